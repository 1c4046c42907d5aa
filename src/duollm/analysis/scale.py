"""The scale section of the report (issue 29, item 1): the study's key numbers and findings per model size.

A study with ``study.widths`` / ``study.train_tokens`` holds one run folder per size in ``RUN/scale/``
(``study/scale.py``), each a whole study with its own report. This module reads them beside the run's own
numbers, smallest model first, and applies the registry's frozen scale rule (``findings.SCALE_RULE``) to each
finding's effect at the smallest and the largest size. Per size, at the middle budget k = L/2 of the primary
oracle, each with its 95% t-interval over sequences:

    gap_nats          the big-small gap: mean loss all-small - all-big (the difficulty finding's benefit)
    oracle_gain       oracle@k's gain over the out-of-sample fixed@k, nats per token
    count_null_share  the share of oracle@k's gain the count-matched selection null recovers (selection, not
                      compute) at k = L/3 and 2L/3 (at L/2 it is the oracle itself: 1 by construction)
    label_free_share  the best share a label-free oracle recovers (confidence, belief, previous-token), and which
    router_gain       the paper's router minus the out-of-sample fixed@k at its realised budget (relative ppl)
    placement         the big share's slopes over layers at k = L/3 and 2L/3
    rho               Spearman(raw loss, selection-free benefit): the difficulty finding's statistic
"""

from __future__ import annotations

import numpy as np

from .. import rundir
from ..io import read_json
from ..stats import finite_round
from .evidence import view
from .findings import CRITERIA, SCALE_RULE, SCALE_RULE_VERSION, scale_rule_fingerprint, scale_trend
from .plotting import COLORS, new_figure, png_bytes
from .rundata import RunData


def _finding(findings: list[dict], fid: str, context: str | None = "any") -> dict | None:
    return next((f for f in findings if f["id"] == fid and (context == "any" or f["context"] == context)), None)


def _oracle_gain(rd: RunData, k: int) -> dict | None:
    v = view(rd.primary)
    if v is None or not (v.has(f"oracle_loss_k{k}") and v.has(f"fixed_oos_loss_k{k}")):
        return None
    o_S, f_S = v.seq_loss(f"oracle_loss_k{k}"), v.seq_loss(f"fixed_oos_loss_k{k}")
    return finite_round(v.estimate(lambda idx: float(f_S[idx].mean() - o_S[idx].mean())), 5)


def size_row(rd: RunData, res: dict) -> dict:
    """One size's numbers (``res``: its results.json, or the run's own being written)."""
    L, primary = rd.n_layers, (res["oracle"][0]["context"] if res.get("oracle") else None)
    k = L // 2
    gaps = {g["k"]: g for g in res.get("gap") or []}
    gap = gaps.get(k)
    label_free = [(name, gap[name]["recovered"]) for name in ("confidence", "belief", "previous_token")
                  if gap and gap.get(name) and (gap[name].get("recovered") or {}).get("value") is not None]
    best = max(label_free, key=lambda x: x[1]["value"], default=None)
    diff = _finding(res["findings"], "difficulty_not_raw_loss", primary)
    place = _finding(res["findings"], "big_layers_by_budget", primary)
    near = _finding(res["findings"], "routers_near_baselines")
    routers = (near or {}).get("numbers", {}).get("routers") or []
    router = min(routers, key=lambda r: abs(r["k"] - k), default=None)
    m = res["model"]
    return {
        "size": rd.run.name if rd.run.parent.name == rundir.SCALE else f"{rundir.scale_name(m['d_model'], 1)} (this run)",
        "d_model": m["d_model"], "n_heads": m["n_heads"], "d_ff_big": m["d_ff_big"], "d_ff_small": m["d_ff_small"],
        "params": m["params"]["total"], "steps": res["training"]["steps"], "k": k,
        "all_big_ppl": res["oracle"][0]["all_big_ppl"] if res.get("oracle") else None,
        "gap_nats": (diff or {}).get("numbers", {}).get("mean_benefit_nats"),
        "oracle_gain": _oracle_gain(rd, k),
        "count_null_share": {f"k{j}": ((gaps.get(j) or {}).get("count_null") or {}).get("recovered")
                             for j in (round(L / 3), round(2 * L / 3))},
        "label_free_share": best and {"oracle": best[0], **best[1]},
        "router_gain": router and {"router": router["router"], **router["gain_over_oos_fixed"]},
        "placement": {"small_k": place["numbers"]["small"]["slope"], "large_k": place["numbers"]["large"]["slope"]}
        if place and {"small", "large"} <= set(place["numbers"]) else None,
        "rho": diff and diff.get("effect"),
    }


def section(rd: RunData, own: dict) -> dict | None:
    """``results.json``'s ``scale``: every size's row, smallest first, and each finding's trend (None: no
    scale axis, or no other size finished). ``own``: the run's own results (model, training, oracle, gap,
    findings)."""
    runs = [(RunData(p), rundir.report_results(p)) for p in rundir.scale_dirs(rd.run)]
    others = [(r, read_json(path)) for r, path in runs if path.is_file()]
    if not others:
        return None
    sizes = sorted([(rd, own), *others], key=lambda x: (x[1]["model"]["params"]["total"], x[1]["training"]["steps"]))
    rows = [size_row(r, res) for r, res in sizes]
    key = lambda f: (f["id"], f["context"])
    trends = []
    for f in sizes[0][1]["findings"]:
        per_size = [next((g for g in res["findings"] if key(g) == key(f)), None) for _, res in sizes]
        c = CRITERIA.get(f["id"])
        if c is None:
            continue
        ends = scale_trend(c, (per_size[0] or {}).get("effect"), (per_size[-1] or {}).get("effect"))
        trends.append({"id": f["id"], "claim": f["claim"], "context": f["context"],
                       "effects": [g and g.get("effect") for g in per_size],
                       "verdicts": [g and g.get("verdict") for g in per_size], **ends})
    return {"rule": {"version": SCALE_RULE_VERSION, "text": SCALE_RULE, "fingerprint": scale_rule_fingerprint()},
            "sizes": rows, "findings": trends, "same_tokens": _same_tokens([r for r, _ in sizes])}


