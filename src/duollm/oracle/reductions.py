"""Streaming reductions: what the oracle keeps of every (pattern, token) loss as it goes.

Per chunk of tokens (``ChunkReducer``): per budget group the best loss and best pattern of each
token; per pattern the summed loss; per budget the per-token best among its random draws; the
all-big and all-small losses; the label-free oracles (``analysis/gap.py``): per group the loss
of each token's most confident pattern, and at each token the loss of its predecessor's best
pattern; per pattern the summed loss of each sequence (the cross-fitted baselines); and per random
subset of the count-versus-compute nulls each token's running minimum (``selection.py``). Nothing of
size patterns x tokens is kept (DESIGN 4.2).

After all chunks (``finalize``): oracle@k (mean of per-token best), fixed@k (the one pattern
with the lowest mean loss, paper section 4.1), random@k (mean over candidates of the per-pattern
mean loss), best of 100 random patterns in both readings, compute relative to all-big,
position-varying budgets (paper section 4.2: falling 6->2, rising 2->6, constant 4), and the
layer x position usage of the oracle's routes for the heatmaps (paper figures 3-5).

Tensor name legend: P evaluated patterns, J reported budgets, G exact-bigs groups,
N tokens (of a chunk, or all), B sequences of a chunk, S sequences (all), L layers, T positions,
R routes (skip, small, big; in ``consume``: the leaves), U null families, X their subsets
(family x draw, ``selection.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..model.routing import BIG, SKIP, FlopModel
from ..stats import paired_ppl_difference, ppl_interval, recovered_share
from .plan import Plan
from .selection import DRAWS
from .space import code_strings, decode_codes


class ChunkReducer:
    """Consumes ``(pattern indices, loss_R...)`` for one chunk of N tokens."""

    def __init__(self, plan: Plan, n_tokens: int, device, matrix_cb=None, n_seq: int = 1):
        self.plan = plan
        N, G, J, P = n_tokens, len(plan.group_bigs), len(plan.budgets), len(plan.code_P)
        self.n_seq = n_seq
        # random@k per sequence: the sum over the budget's members of each sequence's loss (for its interval)
        self.member_JP = torch.as_tensor(plan.member_JP, dtype=torch.float64, device=device)
        self.rand_JB = torch.zeros(J, n_seq, dtype=torch.float64, device=device)
        inf = float("inf")
        self.best_GN = torch.full((G, N), inf, device=device)
        self.arg_GN = torch.full((G, N), -1, dtype=torch.long, device=device)
        self.sub_JN = torch.full((J, N), inf, device=device)
        self.sub_arg_JN = torch.full((J, N), -1, dtype=torch.long, device=device)
        # label-free oracles (the oracle-router gap, decomposed): per group, the most confident pattern's
        # loss (lowest -log top-1 probability) and, at each token t, the loss of token t-1's best pattern
        # (running: updated whenever t-1's best changes; position 0 has no previous token and stays inf)
        self.doubt_GN = torch.full((G, N), inf, device=device)
        self.doubt_loss_GN = torch.full((G, N), inf, device=device)
        # the belief oracle (issue 29): per group, the loss of the pattern whose distribution is closest (KL) to
        # all-big's, the label-free ceiling of a router imitating all-big's beliefs
        self.kl_GN = torch.full((G, N), inf, device=device)
        self.kl_loss_GN = torch.full((G, N), inf, device=device)
        self.kl_arg_GN = torch.full((G, N), -1, dtype=torch.long, device=device)  # its pattern: the consistency router's label
        self.prev_loss_GN = torch.full((G, N), inf, device=device)
        self.sum_P = torch.zeros(P, dtype=torch.float64, device=device)
        self.seq_PB = torch.zeros(P, n_seq, dtype=torch.float64, device=device)  # cross-fitted fixed@k, best of 100
        nulls = plan.nulls
        if nulls is not None:  # per pattern the subsets it belongs to: one update of their minima per pattern
            self.min_XN = torch.full((nulls.n_subsets, N), inf, device=device)
            self.nulls_of = [torch.as_tensor(x_P, device=device) if len(x_P) else None for x_P in nulls.subsets_of_P]
        self.seen_P = np.zeros(P, dtype=bool)
        self.base = {}
        self.samples_of = [np.flatnonzero(plan.sample_JP[:, p]) for p in range(P)]
        self.matrix_cb = matrix_cb

    def consume(self, p_R: np.ndarray, loss_R: torch.Tensor, doubt_R: torch.Tensor | None = None,
                kl_R: torch.Tensor | None = None) -> None:
        """Leaves ``p_R``: their losses ``loss_R...`` and, for the confidence oracle, ``doubt_R...``
        (-log top-1 probability, ``context.Head``); without it the label-free oracles stay empty. ``kl_R...``:
        KL(all-big || the leaf), for the belief oracle (``Head.set_reference``)."""
        loss_RN = loss_R.reshape(len(p_R), -1)
        doubt_RN = None if doubt_R is None else doubt_R.reshape(len(p_R), -1)
        kl_RN = None if kl_R is None else kl_R.reshape(len(p_R), -1)
        p_R_t = torch.as_tensor(p_R, device=loss_RN.device)
        self.sum_P.index_copy_(0, p_R_t, loss_RN.double().sum(1))
        loss_RBT = loss_RN.double().view(len(p_R), self.n_seq, -1)
        self.rand_JB += self.member_JP[:, p_R_t] @ loss_RBT.mean(2)
        self.seq_PB.index_copy_(0, p_R_t, loss_RBT.sum(2))
        self.seen_P[p_R] = True
        for i, p in enumerate(p_R.tolist()):
            loss_N = loss_RN[i]
            g = int(self.plan.group_P[p])
            if g >= 0:
                better_N = loss_N < self.best_GN[g]  # strict: the first pattern in code order wins ties
                self.best_GN[g] = torch.where(better_N, loss_N, self.best_GN[g])
                self.arg_GN[g] = torch.where(better_N, p, self.arg_GN[g])
                if doubt_RN is not None:
                    self._label_free(g, loss_N, doubt_RN[i], better_N)
                if kl_RN is not None:
                    _keep_lower(self.kl_GN, (self.kl_loss_GN, self.kl_arg_GN), g, kl_RN[i], (loss_N, p))
            for j in self.samples_of[p]:
                better_N = loss_N < self.sub_JN[j]
                self.sub_JN[j] = torch.where(better_N, loss_N, self.sub_JN[j])
                self.sub_arg_JN[j] = torch.where(better_N, p, self.sub_arg_JN[j])
            if self.plan.nulls is not None and (x := self.nulls_of[p]) is not None:
                self.min_XN[x] = torch.minimum(self.min_XN[x], loss_N)
            if p == self.plan.all_big:
                self.base["all_big"] = loss_N.clone()
            if p == self.plan.all_small:
                self.base["all_small"] = loss_N.clone()
        if self.matrix_cb is not None:
            self.matrix_cb(p_R, loss_RN)

    def _label_free(self, g: int, loss_N, doubt_N, better_N) -> None:
        _keep_lower(self.doubt_GN, (self.doubt_loss_GN,), g, doubt_N, (loss_N,))
        B = self.n_seq
        prev_BT, better_BT, loss_BT = self.prev_loss_GN[g].view(B, -1), better_N.view(B, -1), loss_N.view(B, -1)
        prev_BT[:, 1:] = torch.where(better_BT[:, :-1], loss_BT[:, 1:], prev_BT[:, 1:])

    def result(self, beam: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
        """Per-budget arrays of this chunk (numpy, CPU). ``beam``: (loss_JN, code_JN) from the search.

        With a search, a token's oracle is the best pattern of its budget that anything evaluated
        for it: the search or the random draw (both are candidates; taking the better is free).
        ``search_loss_JN`` keeps the search's own result, to report its gap on its own.
        """
        plan = self.plan
        assert self.seen_P.all(), "every planned pattern must reach a leaf"
        code_P = torch.as_tensor(plan.code_P, device=self.best_GN.device)
        extra = {}
        if beam is not None:
            search_JN, search_code_JN = beam
            draw_better_JN = self.sub_JN < search_JN
            best_JN = torch.where(draw_better_JN, self.sub_JN, search_JN)
            code_JN = torch.where(draw_better_JN, code_P[self.sub_arg_JN.clamp(min=0)], search_code_JN)
            extra["search_loss_JN"] = search_JN.float().cpu().numpy()
        else:
            bigs_G = plan.group_bigs
            rows_loss, rows_code, rows_doubt, rows_prev, rows_kl, rows_kl_code = [], [], [], [], [], []
            B = self.n_seq
            for k in plan.budgets:
                gs = [g for g, b in enumerate(bigs_G) if plan.in_budget(b, k)]
                loss_N, arg_N = self.best_GN[gs[0]], self.arg_GN[gs[0]]
                doubt_N, doubt_loss_N, prev_N = self.doubt_GN[gs[0]], self.doubt_loss_GN[gs[0]], self.prev_loss_GN[gs[0]]
                kl_N, kl_loss_N, kl_arg_N = self.kl_GN[gs[0]], self.kl_loss_GN[gs[0]], self.kl_arg_GN[gs[0]]
                for g in gs[1:]:  # "at most k": best over the exact groups <= k, lower group on ties
                    better_N = self.best_GN[g] < loss_N
                    loss_N = torch.where(better_N, self.best_GN[g], loss_N)
                    arg_N = torch.where(better_N, self.arg_GN[g], arg_N)
                    doubt_N, (doubt_loss_N,) = _lower(self.doubt_GN[g], (self.doubt_loss_GN[g],), doubt_N, (doubt_loss_N,))
                    kl_N, (kl_loss_N, kl_arg_N) = _lower(self.kl_GN[g], (self.kl_loss_GN[g], self.kl_arg_GN[g]), kl_N,
                                                         (kl_loss_N, kl_arg_N))
                    prev_BT = prev_N.view(B, -1).clone()  # token t follows the group of t-1's best
                    prev_BT[:, 1:] = torch.where(better_N.view(B, -1)[:, :-1], self.prev_loss_GN[g].view(B, -1)[:, 1:],
                                                 prev_BT[:, 1:])
                    prev_N = prev_BT.view(-1)
                rows_loss.append(loss_N)
                rows_code.append(code_P[arg_N])
                rows_doubt.append(doubt_loss_N)
                rows_prev.append(prev_N)
                rows_kl.append(kl_loss_N)
                rows_kl_code.append(code_P[kl_arg_N.clamp(min=0)])
            best_JN, code_JN = torch.stack(rows_loss), torch.stack(rows_code)
            if bool(torch.isfinite(self.doubt_GN).any()):  # the leaves came with their confidence
                extra["confidence_loss_JN"] = torch.stack(rows_doubt).float().cpu().numpy()
                extra["previous_loss_JN"] = torch.stack(rows_prev).float().cpu().numpy()
            if bool(torch.isfinite(self.kl_GN).any()):  # the leaves came with their KL to all-big
                extra["belief_loss_JN"] = torch.stack(rows_kl).float().cpu().numpy()
                extra["belief_code_JN"] = torch.stack(rows_kl_code).long().cpu().numpy()
        if plan.nulls is not None:  # per family: each token's best in a subset, averaged over the draws
            U, N = len(plan.nulls.families), self.min_XN.shape[1]
            extra["null_loss_UN"] = self.min_XN.view(U, DRAWS, N).double().mean(1).float().cpu().numpy()
        return {
            **extra,
            "best_loss_JN": best_JN.float().cpu().numpy(),
            "best_code_JN": code_JN.long().cpu().numpy(),
            "sub_loss_JN": self.sub_JN.cpu().numpy(),
            "all_big_N": self.base["all_big"].float().cpu().numpy(),
            "all_small_N": self.base["all_small"].float().cpu().numpy(),
            "sum_P": self.sum_P.cpu().numpy(),
            "seq_loss_PB": self.seq_PB.cpu().numpy(),
            # mean over the budget's members of each sequence's mean loss: random@k per sequence
            "random_loss_JB": (self.rand_JB / self.member_JP.sum(1, keepdim=True).clamp(min=1)).cpu().numpy(),
        }


def _lower(crit_N, values: tuple, than_crit_N, than_values: tuple):
    """Per token, the criterion and the values (loss, pattern) of the lower criterion; ties keep ``than`` (the one
    seen first)."""
    lower_N = crit_N < than_crit_N
    return torch.where(lower_N, crit_N, than_crit_N), tuple(torch.where(lower_N, v, t) for v, t in zip(values, than_values))


def _keep_lower(crit_GN, kept_GN: tuple, g: int, crit_N, values_N: tuple) -> None:
    """A label-free oracle's running choice in group ``g``: the leaf's values (its loss, its pattern) where its
    criterion (confidence, KL to all-big) is strictly lower, so the first pattern in code order wins ties, as the
    oracle's own."""
    crit_GN[g], new = _lower(crit_N, values_N, crit_GN[g], tuple(k[g] for k in kept_GN))
    for k, v in zip(kept_GN, new):
        k[g] = v


