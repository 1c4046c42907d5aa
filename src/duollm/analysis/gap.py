"""The oracle-router gap, decomposed (issue 13, item 1): how much of it any router could close.

The label oracle picks each token's pattern with the answer in hand. Oracles that cannot see the
next token bound what a router can do: the *confidence* oracle (per token, the pattern with the
highest top-1 probability), the *previous-token* oracle (token t takes token t-1's oracle pattern;
t-1's label is known by then) and the *sequential* oracle (each token chooses given its
predecessors' own choices; ``oracle/sequential.py``). Per budget k of the primary oracle, each of
them and every router at k is reported as the share of the oracle's gain over fixed@k it recovers,
``(fixed - x) / (fixed - oracle)`` in mean loss, with a paired 95% bootstrap interval over sequences
(``stats.recovered_share``; the previous-token oracle on positions 1.., where it is defined).

Array name legend (``docs/NOTATION.md``): S sequences, T positions.
"""

from __future__ import annotations

import numpy as np

from ..stats import budget_weights, finite_round, recovered_share
from .evidence import view
from .rundata import RunData


def _share(d: dict | None) -> dict | None:
    return None if d is None else finite_round(d)


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
        if not v.has(f"fixed_loss_k{k}") or "confidence_recovered" not in b:
            continue
        oracle_ST, fixed_ST = v.loss(f"oracle_loss_k{k}"), v.loss(f"fixed_loss_k{k}")
        if fixed_ST.mean() - oracle_ST.mean() <= 0:  # one candidate (k = 0, L): nothing to recover
            continue
        row = {"k": k, "tokens": rd.primary.summary.get("tokens"), "oracle_ppl": b["oracle_ppl"],
               "fixed_ppl": b["fixed_ppl"], "best_of_100_ppl": b["best_of_100_ppl"],
               "confidence": {"ppl": b["confidence_oracle_ppl"], "recovered": _share(b["confidence_recovered"])},
               "previous_token": {"ppl": b["previous_token_oracle_ppl"], "recovered": _share(b["previous_token_recovered"])},
               "sequential": None, "routers": []}
        if seq is not None and seq.has(f"oracle_loss_k{k}"):
            seq_ST = seq.loss(f"oracle_loss_k{k}")
            row["sequential"] = {"ppl": float(np.exp(seq_ST.mean())),
                                 "recovered": _share(recovered_share(seq_ST, oracle_ST, fixed_ST))}
        for r in rd.routers:
            o = r.get("oracle") or {}
            ps = o.get("per_sequence")
            if o.get("k") != k or not ps or o.get("tokens") != rd.primary.summary.get("tokens"):
                continue  # a router evaluated on other tokens is not comparable
            loss_S1, oracle_S1, fixed_S1 = (np.asarray(ps[key], dtype=np.float64)[:, None]
                                           for key in ("loss", "oracle_loss", "fixed_loss"))
            # its perplexity on the oracle's tokens (its own eval.json may cover more: eval.max_tokens)
            entry = {"name": r["name"], "ppl": o.get("ppl", r.get("ppl")), "big_fraction": r.get("big_fraction")}
            if r.get("labels") == "validation":  # learned from some of these sequences: the held-out share only
                held = o.get("heldout") or {}
                entry.update(ppl=held.get("ppl", r.get("ppl")), recovered=o.get("recovered"),  # the held-out share
                             recovered_matched=None, heldout=True)
            else:
                matched = _at_compute(v, r.get("big_fraction"), r.get("skip_fraction"), rd.n_layers, ps["sequence"])
                entry.update(recovered=_share(recovered_share(loss_S1, oracle_S1, fixed_S1)),
                             recovered_matched=None if matched is None else _share(recovered_share(loss_S1, *matched)))
            row["routers"].append(entry)
        rows.append(row)
    return rows


def _at_compute(v, big_fraction, skip_fraction, n_layers: int, sequences) -> tuple | None:
    """Per-sequence oracle and fixed losses ``[S, 1]`` at a router's *realised* compute: linear in k
    between the two budgets around big_fraction x L (big/small routers: compute is linear in the big
    layers), so a router realising 0.339 big is not credited with the compute it did not save."""
    if big_fraction is None or skip_fraction:
        return None
    k0, w = budget_weights(big_fraction, n_layers)
    cols = [f"{kind}_loss_k{k}" for kind in ("oracle", "fixed") for k in (k0, k0 + 1)]
    if not all(v.has(c) for c in cols):
        return None
    seq = np.asarray(sequences)
    o0, o1, f0, f1 = (v.seq_loss(c)[seq] for c in cols)
    return ((1 - w) * o0 + w * o1)[:, None], ((1 - w) * f0 + w * f1)[:, None]


def _cell(entry: dict | None) -> str:
    """``ppl (share [lo, hi], share at its realised compute)``, whatever of it is defined."""
    if not entry:
        return "—"
    parts = []
    r = entry.get("recovered") or {}
    if r.get("value") is not None:
        parts.append(f"{100 * r['value']:.1f}%" + (f" [{100 * r['lo']:.1f}, {100 * r['hi']:.1f}]" if r.get("lo") is not None
                                                   else ""))
    m = (entry.get("recovered_matched") or {}).get("value")
    if m is not None:
        parts.append(f"{100 * m:.1f}% at its compute {entry['big_fraction']:.3f}")
    held = " on held-out sequences" if entry.get("heldout") else ""
    return f"{entry['ppl']:.2f}" + (f" ({', '.join(parts)}{held})" if parts else "")


def table(rows: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's table (title, header, rows); nothing when the oracle predates the decomposition."""
    if not rows:
        return []
    return [("The oracle-router gap, decomposed: perplexity (share of the oracle's gain over fixed@k recovered "
             f"[paired 95%]) on the primary oracle's {rows[0]['tokens']:,} tokens; label-free oracles cannot see "
             "the next token",
             ["k", "oracle", "confidence oracle", "previous-token oracle", "sequential oracle", "routers", "fixed",
              "best of 100"],
             [[str(r["k"]), f"{r['oracle_ppl']:.2f}", _cell(r["confidence"]), _cell(r["previous_token"]),
               _cell(r["sequential"]), "; ".join(f"{x['name']} {_cell(x)}" for x in r["routers"]) or "—",
               f"{r['fixed_ppl']:.2f}", f"{r['best_of_100_ppl']:.2f}"] for r in rows])]
