"""The paper's findings (DESIGN section 2), each the paper's claim tested against its own null (DESIGN 4.4a).

**One registry, frozen before results are seen.** Every finding is a ``Criterion``: the paper's claim, the
null hypothesis H0 that would explain the observation without the claim, the statistic, its threshold and
the smallest effect of interest (for power), under a version (``CRITERIA_VERSION``). The report prints them;
``tests/test_findings.py`` pins their fingerprint, so changing a threshold is a visible, versioned act and
never a quiet retune after seeing a verdict.

**The null differs by claim** (the review of issue 27 measured why):

- anything an oracle minimum produces (the U-shape, one big layer beating all-big) is mostly *selection*
  among many sub-networks: a budget's oracle picks the best of C(L,k) candidates per token. The test is
  at **equal candidate count** (the engine's ``equal_count_*`` columns: per token the best of n0 random
  candidates of budget k, the same n0 at every k), so the curve over k shows what compute does. The
  as-paper statistic is reported beside it;
- placement: the big share by layer against a flat k/L (slope 0);
- skip != early exit: H0 *is* early exit (the skips in the late half);
- a constant budget best: H0 is the position-wise prediction from oracle@k (convexity alone);
- routers near the baselines: an equivalence test (two one-sided tests) against the **out-of-sample**
  fixed@k (cross-fitted over sequences; the in-sample one is optimistic) and a one-sided bound on the share
  of the oracle's gain recovered;
- what routers learn (late layers, early tokens): the same router trained on the model at initialisation;
- difficulty != raw loss: H0 "difficulty is raw loss" (rank correlation >= 0.5), on a *selection-free*
  benefit (all-small minus all-big loss), since 74% of small-minus-oracle is selection gain.

**Decisions.** Each check returns its effect with a t-interval over sequences (``stats.estimate``) and two
one-sided p-values: ``p_reproduce`` (H0 rejected in the paper's direction) and ``p_contradict`` (the other
way). A claim with several parts (placement at two budgets; a router's equivalence and its share) is
reproduced only if every part is (intersection-union: the largest p) and contradicted if any part is
(Bonferroni). ``check_all`` corrects the family of the run's findings with Holm and then gives one of three
verdicts (``stats.verdict_from``); the unadjusted verdict is kept beside it. Every finding states its
minimum detectable effect at the run's n, and an inconclusive verdict says whether it was underpowered.

Array name legend (``docs/NOTATION.md``): S sequences, T positions, L layers.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from math import comb

import numpy as np

from .. import rundir
from ..oracle.reductions import default_schedules, linear_schedule
from ..stats import (
    ALPHA,
    budget_weights,
    estimate,
    finding_p,
    finite_round,
    holm,
    mde,
    p_above,
    p_below,
    ratio_estimate,
    t_quantile,
    tost,
    verdict_from,
)
from .difficulty import spearman
from .evidence import OracleView, gain, ppl_of, slope, view
from .rundata import RunData, early_exit_pattern, reference_budgets

CRITERIA_VERSION = 2  # 1: the criteria before issue 27 (in-sample baselines, untrained-model null for all)


@dataclass(frozen=True)
class Criterion:
    """A finding as the registry freezes it. ``threshold``: the value of the statistic under H0's boundary;
    ``direction`` +1: the claim is "statistic > threshold", -1: "< threshold". ``sesoi``: the smallest effect
    of interest (distance from the threshold), the yardstick of power. ``extra``: the other frozen numbers of
    a claim with several parts."""

    id: str
    claim: str
    h0: str
    statistic: str
    threshold: float
    direction: int
    sesoi: float
    extra: tuple[tuple[str, float], ...] = ()

    def as_dict(self) -> dict:
        return {"claim": self.claim, "h0": self.h0, "statistic": self.statistic, "threshold": self.threshold,
                "direction": self.direction, "sesoi": self.sesoi, **dict(self.extra)}


@dataclass
class Finding:
    id: str
    claim: str
    h0: str
    statistic: str
    verdict: str | None  # reproduced | contradicted | inconclusive (family-adjusted); None: not testable here
    effect: dict | None = None  # stats.estimate of the deciding statistic: value, lo, hi, se, df (+ null, minus_null)
    threshold: dict = field(default_factory=dict)  # the registry's frozen numbers
    p_reproduce: float | None = None
    p_contradict: float | None = None
    p: float | None = None  # the finding's two-sided p (2 x the smaller one-sided)
    p_adjusted: float | None = None  # after Holm over the run's findings
    unadjusted_verdict: str | None = None
    mde: float | None = None  # minimum detectable effect (distance from the threshold) at 80% power
    power: str = ""  # "underpowered ..." / "powered ..." for an inconclusive verdict
    why: str = ""  # why untested, or what limits the test
    numbers: dict = field(default_factory=dict)  # the as-paper statistic and everything a reader checks
    context: str | None = None
    version: int = CRITERIA_VERSION

    def as_dict(self) -> dict:
        return asdict(self)


def _r(x, nd: int = 4):
    return finite_round(x, nd)


def untested(c: Criterion, why: str, context: str | None = None, numbers: dict | None = None) -> Finding:
    return Finding(c.id, c.claim, c.h0, c.statistic, None, threshold=c.as_dict(), why=why, numbers=numbers or {},
                   context=context)


@dataclass(frozen=True)
class Part:
    """One test of a claim: an estimate against a threshold in a direction."""

    effect: dict
    threshold: float
    direction: int

    @property
    def p_reproduce(self) -> float:
        e = self.effect
        fn = p_above if self.direction == 1 else p_below
        return fn(e["value"], e["se"], e["df"], self.threshold)

    @property
    def p_contradict(self) -> float:
        e = self.effect
        fn = p_below if self.direction == 1 else p_above
        return fn(e["value"], e["se"], e["df"], self.threshold)


def decide(c: Criterion, parts: list[Part], numbers: dict | None = None, context: str | None = None, why: str = "",
           p_pair: tuple[float, float] | None = None, shown: int | None = None) -> Finding:
    """A finding decided on ``parts`` (intersection-union: reproduced only if every part is, contradicted if
    any is). The effect shown is part ``shown`` (default: the weakest, the largest p_reproduce), with its
    threshold and direction. ``p_pair`` overrides the two one-sided p-values (an equivalence test)."""
    p_rep = [p.p_reproduce for p in parts]
    p_con = [p.p_contradict for p in parts]
    if p_pair is None:  # an undefined part (NaN) leaves the claim unproven; any defined part may contradict it
        con = [p for p in p_con if math.isfinite(p)]
        p_pair = (float(np.max(p_rep)), min(1.0, len(parts) * min(con)) if con else float("nan"))
    if shown is None:
        shown = int(np.nanargmax(p_rep)) if np.isfinite(p_rep).any() else 0
    part = parts[shown]
    e = {**part.effect, "threshold": part.threshold, "direction": part.direction}
    vd = verdict_from(*p_pair)
    return Finding(c.id, c.claim, c.h0, c.statistic, vd, effect=finite_round(e, 5), threshold=c.as_dict(),
                   p_reproduce=_r(p_pair[0], 6), p_contradict=_r(p_pair[1], 6), p=_r(finding_p(*p_pair), 6),
                   unadjusted_verdict=vd, mde=_r(mde(e["se"], e["df"]), 5), why=why, numbers=numbers or {}, context=context)


def one_part(c: Criterion, effect: dict, **kw) -> Finding:
    return decide(c, [Part(effect, c.threshold, c.direction)], **kw)


# ----------------------------------------------------------------------------- the registry's criteria

U_SHAPE = Criterion(
    "oracle_u_shape",
    "Oracle perplexity falls from small budgets to about k=L/2 and rises again towards k=L: a middle budget is best.",
    "the U is selection, not compute: at an equal number of candidates per budget, the middle budget is not better "
    "than both ends",
    "relative perplexity gain of k=L/2 over the lowest and over the highest budget of the oracle at equal candidate "
    "count (per token the best of n0 = C(L,2) random candidates of each budget, C(L,1) when L < 8); the smaller "
    "of the two gains",
    0.0, 1, 0.01)
ONE_BIG = Criterion(
    "one_big_beats_all_big",
    "The oracle with one big layer per token beats all layers big.",
    "the gain is selection among C(L,1) candidates, not a virtue of one big layer: at an equal count of n0 = C(L,1) "
    "candidates, one big layer is no better than L-1",
    "relative perplexity gain of the equal-count oracle at k=1 over the equal-count oracle at k=L-1",
    0.0, 1, 0.01)
PLACEMENT = Criterion(
    "big_layers_by_budget",
    "At a small budget the oracle gives big modules to late layers; at a large budget to early layers.",
    "the big share is flat over layers, k/L everywhere (slope 0)",
    "least-squares slope of the oracle's big share over the layer index: > 0 at k=L/3 and < 0 at k=2L/3 (the weaker "
    "of the two shown)",
    0.0, 1, 0.005)
SKIP_EE = Criterion(
    "skip_not_early_exit",
    "Optimal skip patterns do not look like early exit (run the first layers, skip the rest).",
    "the skip oracle is early-exit-like: the late half's skip rate exceeds the early half's by at least 0.5 "
    "(early exit: 1; no depth preference: 0)",
    "late-half minus early-half skip rate of the skip oracle (big or skip, round(L/2) skipped), mean over tokens "
    "(< 0.5); and early exit worse than the best fixed skip pattern chosen out of sample (a gain > 0: the pattern "
    "matters, which it does not for a model whose every skip pattern scores alike)",
    0.5, -1, 0.1)
SKIP_CONSISTENT = Criterion(
    "layers_consistently_skipped",
    "Some layers are almost always skipped and some almost always kept by the skip oracle.",
    "skips spread over the layers: no layer's skip rate is within 10% of always or never (a normalised extremeness "
    "of at most 0.8)",
    "max over layers of |skip rate - s/L| / max(s/L, 1 - s/L) (1: a layer always or never skipped)",
    0.8, 1, 0.05)
CONSTANT = Criterion(
    "constant_budget_best",
    "A constant per-token budget beats one that falls or rises along the sequence (same mean budget).",
    "the schedules differ only as the per-position budgets predict (convexity of oracle@k): measured = the "
    "position-wise prediction from the sequential oracle's own oracle@k",
    "the smaller, over falling and rising, of (constant's measured relative gain over the schedule) minus (its "
    "gain predicted position by position)",
    0.0, 1, 0.005)
NEAR = Criterion(
    "routers_near_baselines",
    "Trained routers land near the fixed baseline, far from the oracle.",
    "a router is not within ±2% perplexity of the out-of-sample fixed@k, or recovers at least half of the oracle's "
    "gain over it, or the oracle itself is within 2% of that fixed@k",
    "per paper router (method budget): two one-sided tests of its relative perplexity gain over the out-of-sample "
    "fixed@k (interpolated at its realised budget) within ±margin, the share of the oracle's gain it recovers "
    "below the bound, and the oracle's own gain over that fixed@k above the margin (far from an oracle that is "
    "itself near fixed means nothing); the weakest router decides",
    0.0, 1, 0.02, (("margin", 0.02), ("share_bound", 0.5)))
LATE = Criterion(
    "routers_favour_late_layers",
    "Routers favour late layers for the big modules.",
    "routers place big modules as a router trained on the model at initialisation does (what the router learns "
    "from the trained model, not its architecture)",
    "slope of the routers' big share over the layer index, mean over the paper's routers, and its paired "
    "difference to the null routers'",
    0.0, 1, 0.005)
EARLY = Criterion(
    "routers_early_tokens_more_big",
    "Routers give early tokens (the first positions of a sequence) more big modules.",
    "early tokens get no more big modules than the rest, or no more than under a router of the untrained model",
    "per router: big share at positions 1..T/4 (position 0 excluded) minus at the rest; the smallest over the "
    "paper's routers, and its paired difference to the null router's",
    0.0, 1, 0.02, (("min_seq_len", 512),))
DIFFICULTY = Criterion(
    "difficulty_not_raw_loss",
    "A token's difficulty is its potential to gain from compute, not its raw loss: the two rank tokens differently.",
    "difficulty is raw loss: Spearman(raw loss, benefit) >= 0.5; or there is no benefit to rank (a model that gains "
    "under 0.01 nats from all-big over all-small ranks noise)",
    "Spearman rank correlation over tokens of the raw loss (mean of all-small and all-big, so neither side is "
    "mechanically in both) and the selection-free benefit all-small - all-big; and the mean benefit above 0.01 nats",
    0.5, -1, 0.1, (("benefit_above", 0.01),))
STAGE1_DENSE = Criterion(
    "stage1_dense_beats_duo",
    "A dense model of the same compute per token beats the Duo model (Fig. 8a, 8b), at each P(big).",
    "the Duo and the dense model differ by no more than separately trained models of one kind do (seed-to-seed)",
    "relative perplexity gain of the FLOP-matched dense model over the Duo model at this P(big)",
    0.0, 1, 0.01, (("min_seeds_per_arm", 3),))
STAGE1_BIGFIRST = Criterion(
    "stage1_big_first_worse",
    "Training the big modules first, then the small ones with the big frozen, is worse than random routing from "
    "scratch at mixed routing (Fig. 8c).",
    "the two recipes differ by no more than separately trained models of one recipe do (seed-to-seed)",
    "relative perplexity gain of the scratch Duo model over the big-first one at P(big) = 0.5",
    0.0, 1, 0.01, (("min_seeds_per_arm", 3),))

CRITERIA = {c.id: c for c in (U_SHAPE, ONE_BIG, PLACEMENT, SKIP_EE, SKIP_CONSISTENT, CONSTANT, NEAR, LATE, EARLY,
                              DIFFICULTY, STAGE1_DENSE, STAGE1_BIGFIRST)}


def criteria_fingerprint() -> str:
    """A hash of every frozen criterion: a test pins it per version."""
    text = json.dumps({"version": CRITERIA_VERSION, **{k: c.as_dict() for k, c in CRITERIA.items()}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the scale axis (issue 29)

# How a finding's effect moves with model size, frozen like the criteria (its own version: the criteria above are
# unchanged by it). Two sizes' models are independent, so the difference's standard error is the two added in
# quadrature; they score the same sequences, which, correlated, makes that conservative.
SCALE_RULE_VERSION = 1
SCALE_RULE = ("Between the smallest and the largest model, d = direction x (effect - threshold) per size (> 0: the "
              "claim's side). flips: the two 95% intervals of d lie on opposite sides of 0. Otherwise grows / shrinks: "
              "the 95% t-interval of d(largest) - d(smallest) (standard errors in quadrature, df the smaller) lies "
              "above / below 0; holds: two one-sided tests put that difference within +-sesoi at 5%; inconclusive "
              "otherwise.")
TRENDS = ("flips", "grows", "shrinks", "holds", "inconclusive")


def scale_rule_fingerprint() -> str:
    """A hash of the frozen scale rule: a test pins it per version."""
    text = json.dumps({"version": SCALE_RULE_VERSION, "rule": SCALE_RULE, "alpha": ALPHA}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def scale_trend(c: Criterion, small: dict | None, large: dict | None) -> dict:
    """``SCALE_RULE`` applied to a finding's effects (``stats.estimate`` dicts with ``se`` and ``df``) at the
    smallest and the largest size; ``trend`` None where either lacks an effect."""
    def oriented(e):
        if not e or e.get("se") is None or not math.isfinite(e["se"]) or e.get("value") is None:
            return None
        thr, d = e.get("threshold", c.threshold), e.get("direction", c.direction)
        return d * (e["value"] - thr), e["se"], e["df"]
    a, b = oriented(small), oriented(large)
    if a is None or b is None:
        return {"trend": None, "difference": None}
    (da, sa, fa), (db, sb, fb) = a, b
    se, df = math.hypot(sa, sb), min(fa, fb)
    diff = db - da
    q = t_quantile(1 - ALPHA / 2, df)
    lo_a, hi_a, lo_b, hi_b = da - q * sa, da + q * sa, db - q * sb, db + q * sb
    lo, hi = diff - q * se, diff + q * se
    if (lo_a > 0 and hi_b < 0) or (hi_a < 0 and lo_b > 0):
        trend = "flips"
    elif lo > 0:
        trend = "grows"
    elif hi < 0:
        trend = "shrinks"
    elif se > 0 and tost(diff, se, df, -c.sesoi, c.sesoi) < ALPHA:
        trend = "holds"
    else:
        trend = "inconclusive"
    return {"trend": trend, "difference": finite_round({"value": diff, "lo": lo, "hi": hi, "se": se, "df": df}, 5)}


# ----------------------------------------------------------------------------- the oracle (sections 4.1, 4.2)


def equal_count_n0(L: int) -> tuple[int, int]:
    """The common candidate counts the engine's equal-count oracle is drawn at: C(L,1) and C(L,2)."""
    return comb(L, 1), comb(L, 2)


