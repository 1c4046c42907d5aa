"""The paper's findings (DESIGN section 2), each decided with an interval and against a null (DESIGN 4.4a).

Every check is a small function returning a ``Finding``: the paper's claim, the criterion in words,
the effect (a number whose sign is the paper's claim), its 95% bootstrap interval over sequences,
the same statistic on the null control (the model at initialisation, the same tokens) and the
paired difference, and one of three verdicts (``stats.verdict``):

- **reproduced**: the effect's interval excludes zero in the paper's direction, and the paired
  effect-minus-null interval does too (a criterion an untrained model passes cannot reproduce);
- **contradicted**: the effect's interval excludes zero the other way;
- **inconclusive**: otherwise. ``verdict`` None: the run lacks what the check needs.

Effects are scale-free where models are compared (relative perplexity gains, shares, slopes), so
that the trained model and the null, whose perplexities differ ~20x, are measured alike. The
criteria follow the paper's budgets: L/3, L/2 and 2L/3 (4, 6 and 8 of 12 big layers).

Array name legend (``docs/NOTATION.md``): S sequences, T positions, L layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import rundir
from ..stats import bootstrap, finite_round, verdict, verdict_of
from .difficulty import reference_k, spearman
from .evidence import OracleView, gain, max_drop, ppl_of, slope, view
from .rundata import RunData, early_exit_pattern, reference_budgets


@dataclass
class Finding:
    id: str
    claim: str  # the paper's finding, in words
    criterion: str  # the test applied to this run's numbers
    verdict: str | None  # reproduced | contradicted | inconclusive; None: not testable on this run
    effect: dict | None = None  # stats.bootstrap: value, lo, hi (+ null, null_lo, null_hi, minus_null)
    numbers: dict = field(default_factory=dict)
    context: str | None = None  # the oracle's context policy, where it matters

    def as_dict(self) -> dict:
        return asdict(self)


def _r(x, nd: int = 4):
    return finite_round(x, nd)


def decide(fid, claim, criterion, stat, n_seq, null_stat=None, numbers=None, context=None, direction=1) -> Finding:
    effect = bootstrap(stat, n_seq, null_stat=null_stat)
    return Finding(fid, claim, criterion, verdict_of(effect, direction), finite_round(effect, 5), numbers or {}, context)


def _combine(verdicts: list[str]) -> str:
    """Several parts of one claim: reproduced if all are, contradicted if any is, else inconclusive."""
    if verdicts and all(v == "reproduced" for v in verdicts):
        return "reproduced"
    return "contradicted" if "contradicted" in verdicts else "inconclusive"


def _same_tokens(a: OracleView | None, b: OracleView | None) -> bool:
    return a is not None and b is not None and (a.S, a.T) == (b.S, b.T) and \
        (a.table.column("target").to_numpy() == b.table.column("target").to_numpy()).all()


def _null(v: OracleView, nv: OracleView | None) -> OracleView | None:
    """The null's view, when it scores the same tokens (else the verdict cannot be gated by it)."""
    return nv if _same_tokens(v, nv) else None


# ----------------------------------------------------------------------------- the oracle (sections 4.1, 4.2)


