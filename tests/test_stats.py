"""Intervals, tests and verdicts (stats.py) on synthetic data with known truth: coverage at the study's own
number of sequences, the jackknife t-interval against the classical one, Holm, equivalence, power."""

import math

import numpy as np
import pytest
from scipy import stats as sp

from duollm.stats import (
    estimate,
    finding_p,
    holm,
    mde,
    p_above,
    paired_ppl_difference,
    ppl_interval,
    recovered_share,
    tost,
    verdict_from,
)

STUDY_N = 16  # the default study's sequences (config.StudyConfig.tokens / seq_len)


def skewed_sequences(rng, S=STUDY_N, T=32, mu=4.0):
    """Per-token losses whose per-sequence means are skewed and heavy-tailed: a gamma sequence effect
    (skewness 1; some sequences are much harder) plus Student-t(3) token noise. Returns ``loss_ST`` and the
    true mean loss."""
    shape, scale = 4.0, 0.15
    seq_S = rng.gamma(shape, scale, (S, 1)) - shape * scale
    return mu + seq_S + 0.5 * rng.standard_t(3, (S, T)), mu


def test_the_interval_covers_at_least_93_percent_at_the_studys_n_on_skewed_heavy_tailed_data():
    """DESIGN 4.4a: coverage holds at the study's own number of sequences. Three statistics the study
    uses: a perplexity, a paired relative gain, and a share of a gain (a ratio of paired differences)."""
    rng = np.random.default_rng(0)
    n, hits = 1000, {"ppl": 0, "gain": 0, "share": 0}
    for _ in range(n):
        base_ST, mu = skewed_sequences(rng)
        hits["ppl"] += (ci := ppl_interval(base_ST))["ppl_lo"] <= math.exp(mu) <= ci["ppl_hi"]
        # b = a - 0.1 (+ a skewed per-sequence part of mean 0): the true gain is 1 - exp(-0.1)
        b_ST = base_ST - 0.1 - 0.05 * (rng.gamma(2.0, 1.0, (STUDY_N, 1)) - 2.0)
        a_S, b_S = base_ST.mean(1), b_ST.mean(1)
        e = estimate(lambda idx: 1 - math.exp(b_S[idx].mean() - a_S[idx].mean()), STUDY_N)
        hits["gain"] += e["lo"] <= 1 - math.exp(-0.1) <= e["hi"]
        # x recovers 30% of the oracle's 0.2-nat gain over fixed, per sequence with skewed noise
        fixed = base_ST
        oracle = fixed - 0.2 - 0.1 * (rng.gamma(2.0, 1.0, (STUDY_N, 1)) - 2.0)
        x = fixed - 0.06 - 0.1 * (rng.gamma(2.0, 1.0, (STUDY_N, 1)) - 2.0)
        s = recovered_share(x, oracle, fixed)
        hits["share"] += s["lo"] <= 0.3 <= s["hi"]
    for name, h in hits.items():
        assert h / n >= 0.93, (name, h / n)


def test_the_jackknife_interval_of_a_mean_is_the_classical_t_interval():
    x_S = np.random.default_rng(1).normal(size=12)
    e = estimate(lambda idx: x_S[idx].mean(), 12)
    lo, hi = sp.t.interval(0.95, 11, loc=x_S.mean(), scale=sp.sem(x_S))
    assert (e["lo"], e["hi"]) == pytest.approx((lo, hi)) and e["df"] == 11


def test_groups_are_left_out_together():
    """Two windows of one document are one unit: duplicating every sequence within its group leaves the
    interval of the mean unchanged (the same units), while treating them as separate units narrows it."""
    x = np.random.default_rng(2).normal(size=8)
    twice = np.repeat(x, 2)
    grouped = estimate(lambda idx: twice[idx].mean(), 16, groups_S=np.repeat(np.arange(8), 2))
    alone = estimate(lambda idx: x[idx].mean(), 8)
    assert (grouped["lo"], grouped["hi"], grouped["df"]) == pytest.approx((alone["lo"], alone["hi"], alone["df"]))
    ungrouped = estimate(lambda idx: twice[idx].mean(), 16)
    assert ungrouped["hi"] - ungrouped["lo"] < 0.8 * (alone["hi"] - alone["lo"])


def test_paired_difference_is_tight_and_covers_the_true_shift():
    rng = np.random.default_rng(3)
    a = 4.0 + rng.normal(0, 0.3, (40, 1)) + rng.normal(0, 0.8, (40, 16))
    b = a + 0.05 + rng.normal(0, 0.01, a.shape)  # the same tokens, b slightly worse
    d = paired_ppl_difference(b, a)
    assert d["lo"] > 0 and d["diff"] == pytest.approx(math.exp(b.mean()) - math.exp(a.mean()))
    sa, sb = ppl_interval(a), ppl_interval(b)
    assert sb["ppl_lo"] < sa["ppl_hi"]  # separately the two intervals overlap ...
    assert d["hi"] - d["lo"] < 0.2 * (sa["ppl_hi"] - sa["ppl_lo"])  # ... paired, the difference is clear


