"""The paper's findings (DESIGN section 2), each checked on a run's numbers with an explicit criterion.

Every check is a small function that returns a ``Finding``: the paper's claim, the criterion
applied here in words, the numbers it used, and ``reproduced`` — True, False, or None when the
run lacks what the check needs (e.g. no routers). Checks of the oracle run once per context
policy (``shared`` is our reading of the paper, ``frozen`` the causally consistent oracle).

Array name legend: L layers, T positions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .rundata import Oracle, RunData, early_exit_pattern, reference_budgets


@dataclass
class Finding:
    id: str
    claim: str  # the paper's finding, in words
    criterion: str  # the test applied to this run's numbers
    reproduced: bool | None  # None: not testable on this run
    numbers: dict = field(default_factory=dict)
    context: str | None = None  # the oracle's context policy, where it matters

    def as_dict(self) -> dict:
        return asdict(self)


def _r(x, nd: int = 4):
    if x is None:
        return None
    x = float(x)
    return round(x, nd) if math.isfinite(x) else None


def _halves(per_layer: list[float]) -> tuple[float, float]:
    """Mean of the first half of the layers and of the second half (the middle layer of an odd L is left out)."""
    a = np.asarray(per_layer, dtype=np.float64)
    h = len(a) // 2
    return float(a[:h].mean()), float(a[len(a) - h:].mean())


# ----------------------------------------------------------------------------- the oracle (sections 4.1, 4.2)


def oracle_u_shape(o: Oracle, L: int) -> Finding:
    """Paper fig. 2: oracle perplexity falls from k=1 to about k=L/2, then rises to k=L."""
    ppl = {int(b["k"]): b["oracle_ppl"] for b in o.budgets if b.get("oracle_ppl") is not None}
    claim = "Oracle perplexity falls from k=1 to about k=L/2 and rises again to k=L (C(L,k) peaks at L/2)."
    lo, hi = math.ceil(L / 4), math.floor(3 * L / 4)
    criterion = (f"the best budget k* over 1..L lies strictly between 1 and L, within L/4..3L/4 = {lo}..{hi}, "
                 f"and ppl(1) > ppl(k*) < ppl(L)")
    if 1 not in ppl or L not in ppl:
        return Finding("oracle_u_shape", claim, criterion, None, {}, o.context)
    inner = {k: v for k, v in ppl.items() if 1 <= k <= L}
    k_star = min(inner, key=lambda k: (inner[k], k))
    ok = 1 < k_star < L and lo <= k_star <= hi and ppl[1] > ppl[k_star] < ppl[L]
    return Finding("oracle_u_shape", claim, criterion, bool(ok),
                   {"k_best": k_star, "ppl_k1": _r(ppl[1]), "ppl_best": _r(ppl[k_star]), "ppl_kL": _r(ppl[L]),
                    "L": L}, o.context)


def one_big_beats_all_big(o: Oracle) -> Finding:
    """Paper section 4.1: the oracle with a single big layer beats every layer big."""
    b1 = o.budget(1)
    claim = "The oracle with one big layer per token beats all layers big."
    criterion = "oracle ppl at k=1 < all-big ppl"
    if b1 is None:
        return Finding("one_big_beats_all_big", claim, criterion, None, {}, o.context)
    big = o.summary["all_big_ppl"]
    return Finding("one_big_beats_all_big", claim, criterion, bool(b1["oracle_ppl"] < big),
                   {"oracle_ppl_k1": _r(b1["oracle_ppl"]), "all_big_ppl": _r(big),
                    "compute_k1": _r(b1.get("oracle_compute"))}, o.context)


def big_layers_by_budget(o: Oracle, L: int) -> Finding:
    """Paper figs. 3-4: at a small budget the big modules go to late layers, at a large one to early layers."""
    ks = reference_budgets(L)
    claim = "At a small budget the oracle gives big modules to late layers; at a large budget to early layers."
    criterion = (f"share of big in the second half of the layers > in the first half at k={ks['small']}, "
                 f"and < at k={ks['large']} (oracle_big_share_by_layer)")
    small, large = o.budget(ks["small"]), o.budget(ks["large"])
    if small is None or large is None or ks["small"] == ks["large"]:
        return Finding("big_layers_by_budget", claim, criterion, None, {}, o.context)
    s_early, s_late = _halves(small["oracle_big_share_by_layer"])
    l_early, l_late = _halves(large["oracle_big_share_by_layer"])
    return Finding("big_layers_by_budget", claim, criterion, bool(s_late > s_early and l_late < l_early),
                   {"k_small": ks["small"], "small_first_half": _r(s_early), "small_second_half": _r(s_late),
                    "k_large": ks["large"], "large_first_half": _r(l_early), "large_second_half": _r(l_late)},
                   o.context)


def constant_budget_best(o: Oracle) -> Finding:
    """Paper section 4.2: a constant per-token budget beats one that falls or rises along the sequence."""
    entries = {e["name"]: e for e in o.summary.get("position_budgets") or []}
    claim = "A constant per-token budget beats one that falls or rises along the sequence (same mean budget)."
    criterion = "oracle ppl with the constant schedule < with the falling and < with the rising schedule"
    if not {"constant", "falling", "rising"} <= set(entries):
        return Finding("constant_budget_best", claim, criterion, None, {}, o.context)
    c, f, r = (entries[n]["oracle_ppl"] for n in ("constant", "falling", "rising"))
    return Finding("constant_budget_best", claim, criterion, bool(c < f and c < r),
                   {"constant": _r(c), "falling": _r(f), "rising": _r(r),
                    "schedules": {n: entries[n]["schedule"] for n in ("constant", "falling", "rising")}}, o.context)


def skip_not_early_exit(o: Oracle | None, L: int) -> Finding:
    """Paper section 4.3: optimal skip patterns do not look like early exit."""
    claim = "Optimal skip patterns do not look like early exit (run the first layers, skip the rest)."
    criterion = ("fewer than half of the tokens take the early-exit pattern as their oracle pattern, "
                 "and the best fixed skip pattern is not early exit")
    if o is None or not o.budgets:
        return Finding("skip_not_early_exit", claim, criterion, None, {})
    b = o.budgets[0]
    s = int(o.summary["skips"])
    ee = early_exit_pattern(L, s)
    share = b.get("oracle_early_exit_share")
    losses = o.pattern_losses()
    skip_by_layer = b.get("oracle_skip_share_by_layer") or []
    late_share = float(np.sum(skip_by_layer[L - s:]) / max(np.sum(skip_by_layer), 1e-12)) if skip_by_layer else None
    numbers = {"skips": s, "early_exit_pattern": ee, "early_exit_token_share": _r(share),
               "late_skip_share": _r(late_share), "late_skip_share_early_exit": 1.0,
               "fixed_pattern": b.get("fixed_pattern"), "fixed_ppl": _r(b.get("fixed_ppl")),
               "early_exit_ppl": _r(math.exp(losses[ee])) if ee in losses else None,
               "oracle_ppl": _r(b.get("oracle_ppl"))}
    if share is None:
        return Finding("skip_not_early_exit", claim, criterion, None, numbers, o.context)
    return Finding("skip_not_early_exit", claim, criterion, bool(share < 0.5 and b.get("fixed_pattern") != ee),
                   numbers, o.context)


# ----------------------------------------------------------------------------- routers (section 4.4)


def _paper_routers(rd: RunData) -> tuple[list[dict], str]:
    """The paper's router (method ``budget``) if trained, else every router."""
    budget = [r for r in rd.routers if r.get("method") == "budget"]
    return (budget, "budget") if budget else (rd.routers, "all methods")