def _u_parts(w: OracleView, column, ks: list[int], L: int) -> list[dict] | None:
    """The estimates of the middle budget's gain over the lowest and over the highest budget in ``ks`` (two
    paired differences: no minimum over budgets, which would favour the side with more budgets)."""
    mid = L // 2
    if mid not in ks or min(ks) >= mid or max(ks) <= mid:
        return None
    centre = w.seq_loss(column(mid))
    out = []
    for end in (min(ks), max(ks)):
        x = w.seq_loss(column(end))
        out.append(w.estimate(lambda idx, x=x: gain(centre[idx], x[idx])) | {"against_k": end})
    return out


def oracle_u_shape(v: OracleView | None, L: int, context=None) -> Finding:
    c = U_SHAPE
    if v is None:
        return untested(c, "no budget sweep", context)
    n0 = equal_count_n0(L)[1 if L >= 8 else 0]
    col = lambda k: f"equal_count_n{n0}_loss_k{k}"
    ks = [k for k in v.budgets if v.has(col(k))]
    numbers = {"n0": n0, "equal_count_ppl": {k: _r(ppl_of(v.seq_loss(col(k)))) for k in ks},
               "oracle_ppl": {k: _r(ppl_of(v.seq_loss(f"oracle_loss_k{k}"))) for k in v.budgets}}
    paper = _u_parts(v, lambda k: f"oracle_loss_k{k}", [k for k in v.budgets if k >= 1], L)
    if paper:  # the paper's curve: k = L/2 against k = 1 and k = L
        numbers["as_paper"] = finite_round(min(paper, key=lambda e: e["value"]), 5)
    nulls = [k for k in v.budgets if v.has(f"count_null_loss_k{k}")]
    null = _u_parts(v, lambda k: f"count_null_loss_k{k}", nulls, L) if nulls else None
    if null:  # the count-matched null draws the same U from the count C(L,k) alone
        numbers["count_null_same_statistic"] = finite_round(min(null, key=lambda e: e["value"]), 5)
    parts = _u_parts(v, col, ks, L)
    if parts is None:
        return untested(c, f"the equal-count oracle (n0 = {n0}) has no budget on both sides of k = {L // 2} (L = {L}), "
                           "or the oracle predates it", context, numbers)
    return decide(c, [Part(e, 0.0, 1) for e in parts], numbers=numbers, context=context)


