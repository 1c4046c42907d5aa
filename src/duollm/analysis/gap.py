"""The oracle's gain, decomposed (issues 13 and 27): what it is made of, and how much of it any router could close.

**The baseline is out of sample.** fixed@k chosen on the tokens it is scored on is optimistic (the winner's
curse of picking the best of C(L,k) patterns on the same data); every share here is measured against the
cross-fitted fixed@k (``fixed_oos_loss_k*``: chosen on the other sequences, scored on the held-out one), and
the in-sample one is shown labelled optimistic. An oracle written before the engine had it falls back to the
in-sample baseline, and the row says so.

**What the gain is made of** (per budget k; shares of the oracle's gain over the out-of-sample fixed@k):

- *winner's curse*: how much better the in-sample fixed@k looks than the out-of-sample one;
- *selection*: the count-matched null (per token the best of the same number of random candidates, all at
  one fixed compute, L/2) recovers this share without any compute to choose;
- *the label*: oracles that cannot see the next token -- *confidence* (per token, the pattern with the
  highest top-1 probability), *previous-token* (token t takes token t-1's oracle pattern; positions 1..,
  where it is defined, for all three series) and *sequential* (each token chooses given its predecessors'
  own choices) -- recover what a router without the label could;
- routers at k: the share they recover, at k and at their realised compute.

Shares ``(fixed - x) / (fixed - oracle)`` in mean loss with a paired Fieller interval over sequences
(``stats.recovered_share``).

Array name legend (``docs/NOTATION.md``): S sequences, T positions.
"""

from __future__ import annotations

import numpy as np

from ..stats import budget_weights, finite_round, recovered_share
from .evidence import OracleView, view
from .rundata import RunData


def _share(d: dict | None) -> dict | None:
    return None if d is None else finite_round(d)


def baseline_column(v: OracleView, k: int) -> tuple[str, bool] | None:
    """The fixed@k column every share is measured against, and whether it is out of sample."""
    if v.has(f"fixed_oos_loss_k{k}"):
        return f"fixed_oos_loss_k{k}", True
    return (f"fixed_loss_k{k}", False) if v.has(f"fixed_loss_k{k}") else None


def _entry(x_ST, oracle_ST, fixed_ST, groups_S=None) -> dict:
    return {"ppl": float(np.exp(x_ST.mean())),
            "recovered": _share(recovered_share(x_ST, oracle_ST, fixed_ST, groups_S=groups_S))}


