"""Running an oracle over a token set: chunks, resume, sharding, outputs.

Sequences are processed in chunks of ``batch_tokens // T`` sequences. After each chunk its
reductions are saved atomically under ``<out>/.partial/``; a rerun with the same inputs loads
them and computes only what is missing, so an interrupted run resumes and gives the same bits
(DESIGN section 7). Under ``torchrun`` each process takes every world-th chunk and rank 0
merges the chunks in order — the merged result equals the one-process result because a
chunk's arithmetic never depends on who computes it (DESIGN 4.6).

Outputs (DESIGN section 5): ``summary.json``, ``per_token.parquet``, ``oracle_loss.npy``, plus
``usage.npy`` (float32 [budgets, routes (skip, small, big), layers, positions]: share of tokens
at each position whose oracle pattern takes that route at that layer — the heatmaps),
``patterns.parquet`` (every evaluated pattern's mean loss), ``run.json`` (timing, processes),
and ``loss_matrix.npy`` only when asked (``OracleSpec.keep_matrix``): float32 [patterns, tokens], row p
the pattern of row p of ``patterns.parquet`` (code order: lexicographic, skip < small < big), column n
the token of row n of ``per_token.parquet`` (sequence-major: n = s * T + t), so its row means are
``patterns.parquet``'s ``mean_loss`` (up to float32 rounding). Each file is written atomically.

Per-token columns beyond the oracle (``selection.py``): ``fixed_oos_loss_k{k}`` and
``best_of_100_oos_loss_k{k}`` (cross-fitted over sequences), ``count_null_loss_k{k}`` and
``equal_count_n{n0}_loss_k{k}`` (the count-versus-compute nulls); exhaustive searches only.

Tensor name legend: S sequences, T positions, B sequences of a chunk, N tokens, P patterns,
J budgets, L layers.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import rundir
from ..io import atomic_path, atomic_write_json, write_table
from ..model.model import DuoModel
from ..model.routing import BIG, SKIP, parse_pattern
from ..rundir import ORACLE_LOSS, PARTIAL, PATTERNS, PER_TOKEN, RUN_JSON, SUMMARY, USAGE
from ..runtime.distributed import has_bf16_matrix_units, init_distributed
from ..stats import paired_ppl_difference, ppl_interval
from .context import CONTEXTS, Head, make_context
from .kernels import Kernels
from .plan import OracleSpec, Plan, build_plan
from .reductions import ChunkReducer, finalize, label_free_entry, merge_chunks
from .search import beam_search, max_children
from .selection import DRAWS, chosen_counts, cross_fitted, null_entries
from .space import code_strings, decode_codes
from .tree import final_hidden, walk_tree

ENGINE_VERSION = 6  # 2: random@k per sequence in each chunk's reductions; 3: the label-free oracles; 4: per-sequence
# sums per pattern and the count-versus-compute nulls (selection.py); 5: the belief oracle (KL to all-big); 6: its pattern
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- helpers


def _param_fingerprint(model: DuoModel) -> str:
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        p64 = p.detach().double()
        h.update(name.encode())
        h.update(np.array([*p.shape, p64.sum().item(), p64.abs().sum().item()], dtype=np.float64).tobytes())
    return h.hexdigest()


def _tensor_fingerprint(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_chunk(path: Path) -> dict | None:
    """A saved chunk's reductions, or None: not saved yet, or damaged (a truncated file, a full disk) — then
    the chunk is computed again, as if it had not been saved (issue 28, item 4)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        print(f"oracle: {path} is damaged; computing that chunk again", file=sys.stderr)
        return None


def _save_npz(path: Path, arrays: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _allocate_matrix(path: Path, shape: tuple[int, int]) -> None:
    """The float32 matrix file with its blocks reserved: a full disk fails here, as an OSError naming
    the file, not later as a SIGBUS when a page of the memory map is first written."""
    with atomic_path(path) as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape).flush()
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: bfloat16 where the device has bf16 matrix units (its answers agree with float32 to
    0.03% on the cpu preset, docs/LOG.md), float32 elsewhere; float32 and bfloat16 as given."""
    if dtype == "auto":
        return "bfloat16" if has_bf16_matrix_units(device) else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, float32 or bfloat16; got {dtype!r}")
    return dtype


def engine_model(model: DuoModel, dtype: str) -> DuoModel:
    """The model in the compute dtype: float32 (exact, default) or bfloat16.

    bfloat16 is mixed precision: the layers' matrix products run in bfloat16 (AMX / AVX512-BF16 /
    tensor cores; float32 accumulation), while the residual stream between layers, the final norm,
    the LM head and the log-sum-exp stay float32 (``fp32_head``; the embedding and every tree node's
    output are float32, ``kernels.norm`` casts into each layer). Agreement with float32 on the cpu
    preset: docs/LOG.md and ``benchmarks/bench_oracle.py --agreement``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float32 or bfloat16; got {dtype!r}")
    model = model.eval()
    if next(model.parameters()).dtype == DTYPES[dtype]:
        return model
    engine = copy.deepcopy(model).to(DTYPES[dtype])
    engine.fp32_head = (copy.deepcopy(model.norm).float(), model.lm_head.weight.detach().float())
    return engine


