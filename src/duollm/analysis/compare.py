"""``duollm compare RUN [RUN ...]``: the runs' headline numbers, then every router of every run by one
headline metric (issues 13 and 15).

The run table: steps trained, the last validation losses, the primary oracle's tokens and its oracle@k
and fixed@k at k = L/2, and the report's verdict counts (where the report has been written).

The metric is the share of the oracle's gain over fixed@k a router recovers, ``(fixed - router) /
(fixed - oracle)`` in mean loss with its paired 95% interval over sequences, fixed@k chosen out of
sample (cross-fitted over sequences; ``gap.baseline_column``), on the primary oracle's
tokens and at the router's *realised* compute (fixed and oracle interpolated at its big fraction;
``gap._at_compute``). Beside it, per budget, the ceilings a router can be judged against: the
count-matched selection null and the label-free oracles of ``gap.decomposition``. Read from the run
folders alone; nothing is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import rundir
from ..io import read_json
from .gap import decomposition
from .rundata import RunData, inventory


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
        for name, entry in (("count-matched null", b["count_null"]), ("confidence oracle", b["confidence"]),
                            ("belief oracle", b["belief"]), ("previous-token oracle", b["previous_token"]),
                            ("sequential oracle", b["sequential"])):
            if entry:
                out.append({**base, "method": name, "ppl": entry["ppl"], "big_fraction": b["k"] / rd.n_layers,
                            "recovered": entry["recovered"], "recovered_matched": entry["recovered"]})
        for r in b["routers"]:
            out.append({**base, "method": r["name"], "ppl": r["ppl"], "big_fraction": r["big_fraction"],
                        "recovered": r["recovered"], "recovered_matched": r["recovered_matched"]})
    return out


def run_summary(run: Path) -> dict:
    """One run's headline numbers (the run table)."""
    inv, rd = inventory(run), RunData(run)
    mid = next((b for b in decomposition(rd) if b["k"] == rd.n_layers // 2), {})
    results = rundir.report_results(run)
    verdicts = read_json(results).get("verdicts") if results.is_file() else None
    return {"run": str(run), "steps": inv["trained_steps"], "val_all_big": inv["validation"].get("val/all_big"),
            "val_all_small": inv["validation"].get("val/all_small"), "tokens": mid.get("tokens"), "k": mid.get("k"),
            "oracle_ppl": mid.get("oracle_ppl"), "fixed_ppl": mid.get("fixed_ppl"), "verdicts": verdicts}


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def format_table(runs: list[dict], rows: list[dict]) -> str:
    def num(x, nd=3):
        return "—" if x is None else f"{x:.{nd}f}"

    def counts(v):
        return "—" if not v else " / ".join(f"{v.get(k, 0)}" for k in ("reproduced", "contradicted", "inconclusive"))

    top = _table(["run", "steps", "val loss all-big", "all-small", "tokens", "k", "oracle@k", "fixed@k (out of sample)",
                  "reproduced / contradicted / inconclusive"],
                 [[Path(r["run"]).name, str(r["steps"]), num(r["val_all_big"]), num(r["val_all_small"]), str(r["tokens"]),
                   str(r["k"]), num(r["oracle_ppl"], 2), num(r["fixed_ppl"], 2), counts(r["verdicts"])] for r in runs])
    header = ["run", "k", "method", "ppl", "big", "recovered at k [95%]", "at its compute [95%]", "oracle",
              "fixed (out of sample)"]
    body = [[Path(r["run"]).name, str(r["k"]), r["method"], f"{r['ppl']:.2f}", f"{r['big_fraction']:.3f}",
             _share(r["recovered"]), _share(r["recovered_matched"]), f"{r['oracle_ppl']:.2f}", f"{r['fixed_ppl']:.2f}"]
            for r in rows]
    return top + "\n\n" + _table(header, body)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders with an oracle and routers")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def run_command(args: argparse.Namespace) -> str:
    rows, runs = [], []
    for run in map(Path, args.runs):
        found = rows_of(run)
        if not found:
            raise ValueError(f"{run} has no oracle with the gap decomposition (run `duollm oracle {run}` or `duollm run`)")
        rows += found
        runs.append(run_summary(run))
    return json.dumps({"runs": runs, "routers": rows}, indent=1) if args.json else format_table(runs, rows)
