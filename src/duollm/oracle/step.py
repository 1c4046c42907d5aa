"""One oracle step: a layer at a node of prefixes — the attention once, then the FFN per child route.

The tree walk (``tree.py``) and the beam search (``search.py``) both advance prefixes one layer at
a time with this step, under either context policy (``context.py`` supplies ``residual``). With
``skip_mode="ffn"`` the attention does not depend on the layer's route, so one attention serves
every child; a skip child is the residual stream after it (with ``skip_mode="block"`` the stream
before it, and a node whose children all skip runs no attention).

Tensor name legend (``docs/NOTATION.md``): B sequences, T positions, M prefixes at the node, D width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..model.routing import BIG, SKIP, SMALL
from . import kernels as K


def layer_children(ctx, layer: int, h_BTMD: torch.Tensor, routes: list[int], *,
                   residual: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                   select: dict[int, torch.Tensor] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(route, child_BTMD)`` for each route in ``routes``, lazily (a depth-first walk holds one
    child at a time). ``select[route]``: the prefixes (indices into M) that take that route; default all.
    ``residual``: the context's ``h + attention`` (default ``ctx.residual``)."""
    block = ctx.model.layers[layer]
    kern = ctx.kernels
    block_skip = block.skip_mode == "block"
    used = set(routes)
    mid_BTMD = x_BTMD = None
    if not block_skip or used != {SKIP}:
        mid_BTMD = (residual or ctx.residual)(layer, h_BTMD)
    if used & {BIG, SMALL}:
        x_BTMD = kern(K.norm, block.ffn_norm, mid_BTMD)

    def pick(t_BTMD: torch.Tensor, route: int) -> torch.Tensor:
        return t_BTMD if select is None else t_BTMD[:, :, select[route]]

    for route in routes:
        if route == BIG:
            yield route, kern(K.ffn_residual, block.ffn.big, pick(mid_BTMD, route), pick(x_BTMD, route))
        elif route == SMALL:
            yield route, kern(K.ffn_residual, block.ffn.small, pick(mid_BTMD, route), pick(x_BTMD, route))
        else:  # skip: the residual passes (with skip_mode="block" the attention output too)
            yield route, pick(h_BTMD if block_skip else mid_BTMD, route)
