"""The paper's figures, each a function of the run folder alone (DESIGN 4.4, issue 5).

Every ``fig_*`` takes a run folder (or a ``RunData``) and returns a matplotlib ``Figure``, or
None when the run lacks the outputs it needs (no routers, no skip study, ...), so a report
simply leaves that figure out. Figures are built on ``matplotlib.figure.Figure`` with the Agg
renderer and never touch pyplot's global state; ``png_bytes`` strips the PNG metadata that
would name the matplotlib version, so the same run folder renders the same bytes.

    training            training and validation losses by step (``metrics.jsonl``)
    ppl_vs_budget       perplexity vs big-layer budget k: oracle (each context), fixed, best of
                        100 random, random mean, routers, all-small, all-big; compute on top
    oracle_usage        layer x position share of big for the oracle at a small, middle and large
                        budget (paper fig. 3-4), and of skip for the skip study (fig. 5)
    router_usage        the same for every router next to the oracle at its budget (fig. 3d), skip too
    router_routes       every layer's route for every token of one sequence, per router (fig. 7)
    position_budgets    budgets that fall, rise or stay constant along the sequence (section 4.2)
    token_losses        per-token loss all-small / all-big / oracle and the gap on real text
    difficulty_ranking  tokens ranked by difficulty gap vs by raw small-model loss
    skip_vs_early_exit  the oracle's skip patterns next to what early exit would choose

Array name legend: L layers, T positions, J budgets, R routes (skip, small, big), N tokens.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib.ticker
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .. import rundir
from ..io import read_json, read_json_lines
from ..model.routing import BIG, SKIP
from ..oracle.reductions import linear_schedule
from ..stats import ppl_interval
from .difficulty import rankdata, reference_k, summarize, token_table
from .plotting import COLORS, as_rundata, heatmap, new_figure, png_bytes, styled, visible
from .rundata import RunData, early_exit_pattern, reference_budgets

# ----------------------------------------------------------------------------- perplexity vs budget


@styled
def fig_ppl_vs_budget(rd: RunData) -> Figure | None:
    """Perplexity vs big-layer budget (paper fig. 2): oracle per context and the baselines, routers
    as points at their realised budget; the top axis gives compute relative to all-big."""
    sweeps = rd.sweeps
    if not sweeps:
        return None
    fig = new_figure(7.0, 5.2)
    ax = fig.subplots()
    primary = rd.primary
    ks = np.array(primary.ks)
    col = lambda key, o=primary: np.array([b.get(key) if b.get(key) is not None else np.nan for b in o.budgets], float)
    for i, (ctx, o) in enumerate(sweeps.items()):
        ax.plot(o.ks, col("oracle_ppl", o), marker="o", ms=3, color=COLORS["oracle"], ls="-" if i == 0 else "--",
                label=f"oracle, {o.label}")
        lo, hi = col("oracle_ppl_lo", o), col("oracle_ppl_hi", o)
        if np.isfinite(lo).any():  # the 95% t-interval over sequences (stats.py)
            ax.fill_between(o.ks, lo, hi, color=COLORS["oracle"], alpha=0.15 if i == 0 else 0.08, lw=0)
    if np.isfinite(col("fixed_oos_ppl")).any():  # the honest baseline: chosen on the other sequences
        ax.plot(ks, col("fixed_oos_ppl"), "-s", ms=3, color=COLORS["fixed"], label="fixed, out of sample")
        ax.plot(ks, col("fixed_ppl"), ":", lw=1, color=COLORS["fixed"], label="fixed, in sample (optimistic)")
    else:
        ax.plot(ks, col("fixed_ppl"), "-s", ms=3, color=COLORS["fixed"], label="fixed (best single pattern)")
    null = col("count_null_ppl")
    if np.isfinite(null).any():  # selection without compute: as many random candidates, all at L/2
        ax.plot(ks, null, "-", lw=1.2, color="#7b3294", label="count-matched null (same count, compute L/2)")
        lo, hi = col("count_null_ppl_lo"), col("count_null_ppl_hi")
        if np.isfinite(lo).any():
            ax.fill_between(ks, lo, hi, color="#7b3294", alpha=0.1, lw=0)
    for n0, ls in zip(sorted({int(n) for b in primary.budgets for n in (b.get("equal_count_ppl") or {})}), ("-.", "--")):
        eq = np.array([np.nan if (x := (b.get("equal_count_ppl") or {}).get(str(n0))) is None else x
                       for b in primary.budgets], float)
        ax.plot(ks, eq, ls, marker=".", ms=4, lw=1, color="#e66101", label=f"oracle at equal count ({n0} candidates)")
    # open markers on a dashed line: where best of 100 equals fixed (it often holds the fixed pattern) both show
    ax.plot(ks, col("best_of_100_ppl"), "--^", ms=5, mfc="none", color=COLORS["best_of_100"],
            label="best of 100 random patterns")
    ax.plot(ks, col("random_mean_ppl"), ":", color=COLORS["random"], label="random pattern (mean)")
    s = primary.summary
    ax.axhline(s["all_small_ppl"], color=COLORS["all_small"], ls="-.", lw=1, label=f"all small ({s['all_small_ppl']:.2f})")
    ax.axhline(s["all_big_ppl"], color=COLORS["all_big"], ls="--", lw=1, label=f"all big ({s['all_big_ppl']:.2f})")
    L = rd.n_layers
    # each router on the oracle's tokens (its eval.json may cover more: eval.max_tokens), like the curves
    on_oracle = [{**r, **{k: r["oracle"][k] for k in ("ppl", "ppl_lo", "ppl_hi") if k in r["oracle"]}}
                 for r in rd.routers if (r.get("oracle") or {}).get("tokens") == s["tokens"]]
    for method in sorted({r.get("method") for r in on_oracle}):
        rs = [r for r in on_oracle if r.get("method") == method]
        ax.scatter([r["big_fraction"] * L for r in rs], [r["ppl"] for r in rs], marker="D", s=28, zorder=5,
                   color=COLORS.get(method, "#333333"), edgecolor="black", lw=0.5, label=f"router: {method}")
        with_ci = [r for r in rs if r.get("ppl_lo") is not None]
        if with_ci:
            ax.errorbar([r["big_fraction"] * L for r in with_ci], [r["ppl"] for r in with_ci],
                        yerr=[[r["ppl"] - r["ppl_lo"] for r in with_ci], [r["ppl_hi"] - r["ppl"] for r in with_ci]],
                        fmt="none", ecolor=COLORS.get(method, "#333333"), lw=0.8, capsize=2, zorder=4)
    ax.set_xlabel("budget k (big layers per token)")
    ax.set_ylabel("perplexity")
    ax.set_xticks(range(0, L + 1, max(1, L // 12)))
    fig.suptitle(f"Perplexity vs budget ({s['tokens']:,} tokens; bands, bars: 95% intervals over sequences)")
    comp = col("fixed_compute")
    ok = np.isfinite(comp)
    if ok.sum() >= 2:  # compute is affine in k for big/small patterns
        slope, icpt = np.polyfit(ks[ok], comp[ok], 1)
        top = ax.secondary_xaxis("top", functions=(lambda k: icpt + slope * k, lambda c: (c - icpt) / slope))
        top.set_xlabel("compute relative to all-big")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=3, frameon=False)  # below: never on a line
    return fig


@styled
def fig_training(rd: RunData) -> Figure | None:
    """The training curve from ``metrics.jsonl``: training loss and the validation losses (all-big,
    all-small, random routing) by step."""
    rows = read_json_lines(rundir.metrics_path(rd.run)) if rundir.metrics_path(rd.run).is_file() else []
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    if not train:
        return None
    fig = new_figure(6.0, 3.2)
    ax = fig.subplots()
    ax.plot(*zip(*train), color="0.6", lw=1, label="training loss (random routing)")
    for key, color in (("val/all_big", COLORS["all_big"]), ("val/all_small", COLORS["all_small"]),
                       ("val/random", COLORS["random"])):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, color=color, label=f"validation, {key[4:].replace('_', '-')}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("Training")
    ax.legend(frameon=False)
    return fig


# ----------------------------------------------------------------------------- usage heatmaps


@styled
def fig_oracle_usage(rd: RunData) -> Figure | None:
    """Share of tokens taking big at each layer and position, for the oracle at a small, middle and
    large budget (one row per context), and the share skipping in the skip study."""
    sweeps = rd.sweeps
    skip = rd.skip_study
    if not sweeps and skip is None:
        return None
    budgets = reference_budgets(rd.n_layers)
    rows = max(1, len(sweeps))
    cols = 3 + (skip is not None)
    fig = new_figure(2.6 * cols + 0.6, 2.2 * rows + 0.3)
    axes = np.array(fig.subplots(rows, cols, squeeze=False))
    im = None
    for r, (ctx, o) in enumerate(sweeps.items()):
        usage_JRLT = o.usage_JRLT()
        for c, (which, k) in enumerate(budgets.items()):
            ax = axes[r, c]
            if usage_JRLT is None or k not in o.ks:
                ax.set_axis_off()
                continue
            im = heatmap(ax, usage_JRLT[o.ks.index(k), BIG], f"oracle {o.context}, k={k} ({which}): big")
            ax.set_ylabel("layer")
    if skip is not None:
        usage_JRLT = skip.usage_JRLT()
        ax = axes[0, cols - 1]
        if usage_JRLT is not None:
            im_skip = heatmap(ax, usage_JRLT[0, SKIP], f"skip study, {skip.summary['skips']} skips: skipped")
            im = im or im_skip
        for r in range(1, rows):
            axes[r, cols - 1].set_axis_off()
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="share of tokens taking the route")
    return fig


def router_label(r: dict) -> str:
    """A router's row in the figures: its method, and its options where they allow skip."""
    opts = r.get("options", "SB")
    return r["method"] if opts == "SB" else f"{r['method']} {opts}"