# ----------------------------------------------------------------------------- one chunk


@torch.no_grad()
def pattern_token_losses(model: DuoModel, spec: OracleSpec, route_PL: np.ndarray, idx_ST, tgt_ST, *,
                         batch_tokens: int, kernels: Kernels) -> np.ndarray:
    """``loss_PST`` (float32): every token's loss under each of a few patterns, from the same engine
    and context policy as the oracle's pass (so they equal what its reductions saw)."""
    S, T = idx_ST.shape
    out_PST = np.empty((len(route_PL), S, T), dtype=np.float32)
    if len(route_PL) == 0:
        return out_PST
    device = model.embed.weight.device
    head = Head(model, kernels=kernels)
    per_chunk = max(1, batch_tokens // T)
    for a in range(0, S, per_chunk):
        b = min(S, a + per_chunk)
        idx_BT, tgt_BT = idx_ST[a:b].to(device), tgt_ST[a:b].to(device)
        ctx = make_context(model, spec.context, idx_BT, spec.reference, kernels)

        def consume(p_R, loss_RBT, a=a, b=b):
            out_PST[p_R, a:b] = loss_RBT.float().cpu().numpy()

        walk_tree(model, ctx, route_PL, model.embed(idx_BT).float(), tgt_BT, consume, head)
    return out_PST


def compute_chunk(model: DuoModel, plan: Plan, idx_BT, tgt_BT, *, batch_tokens: int, on_leaves=None, matrix_cb=None,
                  kernels: Kernels | None = None):
    """All reductions of one chunk of sequences (numpy arrays, see ``ChunkReducer.result``)."""
    spec = plan.spec
    kernels = kernels or Kernels(False)
    head = Head(model, kernels=kernels)
    B, T = idx_BT.shape
    ctx = make_context(model, spec.context, idx_BT, spec.reference, kernels)
    red = ChunkReducer(plan, B * T, idx_BT.device, matrix_cb, n_seq=B)

    def consume(p_R, loss_RBT, doubt_RBT, kl_RBT=None):
        red.consume(p_R, loss_RBT, doubt_RBT, kl_RBT)
        if on_leaves is not None:
            on_leaves(len(p_R))

    h0_BTD = model.embed(idx_BT).float()
    if spec.search != "beam":  # the label-free oracles are exhaustive-only (ChunkReducer.result)
        # the belief oracle's reference: all-big's final hidden states from the engine's own path (KL 0 at its leaf)
        head.set_reference(final_hidden(model, make_context(model, spec.context, idx_BT, spec.reference, kernels),
                                        np.full((1, model.cfg.n_layers), BIG), h0_BTD, tgt_BT).reshape(B * T, -1))
    walk_tree(model, ctx, plan.route_PL, h0_BTD, tgt_BT, consume, head, doubt=True)
    beam = None
    if spec.search == "beam":
        c_max = max_children(spec.space, spec.beam_width)
        group = max(1, (4 * batch_tokens) // (T * c_max))  # memory; shared beams then split per sequence
        losses, codes = [], []
        for a in range(0, B, group):
            idx_bT, tgt_bT = idx_BT[a : a + group], tgt_BT[a : a + group]
            ctx_b = make_context(model, spec.context, idx_bT, spec.reference, kernels)
            loss_JN, code_JN = beam_search(
                model, ctx_b, model.embed(idx_bT).float(), tgt_bT, spec.space, plan.budgets, spec.beam_width, rows=batch_tokens,
                head=head,
            )
            losses.append(loss_JN)
            codes.append(code_JN)
        beam = (torch.cat(losses, 1), torch.cat(codes, 1))
    return red.result(beam)


# ----------------------------------------------------------------------------- the run


def _open_partial(partial: Path, fingerprint: str, matrix_shape: tuple[int, int] | None) -> None:
    """``.partial/`` for these inputs: saved chunks of other inputs are dropped; the matrix reserved."""
    stamp = partial / rundir.PARTIAL_FINGERPRINT
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") != fingerprint:
        shutil.rmtree(partial)  # different inputs: the saved chunks do not apply
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, {"fingerprint": fingerprint})
    if matrix_shape is not None and not (partial / rundir.LOSS_MATRIX).is_file():
        _allocate_matrix(partial / rundir.LOSS_MATRIX, matrix_shape)


class ChunkProgress:
    """The oracle's progress bar in tokens: the tree walk reports leaves (one pattern over one chunk),
    the bar moves by ``share`` of a chunk as they come (in beam mode the random draws cover half;
    the search the rest, at the end of the chunk) and shows the pattern rate."""

    def __init__(self, total_tokens: int, n_patterns: int, desc: str, *, enabled: bool, share: float):
        self.bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=desc,
                        disable=not enabled or total_tokens == 0, dynamic_ncols=True)
        self.P, self.share = n_patterns, share
        self.leaves = 0  # over all chunks of this call
        self.chunk_tokens = self.shown = 0.0
        self.t0 = time.time()

    def start_chunk(self, n_tokens: int) -> None:
        self.chunk_tokens, self.shown = n_tokens, 0.0

    def leaves_done(self, n: int) -> None:
        self.leaves += n
        step = n * self.chunk_tokens * self.share / self.P
        self.shown += step
        self.bar.update(step)
        rate = self.leaves / max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:.3g} patterns/s x {self.chunk_tokens:.0f} tok, {self.P} patterns", refresh=False)

    def end_chunk(self) -> None:
        self.bar.update(self.chunk_tokens - self.shown)

    def close(self) -> float:
        """Close the bar; the seconds since it started (the compute time of this call)."""
        self.bar.close()
        return time.time() - self.t0


