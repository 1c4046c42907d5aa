"""Uncertainty and verdicts (DESIGN 4.4a): bootstrap intervals over sequences, paired differences,
and the three verdicts a finding can get.

Tokens of one sequence are not independent (they share a context), so the unit of resampling is the
sequence: each bootstrap replicate draws S sequences with replacement and recomputes the statistic.
Methods scored on the same tokens are compared *paired* — one draw of sequences serves both — so the
interval of a difference is much narrower than the two intervals side by side suggest. Intervals are
percentile intervals of ``N_BOOT`` seeded replicates (deterministic for a given input).

Tensor name legend (``docs/NOTATION.md``): S sequences, T positions, I bootstrap replicates.
"""

from __future__ import annotations

import math

import numpy as np

N_BOOT = 1000
LEVEL = 0.95
VERDICTS = ("reproduced", "contradicted", "inconclusive")
# A reproduced effect must be at least this multiple of the null's (in the paper's direction). The
# paired interval of effect - null measures sampling over sequences only; a model two steps from its
# initialisation differs from it by a tiny but *systematic* amount that the paired bootstrap calls
# significant (measured: an untrained model on random text "reproduced" the U-shape at a 0.19% gain
# against the null's 0.17%). Requiring the null to explain at most half of the effect keeps such
# differences inconclusive (tests/test_study.py, random text).
NULL_MARGIN = 2.0


def sequence_means(loss_ST) -> np.ndarray:
    """Mean loss per sequence, float64 (``loss_ST`` may be a tensor, an array or a flat canonical-order
    vector together with ``T`` rows reshaped by the caller)."""
    loss_ST = np.asarray(loss_ST.detach().cpu() if hasattr(loss_ST, "detach") else loss_ST, dtype=np.float64)
    assert loss_ST.ndim == 2 and loss_ST.size, "losses must be [sequences, positions]"
    return loss_ST.mean(1)


