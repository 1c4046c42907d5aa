"""Beam and greedy search over routing patterns, for spaces too large to enumerate.

3^12 patterns with skip, or 2^24 / 2^32 for deeper models, cannot be walked exhaustively
(DESIGN 4.2). We grow patterns layer by layer and keep, per *cell*, the ``width`` best prefixes.

- Cell: prefixes with the same number of big layers (and of skipped layers when the skip count
  is constrained). Comparing prefixes only within a cell keeps the comparison fair — they have
  spent the same budget so far — and guarantees every budget keeps candidates to the end.
- Score of a prefix: the next-token loss of the prefix completed by all-big layers. The
  completion ignores the budget on purpose: it asks "how good is the state this prefix leaves,
  if the rest of the network runs at full strength", identically for every prefix in a cell,
  so it ranks prefixes by what their own routes did. A cheaper logit-lens score (the LM head on
  the intermediate state) is unreliable for models not trained to exit early.
- Unit of selection: ``frozen`` — every token keeps its own ``width`` best prefixes per cell
  (its route does not change anyone else's state). ``shared`` — a prefix routes the whole
  sequence, so a sequence keeps up to ``SEQ_FACTOR * width`` prefixes per cell: the union of its
  tokens' ``width`` best, most-voted first. (A first version kept only the ``width``
  most-voted prefixes per sequence; on the trained cpu preset its greedy oracle at k = 6 was
  69.8 ppl against 51.7 exhaustive and 54.5 for the per-token best of 100 random patterns:
  tokens of one sequence want different patterns, and the per-token oracle needs that
  diversity. An uncapped union cost more than the exhaustive walk at L = 12.)
- Only cells with more children than they keep are scored; early depths, whose completions are
  the longest, usually keep every child unscored.
- At the last layer the children are complete patterns and their loss is exact; every token
  takes, per budget, the best pattern its beam reached. Greedy is width 1.

With ``width`` at least the size of every cell nothing is pruned and the result equals the
exhaustive oracle (a test checks this). The gap to exhaustive is reported where both run.

Tensor name legend: B sequences, T positions, M live prefixes (slots), Q their children, W width,
D model width, J budgets, L layers.
"""

from __future__ import annotations

import torch

from ..model.model import DuoModel
from ..model.routing import BIG, ROUTE_OF_LETTER, SKIP
from .context import CONTEXTS, Head
from .space import CandidateSpace
from .step import layer_children

SEQ_FACTOR = 4  # shared context: a sequence keeps up to 4 x width prefixes per cell


def _cells(space: CandidateSpace, bigs: int, skips: int) -> tuple[int, int]:
    return (bigs, skips if space.skips is not None else 0)


