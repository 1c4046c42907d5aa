"""The tree evaluator: every candidate pattern's per-token loss, sharing work across prefixes.

Patterns that share their first l routes share the hidden state after l layers (DESIGN 4.2).
We walk the prefix tree depth first: at a node (a prefix of ``depth`` routes) one oracle step
(``step.layer_children``) runs the attention of layer ``depth`` once, then the FFN once per
child route (big, small; skip costs nothing), and we recurse.
Leaves (full patterns) go through the LM head and cross-entropy, siblings together, and are
handed to ``consume`` as they come, so the pattern x token loss matrix is never held.
Memory: one hidden state per depth for the tokens of the chunk, whatever the pattern count.

Each node's tensors hold all tokens of a chunk of sequences, so the matrix products are as
large as the chunk ([B*T, D] x [D, F]).

Tensor name legend: B sequences, T positions, D model width, L layers, P patterns,
R sibling routes at a node (<= 3), N tokens of the chunk (B*T).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..model.model import DuoModel
from ..model.routing import SKIP, FlopModel
from ..runtime import threads
from .context import Head
from .space import pattern_codes
from .step import layer_children

Consume = Callable[[np.ndarray, torch.Tensor], None]  # (pattern indices [R], loss_RBT)


def sort_patterns(route_PL: np.ndarray) -> np.ndarray:
    """Order that sorts patterns lexicographically (prefixes contiguous); rejects duplicates."""
    code_P = pattern_codes(route_PL)
    order_P = np.argsort(code_P, kind="stable")
    if len(code_P) and (np.diff(code_P[order_P]) == 0).any():
        raise ValueError("the pattern list has duplicates")
    return order_P


def _child_ranges(col_P: np.ndarray, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(route, start, stop) of each child of the node covering sorted patterns [lo, hi)."""
    col = col_P[lo:hi]
    starts = np.flatnonzero(np.r_[True, col[1:] != col[:-1]])
    stops = np.r_[starts[1:], len(col)]
    return [(int(col[a]), lo + int(a), lo + int(b)) for a, b in zip(starts, stops)]


@torch.no_grad()
def walk_tree(
    model: DuoModel,
    ctx,
    route_PL: np.ndarray,
    h0_BTD: torch.Tensor,
    tgt_BT: torch.Tensor,
    consume: Consume,
    head: Head | None = None,
    doubt: bool = False,
) -> None:
    """Evaluate every pattern of ``route_PL`` (any order, no duplicates) under context ``ctx``
    (whose ``kernels`` also run the FFNs: eager or compiled). ``doubt``: ``consume`` also gets each
    leaf's -log top-1 probability, ``consume(p_R, loss_RBT, doubt_RBT)`` (``Head``)."""
    head = head or Head(model, kernels=ctx.kernels)
    L = model.cfg.n_layers
    P = len(route_PL)
    if P == 0:
        return
    assert route_PL.shape[1] == L, "patterns must have one route per layer"
    order_P = sort_patterns(route_PL)
    sorted_PL = np.ascontiguousarray(route_PL[order_P])
    h0_BTMD = h0_BTD.unsqueeze(2)  # M = 1: one prefix per node

    def visit(depth: int, lo: int, hi: int, h_BTMD: torch.Tensor) -> None:
        children = _child_ranges(sorted_PL[:, depth], lo, hi)
        leaves, leaf_h = [], []
        steps = layer_children(ctx, depth, h_BTMD, [r for r, _, _ in children])
        for (route, a, b), (_, child) in zip(children, steps):
            if depth == L - 1:
                assert b == a + 1
                leaves.append(order_P[a])
                leaf_h.append(child)
            else:
                visit(depth + 1, a, b, child)
        if leaves:
            threads.poll()  # one reading of the machine's load every few seconds (runtime/threads.py)
            h_RBTD = torch.stack([h.squeeze(2) for h in leaf_h])
            out = head(h_RBTD, tgt_BT.expand(len(leaves), *tgt_BT.shape), doubt=doubt)
            consume(np.array(leaves), *(out if doubt else (out,)))

    visit(0, 0, P, h0_BTMD)


def tree_flops(route_PL: np.ndarray, flop_model: FlopModel, skip_mode: str = "ffn") -> float:
    """FLOPs per token of the tree walk: one attention per internal node, one FFN per child, one
    head per leaf (the cost model the benchmark's ideal ratio uses)."""
    L = route_PL.shape[1]
    total = 0.0
    for depth in range(L):
        prefix_C = np.unique(pattern_codes(route_PL[:, : depth + 1]))  # C: distinct children at this depth
        route_C, parent_C = prefix_C % 3, prefix_C // 3
        if skip_mode == "block":  # a node whose children all skip runs no attention
            parent_C = parent_C[route_C != SKIP]
        total += len(np.unique(parent_C)) * flop_model.attention
        total += sum(flop_model.ffn[int(r)] for r in route_C)
    return total + len(route_PL) * flop_model.head


def naive_flops(route_PL: np.ndarray, flop_model: FlopModel) -> float:
    """FLOPs per token of one full forward per pattern."""
    return float(sum(flop_model.pattern(r) for r in route_PL))


def final_hidden(model: DuoModel, ctx, route_1L: np.ndarray, h0_BTD: torch.Tensor, tgt_BT: torch.Tensor) -> torch.Tensor:
    """``h_BTD``: the final hidden states of one pattern on the engine's own path (the same numbers its leaf
    reaches in a full walk), for the belief oracle's reference (``Head.set_reference``)."""
    got = {}

    def capture(h_RBTD, tgt_RBT, doubt=False):
        got["h"] = h_RBTD[0]
        return torch.zeros(h_RBTD.shape[:-1])

    walk_tree(model, ctx, route_1L, h0_BTD, tgt_BT, lambda *_: None, capture)
    return got["h"]