def test_the_null_is_left_out_with_the_effect():
    rng = np.random.default_rng(4)
    common = rng.normal(0, 1, 20)
    eff, null = common + 0.3 + rng.normal(0, 0.05, 20), common + rng.normal(0, 0.05, 20)
    e = estimate(lambda idx: eff[idx].mean(), 20, null_stat=lambda idx: null[idx].mean())
    assert e["lo"] < e["null_hi"]  # side by side the intervals overlap; paired, the difference is clear
    assert e["minus_null"]["lo"] > 0.2 and e["minus_null"]["diff"] == pytest.approx(eff.mean() - null.mean())


def test_holm_matches_a_hand_computation_and_skips_undefined():
    p = [0.01, 0.04, float("nan"), 0.03, 0.5]
    adj = holm(p)
    # sorted 0.01, 0.03, 0.04, 0.5 (m = 4): 0.04, max(0.04, 0.09), max(0.09, 0.08), max(.., 0.5)
    assert adj[0] == pytest.approx(0.04) and adj[3] == pytest.approx(0.09) and adj[1] == pytest.approx(0.09)
    assert adj[4] == pytest.approx(0.5) and math.isnan(adj[2])


def test_holm_controls_the_family_wise_error_under_the_global_null():
    rng = np.random.default_rng(5)
    any_false = 0
    for _ in range(2000):
        any_false += min(holm(rng.uniform(size=10).tolist())) < 0.05
    assert any_false / 2000 <= 0.06


def test_an_equivalence_test_needs_the_interval_inside_the_margin():
    assert tost(0.0, 0.01, 15, -0.05, 0.05) < 0.05  # tight around zero: equivalent
    assert tost(0.0, 0.05, 15, -0.05, 0.05) > 0.05  # as wide as the margin: not shown
    assert tost(0.06, 0.001, 15, -0.05, 0.05) > 0.5  # clearly outside


def test_the_minimum_detectable_effect_is_detected_80_percent_of_the_time():
    rng = np.random.default_rng(6)
    n, sd = 16, 1.0
    effect = mde(sd / math.sqrt(n), n - 1)
    detected = 0
    for _ in range(2000):
        x = rng.normal(effect, sd, n)
        detected += 2 * p_above(x.mean(), x.std(ddof=1) / math.sqrt(n), n - 1) < 0.05
    assert 0.74 <= detected / 2000 <= 0.86


@pytest.mark.parametrize("size,want", [(0.3, "reproduced"), (0.0, "inconclusive"), (-0.3, "contradicted")])
def test_three_verdicts_on_simulated_effects_of_known_size(size, want):
    rng = np.random.default_rng(7)
    got = {v: 0 for v in ("reproduced", "contradicted", "inconclusive")}
    for _ in range(200):
        x = rng.normal(size, 0.3, 16)
        se = x.std(ddof=1) / 4
        got[verdict_from(p_above(x.mean(), se, 15), 1 - p_above(x.mean(), se, 15))] += 1
    assert got[want] >= (180 if size else 185), got


def test_a_family_adjusted_p_can_turn_a_verdict_inconclusive():
    assert verdict_from(0.01, 0.99) == "reproduced" and finding_p(0.01, 0.99) == pytest.approx(0.02)
    assert verdict_from(0.01, 0.99, adjusted_p=0.08) == "inconclusive"
    assert verdict_from(0.99, 0.001, adjusted_p=0.01) == "contradicted"
    assert verdict_from(float("nan"), float("nan")) == "inconclusive"


def test_the_share_interval_is_the_inverted_t_test_of_num_minus_theta_den():
    """Fieller: at each end of the interval, the paired t-test of num - θ·den sits exactly at p = 0.05."""
    from duollm.stats import ratio_estimate
    rng = np.random.default_rng(8)
    den = 0.2 + rng.normal(0, 0.1, 16)
    num = 0.3 * den + rng.normal(0, 0.05, 16)
    r = ratio_estimate(num, den)
    assert r["lo"] < r["value"] < r["hi"] and r["value"] == pytest.approx(num.mean() / den.mean())
    for theta in (r["lo"], r["hi"]):
        d = num - theta * den
        assert sp.ttest_1samp(d, 0.0).pvalue == pytest.approx(0.05, abs=1e-9)
    assert math.isnan(ratio_estimate(num, rng.normal(0, 0.1, 16))["lo"])  # a denominator around 0: unbounded
