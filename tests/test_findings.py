"""The findings' criteria (analysis/findings.py) on synthetic data with a known truth: for each claim, data
where the paper's picture holds is reproduced, its opposite contradicted, and no effect inconclusive; the
family's Holm correction; the registry frozen by version."""

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from duollm.analysis.evidence import view
from duollm.analysis.findings import (
    CRITERIA_VERSION,
    Criterion,
    Part,
    adjust,
    big_layers_by_budget,
    constant_budget_best,
    criteria_fingerprint,
    decide,
    difficulty_not_raw_loss,
    layers_consistently_skipped,
    one_big_beats_all_big,
    oracle_u_shape,
    routers_early_tokens_more_big,
    routers_favour_late_layers,
    routers_near_baselines,
    skip_not_early_exit,
)
from duollm.analysis.rundata import Oracle, reference_budgets
from duollm.oracle.reductions import default_schedules, linear_schedule
from duollm.stats import estimate

S, T, L = 16, 16, 12  # the default study's 16 sequences; the paper's 12 layers


def synthetic_oracle(folder, losses: dict, patterns: dict | None = None, summary: dict | None = None):
    """An oracle folder with a per-token table: ``losses`` column -> [S, T] losses, ``patterns`` column ->
    [S][T] pattern strings (or one string for every token)."""
    folder.mkdir(parents=True, exist_ok=True)
    s, t = next(iter(losses.values())).shape
    cols = {"sequence": np.repeat(np.arange(s), t).astype(np.int32), "position": np.tile(np.arange(t), s).astype(np.int32),
            "target": np.arange(s * t, dtype=np.int32) % 7}
    cols.update({k: np.asarray(v, np.float32).reshape(-1) for k, v in losses.items()})
    for k, v in (patterns or {}).items():
        cols[k] = np.broadcast_to(np.asarray(v), (s, t)).reshape(-1).tolist()
    pq.write_table(pa.table(cols), str(folder / "per_token.parquet"))
    return view(Oracle(folder, {"context": "shared", "n_layers": L, **(summary or {})}))


def noisy(rng, mean=2.0, sd=0.3):
    """Per-token losses with sequence-level noise (skewed: a gamma sequence effect), the unit resampled."""
    return mean + sd * (rng.gamma(4.0, 0.5, (S, 1)) - 2.0) + rng.normal(0, 0.5, (S, T))


# ----------------------------------------------------------------------------- the oracle's curve


def curve_oracle(tmp_path, name, equal_count, as_paper=None, seed=0):
    """Oracle@k and the equal-count oracle (n0 = 66, k = 2..10) following the given curves over k."""
    rng = np.random.default_rng(seed)
    base = noisy(rng)
    eps = lambda: rng.normal(0, 0.01, (S, T))  # per-token noise of each pattern choice
    as_paper = as_paper or equal_count
    losses = {f"oracle_loss_k{k}": base + as_paper(k) + eps() for k in range(L + 1)}
    losses |= {f"equal_count_n66_loss_k{k}": base + equal_count(k) + eps() for k in range(2, L - 1)}
    losses |= {f"equal_count_n12_loss_k{k}": base + equal_count(k) + eps() for k in range(1, L)}
    losses["loss_all_big"], losses["loss_all_small"] = base + as_paper(L), base + as_paper(0)
    return synthetic_oracle(tmp_path / name, losses)


def test_u_shape_is_decided_at_equal_candidate_count(tmp_path):
    u = lambda k: 0.01 * (k - 6) ** 2
    f = oracle_u_shape(curve_oracle(tmp_path, "u", u), L)
    assert f.verdict == "reproduced" and f.effect["lo"] > 0 and f.numbers["n0"] == 66
    falling = lambda k: -0.03 * k  # compute helps all the way: no middle optimum
    assert oracle_u_shape(curve_oracle(tmp_path, "falling", falling), L).verdict == "contradicted"
    flat = lambda k: 0.0
    assert oracle_u_shape(curve_oracle(tmp_path, "flat", flat), L).verdict == "inconclusive"
    # the paper's U on oracle@k, made by the count alone: at equal count compute only helps -> contradicted,
    # while the as-paper statistic (shown beside it) is clearly positive
    count = curve_oracle(tmp_path, "count", falling, as_paper=u)
    f = oracle_u_shape(count, L)
    assert f.verdict == "contradicted" and f.numbers["as_paper"]["lo"] > 0
    assert oracle_u_shape(None, L).verdict is None


def test_one_big_beats_all_big_at_equal_count(tmp_path):
    better_with_less = curve_oracle(tmp_path, "less", lambda k: 0.02 * k)
    assert one_big_beats_all_big(better_with_less, L).verdict == "reproduced"
    assert one_big_beats_all_big(curve_oracle(tmp_path, "more", lambda k: -0.02 * k), L).verdict == "contradicted"
    assert one_big_beats_all_big(curve_oracle(tmp_path, "same", lambda k: 0.0), L).verdict == "inconclusive"