def routers_near_baselines(rd: RunData) -> Finding:
    claim = "Trained routers land near the fixed and best-of-random baselines, far from the oracle."
    criterion = ("for every router of the paper's method, its ppl is closer to the nearest of fixed@k, best-of-100@k "
                 "and random@k than to oracle@k (same tokens, k = target budget)")
    routers, which = _paper_routers(rd)
    rows = []
    for r in routers:
        o = r.get("oracle") or {}
        if o.get("oracle_ppl") is None:
            continue
        base = [o.get(key) for key in ("fixed_ppl", "best_of_100_ppl", "random_mean_ppl") if o.get(key) is not None]
        d_oracle = abs(r["ppl"] - o["oracle_ppl"])
        d_base = min(abs(r["ppl"] - b) for b in base) if base else float("inf")
        rows.append({"router": r["name"], "k": o.get("k"), "ppl": _r(r["ppl"]), "oracle_ppl": _r(o["oracle_ppl"]),
                     "fixed_ppl": _r(o.get("fixed_ppl")), "best_of_100_ppl": _r(o.get("best_of_100_ppl")),
                     "random_mean_ppl": _r(o.get("random_mean_ppl")), "big_fraction": _r(r.get("big_fraction")),
                     "nearer_baselines": bool(d_base < d_oracle), "tokens": r.get("tokens"),
                     "oracle_tokens": o.get("tokens")})
    if not rows:
        return Finding("routers_near_baselines", claim, criterion, None, {"methods": which})
    return Finding("routers_near_baselines", claim, criterion, all(x["nearer_baselines"] for x in rows),
                   {"methods": which, "routers": rows})