@styled
def fig_router_usage(rd: RunData) -> Figure | None:
    """Share of tokens each router sends to big (and, where it may skip, to skip), by layer and
    position, next to the oracle at the same budget (top row; paper fig. 3d)."""
    routers = [r for r in rd.routers if r.get("per_position_big")]
    if not routers:
        return None
    targets = sorted({round(float(r["target"]), 4) for r in routers})
    rows_of = sorted({(router_label(r), kind) for r in routers
                      for kind in (("big", "skip") if r.get("options", "SB") != "SB" else ("big",))})
    primary = rd.primary
    usage_JRLT = primary.usage_JRLT() if primary is not None else None
    L = rd.n_layers
    rows = len(rows_of) + (usage_JRLT is not None)
    fig = new_figure(max(5.0, 3.0 * len(targets) + 0.6), 2.0 * rows + 0.3)
    axes = np.array(fig.subplots(rows, len(targets), squeeze=False))
    im = None
    for c, target in enumerate(targets):
        k = round(target * L)
        r0 = 0
        if usage_JRLT is not None:
            r0 = 1
            if k in primary.ks:
                im = heatmap(axes[0, c], usage_JRLT[primary.ks.index(k), BIG], f"oracle ({primary.context}), k={k}")
            else:
                axes[0, c].set_axis_off()
        for r, (label, kind) in enumerate(rows_of):
            ax = axes[r0 + r, c]
            found = [x for x in routers if router_label(x) == label and round(float(x["target"]), 4) == target]
            if not found:
                ax.set_axis_off()
                continue
            x = found[0]
            share = x["per_position_big"] if kind == "big" else x["per_position_skip"]
            frac = x["big_fraction"] if kind == "big" else x["skip_fraction"]
            im = heatmap(ax, np.array(share), f"{label}, k={k}: {kind} ({frac:.2f})")
        axes[0, c].set_ylabel("layer")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="share of tokens on big (or skip)")
    return fig


