"""A memory plan (``duollm info --config PRESET --memory [--gpus N] [--parallel ddp|fsdp]``): the bytes
each device holds while training, so a layout can be chosen before renting GPUs (issue 17).

    weights      fp32 master weights (autocast computes in bf16 but keeps fp32 parameters)
    gradients    fp32, one per trainable weight
    optimizer    AdamW's two moments, fp32
    buffers      DDP: its gradient buckets (a second copy of the gradients); FSDP: the all-gathered
                 weights of two blocks (the one running and the one prefetched) and one block's
                 unsharded gradients before their reduce-scatter; AdamW's step temporary
    activations  what autograd saves for the backward at the micro-batch (train.batch_size / (GPUs x
                 grad_accum) sequences of train.seq_len tokens), plus the two logits-sized gradients
                 in flight when the backward starts

Activations are not estimated from a formula but *counted*: the real model runs one sequence on the
``meta`` device (no memory, no arithmetic) under saved-tensor hooks, at all-big and at all-small routing,
and random routing at P(big) = p saves p of the one and 1 - p of the other per token (measured: within
0.3% of a routed CPU forward on the ``cpu`` preset, 4% on ``tiny``). Under bf16 autocast the counted
tensors are taken at 2 bytes where the meta run in bf16 gives them; the residual stream and the norms
stay fp32 under real autocast, so the bf16 figure is a lower bound (``cpu`` preset: CPU autocast saved
0.71x of fp32's bytes, the plan counts 0.66x).
"""

from __future__ import annotations

import torch

from .config import RunConfig
from .model import DuoModel

FP32 = 4


def saved_bytes_per_token(cfg: RunConfig, route: str, dtype: torch.dtype = torch.float32) -> float:
    """Bytes autograd saves per token for the backward, the whole model under one route ("B" or "S" in every
    layer), counted on the meta device at the run's sequence length."""
    with torch.device("meta"):
        model = DuoModel(cfg.model).to(dtype)
    T = cfg.train.seq_len
    idx_BT = torch.zeros(1, T, dtype=torch.long, device="meta")
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:  # weights (and views of them) are not activations
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx_BT, idx_BT, route * cfg.model.n_layers, return_logits=False)
    return sum(seen.values()) / T


def plan(cfg: RunConfig, gpus: int = 1, parallel: str = "ddp", dtype: str | None = None) -> dict:
    """Bytes per device (see the module docstring) for training ``cfg`` on ``gpus`` devices."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1; got {gpus}")
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"--parallel must be ddp or fsdp; got {parallel!r}")
    t = cfg.train
    if t.batch_size % (gpus * t.grad_accum):
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by GPUs x grad_accum = {gpus} x {t.grad_accum}")
    if dtype is None:  # auto: bf16 autocast on the GPUs planned for, fp32 where the config says cpu
        dtype = t.dtype if t.dtype != "auto" else ("float32" if t.device == "cpu" else "bfloat16")
    with torch.device("meta"):
        model = DuoModel(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in model.layers)
    shards = gpus if parallel == "fsdp" else 1
    states = {"weights": FP32 * n_params / shards, "gradients": FP32 * n_params / shards,
              "optimizer": 2 * FP32 * n_params / shards}
    if parallel == "ddp":
        buffers = FP32 * n_params if gpus > 1 else 0.0
    else:
        buffers = 3 * FP32 * block if gpus > 1 else 0.0
    p_big = cfg.routing.p_big
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    per_token = {r: saved_bytes_per_token(cfg, r, torch_dtype) for r in ("B", "S")}
    p_small = cfg.routing.p_small + cfg.routing.p_skip  # a skipped token saves less still: counted as small
    tokens = t.batch_size // (gpus * t.grad_accum) * t.seq_len
    saved = tokens * (p_big * per_token["B"] + p_small * per_token["S"])
    # in flight at the start of the backward: the gradients of the log-softmax output and of the logits
    logits_grads = 2 * tokens * cfg.model.vocab_size * FP32
    adam_step = FP32 * n_params / shards  # foreach AdamW's one temporary of the parameters' size (sqrt of v)
    out = {**states, "buffers": buffers + adam_step, "activations": saved + logits_grads}
    out["total"] = sum(out.values())
    return {"bytes": out, "gpus": gpus, "parallel": parallel, "dtype": dtype, "params": n_params,
            "micro_batch": t.batch_size // (gpus * t.grad_accum), "seq_len": t.seq_len,
            "activation_bytes_per_token": {"all_big": per_token["B"], "all_small": per_token["S"]}}


def format_plan(p: dict) -> str:
    gib = 2**30
    lines = [f"memory per device: {p['gpus']} device(s), {p['parallel']}, {p['dtype']} compute, micro-batch "
             f"{p['micro_batch']} x {p['seq_len']} tokens, {p['params']:,} parameters"]
    for k, v in p["bytes"].items():
        lines.append(f"  {k:<12} {v / gib:>9.2f} GiB")
    return "\n".join(lines)
