"""The cost model of the study's stages, for its ETA: forward-equivalent FLOPs per kind of stage, and
seconds left at the FLOP rates measured so far (``run.py``)."""

from __future__ import annotations

import math

from ..config import RunConfig
from ..model.routing import FlopModel
from .settings import skip_count


def _prefixes(L: int, skips: int | None) -> list[int]:
    """Distinct pattern prefixes at each depth 1..L of the oracle's tree: 2^d over big/small; with
    big-or-skip and exactly s skips, the prefixes that can still end with s skips."""
    if skips is None:
        return [2**d for d in range(1, L + 1)]
    return [sum(math.comb(d, j) for j in range(max(0, d - (L - skips)), min(d, skips) + 1)) for d in range(1, L + 1)]


def costs(cfg: RunConfig, tokens: int) -> dict[str, float]:
    """Forward-equivalent FLOPs of each kind of stage (backward = 2 forwards), for the ETA only."""
    fm = FlopModel.from_config(cfg.model, cfg.train.seq_len)
    L = cfg.model.n_layers
    big, small = fm.all_big(), fm.pattern([1] * L)
    layer = fm.attention + (fm.ffn[1] + fm.ffn[2]) / 2
    t = cfg.train
    s = skip_count(cfg)
    return {
        "train": 3 * t.steps * t.batch_size * t.seq_len * (big + small) / 2,
        "oracle": tokens * (sum(_prefixes(L, None)) * layer + 2**L * fm.head),
        "sequential": 2.5 * tokens * (sum(_prefixes(L, None)) * layer + 2**L * fm.head),  # measured ~2.2x the sweep
        "skip": tokens * (sum(_prefixes(L, s)) * (fm.attention + fm.ffn[2] / 2) + math.comb(L, s) * fm.head) if s else 0.0,
        # the soft mix runs both FFNs
        "router": (3 * cfg.study.router_steps * cfg.study.router_batch * t.seq_len * (big + small - L * fm.attention)
                   + 4 * tokens * big),
    }


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def eta_seconds(remaining: list, rates: dict[str, list[float]]) -> float | None:
    """Seconds left: each remaining stage's FLOPs at the rate measured on its kind in this call,
    or at the pooled rate of the kinds measured so far (None before any stage was computed)."""
    pooled = [sum(v[0] for v in rates.values()), sum(v[1] for v in rates.values())]
    if pooled[1] <= 0:
        return None
    total = 0.0
    for stage in remaining:
        sec, flops = rates.get(stage.kind, pooled)
        total += stage.cost * (sec / flops if flops > 0 else pooled[0] / pooled[1])
    return total
