"""The report's Stage-1 section (paper section 3.4, Fig. 8), from ``RUN/stage1/evaluation.json``
(``duollm.study.stage1``): Duo against FLOP-matched dense models at every P(big), the big-first ablation,
its finding per P(big) (a between-model claim: seed-to-seed variance is its null) and the figure.

Every number is on the stage's own token set (``eval.max_tokens`` whole validation windows, more than
the oracle's ``study.tokens``: no oracle runs here), resampled by sequence; a multiple-choice item is
built from one window, so items resample with their sequences and every comparison is paired.

Array name legend (``docs/NOTATION.md``): S sequences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import rundir
from ..io import read_json
from ..stats import estimate, finite_round, ppl_interval
from .evidence import gain, ppl_of
from .findings import STAGE1_BIGFIRST, STAGE1_DENSE, Finding, one_part, untested
from .plotting import COLORS, new_figure, png_bytes

DENSE_COLOR = "#1f78b4"

_r = finite_round  # every number rounded as the findings round theirs


def load(run: Path) -> dict | None:
    path = rundir.stage1_evaluation(run)
    return read_json(path) if path.is_file() else None


def _arrays(ev: dict, model: str, label: str, which: str = "trained") -> dict[str, np.ndarray] | None:
    entry = ev["models"].get(model, {}).get(which, {}).get(label)
    if entry is None:
        return None
    return {k: np.asarray(entry[k], dtype=np.float64) for k in ("loss_S", "acc_S", "mc_S")} | {"compute": entry["compute"]}


def _mean_ci(x_S: np.ndarray) -> dict:
    b = estimate(lambda idx: x_S[idx].mean(), len(x_S))
    return {"value": _r(b["value"]), "lo": _r(b["lo"]), "hi": _r(b["hi"])}


def _row(a: dict[str, np.ndarray]) -> dict:
    ci = ppl_interval(a["loss_S"][:, None])
    return {"ppl": _r(ci["ppl"]), "ppl_lo": _r(ci["ppl_lo"]), "ppl_hi": _r(ci["ppl_hi"]), "top1": _mean_ci(a["acc_S"]),
            "mc": _mean_ci(a["mc_S"]), "compute": _r(a["compute"])}


def _gap(a_S: np.ndarray, b_S: np.ndarray) -> dict:
    """Relative perplexity gain of b over a (1 - ppl(b) / ppl(a)), paired over sequences."""
    b = estimate(lambda idx: gain(b_S[idx], a_S[idx]), len(a_S))
    return {"value": _r(b["value"]), "lo": _r(b["lo"]), "hi": _r(b["hi"])}


def section(ev: dict | None) -> dict | None:
    """What results.json keeps: per P(big) the Duo and the dense model, the fixed patterns, the 8c bars."""
    if not ev:
        return None
    rows = []
    for p in ev["p_big"]:
        label = f"p{p:.2f}"
        duo, dense = _arrays(ev, "duo", label), _arrays(ev, f"dense-p{p:.2f}", "p1.00")
        if duo is None or dense is None:
            continue
        rows.append({"p_big": p, "width": ev["widths"][f"{p:.2f}"], "duo": _row(duo), "dense": _row(dense),
                     "dense_gain": _gap(duo["loss_S"], dense["loss_S"])})
    fixed = [{"k": int(k), "pattern": pat, **_row(a)} for k, pat in ev.get("fixed", {}).items()
             if (a := _arrays(ev, "duo", f"fixed-k{k}")) is not None]
    ablation = []
    for p in (0.0, 0.5, 1.0):
        scratch, first = _arrays(ev, "duo", f"p{p:.2f}"), _arrays(ev, "bigfirst", f"p{p:.2f}")
        if scratch is not None and first is not None:
            ablation.append({"p_big": p, "scratch": _row(scratch), "bigfirst": _row(first),
                             "scratch_gain": _gap(first["loss_S"], scratch["loss_S"])})
    models = {name: {k: m[k] for k in ("title", "step", "d_ff_big", "params", "folder")} for name, m in ev["models"].items()}
    return {"tokens": ev["tokens"], "sequences": ev["sequences"], "items": ev["items"], "steps": ev["steps"],
            "draws": ev["draws"], "rows": rows, "fixed": fixed, "ablation": ablation, "models": models}


# ----------------------------------------------------------------------------- findings


def findings(ev: dict | None) -> list[Finding]:
    """The Stage-1 claims: the dense model against the Duo model, one finding per P(big) (no averaging across
    settings: one outlier would decide the mean), and big-first against scratch (Fig. 8c).

    Each is a claim between separately trained models, whose null is seed-to-seed variance (DESIGN 4.4a): an
    interval over evaluation sequences leaves training noise out (a width-392 dense model beat width-512 by
    6%). With ``study.stage1_seeds`` models per arm (at least the registry's ``min_seeds_per_arm``), the effect
    is the mean over seeds of each seed's gain on the stage's tokens and its t-interval is over seeds; with
    fewer, each finding shows its effect with the interval over sequences and stays inconclusive, outside the
    family, saying why."""
    if not ev:
        return []
    S, n_seeds = ev["sequences"], int(ev.get("seeds_per_arm", 1))
    parts = [(STAGE1_DENSE, f"P(big)={p:g}", ("duo", f"p{p:.2f}"), (f"dense-p{p:.2f}", "p1.00"),
              {"dense_width": ev["widths"][f"{p:.2f}"]}) for p in ev["p_big"]]
    parts.append((STAGE1_BIGFIRST, "P(big)=0.5", ("bigfirst", "p0.50"), ("duo", "p0.50"), {}))
    out = []
    for c, ctx, (worse, w_label), (better, b_label), numbers in parts:
        pairs = [(_arrays(ev, rundir.stage1_model_name(worse, i), w_label),
                  _arrays(ev, rundir.stage1_model_name(better, i), b_label))
                 for i in range(n_seeds)]
        if any(a is None or b is None for a, b in pairs):
            out.append(untested(c, "the stage lacks this model", ctx))
            continue
        gain_I = np.array([gain(b["loss_S"], a["loss_S"]) for a, b in pairs])  # one gain per seed
        need = int(dict(c.extra)["min_seeds_per_arm"])
        a, b = pairs[0][0]["loss_S"], pairs[0][1]["loss_S"]
        numbers = {**numbers, "ppl": _r(ppl_of(a)), "ppl_other": _r(ppl_of(b)), "gain_per_seed": [_r(g) for g in gain_I]}
        if n_seeds >= need:  # the null: the spread of the gain across seeds
            f = one_part(c, estimate(lambda idx: float(gain_I[idx].mean()), n_seeds), context=ctx, numbers=numbers,
                         why=f"interval over {n_seeds} seeds per arm (seed-to-seed variance)")
        else:
            f = one_part(c, estimate(lambda idx, a=a, b=b: gain(b[idx], a[idx]), S), context=ctx, numbers=numbers)
            f.why = (f"{n_seeds} model per arm, fewer than the registry's {need}: no seed-to-seed variance, so the "
                     "interval over sequences leaves training noise out (study.stage1_seeds)")
            f.verdict = f.unadjusted_verdict = "inconclusive"
            f.p = f.p_reproduce = f.p_contradict = None
        out.append(f)
    return out


# ----------------------------------------------------------------------------- report tables and figure


def _ppl(r: dict) -> str:
    return f"{r['ppl']:.2f} [{r['ppl_lo']:.2f}, {r['ppl_hi']:.2f}]"


def _acc(d: dict) -> str:
    return f"{d['value']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def _pct(d: dict) -> str:
    return f"{d['value']:+.1%} [{d['lo']:+.1%}, {d['hi']:+.1%}]"


def tables(sec: dict | None) -> list[tuple[str, list[str], list[list[str]]]]:
    if not sec:
        return []
    title = (f"Stage 1 (paper Fig. 8): the Duo model at P(big) (random routing, {sec['draws']} draws) against a dense model "
             f"of the same FLOPs per token, each trained {sec['steps']} steps; {sec['tokens']:,} validation tokens "
             f"({sec['sequences']} sequences) and {sec['items']} multiple-choice items (4 choices, chance 0.25); 95% intervals")
    header = ["P(big)", "compute", "Duo ppl", "dense width", "dense ppl", "dense gain [paired]", "Duo top-1", "dense top-1",
              "Duo choice acc", "dense choice acc"]
    rows = [[f"{r['p_big']:g}", f"{r['duo']['compute']:.2f}", _ppl(r["duo"]), str(r["width"]), _ppl(r["dense"]),
             _pct(r["dense_gain"]), _acc(r["duo"]["top1"]), _acc(r["dense"]["top1"]), _acc(r["duo"]["mc"]),
             _acc(r["dense"]["mc"])] for r in sec["rows"]]
    rows += [[f"fixed@{f['k']}", f"{f['compute']:.2f}", _ppl(f), "—", "—", "—", _acc(f["top1"]), "—", _acc(f["mc"]), "—"]
             for f in sec["fixed"]]
    out = [(title, header, rows)]
    if sec["ablation"]:
        out.append(("Fig. 8c: big modules first (2/3 of the steps all-big, then only the small FFNs trained with random "
                    "routing) against random routing from scratch, same total steps",
                    ["P(big)", "scratch ppl", "big-first ppl", "scratch gain [paired]", "scratch top-1", "big-first top-1"],
                    [[f"{a['p_big']:g}", _ppl(a["scratch"]), _ppl(a["bigfirst"]), _pct(a["scratch_gain"]),
                      _acc(a["scratch"]["top1"]), _acc(a["bigfirst"]["top1"])] for a in sec["ablation"]]))
    return out


def figure(sec: dict | None) -> dict[str, bytes]:
    """``stage1``: perplexity, top-1 and multiple-choice accuracy against compute, Duo and dense, with
    95% intervals; the Fig. 8c bars."""
    if not sec or not sec["rows"]:
        return {}
    fig = new_figure(13.0, 3.0)
    axes = fig.subplots(1, 4)
    rows = sec["rows"]
    for ax, (what, ylabel) in zip(axes[:3], (("ppl", "perplexity"), ("top1", "next-token top-1 accuracy"),
                                            ("mc", "multiple-choice accuracy"))):
        for key, color, name in (("duo", COLORS["random"], "Duo, random routing"), ("dense", DENSE_COLOR, "dense, same FLOPs")):
            xs = [r["duo"]["compute"] for r in rows]
            if what == "ppl":
                ys = [r[key]["ppl"] for r in rows]
                err = [[y - r[key]["ppl_lo"] for y, r in zip(ys, rows)], [r[key]["ppl_hi"] - y for y, r in zip(ys, rows)]]
            else:
                ys = [r[key][what]["value"] for r in rows]
                err = [[y - r[key][what]["lo"] for y, r in zip(ys, rows)], [r[key][what]["hi"] - y for y, r in zip(ys, rows)]]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", ms=3.5, lw=1, elinewidth=0.8, capsize=2, color=color, label=name)
        fixed = sec["fixed"]
        if fixed:
            ys = [f["ppl"] if what == "ppl" else f[what]["value"] for f in fixed]
            ax.plot([f["compute"] for f in fixed], ys, "s", ms=4, color=COLORS["fixed"], label="Duo, fixed@k")
        if what == "mc":
            ax.axhline(0.25, color="#999999", lw=0.8, ls=":", label="chance")
        ax.set_xlabel("compute per token (x all-big)")
        ax.set_ylabel(ylabel)
        for r in rows:
            ax.annotate(f"{r['p_big']:g}", (r["duo"]["compute"], ax.get_ylim()[0]), fontsize=6, ha="center", va="bottom",
                        color="#777777")
    axes[0].set_title("Duo vs dense (P(big) at the bottom)")
    axes[0].legend(frameon=False)
    ax = axes[3]
    ab = sec["ablation"]
    if ab:
        x = np.arange(len(ab))
        for off, key, color, name in ((-0.2, "scratch", COLORS["random"], "random routing from scratch"),
                                      (0.2, "bigfirst", "#7f7f7f", "big first, then small")):
            ys = np.array([a[key]["ppl"] for a in ab])
            err = [ys - [a[key]["ppl_lo"] for a in ab], [a[key]["ppl_hi"] for a in ab] - ys]
            ax.bar(x + off, ys, 0.4, yerr=err, capsize=2, color=color, label=name)
        ax.set_xticks(x, [{0.0: "all-small", 0.5: "P(big)=0.5", 1.0: "all-big"}[a["p_big"]] for a in ab])
        ax.set_ylabel("perplexity")
        ax.set_ylim(0, 1.35 * max(a[k]["ppl_hi"] for a in ab for k in ("scratch", "bigfirst")))
        ax.set_title("Fig. 8c: big modules first")
        ax.legend(frameon=False, loc="upper center")
    else:
        ax.set_visible(False)
    return {"stage1": png_bytes(fig)}