def _same_tokens(runs: list[RunData]) -> bool:
    """Whether every size's primary oracle scored the same target tokens (the comparison is paired by design)."""
    targets = []
    for r in runs:
        v = view(r.primary)
        if v is None:
            return False
        targets.append(v.table.column("target").to_numpy())
    return all(np.array_equal(targets[0], t) for t in targets[1:])


# ----------------------------------------------------------------------------- the report's tables and figure

# (key, label, unit) of the per-size quantities, in the table's and the figure's order
QUANTITIES = (("gap_nats", "big-small gap", "nats"), ("oracle_gain", "oracle@L/2 over out-of-sample fixed", "nats"),
              ("count_null_share", "count-matched null's share at L/3; 2L/3", "share"),
              ("label_free_share", "best label-free share", "share"),
              ("router_gain", "router vs out-of-sample fixed", "relative ppl"),
              ("rho", "Spearman(raw loss, benefit)", "rho"))


def _ci(e: dict | None, nd: int = 3) -> str:
    if not e or e.get("value") is None:
        return "—"
    lo, hi = e.get("lo"), e.get("hi")
    rng = "" if lo is None or hi is None else f" [{lo:+.{nd}f}, {hi:+.{nd}f}]"
    return f"{e['value']:+.{nd}f}{rng}"


def _cell(row: dict, key: str) -> str:
    v = row[key]
    if key == "count_null_share":
        return "; ".join(_ci(e) for e in v.values())
    return _ci(v) + (f" ({v['oracle']})" if key == "label_free_share" and v else "")


def _points(rows: list[dict], key: str) -> list[tuple[str, list[dict | None]]]:
    """(label, estimate per size) series of a quantity: two for the count null's shares."""
    if key == "count_null_share":
        return [(f"k = {j[1:]}", [r[key].get(j) for r in rows]) for j in rows[0][key]]
    return [("", [r.get(key) for r in rows])]


def tables(sec: dict | None) -> list[tuple[str, list[str], list[list[str]]]]:
    if not sec:
        return []
    same = "" if sec["same_tokens"] else " (WARNING: the sizes scored different tokens)"
    sizes = [[r["size"], f"{r['d_model']} ({r['n_heads']} heads, FFN {r['d_ff_big']} / {r['d_ff_small']})",
              f"{r['params']:,}", f"{r['steps']:,}", "—" if r["all_big_ppl"] is None else f"{r['all_big_ppl']:.2f}",
              *[_cell(r, key) for key, _, _ in QUANTITIES],
              "—" if not r["placement"] else f"{_ci(r['placement']['small_k'])}; {_ci(r['placement']['large_k'])}"]
             for r in sec["sizes"]]
    out = [(f"Scale: the study per model size, smallest first, at k = L/2; 95% t-intervals over sequences{same}",
            ["size", "width", "parameters", "steps", "all-big ppl", *[f"{label} ({unit})" for _, label, unit in QUANTITIES],
             "placement slopes at L/3; 2L/3"], sizes)]
    out.append((f"Scale: each finding's effect per size and its trend (rule version {sec['rule']['version']}, "
                f"fingerprint {sec['rule']['fingerprint']}: {sec['rule']['text']})",
                ["finding", "context", *[r["size"] for r in sec["sizes"]], "largest - smallest [95%]", "trend"],
                [[f["claim"], f["context"] or "—",
                  *[_ci(e) + (f" ({v})" if v else "") for e, v in zip(f["effects"], f["verdicts"])],
                  _ci(f["difference"]), f["trend"] or "not tested"] for f in sec["findings"]]))
    return out


def figure(sec: dict | None) -> dict[str, bytes]:
    """``scale``: each per-size quantity against the parameter count (log axis), with its 95% interval."""
    if not sec:
        return {}
    rows = sec["sizes"]
    fig = new_figure(3.0 * len(QUANTITIES), 2.8)
    axes = fig.subplots(1, len(QUANTITIES))
    x = np.array([r["params"] for r in rows], dtype=float)
    for ax, (key, label, unit) in zip(axes, QUANTITIES):
        for (name, per_size), color in zip(_points(rows, key), (COLORS["oracle"], COLORS["fixed"])):
            pts = [(xi, e) for xi, e in zip(x, per_size) if e and e.get("value") is not None]
            if not pts:
                continue
            xs, es = np.array([p[0] for p in pts]), [p[1] for p in pts]
            ys = np.array([e["value"] for e in es])
            lo = np.array([e["lo"] if e.get("lo") is not None else e["value"] for e in es])
            hi = np.array([e["hi"] if e.get("hi") is not None else e["value"] for e in es])
            ax.errorbar(xs, ys, yerr=[ys - lo, hi - ys], fmt="o-", ms=3.5, lw=1, elinewidth=0.8, capsize=2,
                        color=color, label=name or None)
            if name:
                ax.legend(frameon=False, fontsize=7)
        ax.axhline(0.0, color="#999999", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(unit)
        ax.set_title(label, fontsize=8)
    return {"scale": png_bytes(fig)}


__all__ = ["QUANTITIES", "figure", "section", "size_row", "tables"]
