"""The report's token explorer (issue 30): every scored token on its text, with its loss under all-small,
all-big, the out-of-sample fixed@k, the oracle at each budget and each router, and its difficulty; coloured by
any of them, filtered to the hardest tokens or to where a router and the oracle disagree, and each token's
oracle patterns and router routes on hover.

``explorer_data(rd)`` reads the primary oracle's ``per_token.parquet`` and each router's per-token table
(``rundir.router_tokens``; routers evaluated before those were kept are left out), decodes the tokens' text
with the run's tokenizer, and returns a JSON-ready dict; ``explorer_html`` is the section's HTML, the data as
an inline JSON island and the few lines of script that draw it.

Tensor legend (``docs/NOTATION.md``): N scored tokens (the oracle table's row order).
"""

from __future__ import annotations

import numpy as np

from .. import rundir
from ..io import read_table
from .difficulty import context_text, reference_k, token_table
from .page import json_script
from .rundata import RunData

CONTEXT_TOKENS = 6  # input tokens shown with each token in the explorer's table (``difficulty.context_text``)


def _round(x_N: np.ndarray) -> list:
    return [None if not np.isfinite(v) else round(float(v), 3) for v in x_N]


def explorer_data(rd: RunData) -> dict | None:
    """The explorer's data (module docstring), or None for a run without an oracle's per-token table."""
    tab = token_table(rd)
    if tab is None:
        return None
    table = tab["oracle"].per_token()
    cols = table.column_names
    seq_N, pos_N = tab["sequence_N"], tab["position_N"]
    text_N = rd.token_text(tab["target_N"])
    context_N = [context_text(rd, tab, i, CONTEXT_TOKENS) for i in range(len(seq_N))]  # "...inputs [target]"
    row_of = {(int(s), int(p)): i for i, (s, p) in enumerate(zip(seq_N, pos_N))}
    losses = {"all-small": tab["loss_small_N"], "all-big": tab["loss_big_N"]}
    k_ref = reference_k(tab["ks"], rd.n_layers)
    router_ks = sorted({int((r.get("oracle") or {}).get("k")) for r in rd.routers if (r.get("oracle") or {}).get("k")
                        is not None} | {k_ref})
    for k in router_ks:
        if f"fixed_oos_loss_k{k}" in cols:
            losses[f"fixed@{k} (out of sample)"] = table.column(f"fixed_oos_loss_k{k}").to_numpy()
    for j, k in enumerate(tab["ks"]):
        losses[f"oracle@{k}"] = tab["oracle_JN"][j]
    vocab: dict[str, int] = {}
    code = lambda p: vocab.setdefault(p, len(vocab))
    patterns = {f"oracle@{k}": [code(p) for p in table.column(f"best_pattern_k{k}").to_pylist()]
                for k in tab["ks"] if f"best_pattern_k{k}" in cols}
    routers = []
    for r in rd.routers:
        path = rundir.router_tokens(rd.run, r["name"])
        if path is None:
            continue
        t = read_table(path)
        at = [row_of.get((int(s), int(p))) for s, p in zip(t.column("sequence").to_numpy(), t.column("position").to_numpy())]
        loss_N = np.full(len(seq_N), np.nan)
        route_N = [None] * len(seq_N)
        for i, loss, route in zip(at, t.column("loss").to_numpy(), t.column("route").to_pylist()):
            if i is not None:
                loss_N[i], route_N[i] = loss, code(route)
        if any(x is None for x in route_N):
            continue  # evaluated on other tokens than the oracle's
        losses[r["name"]] = loss_N
        patterns[r["name"]] = route_N
        k = (r.get("oracle") or {}).get("k")
        routers.append({"name": r["name"], "oracle": f"oracle@{k}" if f"oracle@{k}" in patterns else None})
    gap_N = tab["loss_small_N"] - tab["oracle_JN"][tab["ks"].index(k_ref)]
    return {"n": len(seq_N), "sequence": seq_N.tolist(), "position": pos_N.tolist(), "text": text_N, "context": context_N,
            "losses": {name: _round(v) for name, v in losses.items()}, "columns": list(losses),  # the order shown
            "difficulty": _round(gap_N), "difficulty_label": f"difficulty (all-small − oracle@{k_ref})",
            "patterns": patterns, "vocab": list(vocab), "routers": routers, "k_ref": k_ref,
            "colour": "all-big"}