def one_big_beats_all_big(v: OracleView | None, L: int, context=None) -> Finding:
    c = ONE_BIG
    if v is None:
        return untested(c, "no budget sweep", context)
    n0 = equal_count_n0(L)[0]
    a, b = f"equal_count_n{n0}_loss_k1", f"equal_count_n{n0}_loss_k{L - 1}"
    numbers = {"n0": n0}
    if v.has("oracle_loss_k1") and v.has("loss_all_big"):
        o1, big = v.seq_loss("oracle_loss_k1"), v.seq_loss("loss_all_big")
        numbers["as_paper"] = finite_round(v.estimate(lambda idx: gain(o1[idx], big[idx])), 5)
        numbers["oracle_ppl_k1"], numbers["all_big_ppl"] = _r(ppl_of(o1)), _r(ppl_of(big))
    if not (v.has(a) and v.has(b)) or L < 3:
        return untested(c, "the oracle has no equal-count columns at k=1 and k=L-1", context, numbers)
    x, y = v.seq_loss(a), v.seq_loss(b)
    numbers["equal_count_ppl_k1"], numbers[f"equal_count_ppl_k{L - 1}"] = _r(ppl_of(x)), _r(ppl_of(y))
    return one_part(c, v.estimate(lambda idx: gain(x[idx], y[idx])), numbers=numbers, context=context)