def run_oracle(
    model: DuoModel,
    idx_ST: torch.Tensor,
    tgt_ST: torch.Tensor,
    spec: OracleSpec,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    meta: dict | None = None,
    on_chunk: Callable[[int], None] | None = None,
    **engine,
) -> dict | None:
    """Run the oracle of ``spec`` on the tokens ``idx_ST``/``tgt_ST`` and write ``out_dir``.

    Returns the summary dict on rank 0 (None on other ranks). ``on_chunk(i)`` is called after
    chunk i is saved (tests use it to interrupt). ``meta`` is merged into the summary. How it is
    computed is the spec's (``OracleSpec``: dtype, batch_tokens, compile, keep_matrix); ``engine``
    overrides any of those for this call. ``dtype`` auto: ``resolve_dtype``; ``compile`` auto: when the
    run evaluates at least 2^24 pattern-tokens, where compiling pays off.
    """
    if engine:
        spec = dataclasses.replace(spec, **engine)
    batch_tokens, dtype, compile, keep_matrix = spec.batch_tokens, spec.dtype, spec.compile, spec.keep_matrix
    if idx_ST.dim() != 2 or idx_ST.shape != tgt_ST.shape or idx_ST.numel() == 0:
        raise ValueError("evaluation tokens must be two non-empty [sequences, positions] tensors of one shape")
    if idx_ST.shape[1] > model.cfg.max_seq_len:
        raise ValueError(f"sequences of {idx_ST.shape[1]} tokens exceed model.max_seq_len={model.cfg.max_seq_len}")
    if spec.n_layers != model.cfg.n_layers:
        raise ValueError(f"the candidate space has {spec.n_layers} layers but the model has {model.cfg.n_layers}")
    t_start = time.time()
    out_dir = Path(out_dir)
    plan = build_plan(spec)
    dtype = resolve_dtype(dtype, model.embed.weight.device)
    meta = {**(meta or {}), "dtype": dtype}  # the summary names the dtype used
    emodel = engine_model(model, dtype)
    device = emodel.embed.weight.device
    S, T = idx_ST.shape
    N = S * T
    per_chunk = max(1, batch_tokens // T)
    chunks = [(i, a, min(S, a + per_chunk)) for i, a in enumerate(range(0, S, per_chunk))]
    ddp = init_distributed(device)
    rank, world = ddp.rank, ddp.world
    mine = [c for c in chunks if c[0] % world == rank]
    P = len(plan.code_P)
    if compile == "auto":
        compile = P * N >= 1 << 24 or spec.search == "beam" and N >= 1 << 14
    kernels = Kernels(bool(compile))

    fingerprint = hashlib.sha256(json.dumps({
        "engine": ENGINE_VERSION, "plan": plan.fingerprint(), "tokens": _tensor_fingerprint(idx_ST, tgt_ST),
        "params": _param_fingerprint(model), "dtype": dtype, "per_chunk": per_chunk, "matrix": keep_matrix,
        "compile": bool(compile),
    }, sort_keys=True).encode()).hexdigest()
    partial = out_dir / PARTIAL
    if rank == 0:
        _open_partial(partial, fingerprint, (P, N) if keep_matrix else None)
    if world > 1:
        dist.barrier()

    matrix = np.lib.format.open_memmap(partial / rundir.LOSS_MATRIX, mode="r+") if keep_matrix else None
    results = {i: r for i, _, _ in mine if (r := _load_chunk(rundir.partial_chunk(partial, i))) is not None}
    resumed, computed = len(results), 0
    todo = [(i, a, b) for i, a, b in mine if i not in results]
    bar = ChunkProgress(sum((b - a) * T for _, a, b in todo), P, f"oracle {spec.name()}", enabled=progress and rank == 0,
                        share=1.0 if spec.search == "exhaustive" else 0.5)
    try:  # the bar closes before an error is printed: the error stays one line of its own
        for i, a, b in todo:
            path = rundir.partial_chunk(partial, i)

            def matrix_cb(p_R, loss_RN, a=a, b=b):
                matrix[p_R, a * T : b * T] = loss_RN.float().cpu().numpy()

            bar.start_chunk((b - a) * T)
            res = compute_chunk(
                emodel, plan, idx_ST[a:b].to(device), tgt_ST[a:b].to(device), batch_tokens=batch_tokens,
                on_leaves=bar.leaves_done, matrix_cb=matrix_cb if keep_matrix else None, kernels=kernels,
            )
            bar.end_chunk()
            if matrix is not None:
                matrix.flush()
            _save_npz(path, res)
            results[i] = res
            computed += 1
            if on_chunk is not None:
                on_chunk(i)
    finally:
        compute_s = bar.close()

    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        if rank == 0:
            for part in gathered:
                results.update(part)
    summary = None
    if rank == 0:
        assert sorted(results) == [c[0] for c in chunks], "every chunk must be computed by some process"
        merged = merge_chunks([results[i] for i, _, _ in chunks])

        def rescore(patterns: list[str]) -> dict[str, np.ndarray]:
            route_PL = np.array([parse_pattern(p, spec.n_layers) for p in patterns], dtype=np.int8).reshape(-1, spec.n_layers)
            return dict(zip(patterns, pattern_token_losses(emodel, spec, route_PL, idx_ST, tgt_ST,
                                                           batch_tokens=batch_tokens, kernels=kernels)))

        summary = _write_outputs(out_dir, plan, merged, idx_ST, tgt_ST, emodel, meta, rescore)
        if keep_matrix:
            del matrix
            os.replace(partial / rundir.LOSS_MATRIX, out_dir / rundir.LOSS_MATRIX)
        atomic_write_json(out_dir / RUN_JSON, {
            "wall_s": round(time.time() - t_start, 3),
            "compute_s": round(compute_s, 3),
            "chunks": len(chunks), "chunks_resumed": resumed, "chunks_computed_rank0": computed,
            "world_size": world, "device": str(device), "dtype": dtype, "batch_tokens": batch_tokens,
            "compiled_kernels": kernels.compile,
            "patterns_evaluated": P,
            "tokens_per_s_rank0": round(computed * per_chunk * T / compute_s, 3) if computed else None,
        })
        shutil.rmtree(partial, ignore_errors=True)
    if world > 1:
        dist.barrier()
        if ddp.initialized_here:
            dist.destroy_process_group()
    return summary


def _write_outputs(out_dir: Path, plan: Plan, merged: dict, idx_ST, tgt_ST, model: DuoModel, meta: dict,
                   rescore: Callable[[list[str]], dict[str, np.ndarray]]) -> dict:
    """The output files. ``rescore(patterns)``: every token's loss under a few patterns (the fixed and
    best-of-100 pattern of each budget, in sample and cross-fitted), for their intervals, the paired
    oracle-vs-pattern gains and the cross-fitted per-token losses."""
    spec = plan.spec
    S, T = idx_ST.shape
    L = plan.n_layers
    position_N = np.tile(np.arange(T), S)
    summary_core, usage_JRLT = finalize(plan, merged, position_N, T, model.flop_model)
    # 95% bootstrap intervals over sequences (stats.py): the baselines and oracle@k per budget
    for key, loss_N in (("all_big", merged["all_big_N"]), ("all_small", merged["all_small_N"])):
        ci = ppl_interval(loss_N.reshape(S, T))
        summary_core[f"{key}_ppl_lo"], summary_core[f"{key}_ppl_hi"] = ci["ppl_lo"], ci["ppl_hi"]
    strings_P = code_strings(plan.code_P, L)
    # out of sample (DESIGN 4.4a): sequence s scored under the pattern chosen on the other sequences; an
    # exhaustive search of a candidate space only (the plans with nulls), and not with one sequence
    choice = {}
    if plan.nulls is not None:
        for key, choose_JP in (("fixed", plan.member_JP), ("best_of_100", plan.sample_JP)):
            if (choice_JS := cross_fitted(merged["seq_loss_PS"], choose_JP)) is not None:
                choice[key] = choice_JS
    pattern_loss = rescore(sorted({b[key] for b in summary_core["budgets"]
                                   for key in ("fixed_pattern", "best_of_100_pattern") if b.get(key)}
                                  | {str(strings_P[p]) for choice_JS in choice.values() for p in np.unique(choice_JS)}))
    null_J, null_cols = null_entries(plan.nulls, merged.get("null_loss_UN"), len(plan.budgets), S, T)
    oos_cols = {}
    for j, entry in enumerate(summary_core["budgets"]):
        entry.update(null_J[j])
        for key in ("fixed", "best_of_100"):
            choice_S = choice[key][j] if key in choice else None
            loss_ST = None if choice_S is None else np.stack([pattern_loss[str(strings_P[p])][s]
                                                              for s, p in enumerate(choice_S)])
            ci = ppl_interval(loss_ST) if loss_ST is not None else {}
            entry[f"{key}_oos_ppl"], entry[f"{key}_oos_ppl_lo"], entry[f"{key}_oos_ppl_hi"] = (
                ci.get("ppl"), ci.get("ppl_lo"), ci.get("ppl_hi"))
            entry[f"{key}_oos_patterns"] = chosen_counts(choice_S, strings_P) if choice_S is not None else None
            if loss_ST is not None:
                oos_cols[f"{key}_oos_loss_k{entry['k']}"] = loss_ST.reshape(-1).astype(np.float32)
        oracle_ST = merged["best_loss_JN"][j].reshape(S, T)
        ci = ppl_interval(oracle_ST)
        entry["oracle_ppl_lo"], entry["oracle_ppl_hi"] = ci["ppl_lo"], ci["ppl_hi"]
        ci = ppl_interval(merged["random_loss_JB"][j][:, None])  # per-sequence means: every sequence has T tokens
        entry["random_mean_ppl_lo"], entry["random_mean_ppl_hi"] = ci["ppl_lo"], ci["ppl_hi"]
        for key in ("fixed", "best_of_100"):
            loss_ST = pattern_loss.get(entry.get(f"{key}_pattern"))
            if loss_ST is not None:
                ci = ppl_interval(loss_ST)
                entry[f"{key}_ppl_lo"], entry[f"{key}_ppl_hi"] = ci["ppl_lo"], ci["ppl_hi"]
                # the oracle's gain over the pattern, paired (the same sequences in every replicate)
                entry[f"oracle_minus_{key}"] = paired_ppl_difference(oracle_ST, loss_ST)
        if "confidence_loss_JN" in merged:
            label_free_entry(entry, oracle_ST, merged["confidence_loss_JN"][j].reshape(S, T),
                              merged["previous_loss_JN"][j].reshape(S, T), pattern_loss.get(entry.get("fixed_pattern")),
                              merged["belief_loss_JN"][j].reshape(S, T) if "belief_loss_JN" in merged else None)
    summary = {
        "name": meta.get("name", spec.name()),
        **spec.describe(),
        "n_layers": L,
        "tokens": int(S * T),
        "sequences": int(S),
        "seq_len": int(T),
        "patterns_evaluated": int(len(plan.code_P)),
        "flops_per_token_all_big": model.flop_model.all_big(),
        **{k: v for k, v in meta.items() if k != "name"},
        **summary_core,
        "notes": [
            f"context={spec.context}: {CONTEXTS[spec.context].note}",
            "compute is FLOPs per token relative to all-big (routing.FlopModel)",
            "*_lo / *_hi: 95% bootstrap interval over sequences (1000 seeded replicates, stats.py)",
            "random_mean_ppl = exp(mean over candidates of the per-pattern mean loss)",
            "best_of_100: seeded uniform draw of up to 100 candidates per budget; _ppl = best single pattern, "
            "_per_token_ppl = each token's best among the draw",
            "fixed_ppl and best_of_100_ppl choose their pattern on the evaluation tokens themselves (optimistic); "
            "fixed_oos_* and best_of_100_oos_* are cross-fitted over sequences: each sequence is scored under the "
            "pattern with the lowest mean loss on the other sequences (exhaustive search, two sequences or more)",
            "count_null: per token the best of n = candidates(k) random candidates that all have round(L/2) big "
            "layers (one fixed compute; n capped at that pool, count_null_capped); equal_count[n0]: per token the "
            "best of n0 random candidates of budget k, n0 in (C(L,1), C(L,2)); both averaged over "
            f"{DRAWS} seeded draws without replacement (oracle/selection.py; exhaustive search only)",
        ],
    }
    if plan.nulls is not None:
        summary["selection_nulls"] = plan.nulls.describe()
    if spec.search == "beam":
        summary["notes"].append(
            "beam search: oracle_ppl takes per token the best of the search and the random draw; "
            "search_only_ppl is the search alone; fixed_ppl needs every candidate and is null "
            "(filled from the exhaustive run when one exists); random_mean_ppl is over the random draw"
        )
    J = len(plan.budgets)
    _save_npy(out_dir / ORACLE_LOSS, merged["best_loss_JN"].astype(np.float32))
    _save_npy(out_dir / USAGE, usage_JRLT)
    cols = {
        "sequence": np.repeat(np.arange(S, dtype=np.int32), T),
        "position": position_N.astype(np.int32),
        "token": idx_ST.reshape(-1).cpu().numpy().astype(np.int32),
        "target": tgt_ST.reshape(-1).cpu().numpy().astype(np.int32),
        "loss_all_small": merged["all_small_N"].astype(np.float32),
        "loss_all_big": merged["all_big_N"].astype(np.float32),
    }
    for j, k in enumerate(plan.budgets):
        cols[f"oracle_loss_k{k}"] = merged["best_loss_JN"][j].astype(np.float32)
    for j, k in enumerate(plan.budgets):
        fixed_ST = pattern_loss.get(summary["budgets"][j].get("fixed_pattern"))
        if fixed_ST is not None:  # fixed@k per token: the baseline of every "share of the gain recovered"
            cols[f"fixed_loss_k{k}"] = fixed_ST.reshape(-1).astype(np.float32)
        if "confidence_loss_JN" in merged:  # the label-free oracles (null: the first token has no previous one)
            cols[f"confidence_loss_k{k}"] = merged["confidence_loss_JN"][j].astype(np.float32)
            cols[f"previous_token_loss_k{k}"] = pa.array(merged["previous_loss_JN"][j].astype(np.float32),
                                                         mask=position_N == 0)
        if "belief_loss_JN" in merged:
            cols[f"belief_loss_k{k}"] = merged["belief_loss_JN"][j].astype(np.float32)
    for j, k in enumerate(plan.budgets):
        strings = code_strings(merged["best_code_JN"][j], L)
        cols[f"best_pattern_k{k}"] = pa.array(strings.tolist(), type=pa.string()).dictionary_encode()
        if "belief_code_JN" in merged:  # the belief oracle's pattern: the consistency router's label (routers/labels.py)
            strings = code_strings(merged["belief_code_JN"][j], L)
            cols[f"belief_pattern_k{k}"] = pa.array(strings.tolist(), type=pa.string()).dictionary_encode()
    write_table(out_dir / PER_TOKEN, {**cols, **oos_cols, **null_cols})
    route_PL = decode_codes(plan.code_P, L)
    N = S * T
    write_table(out_dir / PATTERNS, {
        "pattern": strings_P.tolist(),
        "bigs": (route_PL == BIG).sum(1).astype(np.int16),
        "skips": (route_PL == SKIP).sum(1).astype(np.int16),
        "candidate": plan.member_JP.any(0) if spec.search == "exhaustive" else np.zeros(len(plan.code_P), bool),
        "mean_loss": (merged["sum_P"] / N).astype(np.float64),
    })
    assert J == len(summary["budgets"])
    atomic_write_json(out_dir / SUMMARY, _jsonable(summary))
    return summary


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj
