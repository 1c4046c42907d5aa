"""The HTML page of a study or of several runs side by side (issue 30): one self-contained file.

A page has a spine: a title and what was run, a short summary table beside a table of contents, links to
the data files, then one ``Section`` after another, each with its reading (one paragraph), its figures
beside its tables, and whatever else it carries (the token explorer). Tables sort on a click of their
header and filter as one types; the few lines of script that do it, and the explorer's, are inline: no
network, no CDN, and the page is a function of its inputs (regenerated bit for bit from the run folder).

``analysis/report.py`` (one run) and ``analysis/compare.py`` (``duollm compare --html``) build the
sections; this module only renders them.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field

VERDICT_CLASSES = {"reproduced": "reproduced", "contradicted": "contradicted", "inconclusive": "inconclusive",
                   "not tested": "not-tested", "holds": "reproduced", "grows": "reproduced", "shrinks": "inconclusive",
                   "flips": "contradicted"}


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    id: str  # the anchor
    title: str
    reading: str = ""  # one paragraph: what the section shows and how to read it
    figures: list[str] = field(default_factory=list)  # names of the page's PNGs shown beside the tables
    tables: list[Table] = field(default_factory=list)
    html: str = ""  # anything else (already HTML), below the tables: the token explorer, coloured text


CSS = """body{font-family:system-ui,sans-serif;max-width:1500px;margin:1.2em auto;padding:0 1em;color:#222}
h1{margin:0.2em 0 0.3em;font-size:1.6em}h2{margin:1.6em 0 0.3em;border-bottom:1px solid #ddd;padding-bottom:0.15em}
h3{font-size:0.95em;margin:0.6em 0 0.2em}p{max-width:75em;line-height:1.4}
.top{display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap}.top>.summary{flex:1 1 760px;min-width:0}
nav.toc{flex:0 0 250px;font-size:0.88em;border-left:3px solid #ddd;padding-left:0.8em}
nav.toc ol{margin:0.3em 0;padding-left:1.3em}
nav.toc li{margin:0.12em 0}.links{font-size:0.88em;color:#555}.links a{margin-right:0.9em}
.pair{display:flex;flex-wrap:wrap;gap:1.2em;align-items:flex-start}
.pair>.figs{flex:1 1 520px;max-width:680px;min-width:0;position:sticky;top:0.3em}
.pair>.tables{flex:1 1 520px;min-width:0;overflow-x:auto}.tables.wide{overflow-x:auto}
.tables td:first-child{min-width:11em}
figure{margin:0 0 1em}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:0.84em;color:#555}
table{border-collapse:collapse;margin:0.2em 0 1.2em;font-size:0.84em}
td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}
th{background:#f3f3f3;cursor:pointer;user-select:none;white-space:nowrap}th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.tcap{font-size:0.9em;font-weight:600;margin:0.6em 0 0.1em}.tcap input{margin-left:0.6em;font-weight:normal;font-size:0.9em}
.reproduced{color:#1a7f37;font-weight:600}.contradicted{color:#b42318;font-weight:600}.inconclusive{color:#9a6700}
.not-tested{color:#777}.banner{color:#b42318;font-weight:600}
.toks{font-family:monospace;white-space:pre-wrap;line-height:1.75;margin:0.3em 0;font-size:0.86em}
.toks b{display:inline-block;width:7em}.toks span{border-radius:2px}.toks span.dim{opacity:0.18}
.explorer .controls{display:flex;flex-wrap:wrap;gap:0.9em;align-items:center;font-size:0.88em;margin:0.4em 0}
.explorer #tx-text{max-height:26em;overflow-y:auto;border:1px solid #ddd;padding:0.4em}
.explorer .pat{font-family:monospace}.scroll{overflow-x:auto}"""

# sortable and filterable tables: a click on a header sorts by that column (numbers by value: the first number in
# the cell), a second click reverses; the box above a table keeps the rows whose text contains what is typed
SCRIPT = r"""(function(){
function num(t){t=t.replace(/\u2212/g,'-').replace(/,/g,'');
var m=t.match(/^\s*[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?/i);return m?parseFloat(m[0]):NaN;}
function sortable(tb){var hr=tb.tHead&&tb.tHead.rows[0],ths=hr?hr.cells:[];Array.prototype.forEach.call(ths,function(th,i){
th.addEventListener('click',function(){var asc=th.getAttribute('aria-sort')!=='ascending';
Array.prototype.forEach.call(ths,function(h){h.removeAttribute('aria-sort');});th.setAttribute('aria-sort',asc?'ascending':'descending');
var body=tb.tBodies[0],rows=Array.prototype.slice.call(body.rows);rows.sort(function(a,b){
var x=a.cells[i]?a.cells[i].textContent:'',y=b.cells[i]?b.cells[i].textContent:'',
nx=num(x),ny=num(y),c;
if(!isNaN(nx)&&!isNaN(ny))c=nx-ny;else if(isNaN(nx)!==isNaN(ny))return isNaN(nx)?1:-1;else c=x.localeCompare(y);
return asc?c:-c;});rows.forEach(function(r){body.appendChild(r);});});});}
window.duoSortable=sortable;
document.querySelectorAll('table.sortable').forEach(sortable);
document.querySelectorAll('input.filter').forEach(function(inp){var tb=document.getElementById(inp.dataset.table);
inp.addEventListener('input',function(){var q=inp.value.toLowerCase();Array.prototype.forEach.call(tb.tBodies[0].rows,
function(r){r.hidden=!!q&&r.textContent.toLowerCase().indexOf(q)<0;});});});
})();"""


def _is_number(cell: str) -> bool:
    t = cell.strip().replace("\u2212", "-").replace(",", "").lstrip("+-")
    return bool(t) and (t[0].isdigit() or (t[0] == "." and t[1:2].isdigit()))


def table_html(t: Table, table_id: str) -> str:
    e = html.escape
    parts = [f'<div class="tcap">{e(t.title)}<input type="search" class="filter" data-table="{table_id}" '
             f'placeholder="filter rows" aria-label="filter the rows of this table"></div>',
             f'<table class="sortable" id="{table_id}">']
    if any(t.header):
        parts.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr></thead>")
    parts.append("<tbody>")
    for row in t.rows:
        cells = []
        for cell in row:
            cls = VERDICT_CLASSES.get(cell.split(" (")[0]) or ("num" if _is_number(cell) else None)
            cells.append(f'<td class="{cls}">{e(cell)}</td>' if cls else f"<td>{e(cell)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def figure_html(name: str, png: bytes, caption: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<figure id="fig-{name}"><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_page(title: str, intro: list[str], summary: Table | None, sections: list[Section], pngs: dict[str, bytes],
                captions: dict[str, str], links: list[tuple[str, str]], banner: str | None = None) -> str:
    """The whole page. ``intro``: paragraphs of plain text; ``links``: (label, relative path) of the data files."""
    e = html.escape
    sections = [s for s in sections if s.tables or s.html or any(name in pngs for name in s.figures)]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(title)}</title><style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    parts += [f"<p>{e(p)}</p>" for p in intro]
    if banner:
        parts.append(f'<p class="banner">{e(banner)}</p>')
    if links:
        parts.append('<p class="links">Data: ' + "".join(f'<a href="{e(href)}">{e(label)}</a>' for label, href in links)
                     + "</p>")
    toc = "".join(f'<li><a href="#{s.id}">{e(s.title)}</a></li>' for s in sections)
    parts.append('<div class="top"><div class="summary">' + (table_html(summary, "summary-table") if summary else "")
                 + f'</div><nav class="toc"><b>Contents</b><ol>{toc}</ol></nav></div>')
    n = 0
    for s in sections:
        parts.append(f'<section id="{s.id}"><h2>{e(s.title)}</h2>')
        if s.reading:
            parts.append(f'<p class="reading">{e(s.reading)}</p>')
        figs = "".join(figure_html(name, pngs[name], captions.get(name, name)) for name in s.figures if name in pngs)
        tables = []
        for t in s.tables:
            n += 1
            tables.append(table_html(t, f"t{n}"))
        if figs:
            parts.append(f'<div class="pair"><div class="figs">{figs}</div><div class="tables">{"".join(tables)}</div></div>')
        elif tables:
            parts.append(f'<div class="tables wide">{"".join(tables)}</div>')
        if s.html:
            parts.append(s.html)
        parts.append("</section>")
    parts.append(f"<script>{SCRIPT}</script>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def json_script(element_id: str, data) -> str:
    """``data`` as an inline JSON island a script reads (``</`` escaped so the text cannot close the element)."""
    text = json.dumps(data, separators=(",", ":"), sort_keys=True, allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'
