"""Sharded data parallelism (``train.parallel=fsdp``, DESIGN 4.6) through PyTorch's own FSDP2
(``fully_shard``): parameters, gradients and AdamW state sharded per block across the processes of
a ``torchrun`` group, all-gathered one block at a time for its forward and backward.

Checkpoints stay the project's one format (``checkpoint.py``): the full weights and the optimizer
state are gathered to rank 0 and written there, the optimizer state in the index-keyed layout of a
plain ``optimizer.state_dict()``. So a run trained under FSDP loads in every other command on one
process (eval, oracle, routers, export), and resumes under FSDP, DDP or one process alike.

Random routing and FSDP: FSDP2 reduce-scatters the gradients each process has, so every process
must have gradients for the same parameters. A module gets a gradient on a rank whenever one token
there was sent to it; at P(big) = 0.5 over a micro-batch of hundreds of tokens per layer, a module
without a token on one rank only (while others have some) has probability 2^-hundreds. Routing
that sends *every* token one way (all-big phases) does so on every rank alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..checkpoint import tied_groups

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(module: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` each block (``module.layers``), then the rest (embeddings, final norm, head) at the
    root, in place; build the optimizer afterwards, on the sharded parameters. The tied weights are
    recorded first (sharded parameters have no storage to compare)."""
    module.duollm_tied_groups = tied_groups(module)
    for block in getattr(module, "layers", []):
        fully_shard(block)
    fully_shard(module)
    return module


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def all_finite(tensors) -> bool:
    """Every process's shards finite (a collective: every rank calls it)."""
    ok = torch.tensor([float(all(bool(torch.isfinite(local(t)).all()) for t in tensors if t.is_floating_point()))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def full_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s total norm as a float (a DTensor under FSDP)."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _param_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's order (its groups' params, concatenated): the index of a
    name is its key in a plain ``optimizer.state_dict()``."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The full weights (tied ones once) and the index-keyed optimizer state, on rank 0 (empty elsewhere).
    A collective: every rank calls it."""
    weights = get_model_state_dict(module, options=FULL)
    osd = get_optimizer_state_dict(module, optimizer, options=FULL)
    if dist.get_rank() != 0:
        return {}, {}
    weights = {g[0]: weights[g[0]].contiguous() for g in module.duollm_tied_groups}
    names = _param_names(module, optimizer)
    index = {n: i for i, n in enumerate(names)}
    state = {index[n]: s for n, s in osd["state"].items()}
    groups, start = [], 0
    for group, saved in zip(optimizer.param_groups, osd["param_groups"]):
        groups.append({**{k: v for k, v in saved.items() if k != "params"},
                       "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    return weights, {"state": state, "param_groups": groups}


def load_optimizer(module: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """A plain (index-keyed) optimizer state into the sharded optimizer; every rank passes the full state."""
    names = _param_names(module, optimizer)
    if len(names) != sum(len(g["params"]) for g in saved["param_groups"]):
        raise ValueError("its optimizer state does not fit the model")
    osd = {"state": {names[int(i)]: s for i, s in saved["state"].items()},
           "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[int(i)] for i in g["params"]]}
                            for g in saved["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, osd, options=StateDictOptions(full_state_dict=True))
