"""Count versus compute: how much of the oracle's gain is selection, not compute (DESIGN 4.4a, issue 27).

oracle@k takes, per token, the best of C(L, k) candidates. Part of its gain over fixed@k is the compute
of k big layers, part is only that a token may pick the best of many sub-networks. Two nulls separate
them, read from the losses the exhaustive pass already sees (no forward pass of their own):

- **count-matched selection null** (``count_null``): at budget k, per token the best of n = C(L, k) (the
  oracle@k's own candidate count) random candidates that all have exactly round(L/2) big layers — as many
  choices as the oracle, at one fixed compute. n is capped at that pool's size (recorded: ``capped``).
- **equal-count oracle** (``equal_count``): at budget k, per token the best of n0 random candidates of
  budget k, for n0 in (C(L,1), C(L,2)) — every budget with at least n0 candidates chooses among as many.

Each family (one kind, budget and n) is ``DRAWS`` subsets drawn without replacement, and a token's loss
is its minimum over a subset averaged over the draws. The subsets are drawn once, when the plan is built,
from a generator seeded by (the spec's seed, ``SEED_TAG``, the kind, k, n, L) alone: every chunk and
every process sees the same subsets (a sharded or resumed run gives the same bits), and a family's draw
does not change when other budgets are reported. ``ChunkReducer`` keeps the running minimum of each
subset (``Nulls.subsets_of_P``: per pattern the subsets it belongs to, one vectorised update per pattern).

Out of sample (``cross_fitted``): fixed@k and best-of-100 chosen on the tokens they are scored on are
optimistic; cross-fitted over sequences, sequence s is scored under the pattern with the lowest mean
loss on the *other* sequences.

Tensor name legend: P evaluated patterns, J reported budgets, S sequences, N tokens, U null families,
X subsets (family x draw, flattened: x = u * DRAWS + draw).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from ..stats import ppl_interval

DRAWS = 16  # draws per family: the per-token loss is averaged over them
SEED_TAG = 27  # the nulls' generators differ from the best-of-100 draw's (seeded by [seed, k, L])
KINDS = ("count_null", "equal_count")


@dataclass(frozen=True)
class NullFamily:
    """``DRAWS`` random subsets of ``n`` candidates each: at budget ``k`` (index ``j``), of kind ``kind``."""

    kind: str
    j: int
    k: int
    n: int
    capped: bool = False  # count_null: the oracle has more candidates than the fixed-compute pool

    @property
    def column(self) -> str:
        """Its per-token column in ``per_token.parquet``."""
        if self.kind == "count_null":
            return f"count_null_loss_k{self.k}"
        return f"equal_count_n{self.n}_loss_k{self.k}"


@dataclass(frozen=True)
class Nulls:
    """The subsets of every family, as the reducer needs them: see the module docstring."""

    families: tuple[NullFamily, ...]
    subsets_of_P: tuple[np.ndarray, ...]  # int64 per pattern: the subsets x it belongs to (sorted)
    pool_bigs: int  # the count null's fixed compute: round(L/2) big layers
    pool_size: int  # candidates with that many big layers
    equal_counts: tuple[int, ...]  # the n0 of the equal-count oracle

    @property
    def n_subsets(self) -> int:
        return len(self.families) * DRAWS

    def fingerprint(self) -> bytes:
        h = hashlib.sha256()
        for x_P in self.subsets_of_P:
            h.update(np.int64(len(x_P)).tobytes())
            h.update(x_P.tobytes())
        return h.digest()

    def describe(self) -> dict:
        return {"draws": DRAWS, "count_null_bigs": self.pool_bigs, "count_null_pool": self.pool_size,
                "equal_count_n": list(self.equal_counts)}


def _draw(pool: np.ndarray, n: int, seed: int, kind: str, k: int, n_layers: int) -> list[np.ndarray]:
    """``DRAWS`` subsets of ``n`` of ``pool`` (pattern indices in code order), without replacement."""
    rng = np.random.default_rng([seed, SEED_TAG, KINDS.index(kind), k, n, n_layers])
    return [pool[np.sort(rng.choice(len(pool), size=n, replace=False))] for _ in range(DRAWS)]


def build_nulls(budgets, member_JP: np.ndarray, candidate_P: np.ndarray, bigs_P: np.ndarray, n_layers: int,
                seed: int) -> Nulls:
    """The families and their subsets, for an exhaustive plan: ``member_JP`` each budget's candidates,
    ``candidate_P`` every candidate, ``bigs_P`` each pattern's big layers (all in code order)."""
    L, P = n_layers, len(candidate_P)
    half = round(L / 2)
    pool = np.flatnonzero(candidate_P & (bigs_P == half))
    families, members_X = [], []
    candidates_J = member_JP.sum(1)
    if len(pool):
        for j, k in enumerate(budgets):
            n = int(min(candidates_J[j], len(pool)))
            families.append(NullFamily("count_null", j, int(k), n, capped=bool(candidates_J[j] > len(pool))))
            members_X += _draw(pool, n, seed, "count_null", int(k), L)
    equal_counts = tuple(sorted({n0 for n0 in (math.comb(L, 1), math.comb(L, 2)) if n0 >= 1}))
    for n0 in equal_counts:
        for j, k in enumerate(budgets):
            if candidates_J[j] >= n0:
                families.append(NullFamily("equal_count", j, int(k), n0))
                members_X += _draw(np.flatnonzero(member_JP[j]), n0, seed, "equal_count", int(k), L)
    # invert: per pattern, the subsets it belongs to
    x_all = np.concatenate([np.full(len(m), x, dtype=np.int64) for x, m in enumerate(members_X)] or [np.zeros(0, np.int64)])
    p_all = np.concatenate(members_X or [np.zeros(0, np.int64)]).astype(np.int64)
    order = np.lexsort((x_all, p_all))
    bounds = np.searchsorted(p_all[order], np.arange(P + 1))
    subsets_of_P = tuple(x_all[order][bounds[p]:bounds[p + 1]] for p in range(P))
    return Nulls(tuple(families), subsets_of_P, half, len(pool), equal_counts)