def decomposition(rd: RunData) -> list[dict]:
    """One row per budget with a gain to recover (the primary oracle's, exhaustive)."""
    v = view(rd.primary)
    if v is None:
        return []
    seq = view(rd.sequential)
    if seq is not None and not np.array_equal(seq.table.column("target").to_numpy(), v.table.column("target").to_numpy()):
        seq = None  # scored on other tokens (e.g. an oracle rerun with another --max-tokens): not comparable
    rows = []
    for b in rd.primary.budgets:
        k = b["k"]
        found = baseline_column(v, k)
        if found is None:
            continue
        base_col, oos = found
        oracle_ST, fixed_ST = v.loss(f"oracle_loss_k{k}"), v.loss(base_col)
        if fixed_ST.mean() - oracle_ST.mean() <= 0:  # one candidate (k = 0, L): nothing to recover
            continue
        row = {"k": k, "tokens": rd.primary.summary.get("tokens"), "oracle_ppl": b["oracle_ppl"],
               "baseline": "out-of-sample" if oos else "in-sample (optimistic: chosen on these tokens)",
               "fixed_ppl": float(np.exp(fixed_ST.mean())), "fixed_in_sample_ppl": b.get("fixed_ppl"),
               "best_of_100_ppl": b.get("best_of_100_oos_ppl") or b.get("best_of_100_ppl"),
               "best_of_100_in_sample_ppl": b.get("best_of_100_ppl"),
               "winners_curse": None, "count_null": None, "confidence": None, "previous_token": None, "belief": None,
               "sequential": None, "routers": []}
        if oos and v.has(f"fixed_loss_k{k}"):  # nats the in-sample baseline flatters the oracle's competitor
            ins, out = v.seq_loss(f"fixed_loss_k{k}"), v.seq_loss(base_col)
            row["winners_curse"] = _share(v.estimate(lambda idx: float(out[idx].mean() - ins[idx].mean())))
        if v.has(f"count_null_loss_k{k}"):
            row["count_null"] = _entry(v.loss(f"count_null_loss_k{k}"), oracle_ST, fixed_ST, v.groups)
        if v.has(f"confidence_loss_k{k}"):
            row["confidence"] = _entry(v.loss(f"confidence_loss_k{k}"), oracle_ST, fixed_ST, v.groups)
        if v.has(f"belief_loss_k{k}"):  # the pattern closest (KL) to all-big's distribution: the label-free ceiling
            row["belief"] = _entry(v.loss(f"belief_loss_k{k}"), oracle_ST, fixed_ST, v.groups)
        if v.has(f"previous_token_loss_k{k}"):  # defined from position 1 on: all three series there
            row["previous_token"] = _entry(v.loss(f"previous_token_loss_k{k}")[:, 1:], oracle_ST[:, 1:], fixed_ST[:, 1:],
                                           v.groups)
            # its perplexity covers positions 1..: printed with the oracle's and fixed@k's on the same positions
            row["previous_token"].update(positions="1..", oracle_ppl=float(np.exp(oracle_ST[:, 1:].mean())),
                                         fixed_ppl=float(np.exp(fixed_ST[:, 1:].mean())))
        if seq is not None and seq.has(f"oracle_loss_k{k}"):
            row["sequential"] = _entry(seq.loss(f"oracle_loss_k{k}"), oracle_ST, fixed_ST, v.groups)
        for r in rd.routers:
            o = r.get("oracle") or {}
            ps = o.get("per_sequence")
            if o.get("k") != k or not ps or o.get("tokens") != rd.primary.summary.get("tokens"):
                continue  # a router evaluated on other tokens is not comparable
            s = np.asarray(ps["sequence"])
            loss_S1 = np.asarray(ps["loss"], dtype=np.float64)[:, None]
            oracle_S1, fixed_S1 = v.seq_loss(f"oracle_loss_k{k}")[s][:, None], v.seq_loss(base_col)[s][:, None]
            # its perplexity on the oracle's tokens (its own eval.json may cover more: eval.max_tokens)
            entry = {"name": r["name"], "ppl": o.get("ppl", r.get("ppl")), "big_fraction": r.get("big_fraction")}
            if r.get("labels") == "validation":  # learned from some of these sequences: the held-out share only
                held = o.get("heldout") or {}
                entry.update(ppl=held.get("ppl", r.get("ppl")), recovered=o.get("recovered"),  # the held-out share
                             recovered_matched=None, heldout=True)
            else:
                # at its realised compute (a peeking router pays the small FFN everywhere: routers/evaluate.py)
                matched = _at_compute(v, r.get("compute_big_fraction", r.get("big_fraction")), r.get("skip_fraction"),
                                      rd.n_layers, s)
                g_S = None if v.groups is None else v.groups[s]
                entry.update(recovered=_share(recovered_share(loss_S1, oracle_S1, fixed_S1, groups_S=g_S)),
                             recovered_matched=None if matched is None else
                             _share(recovered_share(loss_S1, *matched, groups_S=g_S)),
                             # its share split into its per-token counts and its choice of layers (routers/evaluate.py)
                             count_vs_placement=o.get("count_vs_placement"))
            row["routers"].append(entry)
        rows.append(row)
    return rows


def _at_compute(v: OracleView, big_fraction, skip_fraction, n_layers: int, sequences) -> tuple | None:
    """Per-sequence oracle and baseline losses ``[S, 1]`` at a router's *realised* compute: linear in k
    between the two budgets around big_fraction x L (big/small routers: compute is linear in the big
    layers), so a router realising 0.339 big is not credited with the compute it did not save."""
    if big_fraction is None or skip_fraction:
        return None
    k0, w = budget_weights(big_fraction, n_layers)
    bases = [baseline_column(v, k) for k in (k0, k0 + 1)]
    if any(b is None for b in bases) or not all(v.has(f"oracle_loss_k{k}") for k in (k0, k0 + 1)):
        return None
    seq = np.asarray(sequences)
    o0, o1 = (v.seq_loss(f"oracle_loss_k{k}")[seq] for k in (k0, k0 + 1))
    f0, f1 = (v.seq_loss(b[0])[seq] for b in bases)
    return ((1 - w) * o0 + w * o1)[:, None], ((1 - w) * f0 + w * f1)[:, None]