def u_window(L: int) -> tuple[int, int]:
    return max(1, L // 2 - 1), min(L, -(-L // 2) + 1)


def oracle_u_shape(v: OracleView | None, nv: OracleView | None, L: int, context=None) -> Finding:
    """Paper fig. 2: oracle perplexity falls from k=1 to about k=L/2, then rises to k=L."""
    lo, hi = u_window(L)
    claim = "Oracle perplexity falls from k=1 to about k=L/2 and rises again to k=L (C(L,k) peaks at L/2)."
    criterion = (f"effect = relative perplexity gain of the best budget within L/2±1 = {lo}..{hi} over the best "
                 f"budget outside it (among 1..L): > 0 iff the minimum lies in the window, both sides worse")
    if v is None or not {1, L} <= set(v.budgets):
        return Finding("oracle_u_shape", claim, criterion, None, context=context)

    def stat_of(w: OracleView):
        inside = [w.seq_loss(f"oracle_loss_k{k}") for k in range(lo, hi + 1) if k in w.budgets]
        outside = [w.seq_loss(f"oracle_loss_k{k}") for k in range(1, L + 1) if k in w.budgets and not lo <= k <= hi]
        return lambda idx: gain(min((x[idx] for x in inside), key=np.mean), min((x[idx] for x in outside), key=np.mean))

    ppl = {k: ppl_of(v.seq_loss(f"oracle_loss_k{k}")) for k in v.budgets if k >= 1}
    k_best = min(ppl, key=lambda k: (ppl[k], k))
    nv = _null(v, nv)
    return decide("oracle_u_shape", claim, criterion, stat_of(v), v.S, stat_of(nv) if nv else None,
                   {"k_best": k_best, "ppl_k1": _r(ppl[1]), "ppl_best": _r(ppl[k_best]), "ppl_kL": _r(ppl[L]), "L": L},
                   context)


def one_big_beats_all_big(v: OracleView | None, nv: OracleView | None, context=None) -> Finding:
    """Paper section 4.1: the oracle with a single big layer beats every layer big."""
    claim = "The oracle with one big layer per token beats all layers big."
    criterion = "effect = relative perplexity gain of oracle@1 over all-big (paired, same tokens)"
    if v is None or 1 not in v.budgets:
        return Finding("one_big_beats_all_big", claim, criterion, None, context=context)

    def stat_of(w):
        a, b = w.seq_loss("oracle_loss_k1"), w.seq_loss("loss_all_big")
        return lambda idx: gain(a[idx], b[idx])

    nv = _null(v, nv)
    return decide("one_big_beats_all_big", claim, criterion, stat_of(v), v.S, stat_of(nv) if nv else None,
                   {"oracle_ppl_k1": _r(ppl_of(v.seq_loss("oracle_loss_k1"))),
                    "all_big_ppl": _r(ppl_of(v.seq_loss("loss_all_big")))}, context)


def big_layers_by_budget(v: OracleView | None, nv: OracleView | None, L: int, context=None) -> Finding:
    """Paper figs. 3-4: at a small budget the big modules go to late layers, at a large one to early layers."""
    ks = reference_budgets(L)
    claim = "At a small budget the oracle gives big modules to late layers; at a large budget to early layers."
    criterion = (f"slope of the oracle's big share over the layer index: > 0 at k={ks['small']} (L/3) and < 0 at "
                 f"k={ks['large']} (2L/3), each interval excluding zero and beyond the null's slope")
    if v is None or not {ks["small"], ks["large"]} <= set(v.budgets) or ks["small"] == ks["large"]:
        return Finding("big_layers_by_budget", claim, criterion, None, context=context)

    def stat_of(w, k):
        share_SL = w.share_SL(f"best_pattern_k{k}", "B")
        return lambda idx: slope(share_SL[idx].mean(0))

    nv = _null(v, nv)
    stats = {name: (stat_of(v, ks[name]), stat_of(nv, ks[name]) if nv else None) for name in ("small", "large")}
    parts = {}
    for name, direction in (("small", 1), ("large", -1)):
        k = ks[name]
        e = bootstrap(stats[name][0], v.S, null_stat=stats[name][1])
        parts[name] = {"k": k, "direction": direction, "verdict": verdict_of(e, direction), **finite_round(e, 5),
                       "big_share_by_layer": [_r(x, 3) for x in v.share_SL(f"best_pattern_k{k}", "B").mean(0)]}
    # the headline effect: the difference of the two slopes (small minus large; > 0 as the paper says)
    (small, n_small), (large, n_large) = stats["small"], stats["large"]
    e = bootstrap(lambda idx: small(idx) - large(idx), v.S,
                  null_stat=(lambda idx: n_small(idx) - n_large(idx)) if nv else None)
    return Finding("big_layers_by_budget", claim, criterion, _combine([p["verdict"] for p in parts.values()]),
                   finite_round(e, 5), {"slopes": parts}, context)


def skip_not_early_exit(v: OracleView | None, nv: OracleView | None, L: int, skips: int | None) -> Finding:
    """Paper section 4.3: optimal skip patterns do not look like early exit."""
    claim = "Optimal skip patterns do not look like early exit (run the first layers, skip the rest)."
    criterion = ("effect = the largest fall of the oracle's per-layer skip rate going deeper (0 for early exit and "
                 "any rate that only rises with depth; > 0: an earlier layer is skipped more than a later one)")
    if v is None or not skips:
        return Finding("skip_not_early_exit", claim, criterion, None)
    column = next(c for c in v.table.column_names if c.startswith("best_pattern_k"))

    def stat_of(w):
        skip_SL = w.share_SL(column, "_")
        return lambda idx: max_drop(skip_SL[idx].mean(0))

    rate_L = v.share_SL(column, "_").mean(0)
    ee = early_exit_pattern(L, skips)
    losses = v.oracle.pattern_losses()
    order = sorted(losses, key=losses.get)
    nv = _null(v, nv)
    return decide("skip_not_early_exit", claim, criterion, stat_of(v), v.S, stat_of(nv) if nv else None,
                   {"skips": skips, "skip_rate_by_layer": [_r(x, 3) for x in rate_L],
                    "rate_spread": _r(rate_L.max() - rate_L.min()), "early_exit_pattern": ee,
                    "early_exit_rank": order.index(ee) + 1 if ee in losses else None, "candidates": len(order),
                    "best_fixed_pattern": order[0] if order else None,
                    "early_exit_token_share": _r((v.letters(column) == np.array(list(ee))).all(-1).mean())}, None)


def constant_budget_best(seq: OracleView | None, nseq: OracleView | None, predictions: dict) -> Finding:
    """Paper section 4.2: a constant per-token budget beats one that falls or rises along the sequence."""
    claim = "A constant per-token budget beats one that falls or rises along the sequence (same mean budget)."
    criterion = ("sequential oracle (each token chooses given its predecessors' own choices): effect = the smaller "
                 "relative perplexity gain of the constant schedule over the falling and over the rising one. Under the "
                 "shared and frozen oracles the comparison is the convexity of oracle@k (measured = predicted)")
    cols = ("oracle_loss_k{c}", "schedule_loss_falling", "schedule_loss_rising")
    if seq is None or not seq.has(cols[1]) or not seq.has(cols[2]):
        return Finding("constant_budget_best", claim, criterion, None, numbers={"predictions": predictions},
                       context="sequential")
    entries = {e["name"]: e for e in seq.oracle.summary.get("position_budgets", [])}
    c = int(round(entries["constant"]["mean_budget"]))

    def stat_of(w):
        const, fall, rise = (w.seq_loss(col.format(c=c)) for col in cols)
        return lambda idx: min(gain(const[idx], fall[idx]), gain(const[idx], rise[idx]))

    nseq = _null(seq, nseq) if nseq is not None and nseq.has(cols[1]) and nseq.has(cols[0].format(c=c)) else None
    return decide("constant_budget_best", claim, criterion, stat_of(seq), seq.S, stat_of(nseq) if nseq else None,
                   {"schedules": {n: entries[n]["schedule"] for n in ("constant", "falling", "rising")},
                    "predictions": predictions}, "sequential")


def schedule_predictions(rd: RunData) -> dict:
    """Per context: each schedule's measured perplexity beside the per-token prediction Σ w_k·oracle@k."""
    out = {}
    for o in [*rd.sweeps.values(), *([rd.sequential] if rd.sequential else [])]:
        out[o.label] = {e["name"]: {"measured": _r(e["oracle_ppl"]), "predicted": _r(e.get("predicted_ppl"))}
                        for e in o.summary.get("position_budgets") or []}
    return out


# ----------------------------------------------------------------------------- routers (section 4.4)


def _paper_routers(rd: RunData | None) -> list[dict]:
    """The paper's routers (method ``budget``) with per-sequence evidence; else every router that has it."""
    if rd is None:
        return []
    have = [r for r in rd.routers if (r.get("oracle") or {}).get("per_sequence")]
    budget = [r for r in have if r.get("method") == "budget"]
    return budget or have


def routers_near_baselines(rd: RunData, v: OracleView | None, null: RunData | None = None) -> Finding:
    claim = "Trained routers land near the fixed and best-of-random baselines, far from the oracle."
    criterion = ("per router of the paper's method: the router-fixed perplexity interval holds 0, the router-oracle "
                 "gap is at least 80% of the fixed-oracle gap (effect = gap ratio - 0.8; the oracle interpolated to "
                 "the router's realised big fraction), and the oracle's gain over fixed exceeds the null model's")
    routers = _paper_routers(rd)
    if not routers or v is None:
        return Finding("routers_near_baselines", claim, criterion, None)
    null_gain = {}
    if null is not None and null.primary is not None:
        for b in null.primary.budgets:
            if b.get("fixed_ppl"):
                null_gain[int(b["k"])] = 1 - b["oracle_ppl"] / b["fixed_ppl"]
    rows, verdicts = [], []
    for r in routers:
        ps = r["oracle"]["per_sequence"]
        seqs = np.asarray(ps["sequence"])
        router_S, fixed_S = np.asarray(ps["loss"]), np.asarray(ps["fixed_loss"])
        k_real = float(r["big_fraction"]) * rd.n_layers
        k0 = min(int(math.floor(k_real)), rd.n_layers - 1)
        w = k_real - k0
        if not {k0, k0 + 1} <= set(v.budgets):  # an oracle run by hand over other budgets: not this router's
            continue
        oracle_S = ((1 - w) * v.seq_loss(f"oracle_loss_k{k0}") + w * v.seq_loss(f"oracle_loss_k{k0 + 1}"))[seqs]
        ratio = bootstrap(lambda idx: (ppl_of(router_S[idx]) - ppl_of(oracle_S[idx]))
                          / (ppl_of(fixed_S[idx]) - ppl_of(oracle_S[idx])) - 0.8, len(seqs))
        near = bootstrap(lambda idx: ppl_of(router_S[idx]) - ppl_of(fixed_S[idx]), len(seqs))
        k = int(r["oracle"]["k"])
        real = bootstrap(lambda idx: gain(oracle_S[idx], fixed_S[idx]), len(seqs))
        gap_real = k in null_gain and real["lo"] > null_gain[k]
        if ratio["hi"] < 0:
            vd = "contradicted"
        elif ratio["lo"] > 0 and near["lo"] <= 0 <= near["hi"] and gap_real:
            vd = "reproduced"
        else:
            vd = "inconclusive"
        verdicts.append(vd)
        rows.append({"router": r["name"], "k": k, "realised_k": _r(k_real, 3), "verdict": vd,
                     "gap_ratio_minus_0.8": finite_round(ratio, 5), "router_minus_fixed_ppl": finite_round(near, 5),
                     "oracle_gain_over_fixed": finite_round(real, 5), "null_oracle_gain_over_fixed": _r(null_gain.get(k)),
                     "ppl": _r(ppl_of(router_S)), "fixed_ppl": _r(ppl_of(fixed_S)), "oracle_ppl": _r(ppl_of(oracle_S))})
    if not rows:
        return Finding("routers_near_baselines", claim, criterion, None,
                       numbers={"why": "the oracle lacks the budgets around the routers' realised compute"})
    worst = min(rows, key=lambda x: x["gap_ratio_minus_0.8"]["value"])
    return Finding("routers_near_baselines", claim, criterion, _combine(verdicts), worst["gap_ratio_minus_0.8"],
                   {"routers": rows})


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


def routers_favour_late_layers(rd: RunData, null_run: RunData | None = None) -> Finding:
    claim = "Routers favour late layers for the big modules."
    criterion = ("effect = slope of the routers' big share over the layer index, mean over the paper's routers; "
                 "the null: the same router trained on the model at initialisation")
    routers = _paper_routers(rd)
    if not routers:
        return Finding("routers_favour_late_layers", claim, criterion, None)
    null = _null_routers(routers, null_run)
    n_seq = len(routers[0]["oracle"]["per_sequence"]["sequence"])
    return decide("routers_favour_late_layers", claim, criterion, _router_stat(routers, _late_layers), n_seq,
                   _router_stat(null, _late_layers) if null else None,
                   {"routers": [r["name"] for r in routers], "null_routers": [r["name"] for r in null],
                    "layer_profiles": {r["name"]: r.get("layer_profile") for r in routers}})


def routers_early_tokens_more_big(rd: RunData, null_run: RunData | None = None) -> Finding:
    claim = "Routers give early tokens (the first positions of a sequence) more big modules."
    criterion = ("per router: big share at positions 1..T/4 (position 0 excluded) minus at the rest, per sequence; "
                 "effect = the smallest over the paper's routers (the same sign at every budget), reproduced only "
                 "if it is at least 0.02, its interval excludes 0, and it exceeds the null router's")
    routers = _paper_routers(rd)
    if not routers:
        return Finding("routers_early_tokens_more_big", claim, criterion, None)
    n_seq = len(routers[0]["oracle"]["per_sequence"]["sequence"])
    null = _null_routers(routers, null_run)
    effect = bootstrap(_router_stat(routers, _early_tokens, min), n_seq,
                       null_stat=_router_stat(null, _early_tokens, min) if null else None)
    vd = verdict_of(effect)
    if vd == "reproduced" and effect["value"] < 0.02:
        vd = "inconclusive"
    per_router = {r["name"]: _r(_early_tokens(r["oracle"]["per_sequence"])(np.arange(n_seq))) for r in routers}
    return Finding("routers_early_tokens_more_big", claim, criterion, vd, finite_round(effect, 5),
                   {"early_minus_rest": per_router, "threshold": 0.02})


# ----------------------------------------------------------------------------- difficulty


def difficulty_not_raw_loss(v: OracleView | None, nv: OracleView | None, L: int) -> Finding:
    claim = ("A token's difficulty is its potential to gain from compute, not its raw loss: "
             "the two rank tokens differently.")
    criterion = ("effect = 0.5 - Spearman(all-small loss, gap), gap = all-small - oracle at k=L/2, over tokens; "
                 "reproduced if below 0.5 and ranking loss and gain apart more than the null model does")
    if v is None:
        return Finding("difficulty_not_raw_loss", claim, criterion, None)
    k = reference_k(v.budgets, L)

    def stat_of(w):
        small = w.loss("loss_all_small")
        gap = small - w.loss(f"oracle_loss_k{k}")
        def stat(idx):  # over the tokens of the sequences drawn; NaN (dropped) if a side is constant
            rho = spearman(small[idx].reshape(-1), gap[idx].reshape(-1))
            return float("nan") if rho is None else 0.5 - rho

        return stat

    def high_loss_low_gain(w):
        small = w.loss("loss_all_small").reshape(-1)
        gap = small - w.loss(f"oracle_loss_k{k}").reshape(-1)
        return _r((gap[small >= np.quantile(small, 0.75)] < np.median(gap)).mean())

    nv = _null(v, nv)
    return decide("difficulty_not_raw_loss", claim, criterion, stat_of(v), v.S, stat_of(nv) if nv else None,
                   {"k": k, "high_loss_low_gain_share": high_loss_low_gain(v),
                    "null_high_loss_low_gain_share": high_loss_low_gain(nv) if nv else None}, v.oracle.context)


# ----------------------------------------------------------------------------- the registry


@dataclass
class Evidence:
    """What a finding is decided on: the run's outputs, the null control's, and (for the checks decided once
    per context policy) the context whose budget sweep is examined."""

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
    def null_sweep(self) -> OracleView | None:
        return self.view(self.null.sweeps.get(self.context)) if self.null is not None and self.context else None

    def of(self, pick) -> tuple[OracleView | None, OracleView | None]:
        """``pick(run_data)`` -> an oracle output, viewed on the run and on the null control."""
        return self.view(pick(self.rd)), self.view(pick(self.null)) if self.null is not None else None


@dataclass(frozen=True)
class FindingCheck:
    """One finding: ``check(evidence) -> Finding``. ``per_context``: decided once per context policy of
    the study's budget sweeps. ``null_gated``: a "reproduced" needs the same statistic on the null control
    (DESIGN 4.4a); a check whose own criterion involves the null says False."""

    id: str
    check: Callable[[Evidence], Finding]
    per_context: bool = False
    null_gated: bool = True


FINDINGS: dict[str, FindingCheck] = {}


def register(finding: FindingCheck) -> FindingCheck:
    """Add a finding; the report decides every registered finding, in registration order."""
    FINDINGS[finding.id] = finding
    return finding


register(FindingCheck("oracle_u_shape", lambda ev: oracle_u_shape(ev.sweep, ev.null_sweep, ev.L, ev.context),
                      per_context=True))
register(FindingCheck("one_big_beats_all_big", lambda ev: one_big_beats_all_big(ev.sweep, ev.null_sweep, ev.context),
                      per_context=True))
register(FindingCheck("big_layers_by_budget", lambda ev: big_layers_by_budget(ev.sweep, ev.null_sweep, ev.L, ev.context),
                      per_context=True))
register(FindingCheck("skip_not_early_exit", lambda ev: skip_not_early_exit(
    *ev.of(lambda r: r.skip_study), ev.L, int(ev.rd.skip_study.summary["skips"]) if ev.rd.skip_study else None)))
register(FindingCheck("constant_budget_best", lambda ev: constant_budget_best(
    *ev.of(lambda r: r.sequential), schedule_predictions(ev.rd))))
register(FindingCheck("routers_near_baselines", lambda ev: routers_near_baselines(ev.rd, ev.view(ev.rd.primary), ev.null),
                      null_gated=False))
register(FindingCheck("routers_favour_late_layers", lambda ev: routers_favour_late_layers(ev.rd, ev.null)))
register(FindingCheck("routers_early_tokens_more_big", lambda ev: routers_early_tokens_more_big(ev.rd, ev.null)))
register(FindingCheck("difficulty_not_raw_loss", lambda ev: difficulty_not_raw_loss(*ev.of(lambda r: r.primary), ev.L)))


def check_all(rd: RunData, null: RunData | None = None) -> list[Finding]:
    """Every registered finding, those of a budget sweep once per context policy (the contexts first, in
    the order of DESIGN section 2). ``null``: the null control's outputs (default ``rd.null``; a seed of a
    multi-seed study uses its parent's)."""
    null = null if null is not None else rd.null
    per_context = [f for f in FINDINGS.values() if f.per_context]
    once = [f for f in FINDINGS.values() if not f.per_context]
    views: dict = {}
    decided = [(f, f.check(Evidence(rd, null, ctx, views))) for ctx in (list(rd.sweeps) or [None]) for f in per_context]
    decided += [(f, f.check(Evidence(rd, null, None, views))) for f in once]
    for check, f in decided:  # DESIGN 4.4a: a finding counts only against a null
        if check.null_gated and f.verdict == "reproduced" and (f.effect is None or f.effect.get("null") is None):
            f.verdict = "inconclusive"
            f.numbers["without_null"] = "no null control for this statistic (study.null=false?): not evidence"
    return [f for _, f in decided]


def across_seeds(rd: RunData, findings: list[dict]) -> dict | None:
    """``study.seeds`` > 1: every finding's effect per training seed (each against the run's null
    control), the across-seed mean and standard deviation beside the bootstrap intervals."""
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


__all__ = ["FINDINGS", "Evidence", "Finding", "FindingCheck", "across_seeds", "check_all", "counts", "register", "verdict"]