def cross_fitted(seq_PS: np.ndarray, choose_JP: np.ndarray) -> np.ndarray | None:
    """``choice_JS``: for held-out sequence s, the pattern among budget j's ``choose_JP`` with the lowest
    mean loss on the other sequences (the first in code order on ties, as the in-sample choice);
    ``seq_PS`` each pattern's summed loss per sequence (every sequence has T tokens, so the lowest sum
    is the lowest mean). None with one sequence: nothing is left to choose on."""
    P, S = seq_PS.shape
    if S < 2:
        return None
    members_J = [np.flatnonzero(m) for m in choose_JP]
    choice_JS = np.empty((len(members_J), S), dtype=np.int64)
    for s in range(S):
        others_P = np.delete(seq_PS, s, axis=1).sum(1)
        for j, members in enumerate(members_J):
            choice_JS[j, s] = members[np.argmin(others_P[members])]
    return choice_JS


def chosen_counts(choice_S: np.ndarray, strings_P) -> dict[str, int]:
    """The distinct patterns chosen and how many held-out sequences chose each (most chosen first, then
    code order)."""
    chosen, counts = np.unique(choice_S, return_counts=True)  # in code order
    order = np.argsort(-counts, kind="stable")
    return {str(strings_P[chosen[i]]): int(counts[i]) for i in order}


def null_entries(nulls: Nulls | None, null_loss_UN: np.ndarray | None, n_budgets: int, S: int, T: int
                 ) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Per budget the nulls' summary keys (None where a plan has no nulls: a beam search or a pattern list;
    ``equal_count_*``: {str(n0): value}, a budget with fewer than n0 candidates left out), and their
    per-token columns (float32, in family order)."""
    entries = [{"count_null_ppl": None, "count_null_ppl_lo": None, "count_null_ppl_hi": None, "count_null_n": None,
                "count_null_capped": None, **{f"equal_count_ppl{end}": None if nulls is None else {}
                                              for end in ("", "_lo", "_hi")}}
               for _ in range(n_budgets)]
    cols = {}
    for u, fam in enumerate(nulls.families if nulls is not None else ()):
        loss_N = null_loss_UN[u]
        ci = ppl_interval(loss_N.reshape(S, T))
        entry = entries[fam.j]
        if fam.kind == "count_null":
            entry.update(count_null_ppl=ci["ppl"], count_null_ppl_lo=ci["ppl_lo"], count_null_ppl_hi=ci["ppl_hi"],
                         count_null_n=fam.n, count_null_capped=fam.capped)
        else:
            for end in ("", "_lo", "_hi"):
                entry[f"equal_count_ppl{end}"][str(fam.n)] = ci[f"ppl{end}"]
        cols[fam.column] = loss_N.astype(np.float32)
    return entries, cols