def big_layers_by_budget(v: OracleView | None, L: int, context=None) -> Finding:
    c = PLACEMENT
    ks = reference_budgets(L)
    if v is None or not {ks["small"], ks["large"]} <= set(v.budgets) or ks["small"] == ks["large"]:
        return untested(c, f"needs budgets k={ks['small']} and k={ks['large']}", context)
    parts, numbers = [], {}
    for name, direction in (("small", 1), ("large", -1)):
        k = ks[name]
        share_SL = v.share_SL(f"best_pattern_k{k}", "B")
        e = v.estimate(lambda idx, s=share_SL: slope(s[idx].mean(0)))
        parts.append(Part(e, 0.0, direction))
        numbers[name] = {"k": k, "slope": finite_round(e, 5),
                         "big_share_minus_k_over_L": [_r(x - k / L, 3) for x in share_SL.mean(0)]}
    return decide(c, parts, numbers=numbers, context=context)


def _skip_rates(v: OracleView) -> tuple[str, np.ndarray]:
    column = next(col for col in v.table.column_names if col.startswith("best_pattern_k"))
    return column, v.share_SL(column, "_")


def skip_not_early_exit(v: OracleView | None, L: int, skips: int | None) -> Finding:
    c = SKIP_EE
    if v is None or not skips:
        return untested(c, "no skip study")
    column, skip_SL = _skip_rates(v)
    half = L // 2
    e = v.estimate(lambda idx: float(skip_SL[idx][:, L - half:].mean() - skip_SL[idx][:, :half].mean()))
    ee = early_exit_pattern(L, skips)
    losses = v.oracle.pattern_losses(candidates_only=True)
    order = sorted(losses, key=losses.get)
    numbers = {"skips": skips, "skip_rate_by_layer": [_r(x, 3) for x in skip_SL.mean(0)],
               "early_exit_pattern": ee, "early_exit_rank": order.index(ee) + 1 if ee in losses else None,
               "candidates": len(order), "best_fixed_candidate": order[0] if order else None,
               "early_exit_token_share": _r((v.letters(column) == np.array(list(ee))).all(-1).mean())}
    ee_N, k = v.oracle.pattern_token_losses(ee), L - skips  # big or skip: the budget is the layers kept
    if ee_N is None or not v.has(f"fixed_oos_loss_k{k}"):
        numbers["early_exit_vs_fixed"] = "needs the kept loss matrix and the out-of-sample fixed pattern"
        f = one_part(c, e, numbers=numbers)
        if f.verdict == "reproduced":  # half of the claim untested: never reproduced
            f.verdict = f.unadjusted_verdict = "inconclusive"
            f.p_reproduce = None
        return f
    ee_S, fixed_S = ee_N.reshape(v.S, v.T).mean(1), v.seq_loss(f"fixed_oos_loss_k{k}")
    worse = v.estimate(lambda idx: gain(fixed_S[idx], ee_S[idx]))  # > 0: the best fixed skip pattern beats early exit
    numbers["fixed_oos_gain_over_early_exit"] = finite_round(worse, 5)
    return decide(c, [Part(e, c.threshold, c.direction), Part(worse, 0.0, 1)], numbers=numbers, shown=0)