# ----------------------------------------------------------------------------- placement and skips


def patterns(rng, weight_L, k, letter="B", other="S"):
    """[S][T] patterns with k layers of ``letter``, drawn per token with probabilities ~ weight_L."""
    p = np.asarray(weight_L, float) / np.sum(weight_L)
    out = []
    for _ in range(S):
        row = []
        for _ in range(T):
            chosen = rng.choice(L, size=k, replace=False, p=p)
            row.append("".join(letter if i in chosen else other for i in range(L)))
        out.append(row)
    return out


def placement(tmp_path, name, small_slope, large_slope, seed=0):
    rng = np.random.default_rng(seed)
    ks = reference_budgets(L)
    w = lambda slope: np.exp(slope * np.arange(L))
    pats = {f"best_pattern_k{ks['small']}": patterns(rng, w(small_slope), ks["small"]),
            f"best_pattern_k{ks['large']}": patterns(rng, w(large_slope), ks["large"])}
    return synthetic_oracle(tmp_path / name, {f"oracle_loss_k{k}": noisy(rng) for k in ks.values()}, pats)


def test_placement_by_budget(tmp_path):
    f = big_layers_by_budget(placement(tmp_path, "paper", 0.3, -0.3), L)
    assert f.verdict == "reproduced"
    assert f.numbers["small"]["slope"]["lo"] > 0 and f.numbers["large"]["slope"]["hi"] < 0
    assert big_layers_by_budget(placement(tmp_path, "late", 0.3, 0.3), L).verdict == "contradicted"
    assert big_layers_by_budget(placement(tmp_path, "flat", 0.0, 0.0), L).verdict == "inconclusive"


def skip_oracle(tmp_path, name, pats, early_exit_worse=0.1):
    """A skip study: the oracle's patterns, the out-of-sample fixed pattern's losses and, in the kept loss
    matrix, early exit's (``early_exit_worse`` nats above the fixed pattern's)."""
    fixed = noisy(np.random.default_rng(0))
    v = synthetic_oracle(tmp_path / name, {"oracle_loss_k6": fixed - 0.2, "fixed_oos_loss_k6": fixed},
                         {"best_pattern_k6": pats}, {"skips": 6})
    names = ["BBBBBB______", "B_B_B_B_B_B_"]
    pq.write_table(pa.table({"pattern": names, "candidate": [True, True], "mean_loss": [0.0, 0.0]}),
                   str(tmp_path / name / "patterns.parquet"))
    np.save(tmp_path / name / "loss_matrix.npy",
            np.stack([fixed.reshape(-1) + early_exit_worse, fixed.reshape(-1)]).astype(np.float32))
    return v


def test_skip_is_tested_against_early_exit(tmp_path):
    rng = np.random.default_rng(1)
    spread = patterns(rng, np.ones(L), 6, "_", "B")  # skips anywhere: late - early = 0
    f = skip_not_early_exit(skip_oracle(tmp_path, "spread", spread), L, 6)
    assert f.verdict == "reproduced" and f.effect["hi"] < 0.5 and f.numbers["early_exit_pattern"] == "BBBBBB______"
    ee = skip_oracle(tmp_path, "ee", "BBBBBB______")
    assert skip_not_early_exit(ee, L, 6).verdict == "contradicted"
    half = np.where(rng.random((S, T)) < 0.5, "BBBBBB______", "_B_B_B_B_B_B").tolist()  # late - early: 1 or 0
    assert skip_not_early_exit(skip_oracle(tmp_path, "half", half), L, 6).verdict == "inconclusive"
    assert skip_not_early_exit(None, L, 6).verdict is None
    # skip choices that look nothing like early exit, but early exit scores as well as any fixed pattern (a model
    # whose patterns all score alike, e.g. at initialisation): not evidence
    alike = skip_not_early_exit(skip_oracle(tmp_path, "alike", spread, early_exit_worse=0.0), L, 6)
    assert alike.verdict == "inconclusive" and alike.effect["hi"] < 0.5


def test_some_layers_consistently_skipped(tmp_path):
    rng = np.random.default_rng(2)
    w = np.ones(L)
    w[0], w[-1] = 1e-6, 1e6  # layer 0 always kept, layer 11 always skipped
    f = layers_consistently_skipped(skip_oracle(tmp_path, "ext", patterns(rng, w, 6, "_", "B")), L, 6)
    assert f.verdict == "reproduced" and f.numbers["most_kept_layer"] == 0 and f.numbers["most_skipped_layer"] == 11
    even = layers_consistently_skipped(skip_oracle(tmp_path, "even", patterns(rng, np.ones(L), 6, "_", "B")), L, 6)
    assert even.verdict == "contradicted"
    mild = np.exp(0.24 * np.arange(L))  # the extreme layers near 0.9 / 0.1: about the threshold (0.8)
    assert layers_consistently_skipped(skip_oracle(tmp_path, "mild", patterns(rng, mild, 6, "_", "B")), L, 6).verdict \
        == "inconclusive"