def merge_chunks(results: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-token arrays in chunk order; sum per-pattern losses in chunk order
    (a fixed order, so a sharded or resumed run gives the same bits as one uninterrupted pass);
    per-sequence sums ``seq_loss_PB`` become ``seq_loss_PS``."""
    out = {}
    for key in ("best_loss_JN", "best_code_JN", "sub_loss_JN", "search_loss_JN", "random_loss_JB", "confidence_loss_JN",
                "previous_loss_JN", "belief_loss_JN", "belief_code_JN", "null_loss_UN"):
        if key in results[0]:
            out[key] = np.concatenate([r[key] for r in results], axis=1)
    out["seq_loss_PS"] = np.concatenate([r["seq_loss_PB"] for r in results], axis=1)
    for key in ("all_big_N", "all_small_N"):
        out[key] = np.concatenate([r[key] for r in results])
    sum_P = np.zeros_like(results[0]["sum_P"])
    for r in results:
        sum_P = sum_P + r["sum_P"]
    out["sum_P"] = sum_P
    return out


def _ppl(mean_loss: float) -> float:
    return math.exp(mean_loss) if math.isfinite(mean_loss) else float("nan")


def route_counts(code_N: np.ndarray, n_layers: int) -> np.ndarray:
    """Per token: number of layers on each route, ``count_NR`` (for compute)."""
    route_NL = decode_codes(code_N, n_layers)
    return np.stack([(route_NL == r).sum(1) for r in range(3)], axis=1)


def compute_of_codes(code_N: np.ndarray, flop_model: FlopModel) -> float:
    """Mean FLOPs per token of the given patterns, relative to all-big (DESIGN section 3)."""
    counts_NR = route_counts(code_N, flop_model.n_layers)
    flops_N = flop_model.n_layers * flop_model.attention + flop_model.head + counts_NR @ np.array(flop_model.ffn)
    return float(flops_N.mean() / flop_model.all_big())


def usage(code_N: np.ndarray, position_N: np.ndarray, n_layers: int, T: int) -> np.ndarray:
    """``share_RLT``: at each position t, the share of tokens whose pattern takes route r at layer l."""
    route_NL = decode_codes(code_N, n_layers)
    tokens_T = np.bincount(position_N, minlength=T).astype(np.float64)
    share_RLT = np.zeros((3, n_layers, T), dtype=np.float64)
    for r in range(3):
        for layer in range(n_layers):
            share_RLT[r, layer] = np.bincount(position_N, weights=(route_NL[:, layer] == r), minlength=T)
    return (share_RLT / np.maximum(tokens_T, 1)).astype(np.float32)


def linear_schedule(start: int, stop: int, T: int) -> np.ndarray:
    """Budget per position, moving linearly from ``start`` to ``stop``; round-half-even is symmetric,
    so falling a->b and rising b->a have the same mean budget (a+b)/2."""
    return np.rint(start + (stop - start) * np.arange(T) / max(T - 1, 1)).astype(np.int64)


def default_schedules(n_layers: int) -> list[tuple[str, int, int]]:
    """Paper section 4.2 for L = 12: falling 6->2, rising 2->6, constant 4; in general around
    round(L/3) with amplitude max(1, round(L/6))."""
    c, d = round(n_layers / 3), max(1, round(n_layers / 6))
    lo, hi = max(0, c - d), min(n_layers, c + d)
    return [("falling", hi, lo), ("rising", lo, hi), ("constant", c, c)]


def position_budgets(plan: Plan, best_loss_JN: np.ndarray, best_code_JN, position_N, T, flop_model) -> list[dict]:
    """Budgets that change along the sequence: each token gets the oracle at its position's budget."""
    out = []
    j_of = {k: j for j, k in enumerate(plan.budgets)}
    for name, start, stop in default_schedules(plan.n_layers):
        sched_T = linear_schedule(start, stop, T)
        needed = sorted(set(sched_T.tolist()))
        if any(k not in j_of for k in needed):
            continue
        j_N = np.array([j_of[int(k)] for k in sched_T])[position_N]
        cols = np.arange(len(position_N))
        loss_N = best_loss_JN[j_N, cols]
        ci = ppl_interval(loss_N.reshape(-1, T))  # position_N is row-major over [sequences, T]
        out.append({
            "name": name,
            "schedule": f"{start}->{stop}",
            "mean_budget": float(sched_T[position_N].mean()),
            "oracle_ppl": _ppl(float(loss_N.astype(np.float64).mean())),
            "oracle_ppl_lo": ci["ppl_lo"],
            "oracle_ppl_hi": ci["ppl_hi"],
            "compute": compute_of_codes(best_code_JN[j_N, cols], flop_model),
            # Σ_k w_k·oracle@k: what the schedule scores from the per-budget means alone; under the shared and
            # frozen contexts a token's budget never changes another's context, so measured ≈ predicted
            "predicted_ppl": _ppl(sum(float((sched_T == k).mean()) * float(best_loss_JN[j_of[k]].astype(np.float64).mean())
                                      for k in needed)),
            "_loss_ST": loss_N.reshape(-1, T),
        })
    constant = next((e["_loss_ST"] for e in out if e["name"] == "constant"), None)
    for e in out:
        loss_ST = e.pop("_loss_ST")
        if constant is not None and e["name"] != "constant":  # paired: the same tokens under both schedules
            e["minus_constant"] = paired_ppl_difference(loss_ST, constant)
    return out


def early_exit_share(code_N: np.ndarray, n_layers: int) -> float:
    """Share of tokens whose pattern looks like early exit: no skip before a non-skip layer."""
    route_NL = decode_codes(code_N, n_layers)
    skip_NL = route_NL == SKIP
    # early exit <=> once a layer is skipped, every later layer is skipped too
    later_kept_NL = np.flip(np.cumsum(np.flip(~skip_NL, 1), 1), 1) > 0
    violated_N = (skip_NL[:, :-1] & later_kept_NL[:, 1:]).any(1)
    return float((~violated_N).mean())


def finalize(plan: Plan, merged: dict, position_N: np.ndarray, T: int, flop_model: FlopModel):
    """Summary dict (per budget and top level) and the usage array ``usage_JRLT``."""
    L = plan.n_layers
    N = merged["best_loss_JN"].shape[1]
    mean_P = merged["sum_P"] / N
    exhaustive = plan.spec.search == "exhaustive"
    strings_P = code_strings(plan.code_P, L)
    per_budget, usage_J = [], []
    for j, k in enumerate(plan.budgets):
        loss_N = merged["best_loss_JN"][j].astype(np.float64)
        code_N = merged["best_code_JN"][j]
        members = np.flatnonzero(plan.member_JP[j])
        sample = np.flatnonzero(plan.sample_JP[j])
        fixed = members[np.argmin(mean_P[members])] if exhaustive else None
        best_sample = sample[np.argmin(mean_P[sample])]
        share_RLT = usage(code_N, position_N, L, T)
        usage_J.append(share_RLT)
        entry = {
            "k": int(k),
            "candidates": int(plan.candidates_J[j]),
            "oracle_ppl": _ppl(loss_N.mean()),
            "oracle_loss": float(loss_N.mean()),
            "oracle_compute": compute_of_codes(code_N, flop_model),
            "fixed_ppl": _ppl(float(mean_P[fixed])) if fixed is not None else None,
            "fixed_pattern": str(strings_P[fixed]) if fixed is not None else None,
            "fixed_compute": compute_of_codes(plan.code_P[[fixed]], flop_model) if fixed is not None else None,
            # random@k: a pattern drawn uniformly per token; its expected loss is the candidates' mean
            "random_mean_ppl": _ppl(float(mean_P[members].mean())),
            "random_mean_over": (
                "all candidates" if exhaustive or len(members) == plan.candidates_J[j] else f"a random draw of {len(members)}"
            ),
            "best_of_100_ppl": _ppl(float(mean_P[best_sample])),
            "best_of_100_pattern": str(strings_P[best_sample]),
            "best_of_100_per_token_ppl": _ppl(float(merged["sub_loss_JN"][j].astype(np.float64).mean())),
            **({"search_only_ppl": _ppl(float(merged["search_loss_JN"][j].astype(np.float64).mean()))}
               if "search_loss_JN" in merged else {}),
            "best_of_100_n": int(len(sample)),
            "oracle_big_share_by_layer": [round(float(x), 6) for x in share_RLT[BIG].mean(1)],
        }
        if "_" in plan.spec.space.options or plan.spec.patterns is not None:
            entry["oracle_skip_share_by_layer"] = [round(float(x), 6) for x in share_RLT[SKIP].mean(1)]
            entry["oracle_early_exit_share"] = early_exit_share(code_N, L)
        per_budget.append(entry)
    big_loss = float(merged["all_big_N"].astype(np.float64).mean())
    small_loss = float(merged["all_small_N"].astype(np.float64).mean())
    summary = {
        "budgets": per_budget,
        "all_big_ppl": _ppl(big_loss),
        "all_small_ppl": _ppl(small_loss),
        "all_big_loss": big_loss,
        "all_small_loss": small_loss,
        "all_small_compute": compute_of_codes(plan.code_P[[plan.all_small]], flop_model),
        "tokens": int(N),
        "n_layers": L,
        "position_budgets": position_budgets(
            plan, merged["best_loss_JN"], merged["best_code_JN"], position_N, T, flop_model
        ),
    }
    usage_JRLT = np.stack(usage_J) if usage_J else np.zeros((0, 3, L, T), np.float32)
    return summary, usage_JRLT


def label_free_entry(entry: dict, oracle_ST, confidence_ST, previous_ST, fixed_ST, belief_ST=None) -> None:
    """The oracles that cannot see the next token (the oracle-router gap, decomposed): each one's
    perplexity and the share of the oracle's gain over fixed@k it recovers, with intervals. The
    previous-token oracle scores positions 1.. (the first token has no previous one): its share is
    computed on those positions for all three."""
    for name, loss_ST, oracle_on, fixed_on in (
        ("confidence", confidence_ST, oracle_ST, fixed_ST),
        ("previous_token", previous_ST[:, 1:], oracle_ST[:, 1:], None if fixed_ST is None else fixed_ST[:, 1:]),
        *((("belief", belief_ST, oracle_ST, fixed_ST),) if belief_ST is not None else ()),
    ):
        ci = ppl_interval(loss_ST)
        entry[f"{name}_oracle_ppl"], entry[f"{name}_oracle_ppl_lo"], entry[f"{name}_oracle_ppl_hi"] = (
            ci["ppl"], ci["ppl_lo"], ci["ppl_hi"])
        if fixed_on is not None:
            entry[f"{name}_recovered"] = recovered_share(loss_ST, oracle_on, fixed_on)