class BeamSearch:
    def __init__(self, model: DuoModel, ctx, space: CandidateSpace, budgets, width: int, rows: int = 8192,
                 head: Head | None = None):
        self.model, self.ctx, self.space = model, ctx, space
        self.head = head or Head(model, kernels=ctx.kernels)
        self.budgets, self.width = tuple(budgets), width
        self.unit = CONTEXTS[ctx.name].beam_unit
        self.rows = rows  # cap on hidden-state rows per matrix product (memory)
        self.routes = [ROUTE_OF_LETTER[c] for c in ("B", "S", "_") if c in space.options]

    # -- pieces of the forward ------------------------------------------------------------
    def _groups(self, B: int, T: int, M: int):
        step = max(1, self.rows // max(1, B * T))
        return [(a, min(M, a + step)) for a in range(0, M, step)]

    def _residual(self, layer: int, h_BTMD: torch.Tensor) -> torch.Tensor:
        B, T, M, _ = h_BTMD.shape
        return torch.cat([self.ctx.residual(layer, h_BTMD[:, :, a:b]) for a, b in self._groups(B, T, M)], dim=2)

    def _complete(self, h_BTQD: torch.Tensor, start: int, tgt_BT: torch.Tensor) -> torch.Tensor:
        """Score children: loss of the prefix completed with big FFNs from layer ``start`` on."""
        B, T, C, _ = h_BTQD.shape
        out = []
        for a, b in self._groups(B, T, C):
            h = h_BTQD[:, :, a:b]
            for layer in range(start, self.model.cfg.n_layers):
                _, h = next(layer_children(self.ctx, layer, h, [BIG]))
            out.append(self.head(h, tgt_BT[:, :, None].expand(B, T, b - a)))
        return torch.cat(out, dim=2)

    # -- the search -----------------------------------------------------------------------
    @torch.no_grad()
    def run(self, h0_BTD: torch.Tensor, tgt_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per budget and token (row-major over [B, T]): best loss found and its pattern code,
        ``(loss_JN, code_JN)``."""
        if self.unit == "sequence" and h0_BTD.shape[0] > 1:  # each sequence keeps its own prefixes
            parts = [self._run(h0_BTD[b : b + 1], tgt_BT[b : b + 1]) for b in range(h0_BTD.shape[0])]
            return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
        return self._run(h0_BTD, tgt_BT)

    def _run(self, h0_BTD: torch.Tensor, tgt_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model, space = self.model, self.space
        L = model.cfg.n_layers
        B, T, D = h0_BTD.shape
        h_BTMD = h0_BTD.unsqueeze(2)
        code_BTM = torch.zeros(B, T, 1, dtype=torch.long, device=h0_BTD.device)
        slots = [(0, 0)]  # (bigs, skips) of each slot; the same for every sequence/token
        for depth in range(L):
            parents = {r: [] for r in self.routes}
            child_counts = []
            for r in self.routes:
                for m, (b, s) in enumerate(slots):
                    b2, s2 = b + (r == BIG), s + (r == SKIP)
                    if space.feasible_prefix(depth + 1, b2, s2):
                        parents[r].append(m)
                        child_counts.append(_cells(space, b2, s2))
            assert child_counts, "feasible prefixes always have a feasible child"
            used = [r for r in self.routes if parents[r]]
            select = {r: torch.tensor(parents[r], device=h0_BTD.device) for r in used}
            parts_h, parts_code = [], []
            for r, h in layer_children(self.ctx, depth, h_BTMD, used, residual=self._residual, select=select):
                parts_h.append(h)
                parts_code.append(code_BTM[:, :, select[r]] * 3 + r)
            h_BTQD, code_BTQ = torch.cat(parts_h, 2), torch.cat(parts_code, 2)
            if depth == L - 1:
                loss_BTQ = self.head(h_BTQD, tgt_BT[:, :, None].expand(*code_BTQ.shape))
                return self._final(loss_BTQ, code_BTQ, child_counts)
            # score (complete to the end) only the children of cells that must be pruned: cells
            # small enough to keep whole need no ranking — the early, most expensive depths
            crowded = {c for c in set(child_counts) if child_counts.count(c) > self.cap}
            need = [i for i, c in enumerate(child_counts) if c in crowded]
            score_BTQ = None
            if need:
                score_BTQ = torch.full(code_BTQ.shape, float("inf"), device=h0_BTD.device)
                need_t = torch.tensor(need, device=h0_BTD.device)
                score_BTQ[:, :, need_t] = self._complete(h_BTQD[:, :, need_t], depth + 1, tgt_BT)
            h_BTMD, code_BTM, slots = self._select(h_BTQD, code_BTQ, score_BTQ, child_counts)
        raise AssertionError("unreachable")

    @property
    def cap(self) -> int:
        """Prefixes a cell keeps: per token (frozen) ``width``; per sequence (shared) SEQ_FACTOR x width."""
        return self.width if self.unit == "token" else SEQ_FACTOR * self.width

    def _select(self, h_BTQD, code_BTQ, score_BTQ, child_cells):
        B, T, C, D = h_BTQD.shape
        device = h_BTQD.device
        new_h, new_code, new_slots = [], [], []
        for cell in sorted(set(child_cells)):
            cidx = torch.tensor([i for i, c in enumerate(child_cells) if c == cell], device=device)
            if len(cidx) <= self.cap:  # nothing to prune
                W = len(cidx)
                top_BTW = torch.arange(W, device=device).view(1, 1, W).expand(B, T, W)
            elif self.unit == "token":  # each token keeps its own best prefixes
                W = self.width
                top_BTW = score_BTQ[:, :, cidx].topk(W, dim=-1, largest=False, sorted=True).indices
            else:  # one set per sequence: the union of its tokens' best, most-voted first, capped
                assert B == 1, "shared-context beams run one sequence at a time (their slot counts differ)"
                s_Tc = score_BTQ[0][:, cidx]
                tok_top_TW = s_Tc.topk(self.width, dim=-1, largest=False).indices
                votes_c = torch.zeros(len(cidx), device=device).scatter_add_(
                    0, tok_top_TW.reshape(-1), torch.ones(tok_top_TW.numel(), device=device)
                )
                by_mean_c = s_Tc.double().mean(0).argsort(stable=True)
                order_c = by_mean_c[(-votes_c[by_mean_c]).argsort(stable=True)]  # most votes, then lower mean
                W = min(int((votes_c > 0).sum()), self.cap)
                top_BTW = order_c[:W].view(1, 1, W).expand(1, T, W)
            sel_BTW = cidx[top_BTW]
            new_h.append(h_BTQD.gather(2, sel_BTW[..., None].expand(B, T, W, D)))
            new_code.append(code_BTQ.gather(2, sel_BTW))
            new_slots += [cell] * W
        return torch.cat(new_h, 2), torch.cat(new_code, 2), new_slots

    def _final(self, loss_BTQ, code_BTQ, child_cells):
        B, T, C = loss_BTQ.shape
        rows_loss, rows_code = [], []
        for k in self.budgets:
            ok_Q = torch.tensor(
                [self.space.allowed(b, s) and bool(self.space.in_budget(b, k)) for b, s in child_cells],
                device=loss_BTQ.device,
            )
            masked_BTQ = loss_BTQ.masked_fill(~ok_Q, float("inf"))
            best_BT, arg_BT = masked_BTQ.min(-1)
            assert torch.isfinite(best_BT).all(), f"budget {k} lost all its candidates"
            rows_loss.append(best_BT.reshape(-1))
            rows_code.append(code_BTQ.gather(2, arg_BT[..., None]).reshape(-1))
        return torch.stack(rows_loss), torch.stack(rows_code)


def beam_search(model, ctx, h0_BTD, tgt_BT, space, budgets, width, rows=8192, head=None):
    """Functional form of ``BeamSearch(...).run``: ``(loss_JN, code_JN)`` for the chunk's B*T tokens."""
    return BeamSearch(model, ctx, space, budgets, width, rows, head).run(h0_BTD, tgt_BT)


def max_children(space: CandidateSpace, width: int) -> int:
    """Most children the search holds at once (to size sequence groups for memory): a dry run of
    the slot bookkeeping, which is the same for every token."""
    routes = [ROUTE_OF_LETTER[c] for c in ("B", "S", "_") if c in space.options]
    slots, most = [(0, 0)], 1
    for depth in range(space.n_layers):
        cells = []
        for r in routes:
            for b, s in slots:
                b2, s2 = b + (r == BIG), s + (r == SKIP)
                if space.feasible_prefix(depth + 1, b2, s2):
                    cells.append(_cells(space, b2, s2))
        most = max(most, len(cells))
        slots = [c for c in sorted(set(cells)) for _ in range(min(width, cells.count(c)))]
    return most