def made_of(rows: list[dict], n_layers: int) -> str | None:
    """The headline sentence: what the oracle's gain at k = L/2 (or the nearest budget) is made of."""
    if not rows:
        return None
    r = min(rows, key=lambda x: (abs(x["k"] - n_layers / 2), x["k"]))

    def pct(entry):
        rec = (entry or {}).get("recovered") or {}
        if rec.get("value") is None:
            return None
        ci = f" [{100 * rec['lo']:.0f}, {100 * rec['hi']:.0f}]" if rec.get("lo") is not None else ""
        return f"{100 * rec['value']:.0f}%{ci}"

    gain = np.log(r["fixed_ppl"] / r["oracle_ppl"])
    parts = [f"At k = {r['k']}, the oracle gains {gain:.3f} nats per token over the {r['baseline']} fixed pattern"]
    if r["winners_curse"]:
        w = r["winners_curse"]
        parts.append(f"choosing that pattern on the scored tokens would flatter it by {w['value']:.3f} nats "
                     f"[{w['lo']:.3f}, {w['hi']:.3f}] (winner's curse)")
    sides = []  # at k = L/2 the count null is the oracle itself: read it below and above
    for name, pick in (("below", lambda k: k < n_layers / 2), ("above", lambda k: k > n_layers / 2)):
        shares = [o["count_null"]["recovered"]["value"] for o in rows if pick(o["k"]) and o["count_null"]
                  and (o["count_null"]["recovered"] or {}).get("value") is not None]
        if shares:
            sides.append(f"{100 * min(shares):.0f}-{100 * max(shares):.0f}% {name} it")
    if sides:
        parts.append("the best of as many random sub-networks at one fixed compute (L/2 big layers) recovers "
                     f"{' and '.join(sides)} of the oracle's gain over fixed@k (over 100%: selection at L/2 beats the "
                     "oracle's own compute)")
    label = [(n, pct(r.get(key))) for n, key in (("confidence", "confidence"), ("belief", "belief"),
                                                 ("previous-token", "previous_token"), ("sequential", "sequential"))
             if pct(r.get(key))]
    if label:
        parts.append("without the next token's label, " + ", ".join(f"the {n} oracle recovers {p}" for n, p in label))
    return "; ".join(parts) + "."


def _pct(d: dict | None) -> str:
    return "—" if not d or d.get("value") is None else f"{100 * d['value']:.1f}%"


def _interval(d: dict | None) -> str:
    return "—" if not d or d.get("lo") is None or d.get("hi") is None else f"[{100 * d['lo']:.1f}, {100 * d['hi']:.1f}]"


def _row(k: int, policy: str, entry: dict, note: str = "") -> list[str]:
    """One policy at budget k: perplexity, the share of the oracle's gain it recovers with its interval, the share at
    its realised compute, that share split into how many big layers and which, and what it was measured on."""
    split = entry.get("count_vs_placement") or {}
    notes = [note] if note else []
    if entry.get("heldout"):
        notes.append("held-out sequences (labels from the others)")
    if entry.get("positions"):  # not all positions: the yardsticks on the same ones
        notes.append(f"positions {entry['positions']}: oracle {entry['oracle_ppl']:.2f}, fixed {entry['fixed_ppl']:.2f}")
    if entry.get("big_fraction") is not None:
        notes.append(f"big fraction {entry['big_fraction']:.3f}")
    return [str(k), policy, f"{entry['ppl']:.2f}", _pct(entry.get("recovered")), _interval(entry.get("recovered")),
            _pct(entry.get("recovered_matched")), _pct(split.get("how_many")), _pct(split.get("which_layers")),
            "; ".join(notes) or "—"]


POLICIES = (("count_null", "count-matched null", "as many random candidates, all at L/2"),
            ("confidence", "confidence oracle", "no label: the most confident pattern"),
            ("belief", "belief oracle", "no label: the pattern closest (KL) to all-big's"),
            ("previous_token", "previous-token oracle", "no label: token t-1's best pattern"),
            ("sequential", "sequential oracle", "each token given its predecessors' own choices"))


def table(rows: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's table (title, header, rows): one row per budget and policy, each number in its own column;
    nothing when the oracle predates the decomposition."""
    if not rows:
        return []
    out = []
    for r in rows:
        k = str(r["k"])
        fixed = "out of sample" if r["baseline"] == "out-of-sample" else "in sample"
        out.append([k, "oracle", f"{r['oracle_ppl']:.2f}", "100.0%", "—", "—", "—", "—", "the yardstick's top"])
        out.append([k, f"fixed ({fixed})", f"{r['fixed_ppl']:.2f}", "0.0%", "—", "—", "—", "—", "the yardstick's bottom"])
        if r["fixed_in_sample_ppl"] is not None and r["baseline"] == "out-of-sample":
            out.append([k, "fixed (in sample, optimistic)", f"{r['fixed_in_sample_ppl']:.2f}", "—", "—", "—", "—", "—",
                        "chosen on the scored tokens"])
        out += [_row(r["k"], name, r[key], note) for key, name, note in POLICIES if r.get(key)]
        out += [_row(r["k"], f"router {x['name']}", x) for x in r["routers"]]
        if r["best_of_100_ppl"] is not None:
            out.append([k, "best of 100 random patterns", f"{r['best_of_100_ppl']:.2f}", "—", "—", "—", "—", "—", "—"])
    return [("The oracle's gain, decomposed: each policy's perplexity and the share of the oracle's gain over the "
             f"out-of-sample fixed@k it recovers [paired 95%], on the primary oracle's {rows[0]['tokens']:,} tokens",
             ["k", "policy", "perplexity", "share recovered", "[95%]", "share at its realised compute",
              "how many big layers", "which layers", "measured on"], out)]
