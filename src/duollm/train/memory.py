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

The peak (``total``) is the larger of two moments, not the sum of the rows: the start of the backward
(weights, Adam state, DDP's buckets, the activations and the logits' gradients, FSDP's gathered blocks;
under accumulation the gradients too) and AdamW's step (weights, Adam state, gradients, its temporary).
Gradients are freed after every step and the activations before the optimizer runs. It is the peak of
*live* tensor bytes, what ``torch.cuda.max_memory_allocated`` reports; an allocator keeps more
(``benchmarks/bench_memory.py`` measures both on the CPU).

Activations are not estimated from a formula but *counted*: the real model runs one sequence on the
``meta`` device (no memory, no arithmetic) under saved-tensor hooks, at all-big and at all-small routing,
and random routing at P(big) = p saves p of the one and 1 - p of the other per token (measured: 4.8% under
a routed CPU forward on the ``cpu`` preset at its batch and length, 4% on ``tiny``). Under bf16 autocast the
counted tensors are taken at 2 bytes where the meta run in bf16 gives them; the residual stream and the norms
stay fp32 under real autocast, so the bf16 figure is a lower bound (``cpu`` preset: CPU autocast saved
0.71x of fp32's bytes, the plan counts 0.66x).
"""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..model.model import DuoModel

FP32 = 4


_SDPA = F.scaled_dot_product_attention


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Attention as the fused kernels run it, for the meta count. On ``meta`` PyTorch has no fused kernel and
    takes the math path, which saves the T x T probabilities; CPU flash attention and the CUDA kernels save
    q, k, v, the output and one log-sum-exp per query instead (at the ``cpu`` preset's batch a CPU forward
    saves 509 MiB: the math path counted 579, this 484). The CPU flash op has a meta kernel: its saved
    tensors are the fused kernels'. A mask (never in training) keeps the math path."""
    if attn_mask is not None or dropout_p:
        return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    if enable_gqa and k.shape[1] != q.shape[1]:  # grouped heads: an upper bound (the kernels read k, v once)
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)[0]


def saved_bytes_per_token(cfg: RunConfig, route: str, dtype: torch.dtype = torch.float32) -> float:
    """Bytes autograd saves per token for the backward, the whole model under one route ("B" or "S" in every
    layer), counted on the meta device at the run's sequence length, attention as the fused kernels save it."""
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

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            mock.patch.object(F, "scaled_dot_product_attention", _fused_attention):
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
    buckets = FP32 * n_params if parallel == "ddp" and gpus > 1 else 0.0  # DDP's: there from the start
    gathered = 2 * FP32 * block if parallel == "fsdp" and gpus > 1 else 0.0  # the running and the prefetched block
    block_grads = FP32 * block if parallel == "fsdp" and gpus > 1 else 0.0  # one block's before its reduce-scatter
    p_big = cfg.routing.p_big
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    per_token = {r: saved_bytes_per_token(cfg, r, torch_dtype) for r in ("B", "S")}
    p_small = cfg.routing.p_small + cfg.routing.p_skip  # a skipped token saves less still: counted as small
    tokens = t.batch_size // (gpus * t.grad_accum) * t.seq_len
    saved = tokens * (p_big * per_token["B"] + p_small * per_token["S"])
    # in flight at the start of the backward: the gradients of the log-softmax output and of the logits
    logits_grads = 2 * tokens * cfg.model.vocab_size * FP32
    adam_step = FP32 * n_params / shards  # foreach AdamW's one temporary of the parameters' size (sqrt of v)
    out = {**states, "buffers": buckets + gathered + block_grads + adam_step, "activations": saved + logits_grads}
    # The peak is the larger of two moments, not the sum of everything: gradients are freed after each step
    # (zero_grad(set_to_none=True)) and the activations before the optimizer runs.
    resident = states["weights"] + states["optimizer"] + buckets
    phases = {  # the start of the backward (earlier micro-batches' gradients held under accumulation) ...
        "backward": resident + out["activations"] + gathered + block_grads
        + (states["gradients"] if t.grad_accum > 1 else 0.0),
        "optimizer": resident + states["gradients"] + adam_step,  # ... and AdamW's step
    }
    out["total"] = max(phases.values())
    return {"bytes": out, "phases": phases, "peak_phase": max(phases, key=phases.get), "gpus": gpus,
            "parallel": parallel, "dtype": dtype, "params": n_params,
            "micro_batch": t.batch_size // (gpus * t.grad_accum), "seq_len": t.seq_len,
            "activation_bytes_per_token": {"all_big": per_token["B"], "all_small": per_token["S"]}}


def format_plan(p: dict) -> str:
    gib = 2**30
    lines = [f"memory per device: {p['gpus']} device(s), {p['parallel']}, {p['dtype']} compute, micro-batch "
             f"{p['micro_batch']} x {p['seq_len']} tokens, {p['params']:,} parameters"]
    for k, v in p["bytes"].items():
        if k != "total":
            lines.append(f"  {k:<12} {v / gib:>9.2f} GiB")
    lines.append(f"  {'peak':<12} {p['bytes']['total'] / gib:>9.2f} GiB  (at the {p['peak_phase']}; "
                 + ", ".join(f"{k} {v / gib:.2f}" for k, v in p["phases"].items()) + " GiB)")
    return "\n".join(lines)