ROUTE_COLORS = ["#f2f2f2", "#9ecae1", "#08306b"]  # skip, small, big


@styled
def fig_router_routes(rd: RunData, n_tokens: int = 48) -> Figure | None:
    """Every layer's route for the first ``n_tokens`` tokens of the first evaluation sequence, per router, under
    the tokens' text: skip, small or big (paper fig. 7)."""
    routers = [r for r in rd.routers if r.get("example_routes")]
    if not routers:
        return None
    tab = token_table(rd)
    labels = None
    if tab is not None:  # the inputs of sequence 0 in position order: what each route was decided on
        rows = np.flatnonzero(tab["sequence_N"] == 0)
        rows = rows[np.argsort(tab["position_N"][rows])][:n_tokens]
        labels = [visible(t) for t in rd.token_text(tab["token_N"][rows])]
    fig = new_figure(9.0, 1.05 * len(routers) + 1.4)
    axes = np.atleast_1d(fig.subplots(len(routers), 1, squeeze=False, sharex=True)[:, 0])
    for ax, r in zip(axes, routers):
        route_LT = np.asarray(r["example_routes"])[:, :n_tokens]
        ax.imshow(route_LT, aspect="auto", origin="lower", cmap=ListedColormap(ROUTE_COLORS), vmin=-0.5, vmax=2.5,
                  interpolation="nearest", extent=(-0.5, route_LT.shape[1] - 0.5, 0.5, route_LT.shape[0] + 0.5))
        ax.set_title(f"{r['name']} (big {r['big_fraction']:.2f}, skip {r['skip_fraction']:.2f})", loc="left", fontsize=8)
        ax.set_ylabel("layer", fontsize=7)
    if labels:
        axes[-1].set_xticks(range(len(labels)), labels, rotation=90, fontsize=6.5, family="monospace")
    else:
        axes[-1].set_xlabel("position in the first evaluation sequence")
    fig.legend(handles=[Patch(color=c, label=n) for c, n in zip(ROUTE_COLORS, ("skip", "small", "big"))],
               loc="upper right", ncol=3, frameon=False)
    return fig