# ----------------------------------------------------------------------------- budgets along the sequence


def sequential(tmp_path, name, interaction, seed=0):
    """A sequential oracle whose schedules score their position-wise prediction plus ``interaction``."""
    rng = np.random.default_rng(seed)
    base = noisy(rng)
    per_k = {k: base + 0.03 * (6 - k) ** 1.5 + rng.normal(0, 0.01, (S, T)) for k in range(2, 7)}  # convex in k
    losses = {f"oracle_loss_k{k}": v for k, v in per_k.items()}
    pb = []
    for n, a, b in default_schedules(L):
        sched = linear_schedule(a, b, T)
        pred = np.stack([per_k[int(k)][:, t] for t, k in enumerate(sched)], 1)
        if n != "constant":
            losses[f"schedule_loss_{n}"] = pred + interaction + rng.normal(0, 0.01, (S, T))
        pb.append({"name": n, "schedule": f"{a}->{b}", "mean_budget": float(sched.mean()), "oracle_ppl": 1.0})
    return synthetic_oracle(tmp_path / name, losses, summary={"context": "sequential", "position_budgets": pb})


def test_constant_budget_against_the_position_wise_prediction(tmp_path):
    assert constant_budget_best(sequential(tmp_path, "worse", 0.05)).verdict == "reproduced"
    assert constant_budget_best(sequential(tmp_path, "better", -0.05)).verdict == "contradicted"
    f = constant_budget_best(sequential(tmp_path, "convex", 0.0))
    # convexity alone: the as-paper statistic favours the constant schedule, the interaction is nil
    assert f.verdict == "inconclusive" and f.numbers["falling"]["as_paper_gain_of_constant"]["value"] > 0
    assert constant_budget_best(None).verdict is None


# ----------------------------------------------------------------------------- routers


def router(loss_S, rng, early_minus_rest=0.0, late_slope=0.0, k=6, n_layers=L):
    by_layer = np.clip(0.5 + late_slope * (np.arange(n_layers) - n_layers / 2) + rng.normal(0, 0.02, (S, n_layers)), 0, 1)
    rest = np.full(S, 0.5) + rng.normal(0, 0.01, S)
    return {"name": f"budget-{k / n_layers:.2f}", "method": "budget", "target": k / n_layers, "big_fraction": k / n_layers,
            "oracle": {"k": k, "per_sequence": {
                "sequence": list(range(S)), "loss": list(map(float, loss_S)), "big_by_layer": by_layer.tolist(),
                "big_early": (rest + early_minus_rest).tolist(), "big_rest": rest.tolist()}}}


def baselines(tmp_path, rng, oracle_gain=0.3, name="base"):
    fixed = noisy(rng, 3.0)
    cols = {f"oracle_loss_k{k}": fixed - oracle_gain for k in range(L + 1)}
    cols |= {f"fixed_oos_loss_k{k}": fixed for k in range(L + 1)}
    cols |= {"loss_all_small": fixed + 0.2, "loss_all_big": fixed - 0.1}
    return synthetic_oracle(tmp_path / name, cols), fixed.mean(1)


def test_routers_near_the_out_of_sample_baseline_by_equivalence(tmp_path):
    rng = np.random.default_rng(3)
    v, fixed_S = baselines(tmp_path, rng)
    near = SimpleNamespace(routers=[router(fixed_S + rng.normal(0, 0.002, S), rng)], n_layers=L)
    f = routers_near_baselines(near, v)
    assert f.verdict == "reproduced" and f.numbers["routers"][0]["share_of_oracle_gain"]["hi"] < 0.5
    closing = SimpleNamespace(routers=[router(fixed_S - 0.25, rng)], n_layers=L)  # recovers 5/6 of the gain
    assert routers_near_baselines(closing, v).verdict == "contradicted"
    vague = SimpleNamespace(routers=[router(fixed_S + rng.normal(0, 0.08, S), rng)], n_layers=L)
    assert routers_near_baselines(vague, v).verdict == "inconclusive"  # too noisy to show equivalence
    # an oracle itself within 2% of fixed (an untrained model's): "far from the oracle" means nothing
    v_near, fixed_S = baselines(tmp_path, np.random.default_rng(3), oracle_gain=0.005, name="flat")
    level = SimpleNamespace(routers=[router(fixed_S + rng.normal(0, 0.002, S), rng)], n_layers=L)
    assert routers_near_baselines(level, v_near).verdict == "inconclusive"