def layers_consistently_skipped(v: OracleView | None, L: int, skips: int | None) -> Finding:
    c = SKIP_CONSISTENT
    if v is None or not skips:
        return untested(c, "no skip study")
    _, skip_SL = _skip_rates(v)
    p = skips / L
    scale = max(p, 1 - p)
    e = v.estimate(lambda idx: float(np.abs(skip_SL[idx].mean(0) - p).max() / scale))
    rate_L = skip_SL.mean(0)
    return one_part(c, e, numbers={"skip_rate_by_layer": [_r(x, 3) for x in rate_L], "mean_rate": _r(p, 3),
                                   "most_skipped_layer": int(rate_L.argmax()), "most_kept_layer": int(rate_L.argmin())})


def constant_budget_best(seq: OracleView | None) -> Finding:
    c = CONSTANT
    if seq is None or not seq.has("schedule_loss_falling") or not seq.has("schedule_loss_rising"):
        return untested(c, "no sequential oracle with the position schedules", "sequential")
    entries = {e["name"]: e for e in seq.oracle.summary.get("position_budgets", [])}
    const_k = int(round(entries["constant"]["mean_budget"]))
    T = seq.T
    sched = {name: linear_schedule(a, b, T) for name, a, b in default_schedules(seq.oracle.summary["n_layers"])}
    if any(not seq.has(f"oracle_loss_k{k}") for s in sched.values() for k in set(s.tolist())):
        return untested(c, "the sequential oracle lacks the per-budget columns of the position-wise prediction",
                        "sequential")
    const = seq.seq_loss(f"oracle_loss_k{const_k}")
    measured = {n: seq.seq_loss(f"schedule_loss_{n}") for n in ("falling", "rising")}
    predicted = {n: np.stack([seq.loss(f"oracle_loss_k{int(k)}")[:, t] for t, k in enumerate(sched[n])], 1).mean(1)
                 for n in ("falling", "rising")}
    parts, numbers = [], {"schedules": {n: entries[n]["schedule"] for n in ("constant", "falling", "rising")}}
    for n in ("falling", "rising"):
        m, p = measured[n], predicted[n]
        e = seq.estimate(lambda idx, m=m, p=p: gain(const[idx], m[idx]) - gain(const[idx], p[idx]))
        parts.append(Part(e, 0.0, 1))
        numbers[n] = {"interaction": finite_round(e, 5),
                      "as_paper_gain_of_constant": finite_round(seq.estimate(lambda idx, m=m: gain(const[idx], m[idx])), 5),
                      "measured_ppl": _r(ppl_of(m)), "predicted_ppl": _r(ppl_of(p))}
    f, r = measured["falling"], measured["rising"]
    numbers["falling_vs_rising"] = finite_round(seq.estimate(lambda idx: gain(f[idx], r[idx])), 5)
    return decide(c, parts, numbers=numbers, context="sequential")


# ----------------------------------------------------------------------------- routers (section 4.4)


def _paper_routers(rd: RunData | None) -> list[dict]:
    """The paper's routers (method ``budget``) with per-sequence evidence; else every router that has it."""
    if rd is None:
        return []
    have = [r for r in rd.routers if (r.get("oracle") or {}).get("per_sequence")]
    budget = [r for r in have if r.get("method") == "budget"]
    return budget or have


def _at_realised(v: OracleView, column: str, big_fraction: float, L: int) -> np.ndarray | None:
    """Per-sequence loss of a per-budget column read at a router's realised budget (``budget_weights``)."""
    k0, w = budget_weights(big_fraction, L)
    if not (v.has(column.format(k=k0)) and v.has(column.format(k=k0 + 1))):
        return None
    return (1 - w) * v.seq_loss(column.format(k=k0)) + w * v.seq_loss(column.format(k=k0 + 1))