def routers_favour_late_layers(rd: RunData) -> Finding:
    claim = "Routers favour late layers for the big modules."
    criterion = "mean over the paper's routers of (big share in the second half of layers - in the first half) > 0"
    routers, which = _paper_routers(rd)
    diffs = {}
    for r in routers:
        if r.get("per_layer_big"):
            early, late = _halves(r["per_layer_big"])
            diffs[r["name"]] = _r(late - early)
    if not diffs:
        return Finding("routers_favour_late_layers", claim, criterion, None, {"methods": which})
    mean = float(np.mean(list(diffs.values())))
    return Finding("routers_favour_late_layers", claim, criterion, bool(mean > 0),
                   {"methods": which, "late_minus_early": diffs, "mean": _r(mean),
                    "layer_profiles": {r["name"]: r.get("layer_profile") for r in routers}})


def routers_early_tokens_more_big(rd: RunData) -> Finding:
    claim = "Routers give early tokens (the first positions of a sequence) more big modules."
    criterion = ("mean over the paper's routers of (big share over the first quarter of positions - over the rest) > 0")
    routers, which = _paper_routers(rd)
    diffs = {}
    for r in routers:
        by_pos = r.get("big_by_position")
        if by_pos and len(by_pos) >= 4:
            a = np.asarray(by_pos, dtype=np.float64)
            q = len(a) // 4
            diffs[r["name"]] = _r(a[:q].mean() - a[q:].mean())
    if not diffs:
        return Finding("routers_early_tokens_more_big", claim, criterion, None, {"methods": which})
    mean = float(np.mean(list(diffs.values())))
    return Finding("routers_early_tokens_more_big", claim, criterion, bool(mean > 0),
                   {"methods": which, "first_quarter_minus_rest": diffs, "mean": _r(mean)})


# ----------------------------------------------------------------------------- difficulty


def difficulty_not_raw_loss(summary: dict | None) -> Finding:
    claim = ("A token's difficulty is its potential to gain from compute, not its raw loss: "
             "the two rank tokens differently.")
    criterion = "Spearman rank correlation of all-small loss with the gap (all-small - oracle at k=L/2) < 0.5"
    if not summary or summary.get("spearman_small_loss_vs_gap") is None:
        return Finding("difficulty_not_raw_loss", claim, criterion, None, {})
    rho = summary["spearman_small_loss_vs_gap"]
    return Finding("difficulty_not_raw_loss", claim, criterion, bool(rho < 0.5),
                   {"spearman": rho, "k": summary["k_ref"], "high_loss_low_gain_share": summary["high_loss_low_gain_share"],
                    "top_decile_overlap": summary["top_decile_overlap"]}, summary.get("context"))


# ----------------------------------------------------------------------------- all of them


_EMPTY = Oracle(folder=None, summary={"budgets": [], "context": None})  # type: ignore[arg-type]  # no oracle: not testable


def check_all(rd: RunData, difficulty: dict | None) -> list[Finding]:
    """Every finding, oracle checks once per context policy, in the order of DESIGN section 2."""
    L = rd.n_layers
    sweeps = list(rd.sweeps.values())
    out: list[Finding] = []
    for check in (lambda o: oracle_u_shape(o, L), one_big_beats_all_big, lambda o: big_layers_by_budget(o, L)):
        out += [check(o) for o in sweeps] or [check(_EMPTY)]
    out.append(skip_not_early_exit(rd.skip_study, L))
    out += [constant_budget_best(o) for o in sweeps] or [constant_budget_best(_EMPTY)]
    out += [routers_near_baselines(rd), routers_favour_late_layers(rd), routers_early_tokens_more_big(rd)]
    out.append(difficulty_not_raw_loss(difficulty))
    return out