# run once the page's own script (analysis/page.py: sortable tables) has, at DOMContentLoaded
EXPLORER_SCRIPT = r"""document.addEventListener('DOMContentLoaded',function(){
var D=JSON.parse(document.getElementById('tx-data').textContent);if(!D)return;
var $=function(id){return document.getElementById(id);};
var cols=D.columns.concat(['difficulty']);
function col(name){return name==='difficulty'?D.difficulty:D.losses[name];}
function label(name){return name==='difficulty'?D.difficulty_label:name;}
function opt(sel,v,t){var o=document.createElement('option');o.value=v;o.textContent=t;sel.appendChild(o);}
cols.forEach(function(c){opt($('tx-colour'),c,label(c));opt($('tx-rank'),c,label(c));});
$('tx-colour').value=D.colour;$('tx-rank').value='all-big';
D.routers.forEach(function(r){opt($('tx-router'),r.name,r.name);});
function range(v){var s=v.filter(function(x){return x!==null;}).sort(function(a,b){return a-b;});
if(!s.length)return[0,1];return[s[Math.floor(0.02*(s.length-1))],s[Math.ceil(0.98*(s.length-1))]];}
function colour(x,lo,hi){if(x===null)return['#eee','#000'];var t=Math.max(0,Math.min(1,(x-lo)/((hi-lo)||1)));
var a=[255,247,214],b=[127,0,0],c=a.map(function(v,i){return Math.round(v+(b[i]-v)*t);});
return['rgb('+c.join(',')+')',t>0.55?'#fff':'#000'];}
function pat(name,i){var p=D.patterns[name];return p&&p[i]!==null?D.vocab[p[i]]:'';}
function hover(i){var s=D.text[i]+'  (sequence '+D.sequence[i]+', position '+D.position[i]+')';
cols.forEach(function(c){var v=col(c)[i];s+='\n'+label(c)+': '+(v===null?'—':v.toFixed(3));});
Object.keys(D.patterns).forEach(function(n){s+='\n'+n+' route: '+pat(n,i);});return s;}
function chosen(){var show=$('tx-show').value,n=Math.max(1,parseInt($('tx-n').value)||20),idx=[];
for(var i=0;i<D.n;i++)idx.push(i);
if(show==='hardest'){var v=col($('tx-rank').value);idx=idx.filter(function(i){return v[i]!==null;});
idx.sort(function(a,b){return v[b]-v[a];});idx=idx.slice(0,n);}
else if(show==='disagree'){var r=D.routers.filter(function(x){return x.name===$('tx-router').value;})[0];
if(r&&r.oracle)idx=idx.filter(function(i){return pat(r.name,i)!==pat(r.oracle,i);});else idx=[];}
return idx;}
function draw(){var c=$('tx-colour').value,v=col(c),rg=range(v),idx=chosen(),keep={};idx.forEach(function(i){keep[i]=1;});
var all=$('tx-show').value==='all',box=$('tx-text');box.textContent='';
for(var i=0;i<D.n;i++){if(i>0&&D.sequence[i]!==D.sequence[i-1])box.appendChild(document.createTextNode('\n\n'));
var sp=document.createElement('span'),cc=colour(v[i],rg[0],rg[1]);sp.textContent=D.text[i].replace(/\n/g,'\u21b5');
sp.style.background=cc[0];sp.style.color=cc[1];sp.title=hover(i);if(!all&&!keep[i])sp.className='dim';box.appendChild(sp);}
var r=$('tx-router').value,oname=(D.routers.filter(function(x){return x.name===r;})[0]||{}).oracle||('oracle@'+D.k_ref);
var head=['sequence','position','context [token]',oname+' pattern',(r||'router')+' route'].concat(cols.map(label));
var t=$('tx-table');t.tHead.innerHTML='';t.tBodies[0].innerHTML='';var hr=t.tHead.insertRow();
head.forEach(function(h){var th=document.createElement('th');th.textContent=h;hr.appendChild(th);});
idx.slice(0,500).forEach(function(i){var tr=t.tBodies[0].insertRow();
var cells=[D.sequence[i],D.position[i],D.context[i].replace(/\n/g,'\u21b5'),
pat(oname,i),r?pat(r,i):''].concat(cols.map(function(c){var x=col(c)[i];return x===null?'—':x.toFixed(3);}));
cells.forEach(function(x,j){var td=tr.insertCell();td.textContent=x;td.className=j===3||j===4?'pat':j===2?'':'num';});
tr.title=hover(i);});
$('tx-count').textContent=idx.length+' of '+D.n+' tokens'+(idx.length>500?' (the table lists the first 500)':'');
window.duoSortable(t);}
['tx-colour','tx-show','tx-n','tx-rank','tx-router'].forEach(function(id){$(id).addEventListener('change',draw);});
$('tx-hardest').addEventListener('click',function(){$('tx-show').value='hardest';$('tx-n').value=20;draw();});
draw();});"""


def explorer_html(data: dict | None) -> str:
    """The explorer's controls, text, table, data and script (empty without data)."""
    if data is None:
        return ""
    router = ('<label>router <select id="tx-router"></select></label>' if data["routers"]
              else '<select id="tx-router" hidden></select>')
    return ('<div class="explorer"><div class="controls">'
            '<label>colour by <select id="tx-colour"></select></label>'
            '<label>show <select id="tx-show"><option value="all">every token</option>'
            '<option value="hardest">the N highest by</option>'
            '<option value="disagree">where the router and the oracle disagree</option></select></label>'
            '<label>N <input id="tx-n" type="number" min="1" value="20" style="width:4.5em"></label>'
            '<label>ranked by <select id="tx-rank"></select></label>' + router
            + '<button id="tx-hardest" type="button">the 20 hardest tokens</button><span id="tx-count"></span></div>'
            '<div id="tx-text" class="toks"></div>'
            '<div class="scroll"><table id="tx-table" class="sortable"><thead></thead><tbody></tbody></table></div></div>'
            + json_script("tx-data", data) + f"<script>{EXPLORER_SCRIPT}</script>")