def routers_near_baselines(rd: RunData, v: OracleView | None) -> Finding:
    c = NEAR
    margin, bound = dict(c.extra)["margin"], dict(c.extra)["share_bound"]
    routers = _paper_routers(rd)
    if not routers or v is None:
        return untested(c, "no routers with per-sequence evidence, or no budget sweep")
    rows, p_rep, p_con, parts = [], [], [], []
    for r in routers:
        ps = r["oracle"]["per_sequence"]
        seqs = np.asarray(ps["sequence"])
        fixed = _at_realised(v, "fixed_oos_loss_k{k}", r["big_fraction"], rd.n_layers)
        oracle = _at_realised(v, "oracle_loss_k{k}", r["big_fraction"], rd.n_layers)
        if fixed is None or oracle is None:
            continue
        x_S, f_S, o_S = np.asarray(ps["loss"]), fixed[seqs], oracle[seqs]
        g_S = None if v.groups is None else v.groups[seqs]  # windows of one document resampled together
        near = estimate(lambda idx: gain(x_S[idx], f_S[idx]), len(seqs), groups_S=g_S)  # > 0: the router beats fixed
        share = ratio_estimate(f_S - x_S, f_S - o_S, groups_S=g_S)
        d_S = (f_S - x_S) - bound * (f_S - o_S)  # share < bound <=> mean(d) < 0 (Fieller's test)
        d = estimate(lambda idx: float(d_S[idx].mean()), len(seqs), groups_S=g_S)
        p_equiv = tost(near["value"], near["se"], near["df"], -margin, margin)
        p_share_below = p_below(d["value"], d["se"], d["df"], 0.0)
        far = estimate(lambda idx: gain(o_S[idx], f_S[idx]), len(seqs), groups_S=g_S)  # the oracle's own gain
        p_far = p_above(far["value"], far["se"], far["df"], margin)
        p_rep.append(float(np.max([p_equiv, p_share_below, p_far])))  # NaN (undefined) stays NaN
        p_con.append(min(1.0, 3 * min(p_above(near["value"], near["se"], near["df"], margin),
                                      p_below(near["value"], near["se"], near["df"], -margin),
                                      p_above(d["value"], d["se"], d["df"], 0.0))))
        parts.append(near)
        rows.append({"router": r["name"], "k": int(r["oracle"]["k"]), "realised_k": _r(r["big_fraction"] * rd.n_layers, 3),
                     "gain_over_oos_fixed": finite_round(near, 5), "share_of_oracle_gain": finite_round(share, 5),
                     "oracle_gain_over_oos_fixed": finite_round(far, 5), "p_oracle_far": _r(p_far, 6),
                     "p_equivalent": _r(p_equiv, 6), "p_share_below_bound": _r(p_share_below, 6),
                     "ppl": _r(ppl_of(x_S)), "oos_fixed_ppl": _r(ppl_of(f_S)), "oracle_ppl": _r(ppl_of(o_S))})
    if not rows:
        return untested(c, "the oracle lacks the out-of-sample fixed@k or the budgets around the routers' realised compute")
    worst = int(np.argmax(p_rep))
    f = decide(c, [Part(parts[worst], 0.0, 1)], numbers={"routers": rows},
               p_pair=(float(np.max(p_rep)), min(1.0, len(p_con) * float(np.nanmin(p_con)))))
    f.effect["margin"] = margin  # an equivalence claim: the effect's yardstick is the margin around 0
    return f


def _router_stat(routers: list[dict], of_router, combine=np.mean):
    """A statistic combined over routers (mean, min), of their per-sequence evidence; sequences are shared."""
    arrays = [of_router(r["oracle"]["per_sequence"]) for r in routers]
    return lambda idx: float(combine([fn(idx) for fn in arrays]))


def _null_routers(routers: list[dict], null_run: RunData | None) -> list[dict]:
    """The null model's paper routers, when they scored as many sequences as the run's (else none)."""
    null = _paper_routers(null_run)
    n_seq = len(routers[0]["oracle"]["per_sequence"]["sequence"])
    return null if null and len(null[0]["oracle"]["per_sequence"]["sequence"]) == n_seq else []


def _late_layers(ps):
    big_SL = np.asarray(ps["big_by_layer"])
    return lambda idx: slope(big_SL[idx].mean(0))


def _early_tokens(ps):
    d_S = np.asarray(ps["big_early"]) - np.asarray(ps["big_rest"])
    return lambda idx: float(d_S[idx].mean())


def _groups(routers: list[dict], v: OracleView | None) -> np.ndarray | None:
    """The documents of the routers' sequences (indices into the primary oracle's), where recorded."""
    if v is None or v.groups is None:
        return None
    return v.groups[np.asarray(routers[0]["oracle"]["per_sequence"]["sequence"])]


def _against_untrained(c: Criterion, routers, null, of_router, combine, numbers, why="", groups_S=None) -> Finding:
    """The routers' statistic above the threshold and above the same routers' on the untrained model."""
    n_seq = len(routers[0]["oracle"]["per_sequence"]["sequence"])
    e = estimate(_router_stat(routers, of_router, combine), n_seq, groups_S=groups_S,
                 null_stat=_router_stat(null, of_router, combine) if null else None)
    parts = [Part(e, c.threshold, c.direction)]
    if null:
        gap = e["minus_null"]
        parts.append(Part({"value": gap["diff"], "lo": gap["lo"], "hi": gap["hi"], "se": gap["se"], "df": e["df"]}, 0.0, 1))
    else:
        why = (why + "; " if why else "") + "no null routers (study.null=false?): the claim's null is untested"
    f = decide(c, parts, numbers=numbers, why=why, shown=0)
    f.effect = finite_round({**e, "threshold": c.threshold, "direction": c.direction}, 5)
    if not null:  # half of the claim cannot be tested: never reproduced
        f.p_reproduce = None
        f.verdict = f.unadjusted_verdict = "inconclusive" if f.verdict == "reproduced" else f.verdict
    return f


