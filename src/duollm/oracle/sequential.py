"""The sequential oracle (context policy ``sequential``; issue 11, item 6).

Left to right, token t's pattern is chosen given the keys and values of the earlier tokens *under
their own chosen patterns*: the only oracle that is both causally realisable (a token's choice
depends on its past only) and compute-consistent (every position spends its own budget). The
``shared`` oracle lets the scored token's pattern route its whole context; the ``frozen`` one runs
every context token all-big. Under both, a position-varying budget takes oracle@k_t from one pass,
so "constant beats falling/rising" follows from oracle@k being convex in k; here the choices at a
budget shape the context of every later token, so the comparison measures something.

The choice is per budget schedule (one budget per position), because the context depends on it:
``sequential_oracle`` runs one schedule. Step t walks the prefix tree of token t's candidates
breadth first (all prefixes of a depth in one tensor, ``step.layer_children``), each attending to the
cache of positions < t plus its own key/value (``context.frozen_attn_residual`` with the cache as the
context), takes the best leaf, and runs the chosen pattern once through the model to append token
t's keys and values to the cache. Ties go to the smallest pattern code, as in the naive reference
(``naive.naive_sequential``).

Tensor name legend (``docs/NOTATION.md``): B sequences, T positions, M prefixes (leaves: P patterns),
L layers, D width.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from ..io import atomic_write_json, write_table
from ..model.model import DuoModel, KVCache
from ..model.routing import BIG
from ..rundir import PER_TOKEN, RUN_JSON, SUMMARY
from ..runtime import threads
from ..stats import paired_ppl_difference, ppl_interval
from . import kernels as K
from .context import Head, frozen_attn_residual
from .reductions import compute_of_codes, default_schedules, linear_schedule
from .space import code_strings, decode_codes, pattern_codes
from .step import layer_children


@dataclass(frozen=True)
class PrefixLevels:
    """The prefix tree of a candidate set, level by level, in the order the tensors hold it: at
    layer d the children of route r are ``select[d][r]`` (indices of their parents among the
    previous level's prefixes), concatenated route by route. ``leaf_order`` sorts the leaves by code
    (so that a tie goes to the smallest code); ``code_P`` are the leaves' codes in that order."""

    select: list[dict[int, torch.Tensor]]
    leaf_order: torch.Tensor
    code_P: np.ndarray

    @classmethod
    def of(cls, route_PL: np.ndarray, device=None) -> PrefixLevels:
        L = route_PL.shape[1]
        prev = np.zeros(1, dtype=np.int64)  # the root: the empty prefix, in tensor order
        levels = []
        for d in range(L):
            uniq = np.unique(pattern_codes(route_PL[:, : d + 1]))
            parent_pos = {int(c): i for i, c in enumerate(prev)}
            select, order = {}, []
            for r in (int(x) for x in np.unique(uniq % 3)):
                kids = uniq[uniq % 3 == r]
                select[r] = torch.as_tensor([parent_pos[int(c)] for c in kids // 3], device=device)
                order.append(kids)
            levels.append(select)
            prev = np.concatenate(order)
        leaf_order = np.argsort(prev, kind="stable")
        return cls(levels, torch.as_tensor(leaf_order, device=device), prev[leaf_order])


class _Step:
    """What ``layer_children`` needs of a context: the model, the kernels, and ``residual`` — here
    attention over the cached keys/values of positions < t plus the token's own."""

    def __init__(self, model: DuoModel, cache: KVCache, t: int, kernels: K.Kernels):
        self.model, self.kernels, self.cache, self.t = model, kernels, cache, t
        self.cos_TE, self.sin_TE = model.rope_cos[t : t + 1], model.rope_sin[t : t + 1]
        self.scale = 1.0 / math.sqrt(model.cfg.head_dim)
        self.all_1C = torch.ones(1, t, dtype=torch.bool, device=model.rope_cos.device)

    def residual(self, layer: int, h_B1MD: torch.Tensor) -> torch.Tensor:
        B, E, K_ = h_B1MD.shape[0], self.model.cfg.head_dim, self.model.cfg.kv_heads
        if self.t:
            k_BKCE, v_BKCE = self.cache.k[layer], self.cache.v[layer]
        else:  # the first position has no context
            k_BKCE = v_BKCE = h_B1MD.new_zeros(B, K_, 0, E)
        return self.kernels(frozen_attn_residual, self.model.layers[layer], h_B1MD, k_BKCE, v_BKCE,
                            self.cos_TE, self.sin_TE, self.all_1C, self.scale)


@torch.no_grad()
def sequential_oracle(model: DuoModel, idx_BT: torch.Tensor, tgt_BT: torch.Tensor, schedule_T,
                      candidates: Callable[[int], np.ndarray], *, kernels: K.Kernels = K.EAGER,
                      on_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """``(loss_BT, code_BT)``: each token's loss under its sequentially chosen pattern, and the pattern.

    ``schedule_T``: the budget of each position; ``candidates(k)``: the patterns ``route_PL`` a token
    with budget k chooses among."""
    B, T = idx_BT.shape
    head = Head(model, kernels=kernels)
    levels = {int(k): PrefixLevels.of(np.asarray(candidates(int(k))), idx_BT.device)
              for k in sorted(set(map(int, schedule_T)))}
    if any(len(lv.code_P) == 0 for lv in levels.values()):
        raise ValueError("a budget of the schedule has no candidate pattern")
    h0_BTD = model.embed(idx_BT).float()
    cache = KVCache(model.cfg.n_layers)
    loss_BT = torch.empty(B, T, dtype=torch.float32, device=idx_BT.device)
    code_BT = np.empty((B, T), dtype=np.int64)
    for t in range(T):
        threads.poll()
        lv = levels[int(schedule_T[t])]
        step = _Step(model, cache, t, kernels)
        h_B1MD = h0_BTD[:, t : t + 1, None, :]
        for d, select in enumerate(lv.select):
            children = [child for _, child in layer_children(step, d, h_B1MD, list(select), select=select)]
            h_B1MD = children[0] if len(children) == 1 else torch.cat(children, dim=2)
        P = h_B1MD.shape[2]
        leaf_loss_BP = head(h_B1MD[:, 0], tgt_BT[:, t : t + 1].expand(B, P))[:, lv.leaf_order]
        best_B = leaf_loss_BP.argmin(1)  # the first minimum: the smallest code among ties
        loss_BT[:, t] = leaf_loss_BP.gather(1, best_B[:, None])[:, 0]
        code_BT[:, t] = lv.code_P[best_B.cpu().numpy()]
        route_LB1 = torch.as_tensor(decode_codes(code_BT[:, t], model.cfg.n_layers).T, device=idx_BT.device).long()
        model(idx_BT[:, t : t + 1], None, route_LB1[:, :, None], cache=cache, return_logits=False)
        if on_step is not None:
            on_step(t)
    return loss_BT, code_BT


# ----------------------------------------------------------------------------- a run: constant budgets and schedules


def schedules_of(budgets, n_layers: int, T: int, schedules_only: bool = False) -> list[tuple[str, str, np.ndarray]]:
    """``(name, label, schedule_T)``: a constant schedule per budget, then the paper's falling and
    rising schedules (``reductions.default_schedules``) whose budgets are all among ``budgets``.
    ``schedules_only``: of the constant schedules only the paper's (its mean budget): no prediction."""
    c = default_schedules(n_layers)[-1][1]
    out = [(f"k{k}", f"{k}->{k}", np.full(T, k, dtype=np.int64)) for k in budgets if k == c or not schedules_only]
    for name, start, stop in default_schedules(n_layers):
        sched_T = linear_schedule(start, stop, T)
        if name != "constant" and set(sched_T.tolist()) <= set(budgets):
            out.append((name, f"{start}->{stop}", sched_T))
    return out


def run_sequential(model: DuoModel, idx_ST: torch.Tensor, tgt_ST: torch.Tensor, spec, out_dir: Path, *,
                   batch_sequences: int = 64, progress: bool = True, meta: dict | None = None,
                   schedules_only: bool = False) -> dict:
    """The sequential oracle of ``spec`` (its budgets as constant schedules, plus falling/rising) on
    every sequence; writes ``summary.json``, ``per_token.parquet`` and ``run.json`` (last) into
    ``out_dir``. Resume granularity: the whole run (it is one stage of a study)."""
    t_start = time.time()
    meta = meta or {}
    sp = spec.space
    L = sp.n_layers
    S, T = idx_ST.shape
    device = next(model.parameters()).device
    schedules = schedules_of(sp.budgets, L, T, schedules_only)
    space_of = {k: dataclasses.replace(sp, budgets=(k,)).enumerate()
                for k in sorted({int(k) for _, _, sched in schedules for k in sched})}
    loss, code = {}, {}
    bar = tqdm(total=len(schedules) * T * math.ceil(S / batch_sequences), desc="sequential oracle", unit="step",
               disable=not progress, leave=False)
    for name, _, sched_T in schedules:
        parts = []
        for a in range(0, S, batch_sequences):
            idx_BT, tgt_BT = idx_ST[a : a + batch_sequences].to(device), tgt_ST[a : a + batch_sequences].to(device)
            parts.append(sequential_oracle(model, idx_BT, tgt_BT, sched_T, space_of.__getitem__,
                                           on_step=lambda t: bar.update()))
        loss[name] = torch.cat([p[0].cpu() for p in parts]).numpy().astype(np.float64)
        code[name] = np.concatenate([p[1] for p in parts])
    bar.close()
    with torch.no_grad():
        base = {key: torch.cat([model(idx_ST[a : a + batch_sequences].to(device), tgt_ST[a : a + batch_sequences].to(device),
                                      pattern * L, return_logits=False).loss_BT.float().cpu()
                                for a in range(0, S, batch_sequences)]).numpy().astype(np.float64)
                for key, pattern in (("all_big", "B"), ("all_small", "S"))}
    fm = model.flop_model
    budgets = []
    for k in [k for k in sp.budgets if f"k{k}" in loss]:
        loss_ST, code_ST = loss[f"k{k}"], code[f"k{k}"]
        route_NL = decode_codes(code_ST.reshape(-1), L)
        budgets.append({"k": int(k), "candidates": int(len(space_of[k])), **_ppl_entry(loss_ST, "oracle"),
                        "oracle_loss": float(loss_ST.mean()), "oracle_compute": compute_of_codes(code_ST.reshape(-1), fm),
                        "oracle_big_share_by_layer": [round(float(x), 6) for x in (route_NL == BIG).mean(0)]})
    mean_loss = {b["k"]: b["oracle_loss"] for b in budgets}
    position = []
    for name, label, sched_T in schedules:
        if name.startswith("k") and int(name[1:]) != default_schedules(L)[-1][1]:
            continue  # the constant schedule at the paper's mean budget, and the falling/rising ones
        w = {int(k): float((sched_T == k).mean()) for k in set(sched_T.tolist())}
        entry = {"name": "constant" if name.startswith("k") else name, "schedule": label,
                 "mean_budget": float(sched_T.mean()), **_ppl_entry(loss[name], "oracle"),
                 "compute": compute_of_codes(code[name].reshape(-1), fm),
                 # what the schedule would score if a token's budget did not change its successors' context
                 "predicted_ppl": math.exp(sum(wk * mean_loss[k] for k, wk in w.items())) if set(w) <= set(mean_loss)
                 else None}
        position.append((entry, loss[name]))
    constant = next((lo for e, lo in position if e["name"] == "constant"), None)
    for e, loss_ST in position:
        if constant is not None and e["name"] != "constant":
            e["minus_constant"] = paired_ppl_difference(loss_ST, constant)
    summary = {
        "name": meta.get("name", spec.name()), **spec.describe(), "n_layers": L, "tokens": int(S * T),
        "sequences": int(S), "seq_len": int(T), "flops_per_token_all_big": fm.all_big(),
        **{k: v for k, v in meta.items() if k != "name"},
        "budgets": budgets, **_ppl_entry(base["all_big"], "all_big"), **_ppl_entry(base["all_small"], "all_small"),
        "all_big_loss": float(base["all_big"].mean()), "all_small_loss": float(base["all_small"].mean()),
        "position_budgets": [e for e, _ in position],
        "notes": ["context=sequential: left to right, each token's pattern is chosen given the keys and values of "
                  "the earlier tokens under their own chosen patterns (one pass per budget schedule)",
                  "fixed@k is the shared context's (one pattern for every token routes every context alike)",
                  "predicted_ppl = exp(sum_k w_k * mean oracle loss at constant k): the schedule's score were "
                  "budgets not to interact through the context",
                  "*_lo / *_hi: 95% t-interval over sequences (jackknife standard error, stats.py)"],
    }
    cols = {"sequence": np.repeat(np.arange(S, dtype=np.int32), T), "position": np.tile(np.arange(T, dtype=np.int32), S),
            "token": idx_ST.reshape(-1).cpu().numpy().astype(np.int32),
            "target": tgt_ST.reshape(-1).cpu().numpy().astype(np.int32),
            "loss_all_small": base["all_small"].reshape(-1).astype(np.float32),
            "loss_all_big": base["all_big"].reshape(-1).astype(np.float32)}
    for name, _, _ in schedules:
        key = f"oracle_loss_{name}" if name.startswith("k") else f"schedule_loss_{name}"
        cols[key] = loss[name].reshape(-1).astype(np.float32)
        strings = code_strings(code[name].reshape(-1), L).tolist()
        cols[key.replace("_loss_", "_pattern_")] = pa.array(strings, type=pa.string()).dictionary_encode()
    cols = {k.replace("oracle_pattern_", "best_pattern_"): v for k, v in cols.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(out_dir / PER_TOKEN, cols)
    atomic_write_json(out_dir / SUMMARY, summary)
    atomic_write_json(out_dir / RUN_JSON, {"wall_s": round(time.time() - t_start, 3), "device": str(device),
                                           "schedules": len(schedules), "sequences": int(S)})
    return summary


def _ppl_entry(loss_ST: np.ndarray, key: str) -> dict:
    ci = ppl_interval(loss_ST)
    return {f"{key}_ppl": ci["ppl"], f"{key}_ppl_lo": ci["ppl_lo"], f"{key}_ppl_hi": ci["ppl_hi"]}
