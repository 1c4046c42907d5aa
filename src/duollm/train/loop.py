"""One training loop, shared by random-routing pretraining (stage 1) and router training (stage 3).

An ``Objective`` says what is trained (``module``), how a global batch gets its extras
(``make_batch``: e.g. random routes), how a micro-batch becomes a loss (``loss``) and how
to validate (``evaluate``). The loop owns everything else: AdamW, warm-up + cosine,
gradient accumulation and clipping, bf16 autocast on CUDA, DDP or FSDP under torchrun, NaN
checks, metrics (JSON lines, TensorBoard, W&B), atomic checkpoints and exact resume.

Exact resume: the batch and the routes of step s are drawn from a generator seeded by
(seed, s) for the *global* batch, which each process then slices. A resumed run, or a run
on another number of processes, therefore sees exactly the same data and routes.

Tensor name legend: B batch, T positions, L layers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import rundir
from ..checkpoint import (
    LATEST,
    checkpoint_step,
    commit_checkpoint,
    latest_checkpoint,
    load_state,
    load_weights,
    stage_checkpoint,
    tensors_finite,
)
from ..config import RunConfig, TrainConfig, load_run_config, resume_conflict, save_config, to_dict
from ..data.cache import cached_meta, load_tokens, write_data
from ..data.corpus import build_data, check_length, sample_batch, sequences
from ..io import append_line, atomic_write_text, read_json_lines
from ..model.model import DuoModel
from ..model.routing import RouteProbs, sample_routes
from ..runtime import threads
from ..runtime.distributed import init_distributed, resolve_device
from . import fsdp
from .evaluate import validation_metrics
from .tracking import init_wandb


@dataclass
class Objective:
    module: torch.nn.Module  # the trainable parameters live here; it is checkpointed and DDP-wrapped
    loss: Callable[[torch.nn.Module, dict], torch.Tensor]  # (possibly wrapped) module, micro-batch -> loss
    make_batch: Callable[[torch.Tensor, torch.Tensor, torch.Generator], dict] | None = None
    evaluate: Callable[[torch.nn.Module], dict] | None = None  # periodic validation metrics


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on CUDA by default (DESIGN 4.1); on CPU only when asked (train.dtype=bfloat16)."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def deterministic_compiled(on: bool):
    """Deterministic algorithms while a compiled model trains on the CPU (``on``), as they were after.

    Inductor's CPU scatter kernels (the backward of the embedding and of the routed FFN's gather)
    accumulate with atomic adds in whatever order the threads reach them, so two runs of one seed on
    the same threads parted after ~8 `cpu`-preset steps and ended 0.1 nats apart. Deterministic mode
    makes inductor lower them to ATen's ordered kernels instead: bit-identical runs, no step-time
    cost measured (docs/LOG.md 2026-12-02). Not on CUDA, where ordered kernels are slow and cuBLAS
    has its own conditions."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# ----------------------------------------------------------------------------- schedule and logging


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``min_lr`` at ``steps``."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(module: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
    )