def routers_favour_late_layers(rd: RunData, null_run: RunData | None = None, v: OracleView | None = None) -> Finding:
    c = LATE
    routers = _paper_routers(rd)
    if not routers:
        return untested(c, "no routers with per-sequence evidence")
    null = _null_routers(routers, null_run)
    return _against_untrained(c, routers, null, _late_layers, np.mean,
                              {"routers": [r["name"] for r in routers], "null_routers": [r["name"] for r in null],
                               "layer_profiles": {r["name"]: r.get("layer_profile") for r in routers}},
                              groups_S=_groups(routers, v))


def routers_early_tokens_more_big(rd: RunData, v: OracleView | None, null_run: RunData | None = None) -> Finding:
    c = EARLY
    routers = _paper_routers(rd)
    if not routers:
        return untested(c, "no routers with per-sequence evidence")
    null = _null_routers(routers, null_run)
    n_seq = len(routers[0]["oracle"]["per_sequence"]["sequence"])
    numbers = {"early_minus_rest": {r["name"]: _r(_early_tokens(r["oracle"]["per_sequence"])(np.arange(n_seq)))
                                    for r in routers}}
    T = v.T if v is not None else 0
    if v is not None:  # the oracle's and the benefit's position profiles beside the routers'
        q = max(2, T // 4)
        early = np.zeros(T, bool)
        early[1:q] = True
        rest = ~early
        rest[0] = False
        benefit = v.loss("loss_all_small") - v.loss("loss_all_big")
        numbers["benefit_early_minus_rest"] = _r(benefit[:, early].mean() - benefit[:, rest].mean())
        for k in sorted({int(r["oracle"]["k"]) for r in routers}):
            if v.has(f"best_pattern_k{k}"):
                big_ST = (v.letters(f"best_pattern_k{k}") == "B").mean(-1)
                numbers[f"oracle_k{k}_early_minus_rest"] = _r(big_ST[:, early].mean() - big_ST[:, rest].mean())
    min_t = int(dict(c.extra)["min_seq_len"])
    why = f"sequences of {T} tokens < {min_t}: underpowered by design (the registry's minimum)" if 0 < T < min_t else ""
    return _against_untrained(c, routers, null, _early_tokens, min, numbers, why, _groups(routers, v))


# ----------------------------------------------------------------------------- difficulty


def difficulty_not_raw_loss(v: OracleView | None, L: int) -> Finding:
    c = DIFFICULTY
    if v is None:
        return untested(c, "no budget sweep")
    small, big = v.loss("loss_all_small"), v.loss("loss_all_big")
    raw, benefit = (small + big) / 2, small - big

    def rho(idx):  # over the tokens of the sequences kept; NaN if a side is constant
        r = spearman(raw[idx].reshape(-1), benefit[idx].reshape(-1))
        return float("nan") if r is None else r

    k = reference_budgets(L)["middle"]
    numbers = {}
    if v.has(f"oracle_loss_k{k}"):
        gap = small - v.loss(f"oracle_loss_k{k}")
        numbers["as_paper_spearman_small_vs_small_minus_oracle"] = _r(spearman(small.reshape(-1), gap.reshape(-1)))
        numbers["selection_share_of_small_minus_oracle"] = _r(1 - benefit.mean() / gap.mean()) if gap.mean() > 0 else None
        numbers["k"] = k
    benefit_S = benefit.mean(1)
    gains = v.estimate(lambda idx: float(benefit_S[idx].mean()))
    numbers["mean_benefit_nats"] = finite_round(gains, 5)
    return decide(c, [Part(v.estimate(rho), c.threshold, c.direction), Part(gains, dict(c.extra)["benefit_above"], 1)],
                  numbers=numbers,
                  context=v.oracle.context, shown=0)


# ----------------------------------------------------------------------------- the registry


@dataclass
class Evidence:
    """What a finding is decided on: the run's outputs, the null control's (used only where the untrained model
    is the claim's null: what routers learn), and (for the checks decided once per context policy) the context
    whose budget sweep is examined."""

    rd: RunData
    null: RunData | None
    context: str | None = None
    views: dict = field(default_factory=dict, repr=False)  # oracle -> its view, shared by one check_all's checks

    @property
    def L(self) -> int:
        return self.rd.n_layers

    def view(self, o) -> OracleView | None:
        """``view(o)``, read once per oracle however many checks use it (a view reads the per-token table)."""
        if id(o) not in self.views:
            self.views[id(o)] = (o, view(o))  # the oracle is kept with its view: its id stays its own
        return self.views[id(o)][1]

    @property
    def sweep(self) -> OracleView | None:
        return self.view(self.rd.sweeps.get(self.context)) if self.context else None

    @property
    def skips(self) -> int | None:
        return int(self.rd.skip_study.summary["skips"]) if self.rd.skip_study else None


@dataclass(frozen=True)
class FindingCheck:
    """One finding: ``check(evidence) -> Finding`` under its frozen ``criterion``. ``per_context``: decided once
    per context policy of the study's budget sweeps. ``uses_null``: needs the null control's outputs (the study
    runs the null control's stages only for these)."""

    id: str
    check: Callable[[Evidence], Finding]
    per_context: bool = False
    uses_null: bool = False


FINDINGS: dict[str, FindingCheck] = {}


def register(finding: FindingCheck) -> FindingCheck:
    """Add a finding; the report decides every registered finding, in registration order."""
    FINDINGS[finding.id] = finding
    return finding


register(FindingCheck("oracle_u_shape", lambda ev: oracle_u_shape(ev.sweep, ev.L, ev.context), per_context=True))
register(FindingCheck("one_big_beats_all_big", lambda ev: one_big_beats_all_big(ev.sweep, ev.L, ev.context), per_context=True))
register(FindingCheck("big_layers_by_budget", lambda ev: big_layers_by_budget(ev.sweep, ev.L, ev.context), per_context=True))
register(FindingCheck("skip_not_early_exit", lambda ev: skip_not_early_exit(ev.view(ev.rd.skip_study), ev.L, ev.skips)))
register(FindingCheck("layers_consistently_skipped",
                      lambda ev: layers_consistently_skipped(ev.view(ev.rd.skip_study), ev.L, ev.skips)))
register(FindingCheck("constant_budget_best", lambda ev: constant_budget_best(ev.view(ev.rd.sequential))))
register(FindingCheck("routers_near_baselines", lambda ev: routers_near_baselines(ev.rd, ev.view(ev.rd.primary))))
register(FindingCheck("routers_favour_late_layers",
                      lambda ev: routers_favour_late_layers(ev.rd, ev.null, ev.view(ev.rd.primary)), uses_null=True))
register(FindingCheck("routers_early_tokens_more_big",
                      lambda ev: routers_early_tokens_more_big(ev.rd, ev.view(ev.rd.primary), ev.null), uses_null=True))
register(FindingCheck("difficulty_not_raw_loss", lambda ev: difficulty_not_raw_loss(ev.view(ev.rd.primary), ev.L)))


def adjust(findings: list[Finding], alpha: float = ALPHA) -> list[Finding]:
    """Holm across the family (every tested finding with a p-value), then the verdicts and the power notes."""
    adjusted = holm([f.p if f.p is not None else float("nan") for f in findings])
    for f, p_adj in zip(findings, adjusted):
        if f.verdict is None:
            continue
        f.p_adjusted = _r(p_adj, 6)
        if math.isfinite(p_adj):
            f.verdict = verdict_from(f.p_reproduce if f.p_reproduce is not None else 1.0,
                                     f.p_contradict if f.p_contradict is not None else 1.0, adjusted_p=p_adj, alpha=alpha)
        sesoi = f.threshold.get("sesoi")
        if f.verdict == "inconclusive" and f.mde is not None and sesoi:
            f.power = (f"underpowered: the minimum detectable effect at this n is {f.mde:.3g}, above the smallest effect "
                       f"of interest {sesoi:g}" if f.mde > sesoi else
                       f"powered: an effect of {sesoi:g} would have been detected with 80% probability (MDE {f.mde:.3g})")
    return findings


def check_all(rd: RunData, null: RunData | None = None, extra: list[Finding] = ()) -> list[Finding]:
    """Every registered finding (those of a budget sweep once per context policy), plus ``extra`` (Stage 1),
    corrected as one family. ``null``: the null control's outputs (default ``rd.null``; a seed of a multi-seed
    study uses its parent's)."""
    null = null if null is not None else rd.null
    per_context = [f for f in FINDINGS.values() if f.per_context]
    once = [f for f in FINDINGS.values() if not f.per_context]
    views: dict = {}
    decided = [f.check(Evidence(rd, null, ctx, views)) for ctx in (list(rd.sweeps) or [None]) for f in per_context]
    decided += [f.check(Evidence(rd, null, None, views)) for f in once]
    return adjust([*decided, *extra])


def across_seeds(rd: RunData, findings: list[dict]) -> dict | None:
    """``study.seeds`` > 1: every finding's effect per training seed, the across-seed mean and standard
    deviation beside the intervals over sequences."""
    runs = [RunData(p) for p in rundir.seed_dirs(rd.run)]
    if not runs:
        return None
    seeds = [rd.config.train.seed] + [r.config.train.seed for r in runs]
    key = lambda f: (f["id"], f["context"])  # a seed may lack a context the parent has
    per_run = [{key(f): f for f in fs} for fs in [findings, *([f.as_dict() for f in check_all(r, null=rd.null)]
                                                              for r in runs)]]
    rows = []
    for f in findings:
        same = [fs[key(f)] for fs in per_run if key(f) in fs]
        values = [x["effect"]["value"] for x in same if x["effect"] and x["effect"].get("value") is not None]
        rows.append({"id": f["id"], "claim": f["claim"], "context": f["context"],
                     "effects": [x["effect"] for x in same], "verdicts": [x["verdict"] for x in same],
                     "mean": _r(float(np.mean(values))) if values else None,
                     "sd": _r(float(np.std(values, ddof=1))) if len(values) > 1 else None})
    quality = [{"seed": s, "all_big_ppl": _r(r.primary.summary["all_big_ppl"]) if r.primary else None}
               for s, r in zip(seeds, [rd, *runs])]
    return {"seeds": seeds, "findings": rows, "models": quality}


def counts(findings: list[dict]) -> dict:
    """The headline: how many findings got each verdict (and how many were testable)."""
    out = {v: sum(f["verdict"] == v for f in findings) for v in ("reproduced", "contradicted", "inconclusive")}
    out["tested"] = sum(f["verdict"] is not None for f in findings)
    return out


__all__ = ["CRITERIA", "CRITERIA_VERSION", "FINDINGS", "SCALE_RULE", "SCALE_RULE_VERSION", "TRENDS", "Criterion",
           "Evidence", "Finding", "FindingCheck", "Part", "across_seeds", "adjust", "check_all", "counts",
           "criteria_fingerprint", "decide", "one_part", "register", "scale_rule_fingerprint", "scale_trend", "untested"]