def replicates(n_seq: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``idx_IS``: the sequences each replicate draws (with replacement), the same for every method."""
    return np.random.default_rng(seed).integers(0, n_seq, size=(n_boot, n_seq))


def percentile_interval(values_I: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    a = (1.0 - level) / 2
    lo, hi = np.quantile(values_I, [a, 1.0 - a])
    return float(lo), float(hi)


def ppl_interval(loss_ST, *, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """``{"ppl", "ppl_lo", "ppl_hi"}``: perplexity of all tokens and its bootstrap interval over sequences."""
    m_S = sequence_means(loss_ST)
    boot_I = m_S[replicates(len(m_S), n_boot, seed)].mean(1)
    lo, hi = percentile_interval(boot_I, level)
    return {"ppl": math.exp(m_S.mean()), "ppl_lo": math.exp(lo), "ppl_hi": math.exp(hi)}


def paired_ppl_difference(loss_a_ST, loss_b_ST, *, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """``ppl(a) - ppl(b)`` on the same tokens, with its paired bootstrap interval: ``{"diff", "lo", "hi"}``."""
    a_S, b_S = sequence_means(loss_a_ST), sequence_means(loss_b_ST)
    assert a_S.shape == b_S.shape, "a paired comparison needs the same sequences"
    idx_IS = replicates(len(a_S), n_boot, seed)
    diff_I = np.exp(a_S[idx_IS].mean(1)) - np.exp(b_S[idx_IS].mean(1))
    lo, hi = percentile_interval(diff_I, level)
    return {"diff": math.exp(a_S.mean()) - math.exp(b_S.mean()), "lo": lo, "hi": hi}


def recovered_share(loss_x_ST, loss_oracle_ST, loss_fixed_ST, *, n_boot: int = N_BOOT, seed: int = 0,
                    level: float = LEVEL) -> dict:
    """The share of the oracle's gain over the fixed pattern that ``x`` recovers, in mean loss:
    ``(fixed - x) / (fixed - oracle)`` (1: as good as the oracle, 0: no better than fixed), on the same
    tokens, with its paired bootstrap interval over sequences: ``{"value", "lo", "hi"}`` (NaN where
    the oracle gains nothing, e.g. a budget with one candidate)."""
    x_S, o_S, f_S = (sequence_means(a) for a in (loss_x_ST, loss_oracle_ST, loss_fixed_ST))
    assert x_S.shape == o_S.shape == f_S.shape, "a paired comparison needs the same sequences"

    def share(idx_S):
        gain = f_S[idx_S].mean() - o_S[idx_S].mean()
        return (f_S[idx_S].mean() - x_S[idx_S].mean()) / gain if gain > 0 else float("nan")

    return bootstrap(share, len(x_S), n_boot=n_boot, seed=seed, level=level)


def budget_weights(big_fraction: float, n_layers: int) -> tuple[int, float]:
    """``(k0, w)``: a realised big fraction as the budgets around it, k = big_fraction * L = (1 - w) * k0
    + w * (k0 + 1). Curves over k (oracle@k, fixed@k) read at ``(1 - w) * c[k0] + w * c[k0 + 1]``
    compare a router with the compute it realised, not the compute it aimed at (big/small routers:
    compute is linear in the big layers)."""
    x = float(big_fraction) * n_layers
    k0 = min(int(math.floor(x)), n_layers - 1)
    return k0, x - k0


def finite_round(x, nd: int = 4):
    """A number for JSON: rounded to ``nd`` places, undefined (None, NaN, inf) as None; lists and dicts
    element by element. The one rounding of every number the study writes."""
    if isinstance(x, dict):
        return {k: finite_round(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_round(v, nd) for v in x]
    if x is None:
        return None
    x = float(x)
    return round(x, nd) if math.isfinite(x) else None


def bootstrap(stat, n_seq: int, *, null_stat=None, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """A statistic of the sequences and its interval: ``stat(idx_S)`` maps the indices of the
    sequences drawn (with repeats) to a float; it is computed on all sequences and on each
    replicate. ``null_stat``: the same statistic on the null control's outputs for the same
    sequences; its replicates use the *same* draws, so ``minus_null`` (effect - null) is paired.

    Returns ``{"value", "lo", "hi"}`` plus, with a null, ``"null", "null_lo", "null_hi"`` and
    ``"minus_null": {"diff", "lo", "hi"}``. Replicates where the statistic is undefined (NaN) are
    dropped; with none left the interval is NaN."""
    idx_IS = replicates(n_seq, n_boot, seed)
    full = np.arange(n_seq)

    def run(fn):
        value = float(fn(full))
        value_I = np.array([fn(idx) for idx in idx_IS], dtype=np.float64)
        return value, value_I

    def interval(value_I):
        ok = value_I[np.isfinite(value_I)]
        return percentile_interval(ok, level) if len(ok) else (float("nan"), float("nan"))

    value, value_I = run(stat)
    lo, hi = interval(value_I)
    out = {"value": value, "lo": lo, "hi": hi}
    if null_stat is not None:
        n_value, null_I = run(null_stat)
        out["null"], (out["null_lo"], out["null_hi"]) = n_value, interval(null_I)
        d_lo, d_hi = interval(value_I - null_I)
        out["minus_null"] = {"diff": value - n_value, "lo": d_lo, "hi": d_hi}
    return out


def verdict_of(effect: dict, direction: int = 1) -> str:
    """The verdict of a ``bootstrap`` result: the effect's interval, gated by the paired difference
    to the null where there is one (``verdict``)."""
    gap = effect.get("minus_null")
    return verdict(effect["lo"], effect["hi"], null_gap=(gap["lo"], gap["hi"]) if gap else None, direction=direction,
                   value=effect["value"], null_value=effect.get("null"))


def verdict(lo: float, hi: float, *, null: float | None = None, null_gap: tuple[float, float] | None = None,
            direction: int = 1, value: float | None = None, null_value: float | None = None) -> str:
    """The three verdicts of DESIGN 4.4a for an effect with interval ``[lo, hi]``.

    ``direction`` +1: the paper predicts a positive effect, -1 a negative one. ``null``: the same
    statistic on the null control (an untrained model on the same tokens); ``null_gap``: the interval
    of the paired difference effect - null. **reproduced**: the interval excludes zero in the
    paper's direction *and* the effect exceeds the null's by more than the interval (the interval
    lies above the null's value; with ``null_gap``, the difference's interval excludes zero in the
    paper's direction) — so a criterion the null passes cannot reproduce; with ``value`` and
    ``null_value`` (the point estimates) the effect must also be at least ``NULL_MARGIN`` times the
    null's; **contradicted**: the interval excludes zero the other way; otherwise **inconclusive**.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1; got {direction!r}")
    if any(map(math.isnan, (lo, hi))):
        return "inconclusive"
    lo, hi = (lo, hi) if direction == 1 else (-hi, -lo)
    if hi < 0:
        return "contradicted"
    beyond_null = null is None or lo > direction * null
    if null_gap is not None:
        g_lo, g_hi = null_gap if direction == 1 else (-null_gap[1], -null_gap[0])
        beyond_null = beyond_null and not math.isnan(g_lo) and g_lo > 0
    if value is not None and null_value is not None and direction * null_value > 0:
        beyond_null = beyond_null and direction * value >= NULL_MARGIN * direction * null_value
    if lo > 0 and beyond_null:
        return "reproduced"
    return "inconclusive"
