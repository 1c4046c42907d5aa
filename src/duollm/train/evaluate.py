"""Per-token evaluation of a Duo model under a routing (pattern, random, policy).

Tensor name legend: S sequences, T positions, L layers, B batch of sequences.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..model.model import DuoModel, Routes
from ..model.routing import RouteProbs, sample_routes
from ..stats import ppl_interval


def random_routes(n_layers: int, n_seq: int, seq_len: int, p_big: float, p_skip: float = 0.0, seed: int = 0):
    """Seeded random routes ``route_LST`` for a whole evaluation set (big with ``p_big``, else small/skip)."""
    probs = RouteProbs(skip=p_skip, small=1.0 - p_big - p_skip, big=p_big)
    gen = torch.Generator().manual_seed(seed)
    return sample_routes(probs, n_layers, n_seq, seq_len, generator=gen)


@torch.no_grad()
def per_token_loss(
    model: DuoModel,
    idx_ST: torch.Tensor,
    tgt_ST: torch.Tensor,
    routes: Routes = None,
    *,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, torch.Tensor]:
    """Loss, routes and FLOPs of every token: ``loss_ST``, ``route_LST``, ``flops_ST`` (on the CPU).

    ``routes`` may be anything ``DuoModel.forward`` accepts; a ``route_LST`` tensor covering
    the whole set is sliced per batch.
    """
    device = next(model.parameters()).device
    S, T = idx_ST.shape
    losses, taken, flops = [], [], []
    whole = isinstance(routes, torch.Tensor) and routes.dim() == 3
    for s0 in tqdm(range(0, S, batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        s1 = min(S, s0 + batch_size)
        r = routes[:, s0:s1].to(device) if whole else routes
        out = model(idx_ST[s0:s1].to(device), tgt_ST[s0:s1].to(device), r, return_logits=False)
        losses.append(out.loss_BT.float().cpu())
        taken.append(out.route_LBT.cpu())
        flops.append(out.flops_BT.cpu())
    return {"loss_ST": torch.cat(losses), "route_LST": torch.cat(taken, 1), "flops_ST": torch.cat(flops)}


def summarize(result: dict[str, torch.Tensor], flops_all_big: float) -> dict:
    """Mean loss, perplexity with its 95% t-interval over sequences, tokens, realised route
    fractions and compute relative to all-big."""
    loss = result["loss_ST"].double().mean().item()
    route = result["route_LST"]
    ci = ppl_interval(result["loss_ST"])  # 95% t-interval over sequences
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "ppl_lo": ci["ppl_lo"],
        "ppl_hi": ci["ppl_hi"],
        "tokens": int(result["loss_ST"].numel()),
        "big_fraction": (route == 2).float().mean().item(),
        "small_fraction": (route == 1).float().mean().item(),
        "skip_fraction": (route == 0).float().mean().item(),
        "compute": result["flops_ST"].double().mean().item() / flops_all_big,
    }


def validation_metrics(model: DuoModel, idx_ST, tgt_ST, p_big: float = 0.5, batch_size: int = 16) -> dict:
    """Validation loss at all-big, all-small and random routing (periodic evaluation in training)."""
    L = model.cfg.n_layers
    was_training = model.training
    model.eval()
    out = {}
    for name, routes in (
        ("all_big", "B" * L),
        ("all_small", "S" * L),
        ("random", random_routes(L, *idx_ST.shape, p_big=p_big)),
    ):
        out[f"val/{name}"] = per_token_loss(model, idx_ST, tgt_ST, routes, batch_size=batch_size)["loss_ST"].mean().item()
    model.train(was_training)
    return out