@styled
def fig_router_training(rd: RunData) -> Figure | None:
    """How each router trained: its training loss by step (``metrics.jsonl``, one panel per method: the methods'
    losses have their own units), and the DAgger routers' held-out loss by round (``dagger.json``)."""
    curves: dict[str, list] = {}
    rounds = []
    for r in rd.routers:
        folder = rundir.router_dir(rd.run, r["name"])
        path = rundir.metrics_path(folder)  # the training loop's, in the router's folder
        pts = [(x["step"], x["train/loss"]) for x in read_json_lines(path) if "train/loss" in x] if path.is_file() else []
        if pts:
            curves.setdefault(str(r.get("method")), []).append((r["name"], pts))
        dagger = folder / rundir.ROUTER_DAGGER / rundir.DAGGER_RECORD
        if dagger.is_file():
            rec = read_json(dagger)
            pts = [(-1, rec["start"]["heldout_loss"])] + [(x["round"], x["heldout_loss"]) for x in rec.get("rounds", [])]
            rounds.append((r["name"], pts))
    panels = len(curves) + bool(rounds)
    if not panels:
        return None
    cols = min(4, panels)
    rows_n = -(-panels // cols)
    fig = new_figure(3.1 * cols, 2.6 * rows_n + 0.3)
    axes = np.atleast_1d(fig.subplots(rows_n, cols, squeeze=False).ravel())
    for ax, (method, lines) in zip(axes, sorted(curves.items())):
        for name, pts in lines:
            ax.plot(*zip(*pts), lw=1, marker="o" if len(pts) < 5 else None, ms=3, label=name.removeprefix(method + "-"))
        ax.set_title(f"{method}: training loss", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.legend(frameon=False, fontsize=6, title="target", title_fontsize=6)
    if rounds:
        ax = axes[len(curves)]
        for name, pts in rounds:
            ax.plot(*zip(*pts), "o-", ms=3, lw=1, label=name)
        ax.set_xticks(sorted({x for _, pts in rounds for x, _ in pts}))
        ax.set_xticklabels(["start" if x < 0 else str(x) for x in ax.get_xticks()])
        ax.set_title("DAgger: held-out loss by round", fontsize=8)
        ax.set_xlabel("round", fontsize=7)
        ax.set_ylabel("LM loss (nats)", fontsize=7)
        ax.legend(frameon=False, fontsize=6)
    for ax in axes[panels:]:
        ax.set_axis_off()
    return fig


# ----------------------------------------------------------------------------- position-varying budgets


@styled
def fig_position_budgets(rd: RunData) -> Figure | None:
    """Oracle perplexity when the budget falls, rises or stays constant along the sequence, at the
    same mean budget (paper section 4.2: 6 -> 2, 2 -> 6, constant 4 for L = 12), per context with the
    sequential oracle last; bars carry the 95% interval, dots the per-token prediction Σ w_k·oracle@k."""
    oracles = {o.label: o for o in [*rd.sweeps.values(), *([rd.sequential] if rd.sequential else [])]}
    entries = {label: o.summary.get("position_budgets") or [] for label, o in oracles.items()}
    entries = {label: e for label, e in entries.items() if e}
    if not entries:
        return None
    T = int(rd.primary.summary.get("seq_len") or rd.config.train.seq_len)
    fig = new_figure(7.5, 3.4)
    ax_s, ax_p = fig.subplots(1, 2, width_ratios=[1, 1.2])
    first = next(iter(entries.values()))
    for e in first:
        start, stop = (int(x) for x in e["schedule"].split("->"))
        ax_s.plot(np.arange(T), linear_schedule(start, stop, T), drawstyle="steps-mid", label=f"{e['name']} {e['schedule']}")
    ax_s.set_xlabel("position")
    ax_s.set_ylabel("budget k")
    ax_s.set_title("Budget along the sequence")
    ax_s.legend()
    names = [e["name"] for e in first]
    width = 0.8 / len(entries)
    for i, (label, es) in enumerate(entries.items()):
        by = {e["name"]: e for e in es}
        xs = np.arange(len(names)) + (i - (len(entries) - 1) / 2) * width
        vals = np.array([by[n]["oracle_ppl"] if n in by else np.nan for n in names])
        lo_, hi_ = (np.array([by[n].get(f"oracle_ppl_{s}", np.nan) if n in by else np.nan for n in names]) for s in ("lo", "hi"))
        # points, not bars: the axis is zoomed to the differences, and a bar's length would claim a zero
        yerr = [vals - lo_, hi_ - vals] if np.isfinite(lo_).all() else None  # the t-interval over sequences
        ax_p.errorbar(xs, vals, yerr=yerr, fmt="o", ms=4, elinewidth=0.8, capsize=2, label=f"oracle, {label}")
        pred = np.array([by[n].get("predicted_ppl") or np.nan if n in by else np.nan for n in names])
        ax_p.plot(xs, pred, "kx", markersize=4, label="Σ w_k·oracle@k" if i == 0 else None)
        for x, v in zip(xs, vals):
            ax_p.annotate(f"{v:.2f}", (x, v), textcoords="offset points", xytext=(4, 0), fontsize=6.5, va="center")
    ax_p.set_xticks(range(len(names)), names)
    ax_p.set_ylabel("oracle perplexity")
    # the axis holds every interval, so differences look as large as they are against the uncertainty
    lo = min(e.get("oracle_ppl_lo", e["oracle_ppl"]) for es in entries.values() for e in es)
    hi = max(e.get("oracle_ppl_hi", e["oracle_ppl"]) for es in entries.values() for e in es)
    ax_p.set_ylim(lo - 0.05 * (hi - lo + 1e-9) - 1e-3 * lo, hi + 0.05 * (hi - lo + 1e-9) + 1e-3 * hi)
    ax_p.set_title("Same mean budget, different shapes")
    ax_p.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=3, frameon=False)
    return fig


# ----------------------------------------------------------------------------- tokens


def sample_sequence(tab: dict, n_tokens: int = 48) -> np.ndarray:
    """Rows of the per-token table shown as text: the first ``n_tokens`` positions of sequence 0."""
    rows = np.flatnonzero(tab["sequence_N"] == tab["sequence_N"].min())
    rows = rows[np.argsort(tab["position_N"][rows], kind="stable")]
    return rows[:n_tokens]


@styled
def fig_token_losses(rd: RunData) -> Figure | None:
    """Per-token loss on real text under all-small, all-big and the oracle at k = L/2, and the
    difficulty gap (all-small minus oracle): each column is a token of the validation text."""
    tab = token_table(rd)
    if tab is None:
        return None
    k = reference_k(tab["ks"], rd.n_layers)
    rows = sample_sequence(tab)
    labels = [visible(t) for t in rd.token_text(tab["target_N"][rows])]
    loss_XN = np.stack([tab["loss_small_N"][rows], tab["loss_big_N"][rows], tab["oracle_JN"][tab["ks"].index(k)][rows]])
    gap_N = loss_XN[0] - loss_XN[2]
    fig = new_figure(max(7.0, 0.17 * len(rows) + 1.5), 3.2)
    ax_l, ax_g = fig.subplots(2, 1, height_ratios=[3, 1.4], sharex=True)
    im = ax_l.imshow(loss_XN, aspect="auto", cmap="magma_r", interpolation="nearest")
    ax_l.set_yticks(range(3), ["all small", "all big", f"oracle k={k}"])
    ax_l.set_title(f"Loss of each next token (sequence {int(tab['sequence_N'][rows[0]])} of the validation text)")
    fig.colorbar(im, ax=ax_l, label="loss (nats)", pad=0.01)
    lim = max(1e-6, float(np.abs(gap_N).max()))
    im_g = ax_g.imshow(gap_N[None], aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, interpolation="nearest")
    ax_g.set_yticks([0], ["gap"])
    fig.colorbar(im_g, ax=ax_g, label="small - oracle", pad=0.01)
    ax_g.set_xticks(range(len(rows)))
    ax_g.set_xticklabels(labels, rotation=90, fontsize=7, parse_math=False)
    return fig


@styled
def fig_difficulty_ranking(rd: RunData, summary: dict | None = None) -> Figure | None:
    """Tokens ranked by difficulty gap vs by raw small-model loss: a rank-rank scatter with the
    Spearman correlation, and the head of each ranking."""
    tab = token_table(rd)
    if tab is None:
        return None
    summary = summary or summarize(rd, tab)
    k = summary["k_ref"]
    small_N = tab["loss_small_N"]
    gap_N = small_N - tab["oracle_JN"][tab["ks"].index(k)]
    fig = new_figure(10.0, 4.0)
    ax_s, ax_g, ax_l = fig.subplots(1, 3, width_ratios=[1.1, 1, 1])
    N = len(small_N)
    ax_s.scatter(rankdata(small_N) / N, rankdata(gap_N) / N, s=2, alpha=0.35, color="#444444", rasterized=False)
    ax_s.set_xlabel("rank by all-small loss (quantile)")
    ax_s.set_ylabel(f"rank by gap at k={k} (quantile)")
    rho = summary.get("spearman_small_loss_vs_gap")
    ax_s.set_title(f"Spearman {rho:.2f}" if rho is not None else "Spearman undefined")
    for ax, key, title, value in ((ax_g, "top_by_gap", "highest gap (difficulty)", "gap"),
                                  (ax_l, "top_by_loss", "highest all-small loss", "loss_small")):
        items = summary[key][::-1]
        ys = np.arange(len(items))
        ax.barh(ys, [it["gap"] for it in items], color=COLORS["oracle"], label="gap")
        if value == "loss_small":
            ax.barh(ys, [it["loss_small"] for it in items], color="none", edgecolor="#444444", label="loss")
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{visible(it['text'][-28:])}" for it in items], fontsize=6.5, parse_math=False)
        ax.set_title(f"Top {len(items)} by {title}")
        ax.set_xlabel("nats")
        ax.legend(loc="lower right")
    return fig


# ----------------------------------------------------------------------------- skip study


@styled
def fig_skip_vs_early_exit(rd: RunData) -> Figure | None:
    """The skip study's optimal patterns next to early exit (paper section 4.3): share of tokens
    skipping each layer, the most chosen patterns, and perplexity of oracle, best fixed pattern,
    the early-exit pattern and a random pattern."""
    skip = rd.skip_study
    if skip is None:
        return None
    L, s = rd.n_layers, int(skip.summary["skips"])
    ee = early_exit_pattern(L, s)
    b = skip.budgets[0]
    fig = new_figure(10.5, 3.4)
    ax_l, ax_p, ax_b = fig.subplots(1, 3, width_ratios=[1, 1.2, 0.9])
    layers = np.arange(1, L + 1)
    share = np.array(b.get("oracle_skip_share_by_layer") or [np.nan] * L)
    ax_l.bar(layers, share, color=COLORS["oracle"], label="oracle")
    ax_l.stairs([1.0 if c == "_" else 0.0 for c in ee], np.arange(0.5, L + 1), color="black", lw=1.5, label="early exit")
    ax_l.set_xticks(range(1, L + 1, max(1, L // 12)))
    ax_l.set_xlabel("layer")
    ax_l.set_ylabel("share of tokens skipping")
    ax_l.set_title(f"Which layers are skipped ({s} of {L})")
    ax_l.legend()
    table = skip.per_token()
    col = f"best_pattern_k{b['k']}"
    if table is not None and col in table.column_names:
        counts = sorted(((c, p) for p, c in Counter(table.column(col).to_pylist()).items()), key=lambda x: (-x[0], x[1]))
        n = table.num_rows
        top = counts[:10]
        names = [p for _, p in top]
        if ee not in names:
            names.append(ee)
        share_of = {p: c / n for c, p in counts}
        ys = np.arange(len(names))[::-1]
        ax_p.barh(ys, [share_of.get(p, 0.0) for p in names],
                  color=["black" if p == ee else COLORS["oracle"] for p in names])
        ax_p.set_yticks(ys)
        ax_p.set_yticklabels([p + ("  (early exit)" if p == ee else "") for p in names], family="monospace",
                             fontsize=7, parse_math=False)
        ax_p.set_xlabel("share of tokens")
        ax_p.set_title("Most chosen oracle patterns")
    losses = skip.pattern_losses()
    vals = {"oracle": b.get("oracle_ppl"), "best fixed": b.get("fixed_ppl"),
            "early exit": float(np.exp(losses[ee])) if ee in losses else None,
            "random": b.get("random_mean_ppl")}
    # 95% t-intervals over sequences: the oracle's summary has them; early exit's from its per-token losses
    cis = {"oracle": (b.get("oracle_ppl_lo"), b.get("oracle_ppl_hi")),
           "best fixed": (b.get("fixed_ppl_lo"), b.get("fixed_ppl_hi")),
           "random": (b.get("random_mean_ppl_lo"), b.get("random_mean_ppl_hi"))}
    ee_N = skip.pattern_token_losses(ee)
    if ee_N is not None and table is not None and len(ee_N) == table.num_rows:
        ci = ppl_interval(ee_N.reshape(len(set(table.column("sequence").to_pylist())), -1))
        cis["early exit"] = (ci["ppl_lo"], ci["ppl_hi"])
    colors = {"oracle": COLORS["oracle"], "best fixed": COLORS["fixed"], "early exit": "black", "random": COLORS["random"]}
    vals = {k: v for k, v in vals.items() if v is not None}
    # points with their intervals, not bars, on an axis zoomed to the differences
    for x, (name, v) in enumerate(vals.items()):
        lo_, hi_ = cis.get(name, (None, None))
        yerr = None if lo_ is None or hi_ is None else [[v - lo_], [hi_ - v]]
        ax_b.errorbar([x], [v], yerr=yerr, fmt="o", ms=5, color=colors[name], capsize=3, lw=1, zorder=3)
        ax_b.annotate(f"{v:.2f}", (x, v), textcoords="offset points", xytext=(8, 0), fontsize=7, va="center")
    ax_b.set_xticks(range(len(vals)), list(vals.keys()), rotation=20)
    ax_b.set_xlim(-0.5, len(vals) - 0.2)
    ax_b.set_ylabel("perplexity (95% interval)")
    ends = [x for name, v in vals.items() for x in (v, *(c for c in cis.get(name, ()) if c is not None))]
    lo, hi = min(ends), max(ends)
    ax_b.set_ylim(max(0.0, lo - 0.5 * (hi - lo) - 1e-3 * lo), hi + 0.25 * (hi - lo) + 1e-3 * hi)
    ax_b.set_title(f"fixed: {b.get('fixed_pattern')}", family="monospace", fontsize=8)
    return fig


# ----------------------------------------------------------------------------- all of them

def _z_axis(ax, reach: float) -> None:
    """The standardised effect axis: linear where verdicts are decided (|z| ~ 2), compressed beyond ±4 (symmetric
    log), with a margin so no point sits on the frame, and ticks that never crowd at zero."""
    ax.set_xscale("symlog", linthresh=4.0)
    ax.set_xlim(-1.6 * reach, 1.6 * reach)
    ticks = [t for t in (-1000, -100, -10, -4, -2, 0, 2, 4, 10, 100, 1000) if abs(t) <= 1.6 * reach]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _z(f: dict) -> tuple[float, float, float] | None:
    """A finding's (lo, value, hi) as (effect - threshold) / se in the paper's direction; None without an interval."""
    e, t = f.get("effect") or {}, f.get("threshold") or {}
    if not e.get("se") or e.get("lo") is None or not t:
        return None
    d, thr = e.get("direction", t.get("direction")), e.get("threshold", t.get("threshold"))
    z = sorted(d * (x - thr) / e["se"] for x in (e["lo"], e["hi"]))
    return z[0], d * (e["value"] - thr) / e["se"], z[1]


def fig_findings(findings: list[dict]) -> Figure | None:
    """Every tested finding's effect minus its registry threshold in units of its own standard error, with
    its 95% t-interval (the effects have different units; standardised, every interval is visible on one
    axis); right of zero is the paper's direction. The effect in its own units is written at the right."""
    rows = [f for f in findings if _z(f) is not None]
    if not rows:
        return None
    fig = new_figure(8.5, 0.34 * len(rows) + 1.1)
    ax = fig.subplots()
    colour = {"reproduced": "#1a7f37", "contradicted": "#b42318", "inconclusive": "#9a6700"}
    reach = 2.0
    for i, f in enumerate(rows):
        e = f["effect"]
        thr = e.get("threshold", f["threshold"]["threshold"])
        lo, z, hi = _z(f)
        reach = max(reach, abs(lo), abs(hi))
        y = len(rows) - 1 - i
        c = colour.get(f["verdict"], "0.5")
        ax.plot([lo, hi], [y, y], color=c, lw=3, solid_capstyle="butt")
        ax.plot([z], [y], "o", color=c, markersize=4)
        ax.text(1.01, y, f"{f['verdict']}: {e['value']:+.3g} [{e['lo']:+.3g}, {e['hi']:+.3g}], threshold {thr:g}",
                va="center", fontsize=6.5, transform=ax.get_yaxis_transform())
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(range(len(rows)), [f["id"].replace("_", " ") + (f" [{f['context']}]" if f["context"] else "")
                                     for f in reversed(rows)], fontsize=7)
    _z_axis(ax, reach)
    for z in (-2.1, 2.1):  # about where a 95% interval starts to exclude the threshold (t, 15 df)
        ax.axvline(z, color="0.8", lw=0.6, ls=":")
    ax.set_xlabel("(effect − threshold) / standard error, paper's direction to the right (95% t-interval; "
                  "symmetric log beyond ±4)")
    ax.set_title("Findings against their registry thresholds")
    return fig


def fig_compare_findings(names: list[str], findings: list[list[dict]]) -> Figure | None:
    """Several runs' findings on the standardised axis of ``fig_findings``: one row per finding, one point and
    95% interval per run (``duollm compare --html``)."""
    keys = list(dict.fromkeys((f["id"], f.get("context")) for fs in findings for f in fs if _z(f)))
    if not keys:
        return None
    fig = new_figure(8.5, 0.42 * len(keys) + 1.3)
    ax = fig.subplots()
    reach, width = 2.0, 0.7 / max(1, len(names))
    for j, (name, fs) in enumerate(zip(names, findings)):
        by = {(f["id"], f.get("context")): f for f in fs}
        for i, key in enumerate(keys):
            z = _z(by[key]) if key in by else None
            if z is None:
                continue
            y = len(keys) - 1 - i + 0.35 - (j + 0.5) * width
            reach = max(reach, abs(z[0]), abs(z[2]))
            ax.errorbar([z[1]], [y], xerr=[[z[1] - z[0]], [z[2] - z[1]]], fmt="o", ms=3.5, lw=1.2, capsize=2,
                        color=f"C{j}", label=name if i == 0 else None)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(range(len(keys)), [k[0].replace("_", " ") + (f" [{k[1]}]" if k[1] else "") for k in reversed(keys)],
                  fontsize=7)
    _z_axis(ax, reach)
    ax.set_xlabel("(effect − threshold) / standard error, paper's direction to the right (95% interval)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=min(4, len(names)), frameon=False)
    return fig


def fig_compare_shares(rows: list[dict]) -> Figure | None:
    """Each router's and label-free oracle's share of the oracle's gain [95%] per run, one panel per budget."""
    rows = [r for r in rows if (r.get("recovered") or {}).get("value") is not None]
    if not rows:
        return None
    ks = sorted({r["k"] for r in rows})
    runs = list(dict.fromkeys(r["run"] for r in rows))
    methods = {k: list(dict.fromkeys(r["method"] for r in rows if r["k"] == k)) for k in ks}
    fig = new_figure(4.2 * len(ks), 0.3 * max(len(m) for m in methods.values()) + 1.6)
    axes = np.atleast_1d(fig.subplots(1, len(ks), squeeze=False)[0])
    width = 0.7 / len(runs)
    for ax, k in zip(axes, ks):
        ms = methods[k]
        for j, run in enumerate(runs):
            for i, m in enumerate(ms):
                r = next((x for x in rows if x["k"] == k and x["run"] == run and x["method"] == m), None)
                if r is None:
                    continue
                rec = r["recovered"]
                v = 100 * rec["value"]
                lo, hi = (100 * rec["lo"], 100 * rec["hi"]) if rec.get("lo") is not None else (v, v)
                ax.errorbar([v], [len(ms) - 1 - i + 0.35 - (j + 0.5) * width], xerr=[[v - lo], [hi - v]], fmt="o",
                            ms=3, lw=1, capsize=2, color=f"C{j}", label=Path(run).name if (ax is axes[0] and i == 0) else None)
        ax.axvline(0, color="k", lw=0.6)
        ax.axvline(100, color="0.7", lw=0.6, ls=":")
        ax.set_yticks(range(len(ms)), list(reversed(ms)), fontsize=7)
        ax.set_title(f"k = {k}", fontsize=8)
        ax.set_xlabel("share of the oracle's gain (%)", fontsize=7)
    fig.legend(loc="lower center", ncols=min(4, len(runs)), frameon=False, fontsize=7)
    return fig


FIGURES = {
    "training": fig_training,
    "ppl_vs_budget": fig_ppl_vs_budget,
    "oracle_usage": fig_oracle_usage,
    "router_usage": fig_router_usage,
    "router_routes": fig_router_routes,
    "router_training": fig_router_training,
    "position_budgets": fig_position_budgets,
    "token_losses": fig_token_losses,
    "difficulty_ranking": fig_difficulty_ranking,
    "skip_vs_early_exit": fig_skip_vs_early_exit,
}


def render_all(run, difficulty: dict | None = None, findings: list[dict] | None = None) -> dict[str, bytes]:
    """PNG bytes of every figure the run folder supports, in a fixed order (the findings first)."""
    rd = as_rundata(run)
    out = {}
    fig = fig_findings(findings) if findings else None
    if fig is not None:
        out["findings"] = png_bytes(fig)
    for name, fn in FIGURES.items():
        fig = fn(rd, difficulty) if name == "difficulty_ranking" else fn(rd)
        if fig is not None:
            out[name] = png_bytes(fig)
    return out
