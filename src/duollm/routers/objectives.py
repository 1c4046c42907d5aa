"""Every training method on one module (``RouterTrainer``, its loss from ``methods.METHODS``) for ``train_loop``.

Tensor legend (``docs/NOTATION.md``): B batch, T positions, L layers, R routes, O options, S sequences.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model.policy import Router
from ..model.routing import BIG, SKIP
from ..train.loop import Objective
from .config import RouterConfig
from .evaluate import run_router
from .methods import METHODS


def beta_at(step: int, c: RouterConfig) -> float:
    """Softmax sharpness at ``step`` (0-based), annealed upward from beta_start to beta_end (3.3).

    The paper's formula is misprinted (DESIGN 2); softmax(beta * logits) with beta rising
    moves the mix from soft towards the hard argmax used at evaluation.
    """
    frac = min(1.0, step / max(1, c.train.steps - 1))
    if c.beta_schedule == "constant":
        return c.beta_start
    if c.beta_schedule == "geometric":
        return c.beta_start * (c.beta_end / c.beta_start) ** frac
    return c.beta_start + (c.beta_end - c.beta_start) * frac




class RouterTrainer(nn.Module):
    """What ``train_loop`` trains and checkpoints: the router plus a step counter.

    The frozen LM is held outside the module tree (a tuple, not a submodule) so it is not
    checkpointed with every router, not handed to the optimizer and not synchronised by DDP.
    ``steps_done`` is a buffer, hence checkpointed: the beta schedule continues exactly on resume.
    """

    def __init__(self, router: Router, model: nn.Module, cfg: RouterConfig):
        super().__init__()
        self.router = router
        self._lm = (model,)
        self.cfg = cfg
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @property
    def lm(self) -> nn.Module:
        return self._lm[0]

    def forward(self, mb: dict) -> torch.Tensor:
        return METHODS[self.cfg.method].loss(self, mb)


def router_objective(trainer: RouterTrainer, cfg: RouterConfig, val_idx_ST, val_tgt_ST,
                     imitation_data: tuple | None = None, value_data: dict | None = None):
    """An ``Objective`` for ``train.train_loop``.

    ``make_batch`` is called by the loop exactly once per optimizer step on every process;
    it advances the checkpointed step counter and passes that step's beta with the batch.
    For imitation it replaces the loop's random windows by whole oracle-labelled sequences
    (``imitation_data`` = idx_ST, tgt_ST, route_LST, benefit_LST or None), drawn with the loop's per-step generator
    so a resumed run sees the same batches. For the value methods it draws ``batch_size x seq_len``
    token rows of ``value_data`` (``value.collect_targets``, every round so far) the same way.
    """
    def make_batch(idx_BT, tgt_BT, gen):
        step = int(trainer.steps_done)
        trainer.steps_done += 1
        B = idx_BT.shape[0]
        batch = {"beta_B": torch.full((B,), beta_at(step, cfg))}
        if imitation_data is not None:
            idx_ST, tgt_ST, route_LST, benefit_LST = imitation_data
            rows = torch.randint(0, idx_ST.shape[0], (B,), generator=gen)
            batch.update(idx_BT=idx_ST[rows], tgt_BT=tgt_ST[rows], route_BLT=route_LST[:, rows].transpose(0, 1))
            if benefit_LST is not None:
                batch["benefit_BLT"] = benefit_LST[:, rows].transpose(0, 1)
        if value_data is not None:
            T = idx_BT.shape[1]
            rows = torch.randint(0, value_data["x_NLD"].shape[0], (B, T), generator=gen)
            batch.update(x_BTLD=value_data["x_NLD"][rows], used_BTL=value_data["used_NL"][rows],
                         value_BTLO=value_data["value_NLO"][rows])
        return batch

    def loss(module, mb):
        return module(mb)

    def evaluate(module):
        router, model = module.router, module.lm
        res = run_router(model, router, val_idx_ST, val_tgt_ST, cfg.eval_batch)
        return {"val/loss": res["loss_ST"].double().mean().item(),
                "val/big_fraction": (res["route_LST"] == BIG).float().mean().item(),
                "val/skip_fraction": (res["route_LST"] == SKIP).float().mean().item(),
                "beta": beta_at(max(0, int(module.steps_done) - 1), cfg)}

    return Objective(module=trainer, loss=loss, make_batch=make_batch, evaluate=evaluate)