def test_router_findings_need_the_untrained_models_router(tmp_path):
    rng = np.random.default_rng(4)
    v, fixed_S = baselines(tmp_path, rng)
    run = lambda **kw: SimpleNamespace(routers=[router(fixed_S, rng, **kw)], n_layers=L)
    null = run(early_minus_rest=0.0, late_slope=0.0)
    assert routers_favour_late_layers(run(late_slope=0.05), null).verdict == "reproduced"
    assert routers_favour_late_layers(run(late_slope=-0.05), null).verdict == "contradicted"
    assert routers_favour_late_layers(run(late_slope=0.0), null).verdict == "inconclusive"
    same_as_null = run(late_slope=0.05)
    assert routers_favour_late_layers(run(late_slope=0.05), same_as_null).verdict == "inconclusive"
    assert routers_favour_late_layers(run(late_slope=0.05), None).verdict == "inconclusive"  # no null: never
    f = routers_early_tokens_more_big(run(early_minus_rest=0.1), v, null)
    assert f.verdict == "reproduced" and "underpowered by design" in f.why  # T = 16 < 512: said so
    assert routers_early_tokens_more_big(run(early_minus_rest=-0.1), v, null).verdict == "contradicted"


# ----------------------------------------------------------------------------- difficulty


def difficulty(tmp_path, name, rho_target, gain=0.2, seed=0):
    rng = np.random.default_rng(seed)
    raw = noisy(rng, 4.0, 0.3)
    z = (raw - raw.mean()) / raw.std()
    benefit = gain + 0.1 * (rho_target * z + np.sqrt(1 - rho_target**2) * rng.normal(size=(S, T)))
    cols = {"loss_all_small": raw + benefit / 2, "loss_all_big": raw - benefit / 2}
    return synthetic_oracle(tmp_path / name, cols)


def test_difficulty_is_not_raw_loss(tmp_path):
    f = difficulty_not_raw_loss(difficulty(tmp_path, "indep", 0.0), L)
    assert f.verdict == "reproduced" and f.effect["hi"] < 0.5
    assert difficulty_not_raw_loss(difficulty(tmp_path, "same", 0.95), L).verdict == "contradicted"
    assert difficulty_not_raw_loss(difficulty(tmp_path, "half", 0.5), L).verdict == "inconclusive"
    # a model that gains nothing from compute ranks noise: not evidence for the claim
    assert difficulty_not_raw_loss(difficulty(tmp_path, "nogain", 0.0, gain=0.0), L).verdict == "inconclusive"


# ----------------------------------------------------------------------------- the family and the registry


def test_holm_turns_a_lone_marginal_finding_inconclusive():
    c = Criterion("x", "claim", "h0", "stat", 0.0, 1, 0.01)
    rng = np.random.default_rng(5)

    def finding(shift):
        x = rng.normal(shift, 1.0, 16)
        x = x - x.mean() + shift
        return decide(c, [Part(estimate(lambda idx: float(x[idx].mean()), 16), 0.0, 1)])

    marginal = finding(0.62)  # t ~ 2.5: p ~ 0.025 two-sided, reproduced on its own
    assert marginal.verdict == "reproduced"
    family = adjust([marginal, finding(0.0), finding(0.05), finding(-0.05)])
    assert family[0].unadjusted_verdict == "reproduced" and family[0].verdict == "inconclusive"
    assert family[0].p_adjusted > family[0].p and family[0].power.startswith(("powered", "underpowered"))


def test_the_criteria_are_frozen_by_version():
    """Changing a threshold, statistic or claim changes the fingerprint: bump CRITERIA_VERSION and record why
    in docs/LOG.md, before any result is looked at with the new criteria."""
    assert (CRITERIA_VERSION, criteria_fingerprint()) == (2, FROZEN[2])


FROZEN = {2: "323c175e34483d00"}  # version 2: issue 27, 2026-12-07


def test_findings_round_trip_through_json(tmp_path):
    f = oracle_u_shape(curve_oracle(tmp_path, "u", lambda k: 0.01 * (k - 6) ** 2), L).as_dict()
    assert json.loads(json.dumps(f))["threshold"]["h0"].startswith("the U is selection")


@pytest.mark.parametrize("check", [oracle_u_shape, one_big_beats_all_big])
def test_an_oracle_without_the_count_columns_is_untested_and_says_why(tmp_path, check):
    rng = np.random.default_rng(6)
    old = synthetic_oracle(tmp_path / "old", {f"oracle_loss_k{k}": noisy(rng) for k in range(L + 1)}
                           | {"loss_all_big": noisy(rng)})
    f = check(old, L)
    assert f.verdict is None and "equal-count" in f.why
