"""Bootstrap intervals over sequences and the three verdicts, on synthetic data with known truth."""

import math

import numpy as np
import pytest

from duollm.stats import NULL_MARGIN, bootstrap, paired_ppl_difference, ppl_interval, verdict, verdict_of


def synthetic(rng, S=40, T=16, mu=4.0, seq_sd=0.3, tok_sd=0.8):
    """Per-token losses with a per-sequence effect (tokens of one sequence are correlated)."""
    return mu + rng.normal(0, seq_sd, (S, 1)) + rng.normal(0, tok_sd, (S, T))


def test_the_interval_covers_the_true_perplexity_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    mu, hits, n = 4.0, 0, 300
    for i in range(n):
        r = ppl_interval(synthetic(rng, mu=mu), n_boot=400, seed=i)
        assert r["ppl_lo"] <= r["ppl"] <= r["ppl_hi"]
        hits += r["ppl_lo"] <= math.exp(mu) <= r["ppl_hi"]
    assert 0.89 <= hits / n <= 0.99, hits / n  # percentile bootstrap over 40 sequences: ~93-95%


def test_resampling_sequences_not_tokens_widens_the_interval_for_correlated_tokens():
    rng = np.random.default_rng(1)
    loss = synthetic(rng, seq_sd=1.0, tok_sd=0.1)
    by_sequence = ppl_interval(loss)
    by_token = ppl_interval(loss.reshape(-1, 1))  # every token its own "sequence": ignores the correlation
    assert (by_sequence["ppl_hi"] - by_sequence["ppl_lo"]) > 3 * (by_token["ppl_hi"] - by_token["ppl_lo"])


def test_paired_difference_is_tight_and_covers_the_true_shift():
    rng = np.random.default_rng(2)
    a = synthetic(rng)
    b = a + 0.05 + rng.normal(0, 0.01, a.shape)  # the same tokens, b slightly worse
    d = paired_ppl_difference(b, a)
    assert d["lo"] > 0 and d["diff"] == pytest.approx(math.exp(b.mean()) - math.exp(a.mean()))
    sa, sb = ppl_interval(a), ppl_interval(b)
    assert sb["ppl_lo"] < sa["ppl_hi"]  # separately the two intervals overlap ...
    assert d["hi"] - d["lo"] < 0.2 * (sa["ppl_hi"] - sa["ppl_lo"])  # ... paired, the difference is clear


def test_seeded_intervals_repeat():
    loss = synthetic(np.random.default_rng(3))
    assert ppl_interval(loss, seed=5) == ppl_interval(loss, seed=5)


@pytest.mark.parametrize("lo,hi,null,direction,want", [
    (0.2, 0.9, None, 1, "reproduced"),
    (0.2, 0.9, 0.1, 1, "reproduced"),
    (0.2, 0.9, 0.5, 1, "inconclusive"),   # the null shows as large an effect: not evidence
    (-0.1, 0.9, None, 1, "inconclusive"),
    (-0.9, -0.2, None, 1, "contradicted"),
    (-0.9, -0.2, None, -1, "reproduced"),  # the paper predicts a decrease
    (-0.9, -0.2, -0.5, -1, "inconclusive"),
    (0.2, 0.9, None, -1, "contradicted"),
    (float("nan"), 0.9, None, 1, "inconclusive"),
])
def test_three_verdicts(lo, hi, null, direction, want):
    assert verdict(lo, hi, null=null, direction=direction) == want


def test_verdicts_on_simulated_effects_of_known_size():
    """A real effect is reproduced, no effect is rarely called either way, the opposite is contradicted."""
    rng = np.random.default_rng(4)
    counts = {size: {"reproduced": 0, "contradicted": 0, "inconclusive": 0} for size in (0.1, 0.0, -0.1)}
    for size in counts:
        for i in range(100):
            a = synthetic(rng)
            b = a - size + rng.normal(0, 0.05, a.shape)  # the paper's claim: b is better (lower loss) than a
            d = paired_ppl_difference(a, b, n_boot=300, seed=i)
            counts[size][verdict(d["lo"], d["hi"])] += 1
    assert counts[0.1]["reproduced"] >= 95 and counts[-0.1]["contradicted"] >= 95
    assert counts[0.0]["inconclusive"] >= 85


def test_bootstrap_of_a_statistic_covers_its_true_value_and_pairs_the_null():
    """stats.bootstrap on a non-perplexity statistic (a mean difference of two per-sequence columns):
    ~95% coverage in a seeded simulation; the same statistic as its own null gives a zero paired gap."""
    rng = np.random.default_rng(5)
    hits, n, true = 0, 200, 0.1
    for i in range(n):
        a_S = rng.normal(0, 1, 40)
        b_S = a_S + true + rng.normal(0, 0.5, 40)
        e = bootstrap(lambda idx: float((b_S[idx] - a_S[idx]).mean()), 40, n_boot=300, seed=i)
        assert e["lo"] <= e["value"] <= e["hi"]
        hits += e["lo"] <= true <= e["hi"]
    assert 0.89 <= hits / n <= 0.99, hits / n
    stat = lambda idx: float(b_S[idx].mean())
    same = bootstrap(stat, 40, null_stat=stat)
    assert same["minus_null"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    assert verdict_of(same) == "inconclusive"  # the null shows exactly the effect: not evidence


def test_a_reproduced_effect_must_be_twice_the_null():
    clear = {"value": 0.30, "lo": 0.25, "hi": 0.35, "null": 0.10, "minus_null": {"diff": 0.2, "lo": 0.15, "hi": 0.25}}
    assert verdict_of(clear) == "reproduced"
    close = {**clear, "null": 0.20, "minus_null": {"diff": 0.1, "lo": 0.05, "hi": 0.15}}  # beyond, but < 2x the null
    assert NULL_MARGIN == 2.0 and verdict_of(close) == "inconclusive"
    negative_null = {**clear, "null": -0.2, "minus_null": {"diff": 0.5, "lo": 0.4, "hi": 0.6}}
    assert verdict_of(negative_null) == "reproduced"
    assert verdict_of({**clear, "lo": -0.4, "hi": -0.3, "value": -0.35}) == "contradicted"
