"""The naive evaluator: one full model forward per pattern (the reference and the benchmark baseline).

It uses nothing of the tree engine — only ``DuoModel.forward`` — so the tests that compare the
two check the engine against the model itself.

- ``shared``: the pattern routes the whole sequence; one forward per pattern.
- ``frozen``: token t's loss under pattern p is the loss at position t of a forward in which
  positions < t follow the reference routes and position t follows p (positions > t cannot
  influence t: the attention is causal). We batch the T such variants of each sequence.

Tensor name legend: S sequences, B batch, T positions, L layers, P patterns, N tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..model.model import DuoModel
from ..model.routing import format_pattern
from .context import reference_routes
from .space import pattern_codes


@torch.no_grad()
def naive_losses(
    model: DuoModel,
    idx_ST: torch.Tensor,
    tgt_ST: torch.Tensor,
    route_PL: np.ndarray,
    *,
    context: str = "shared",
    reference=None,
    batch_size: int = 16,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(p, loss_ST)`` (float32, on the CPU) for every pattern, one full forward at a time."""
    if context not in ("shared", "frozen"):
        raise ValueError(f"unknown context {context!r}; use shared or frozen")
    L = model.cfg.n_layers
    device = model.embed.weight.device
    S, T = idx_ST.shape
    reference = "B" * L if reference is None else reference
    for p, route_L in enumerate(route_PL):
        pattern = format_pattern(route_L)
        parts = []
        for s0 in range(0, S, batch_size):
            idx_BT = idx_ST[s0 : s0 + batch_size].to(device)
            tgt_BT = tgt_ST[s0 : s0 + batch_size].to(device)
            if context == "shared":
                parts.append(model(idx_BT, tgt_BT, pattern, return_logits=False).loss_BT.float().cpu())
                continue
            B = idx_BT.shape[0]
            ref_LBT = reference_routes(model, idx_BT, reference)
            own_L11 = torch.as_tensor(np.asarray(route_L), device=device).long().view(L, 1, 1)
            # variant (b, t): reference routes before t, the candidate pattern from t on
            before_TT = torch.ones(T, T, dtype=torch.bool, device=device).tril(-1)  # [variant t, position]
            route_LBTT = torch.where(before_TT, ref_LBT[:, :, None, :], own_L11[..., None])
            out = model(
                idx_BT.repeat_interleave(T, 0), tgt_BT.repeat_interleave(T, 0),
                route_LBTT.reshape(L, B * T, T), return_logits=False,
            )
            loss_BTT = out.loss_BT.view(B, T, T)
            parts.append(loss_BTT.diagonal(dim1=1, dim2=2).float().cpu())
        yield p, torch.cat(parts)


@torch.no_grad()
def naive_sequential(model: DuoModel, idx_BT: torch.Tensor, tgt_BT: torch.Tensor, schedule_T, candidates):
    """The sequential oracle by brute force: for t = 0..T-1 and every candidate p of budget
    ``schedule_T[t]`` (in code order), a full forward in which positions < t follow their chosen
    patterns and position t follows p; token t keeps the first pattern of lowest loss.
    Returns ``(loss_BT, code_BT)`` like ``sequential.sequential_oracle``."""
    L = model.cfg.n_layers
    B, T = idx_BT.shape
    device = idx_BT.device
    chosen_LBT = torch.zeros(L, B, T, dtype=torch.long, device=device)
    loss_BT = torch.empty(B, T)
    code_BT = np.empty((B, T), dtype=np.int64)
    for t in range(T):
        route_PL = np.asarray(candidates(int(schedule_T[t])))
        code_P = pattern_codes(route_PL)
        order = np.argsort(code_P, kind="stable")
        best = torch.full((B,), float("inf"))
        for p in order:
            route_LBT = chosen_LBT.clone()
            route_LBT[:, :, t:] = torch.as_tensor(route_PL[p], device=device).long().view(L, 1, 1)
            loss_B = model(idx_BT, tgt_BT, route_LBT, return_logits=False).loss_BT[:, t].float().cpu()
            better = loss_B < best
            best = torch.where(better, loss_B, best)
            code_BT[better.numpy(), t] = code_P[p]
            chosen_LBT[:, better.to(device), t] = torch.as_tensor(route_PL[p], device=device).long().view(L, 1)
        loss_BT[:, t] = best
    return loss_BT, code_BT