class MetricsLog:
    """``metrics.jsonl`` always; TensorBoard and Weights & Biases (offline) when enabled."""

    def __init__(self, out: Path, t: TrainConfig, resume_step: int, enabled: bool, run_config: dict):
        self.path = rundir.metrics_path(out)
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        if self.path.is_file():  # drop what a killed run logged after its last checkpoint (and a torn line)
            rows = read_json_lines(self.path, warn=lambda msg: print(msg, file=sys.stderr))
            kept = [row for row in rows if row.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        if t.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("train.tensorboard=true needs tensorboard: pip install 'duollm[tensorboard]'") from None
            self.tb = SummaryWriter(str(rundir.tensorboard_dir(out)), purge_step=resume_step + 1)
        if t.wandb:
            self.wandb = init_wandb(t, out, run_config)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        append_line(self.path, json.dumps({"step": step, **metrics}))
        for k, v in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------- the loop


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train_loop(
    objective: Objective,
    t: TrainConfig,
    train_tokens: np.ndarray,
    out: Path,
    *,
    device: torch.device,
    resume: bool = False,
    desc: str = "train",
    run_config: dict | None = None,
) -> dict:
    """Train ``objective.module`` for ``t.steps`` steps; checkpoints go to ``out``. Returns final metrics.

    Non-finite guard (DESIGN 7): the loss and the gradient norm are checked before every optimizer
    step, and a checkpoint becomes the checkpoint only for weights that are finite *and* gave a
    finite loss and gradient on the following batch. So the checkpoint of step s is written (staged)
    at step s, with its exact state, and committed during step s + 1 once those checks passed; the
    last one after a probe forward on the next batch. A divergence names a checkpoint that is good.
    """
    out = Path(out)
    ddp = init_distributed(device)
    if t.batch_size % (ddp.world * t.grad_accum):
        raise ValueError(
            f"train.batch_size={t.batch_size} is not divisible by processes x grad_accum = {ddp.world} x {t.grad_accum}"
        )
    micro = t.batch_size // (ddp.world * t.grad_accum)
    sharded = t.parallel == "fsdp" and ddp.world > 1
    module = objective.module.to(device)
    start, state = 0, None
    ckpt = latest_checkpoint(out)
    if ckpt is not None and resume:
        load_weights(module, ckpt)  # before sharding: the shards are cut from the full weights
        state = load_state(ckpt)
        start = state["step"]
    elif ckpt is not None:
        raise ValueError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    if sharded:
        fsdp.shard(module)  # in place; the optimizer is built on the shards
    optimizer = make_optimizer(module, t)
    if state is not None:
        try:
            if sharded:
                fsdp.load_optimizer(module, optimizer, state["optimizer"])
            else:
                optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"corrupt checkpoint {ckpt}: its optimizer state does not fit the model ({e})") from None
    wrapped = module
    if ddp.world > 1 and not sharded:
        # Random routing leaves some parameters without a gradient on a step (DESIGN 4.6)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    if t.compile:
        # where compilation cannot work (no C++ compiler on a CPU machine, say) the step runs eager
        # with one warning instead of failing the run
        torch._dynamo.config.suppress_errors = True
        wrapped = torch.compile(wrapped)
    log = MetricsLog(out, t, start, ddp.main, run_config or {})
    last = {}
    bar = tqdm(total=t.steps, initial=start, desc=desc, disable=not ddp.main, dynamic_ncols=True)
    tokens_per_step = t.batch_size * t.seq_len
    tick = time.perf_counter()
    params = [p for p in module.parameters() if p.requires_grad]
    good = ckpt  # the checkpoint a divergence message names

    def batch_of(step: int) -> dict:
        gen = step_generator(t.seed, step)
        idx_BT, tgt_BT = sample_batch(train_tokens, t.batch_size, t.seq_len, gen)
        batch = {"idx_BT": idx_BT, "tgt_BT": tgt_BT}
        if objective.make_batch is not None:
            batch.update(objective.make_batch(idx_BT, tgt_BT, gen))
        return batch

    def forward(batch: dict, *, backward: bool, net: torch.nn.Module | None = None) -> float:
        """Mean loss over the global batch (gradients accumulated when ``backward``) of ``net`` (default:
        the wrapped module: compiled, DDP)."""
        net = net or wrapped
        loss_sum = torch.zeros((), device=device)
        for m in range(t.grad_accum):
            lo = (ddp.rank * t.grad_accum + m) * micro
            mb = {k: v[lo : lo + micro].to(device) for k, v in batch.items()}  # every tensor is batch-first
            sync = m == t.grad_accum - 1 or ddp.world == 1 or sharded  # FSDP: reduce-scatter every micro-batch
            ctx = contextlib.nullcontext() if sync or not backward else net.no_sync()
            with ctx, autocast(device, t.dtype), torch.set_grad_enabled(backward):
                loss = objective.loss(net, mb)
            if backward:
                (loss / t.grad_accum).backward()
            loss_sum += loss.detach().float()
        if ddp.world > 1:
            dist.all_reduce(loss_sum)
        return loss_sum.item() / (t.grad_accum * ddp.world)

    def diverged(what: str, value: float, step: int) -> ValueError:
        where = f"the last good checkpoint ({good.name}) is kept" if good else "no checkpoint was written yet"
        return ValueError(f"training diverged: {what} is {value} at step {step}; {where} in {out}")

    def stage(step: int):
        if not (fsdp.all_finite(params) if sharded else tensors_finite(p.detach() for p in params)):
            raise diverged("a weight", "non-finite", step)
        if sharded:  # every rank gathers, rank 0 writes the one checkpoint format
            weights, opt = fsdp.full_state(module, optimizer)
            return stage_checkpoint(out, module, {"step": step, "optimizer": opt}, weights=weights) if ddp.main else True
        return stage_checkpoint(out, module, {"step": step, "optimizer": optimizer.state_dict()}) if ddp.main else True

    def commit(staged) -> None:
        nonlocal good
        if ddp.main:
            good = commit_checkpoint(staged, keep=t.keep_checkpoints)
        if ddp.world > 1:
            dist.barrier()

    def probe(step: int) -> float:
        """The loss of the current weights on the next batch, changing nothing (buffers restored)."""
        buffers = {name: b.clone() for name, b in module.named_buffers()}
        # the module itself: a compiled one would compile its whole forward again for no_grad (~6 s on `cpu`)
        loss = forward(batch_of(step), backward=False, net=module)
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
        return loss

    pending = None  # a staged checkpoint waiting for the next loss to prove its weights good
    with deterministic_compiled(t.compile and device.type == "cpu"):
        try:
            for step in range(start, t.steps):
                threads.poll()  # follow the cores other processes leave free (runtime/threads.py)
                lr = lr_at(step, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                module.train()
                train_loss = forward(batch_of(step), backward=True)
                if not math.isfinite(train_loss):
                    raise diverged("loss", train_loss, step + 1)
                # max_norm=inf measures without clipping (train.grad_clip=0: off)
                grad_norm = fsdp.full_norm(torch.nn.utils.clip_grad_norm_(params, t.grad_clip or math.inf))
                if not math.isfinite(grad_norm):
                    raise diverged("the gradient norm", grad_norm, step + 1)
                if pending is not None:
                    commit(pending)
                    pending = None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                bar.update(1)
                if done % t.log_every == 0 or done == t.steps:
                    now = time.perf_counter()
                    n = t.log_every if done % t.log_every == 0 else done - start
                    last = {"train/loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                            "tokens_per_s": n * tokens_per_step / max(now - tick, 1e-9)}
                    tick = now
                    log.write(done, last)
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
                # under FSDP every rank takes part in the forward (its all-gathers); rank 0 logs
                if objective.evaluate is not None and (done % t.eval_every == 0 or done == t.steps) and (ddp.main or sharded):
                    val = objective.evaluate(module)
                    log.write(done, val)
                    last.update(val)
                    if ddp.main:
                        bar.write(f"step {done}: " + "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
                if done % t.save_every == 0 or done == t.steps:
                    pending = stage(done)
            if pending is not None:  # the last checkpoint: its weights' loss on the next batch, no update
                module.train()
                final_loss = probe(t.steps)
                if not math.isfinite(final_loss):
                    raise diverged("the loss of the final weights", final_loss, t.steps)
                commit(pending)
                pending = None
        finally:
            if isinstance(pending, Path):  # staged but never vouched for (divergence, interruption)
                shutil.rmtree(pending, ignore_errors=True)
            bar.close()
            log.close()
    return last


# ----------------------------------------------------------------------------- stage 1: pretraining


def pretrain_objective(model, cfg: RunConfig, val_idx_ST, val_tgt_ST) -> Objective:
    """Random routing (paper section 3.1): each token independently big or small at every layer."""
    probs = RouteProbs(cfg.routing.p_skip, cfg.routing.p_small, cfg.routing.p_big)
    L = cfg.model.n_layers

    def make_batch(idx_BT, tgt_BT, gen):
        route_LBT = sample_routes(probs, L, *idx_BT.shape, per=cfg.routing.per, generator=gen)
        return {"route_BLT": route_LBT.transpose(0, 1)}

    def loss(module, mb):
        return module(mb["idx_BT"], mb["tgt_BT"], mb["route_BLT"].transpose(0, 1), return_logits=False).loss

    def evaluate(module):
        return validation_metrics(module, val_idx_ST, val_tgt_ST, p_big=cfg.routing.p_big)

    return Objective(module=model, loss=loss, make_batch=make_batch, evaluate=evaluate)


def check_run_folder(cfg: RunConfig, out: Path, resume: bool) -> None:
    """May ``train`` (``resume``: ``train --resume``) write ``cfg``'s run into ``out``? One line if not.

    Checked before anything is written, and again under the run's lock: a fresh run goes only into
    a new or empty folder or one without a checkpoint; a resume only continues the same model,
    tokenizer, data and routing (``config.resume_conflict``) to at least the step it has.
    """
    rundir.check_out_folder(out)
    has_config = rundir.has_run(out)
    if not has_config:
        if resume:
            raise ValueError(f"cannot resume: {out} is not a run folder (no config.yaml)")
        strays = [p.name for p in out.iterdir() if p.name != rundir.LOCK] if out.is_dir() else []
        if strays:
            raise ValueError(f"--out {out} is not empty and holds no run (found {sorted(strays)[0]!r}); "
                             f"choose a new or empty folder")
        return
    ckpt = latest_checkpoint(out)
    if not resume:
        if ckpt is not None:
            raise ValueError(f"{out} already holds a checkpoint ({ckpt.name}); pass --resume to continue it "
                             f"or choose another --out")
        return
    conflict = resume_conflict(load_run_config(out), cfg)
    if conflict:
        raise ValueError(f"cannot resume {out}: {conflict}")
    link = out / LATEST
    if ckpt is None and os.path.lexists(link):
        target = os.readlink(link) if link.is_symlink() else "a folder"
        raise ValueError(f"cannot resume {out}: latest points to {target}, which is not a complete checkpoint, "
                         f"and no complete step folder is left")
    if ckpt is not None:
        step = checkpoint_step(ckpt)
        if cfg.train.steps < step:
            raise ValueError(f"cannot resume {out} with train.steps={cfg.train.steps}: it is already trained to "
                             f"step {step} (set train.steps={step} or more)")


def pretrain(cfg: RunConfig, out: Path, *, resume: bool = False, log=print,
             prepare: Callable[[DuoModel], None] | None = None) -> dict:
    """Stage 1 end to end: data and tokenizer into the run folder, then the training loop.

    ``prepare(model)``: applied to the freshly built model before training (e.g. start from other
    weights, freeze parameters: the Fig. 8c ablation of ``study/stage1.py``); a resume then loads the
    checkpoint over its weights, its frozen parameters stay frozen.

    Everything is validated (the config, the run folder, the corpus read and tokenized in memory)
    before the first byte is written, and the folder is written under its lock (``rundir``).
    """
    out = Path(out)
    device = resolve_device(cfg.train.device)
    check_run_folder(cfg, out, resume)
    threads.configure(cfg.threads)  # unless --threads was given
    ddp = init_distributed(device)
    prepared = None
    if ddp.main and cached_meta(cfg, out) is None:
        prepared = build_data(cfg, log=log)  # may refuse the corpus: nothing is written yet
    with rundir.writing(out, create=ddp.main):
        if ddp.main:
            check_run_folder(cfg, out, resume)  # again, now that no other writer can change the folder
            # the config first: a folder killed before its data is complete is still a run (restartable)
            save_config(cfg, rundir.config_path(out))
            meta = write_data(prepared, out) if prepared is not None else cached_meta(cfg, out)
            log(f"corpus {cfg.data.spec}: {meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens")
        if ddp.world > 1:
            dist.barrier()
        train_tokens = load_tokens(out, "train")
        check_length(train_tokens, cfg.train.seq_len, "training")
        val_idx, val_tgt = sequences(load_tokens(out, "val"), cfg.train.seq_len, cfg.train.eval_tokens)
        torch.manual_seed(cfg.train.seed)
        model = DuoModel(cfg.model)
        if prepare is not None:
            prepare(model)
        objective = pretrain_objective(model, cfg, val_idx, val_tgt)
        return train_loop(objective, cfg.train, train_tokens, out, device=device, resume=resume,
                          desc="pretrain", run_config=to_dict(cfg))
