"""Uncertainty and verdicts (DESIGN 4.4a): bootstrap intervals over sequences, paired differences,
and the three verdicts a finding can get.

Tokens of one sequence are not independent (they share a context), so the unit of resampling is the
sequence: each bootstrap replicate draws S sequences with replacement and recomputes the statistic.
Methods scored on the same tokens are compared *paired* — one draw of sequences serves both — so the
interval of a difference is much narrower than the two intervals side by side suggest. Intervals are
percentile intervals of ``N_BOOT`` seeded replicates (deterministic for a given input).

Tensor name legend (``docs/NOTATION.md``): S sequences, T positions, R bootstrap replicates.
"""

from __future__ import annotations

import math

import numpy as np

N_BOOT = 1000
LEVEL = 0.95
VERDICTS = ("reproduced", "contradicted", "inconclusive")


def sequence_means(loss_ST) -> np.ndarray:
    """Mean loss per sequence, float64 (``loss_ST`` may be a tensor, an array or a flat canonical-order
    vector together with ``T`` rows reshaped by the caller)."""
    loss_ST = np.asarray(loss_ST.detach().cpu() if hasattr(loss_ST, "detach") else loss_ST, dtype=np.float64)
    assert loss_ST.ndim == 2 and loss_ST.size, "losses must be [sequences, positions]"
    return loss_ST.mean(1)


def replicates(n_seq: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``idx_RS``: the sequences each replicate draws (with replacement), the same for every method."""
    return np.random.default_rng(seed).integers(0, n_seq, size=(n_boot, n_seq))


def percentile_interval(values_R: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    a = (1.0 - level) / 2
    lo, hi = np.quantile(values_R, [a, 1.0 - a])
    return float(lo), float(hi)


def ppl_interval(loss_ST, *, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """``{"ppl", "ppl_lo", "ppl_hi"}``: perplexity of all tokens and its bootstrap interval over sequences."""
    m_S = sequence_means(loss_ST)
    boot_R = m_S[replicates(len(m_S), n_boot, seed)].mean(1)
    lo, hi = percentile_interval(boot_R, level)
    return {"ppl": math.exp(m_S.mean()), "ppl_lo": math.exp(lo), "ppl_hi": math.exp(hi)}


def paired_ppl_difference(loss_a_ST, loss_b_ST, *, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """``ppl(a) - ppl(b)`` on the same tokens, with its paired bootstrap interval: ``{"diff", "lo", "hi"}``."""
    a_S, b_S = sequence_means(loss_a_ST), sequence_means(loss_b_ST)
    assert a_S.shape == b_S.shape, "a paired comparison needs the same sequences"
    idx_RS = replicates(len(a_S), n_boot, seed)
    diff_R = np.exp(a_S[idx_RS].mean(1)) - np.exp(b_S[idx_RS].mean(1))
    lo, hi = percentile_interval(diff_R, level)
    return {"diff": math.exp(a_S.mean()) - math.exp(b_S.mean()), "lo": lo, "hi": hi}


def verdict(lo: float, hi: float, *, null: float | None = None, direction: int = 1) -> str:
    """The three verdicts of DESIGN 4.4a for an effect with interval ``[lo, hi]``.

    ``direction`` +1: the paper predicts a positive effect, -1 a negative one. ``null``: the same
    statistic on the null control (an untrained model on the same tokens). **reproduced**: the
    interval excludes zero in the paper's direction *and* lies above the null's effect (so a
    criterion the null passes cannot reproduce); **contradicted**: it excludes zero the other way;
    otherwise **inconclusive**.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1; got {direction!r}")
    if any(map(math.isnan, (lo, hi))):
        return "inconclusive"
    lo, hi = (lo, hi) if direction == 1 else (-hi, -lo)
    if hi < 0:
        return "contradicted"
    if lo > 0 and (null is None or lo > direction * null):
        return "reproduced"
    return "inconclusive"
