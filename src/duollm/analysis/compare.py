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
folders alone; ``--html OUT`` also writes the runs side by side as one page (``html_page``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import rundir
from ..io import atomic_write_text, read_json
from .gap import POLICIES, decomposition
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
        for key, name, _ in POLICIES:  # the decomposition's label-free oracles and the count null
            entry = b[key]
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


def _num(x, nd: int = 3) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _counts(v: dict | None) -> str:
    return "—" if not v else " / ".join(f"{v.get(k, 0)}" for k in ("reproduced", "contradicted", "inconclusive"))


RUN_HEADER = ["run", "steps", "val loss all-big", "all-small", "tokens", "k", "oracle@k", "fixed@k (out of sample)",
              "reproduced / contradicted / inconclusive"]
SHARE_HEADER = ["run", "k", "method", "ppl", "big", "recovered at k [95%]", "at its compute [95%]", "oracle",
                "fixed (out of sample)"]


def run_cells(runs: list[dict]) -> list[list[str]]:
    """The run table's cells (terminal and page alike)."""
    return [[Path(r["run"]).name, str(r["steps"]), _num(r["val_all_big"]), _num(r["val_all_small"]), str(r["tokens"]),
             str(r["k"]), _num(r["oracle_ppl"], 2), _num(r["fixed_ppl"], 2), _counts(r["verdicts"])] for r in runs]


def share_cells(rows: list[dict]) -> list[list[str]]:
    """The shares table's cells (terminal and page alike)."""
    return [[Path(r["run"]).name, str(r["k"]), r["method"], f"{r['ppl']:.2f}", f"{r['big_fraction']:.3f}",
             _share(r["recovered"]), _share(r["recovered_matched"]), f"{r['oracle_ppl']:.2f}", f"{r['fixed_ppl']:.2f}"]
            for r in rows]


def format_table(runs: list[dict], rows: list[dict]) -> str:
    return _table(RUN_HEADER, run_cells(runs)) + "\n\n" + _table(SHARE_HEADER, share_cells(rows))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders with an oracle and routers")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--html", metavar="OUT", default=None,
                        help="also write the runs side by side as one self-contained page OUT (verdicts and effects per "
                             "run, routers' shares, with figures)")


def run_command(args: argparse.Namespace) -> str:
    rows, runs = [], []
    for run in map(Path, args.runs):
        found = rows_of(run)
        if not found:
            raise ValueError(f"{run} has no oracle with the gap decomposition (run `duollm oracle {run}` or `duollm run`)")
        rows += found
        runs.append(run_summary(run))
    if args.html:
        out = Path(args.html)
        if out.is_dir():
            raise ValueError(f"--html {out} is a folder; give the page's file name, e.g. {out / 'compare.html'}")
        atomic_write_text(out, html_page(list(map(Path, args.runs)), runs, rows))
    text = json.dumps({"runs": runs, "routers": rows}, indent=1) if args.json else format_table(runs, rows)
    return text + (f"\n\nwrote {args.html}" if args.html and not args.json else "")


# ----------------------------------------------------------------------------- several runs on one page (issue 30)


def _findings_of(run: Path) -> list[dict]:
    """The findings of a run's report (``results.json``; empty where no report was written)."""
    path = rundir.report_results(run)
    return read_json(path).get("findings") or [] if path.is_file() else []


def _effect_cell(f: dict | None) -> str:
    e = (f or {}).get("effect") or {}
    if e.get("value") is None:
        return "—"
    ci = f" [{e['lo']:+.3f}, {e['hi']:+.3f}]" if e.get("lo") is not None and e.get("hi") is not None else ""
    return f"{e['value']:+.3f}{ci}"


def _label(f: dict) -> str:
    return f["claim"] + (f" [{f['context']}]" if f.get("context") else "")


def html_page(run_dirs: list[Path], runs: list[dict], rows: list[dict]) -> str:
    """The runs side by side: their headline numbers, every finding's verdict and effect per run, and every
    router's and label-free oracle's share per run, with figures of the effects and shares and their intervals."""
    from .figures import fig_compare_findings, fig_compare_shares
    from .page import Section, Table, render_page
    from .plotting import png_bytes

    names = [r.name for r in run_dirs]
    findings = {name: _findings_of(run) for name, run in zip(names, run_dirs)}
    keys = list(dict.fromkeys((f["id"], f.get("context")) for fs in findings.values() for f in fs))
    by = {name: {(f["id"], f.get("context")): f for f in fs} for name, fs in findings.items()}
    finding_rows = []
    for key in keys:
        first = next(by[n][key] for n in names if key in by[n])
        cells = [_label(first)]
        for n in names:
            f = by[n].get(key)
            cells += [_effect_cell(f), (f or {}).get("verdict") or "not tested"]
        finding_rows.append(cells)
    summary = Table("The runs: headline numbers at k = L/2 and their verdict counts", RUN_HEADER, run_cells(runs))
    pngs = {}
    fig = fig_compare_findings(names, [findings[n] for n in names])
    if fig is not None:
        pngs["findings"] = png_bytes(fig)
    fig = fig_compare_shares(rows)
    if fig is not None:
        pngs["shares"] = png_bytes(fig)
    captions = {"findings": "Each finding's effect minus its registry threshold in units of its own standard error, one "
                            "point and 95% interval per run (paper's direction to the right).",
                "shares": "Share of the oracle's gain over the out-of-sample fixed@k each router and label-free oracle "
                          "recovers, with its paired 95% interval, per run and budget."}
    sections = [
        Section("findings", "Findings per run", "Each finding's verdict and effect [95% interval] in every run side by "
                "side: a verdict that differs between seeds or corpora is a property of one model, not of the method.",
                ["findings"], [Table("Findings: effect [95%] and verdict per run", ["finding"] + [
                    x for n in names for x in (f"{n}: effect [95%]", f"{n}: verdict")], finding_rows)]),
        Section("shares", "Routers and label-free oracles per run", "The share of the oracle's gain each policy "
                "recovers, at its budget k and at the compute it realised.", ["shares"],
                [Table("Shares of the oracle's gain over the out-of-sample fixed@k", SHARE_HEADER, share_cells(rows))]),
    ]
    return render_page(f"duollm compare: {', '.join(names)}", [f"{len(names)} runs side by side: " + ", ".join(
        str(r) for r in run_dirs) + "."], summary, sections, pngs, captions, [])
