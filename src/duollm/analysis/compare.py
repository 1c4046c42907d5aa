"""``duollm compare RUN [RUN ...]``: every router of every run by one headline metric (issue 13, item 4).

The metric is the share of the oracle's gain over fixed@k a router recovers, ``(fixed - router) /
(fixed - oracle)`` in mean loss with its paired 95% interval over sequences, on the primary oracle's
tokens and at the router's *realised* compute (fixed and oracle interpolated at its big fraction;
``gap._at_compute``). Beside it, per budget, the ceilings a router can be judged against: the
label-free oracles of ``gap.decomposition``. Read from the run folders alone; nothing is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .gap import decomposition
from .rundata import RunData


def _share(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "—"
    ci = f" [{100 * d['lo']:.1f}, {100 * d['hi']:.1f}]" if d.get("lo") is not None else ""
    return f"{100 * d['value']:.1f}%{ci}"


def rows_of(run: Path) -> list[dict]:
    """One row per (budget, method): the oracles of the decomposition, then the routers."""
    out, rd = [], RunData(run)
    for b in decomposition(rd):
        base = {"run": str(run), "k": b["k"], "tokens": b["tokens"], "oracle_ppl": b["oracle_ppl"], "fixed_ppl": b["fixed_ppl"]}
        for name, entry in (("confidence oracle", b["confidence"]), ("previous-token oracle", b["previous_token"]),
                            ("sequential oracle", b["sequential"])):
            if entry:
                out.append({**base, "method": name, "ppl": entry["ppl"], "big_fraction": b["k"] / rd.n_layers,
                            "recovered": entry["recovered"], "recovered_matched": entry["recovered"]})
        for r in b["routers"]:
            out.append({**base, "method": r["name"], "ppl": r["ppl"], "big_fraction": r["big_fraction"],
                        "recovered": r["recovered"], "recovered_matched": r["recovered_matched"]})
    return out


def format_table(rows: list[dict]) -> str:
    header = ["run", "k", "method", "ppl", "big", "recovered at k [95%]", "at its compute [95%]", "oracle", "fixed"]
    body = [[Path(r["run"]).name, str(r["k"]), r["method"], f"{r['ppl']:.2f}", f"{r['big_fraction']:.3f}",
             _share(r["recovered"]), _share(r["recovered_matched"]), f"{r['oracle_ppl']:.2f}", f"{r['fixed_ppl']:.2f}"]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders with an oracle and routers")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def run_command(args: argparse.Namespace) -> str:
    rows = []
    for run in map(Path, args.runs):
        found = rows_of(run)
        if not found:
            raise ValueError(f"{run} has no oracle with the gap decomposition (run `duollm oracle {run}` or `duollm run`)")
        rows += found
    return json.dumps(rows, indent=1) if args.json else format_table(rows)
