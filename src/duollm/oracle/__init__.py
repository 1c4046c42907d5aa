"""Stage 2 of Duo-LLM: the oracle engine (paper section 3.2, DESIGN 4.2).

- ``build_spec``: the user's choices -> an ``OracleSpec`` (what is searched and how it is computed).
- ``oracle_of_run``: a run folder + ``OracleSpec`` -> ``RUN/oracle/<name>/`` (the study calls this).
- ``run_oracle``: a model + tokens + ``OracleSpec`` -> an output folder (chunks, resume, sharding).
- ``CONTEXTS`` (``context.py``): the context policies, one registry entry each.
- ``run_oracle_command`` / ``add_arguments``: the ``duollm oracle`` command.
- ``walk_tree`` (tree evaluator), ``naive_losses`` (one forward per pattern), ``beam_search``.
- ``pattern_losses``: every pattern's per-token loss for small problems (tests, notebooks).
"""

from __future__ import annotations

import numpy as np
import torch

from .command import add_arguments, run_command, run_oracle_command
from .context import CONTEXTS, FrozenContext, OracleContext, SharedContext, make_context
from .folder import oracle_of_run
from .naive import naive_losses
from .plan import OracleSpec, Plan, build_plan, build_spec
from .runner import run_oracle
from .search import beam_search
from .tree import naive_flops, tree_flops, walk_tree


@torch.no_grad()
def pattern_losses(model, idx_ST, tgt_ST, route_PL, *, context="shared", reference=None) -> torch.Tensor:
    """``loss_PST`` of every pattern with the tree evaluator — holds the full matrix, so for small
    problems only (the engine itself streams reductions instead)."""
    route_PL = np.asarray(route_PL, dtype=np.int8)
    out = torch.empty(len(route_PL), *idx_ST.shape)
    ctx = make_context(model, context, idx_ST, reference)

    def consume(p_R, loss_RST):
        out[torch.as_tensor(p_R)] = loss_RST.float().cpu()

    walk_tree(model, ctx, route_PL, model.embed(idx_ST).float(), tgt_ST, consume)
    return out


__all__ = [
    "CONTEXTS", "FrozenContext", "OracleContext", "OracleSpec", "Plan", "SharedContext", "add_arguments", "beam_search",
    "build_plan", "build_spec", "make_context", "naive_flops", "naive_losses", "oracle_of_run", "pattern_losses",
    "run_command", "run_oracle", "run_oracle_command", "tree_flops", "walk_tree",
]
