"""Budget calibration: one offset on the big logit so the hard big fraction meets the target."""

from __future__ import annotations

import torch

from ..model.policy import Router
from ..model.routing import BIG
from .evaluate import run_router


@torch.no_grad()
def calibrate_budget(model, router: Router, idx_ST, tgt_ST, target: float, *, batch_size: int = 16,
                     iters: int = 20, span: float = 20.0) -> tuple[float, float]:
    """Find the offset on every layer's big logit that makes the hard big fraction meet ``target``.

    Bisection over the offset: the fraction of (token, layer) routes that go big grows with it
    (not strictly: routes change the later layers' inputs, so the closest value seen is kept).
    Sets ``router.offset_O`` and returns (offset, realised fraction on these tokens).
    """
    big = int(router.option_of_R[BIG])
    base = router.offset_O.clone()

    def fraction(delta: float) -> float:
        router.offset_O.copy_(base)
        router.offset_O[big] += delta
        return (run_router(model, router, idx_ST, tgt_ST, batch_size)["route_LST"] == BIG).float().mean().item()

    lo, hi = -span, span
    best = (abs(fraction(0.0) - target), 0.0, 0.0)  # (miss, |offset|, offset): prefer the smallest shift
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        f = fraction(mid)
        best = min(best, (abs(f - target), abs(mid), mid))
        if f < target:
            lo = mid
        else:
            hi = mid
    delta = best[2]
    return delta, fraction(delta)


