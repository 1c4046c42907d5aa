"""The candidate space: which routing patterns the oracle searches (paper section 3.2), and pattern codes.

The oracle enumerates routing patterns under a budget: k big layers out of L (exactly k by default, or
at most k). The skip study constrains the number of skipped layers the same way (the paper: big-or-skip
with exactly 6 of 12 skipped). Patterns are also written as base-3 integer codes, first layer most
significant, so that sorting codes sorts patterns lexicographically (skip < small < big) and prefixes
share contiguous ranges — the shape the oracle's tree walk needs.

Legend (``docs/NOTATION.md``): P patterns, L layers, N tokens.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np

from ..model.routing import BIG, ROUTE_OF_LETTER, SKIP, SMALL, format_pattern, parse_options


def parse_budgets(spec, n_layers: int) -> tuple[int, ...] | None:
    """``"all"`` -> None (every budget that has a candidate); ``"0-12"``, ``"4,6,8"``, ``"0-3,8"``,
    an int or a list of ints -> sorted unique budgets, each checked to lie in 0..L."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return None
    if isinstance(spec, int) and not isinstance(spec, bool):
        values = [spec]
    elif isinstance(spec, str):
        values = []
        for part in spec.replace(" ", "").split(","):
            m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
            if m is None:
                raise ValueError(f"budgets {spec!r} are malformed; use all, a range like 0-12, or a list like 4,6,8")
            a = int(m.group(1))
            b = a if m.group(2) is None else int(m.group(2))
            if a > b:
                raise ValueError(f"budgets {spec!r}: range {part} runs backwards")
            values.extend(range(a, b + 1))
    else:
        try:
            values = [int(v) for v in spec]
        except (TypeError, ValueError):
            raise ValueError(f"budgets must be 'all', a range, a list of ints; got {spec!r}") from None
    if not values:
        raise ValueError(f"budgets {spec!r} name no budget")
    for k in values:
        if not 0 <= k <= n_layers:
            raise ValueError(f"budget {k} is outside 0..{n_layers} (the model has {n_layers} layers)")
    return tuple(sorted(set(values)))


def pattern_codes(route_PL) -> np.ndarray:
    """Base-3 codes ``code_P`` (int64) of patterns ``route_PL``; first layer most significant."""
    route_PL = np.asarray(route_PL, dtype=np.int64)
    L = route_PL.shape[-1]
    assert L <= 39, "base-3 codes of more than 39 layers overflow int64"
    weights_L = 3 ** np.arange(L - 1, -1, -1, dtype=np.int64)
    return route_PL @ weights_L


def decode_codes(code_N, n_layers: int) -> np.ndarray:
    """Inverse of ``pattern_codes``: ``route_NL`` (int8)."""
    code_N = np.asarray(code_N, dtype=np.int64)
    weights_L = 3 ** np.arange(n_layers - 1, -1, -1, dtype=np.int64)
    return ((code_N[..., None] // weights_L) % 3).astype(np.int8)


def code_strings(code_N, n_layers: int) -> np.ndarray:
    """Pattern strings (object array) of codes, e.g. ``"SSBB"``."""
    code_N = np.asarray(code_N, dtype=np.int64)
    uniq, inverse = np.unique(code_N, return_inverse=True)
    table = np.array([format_pattern(r) for r in decode_codes(uniq, n_layers)], dtype=object)
    return table[inverse.reshape(code_N.shape)]


@dataclass(frozen=True)
class CandidateSpace:
    """The patterns an oracle searches: per-layer ``options`` and count constraints.

    ``budgets``: the budgets k to report (None: every k with at least one candidate);
    ``budget_mode``: "exact" (k big layers, the paper's definition) or "max" (at most k).
    ``skips``: None (unconstrained) or s, with ``skips_mode`` "exact" or "max".
    Every inconsistency is a one-line ValueError.
    """

    n_layers: int
    options: str = "SB"
    budgets: tuple[int, ...] | None = None
    budget_mode: str = "exact"
    skips: int | None = None
    skips_mode: str = "exact"

    def __post_init__(self):
        L = self.n_layers
        object.__setattr__(self, "options", parse_options(self.options))
        if self.budget_mode not in ("exact", "max"):
            raise ValueError(f"budget mode must be 'exact' or 'max'; got {self.budget_mode!r}")
        if self.skips_mode not in ("exact", "max"):
            raise ValueError(f"skips mode must be 'exact' or 'max'; got {self.skips_mode!r}")
        if self.skips is not None:
            if isinstance(self.skips, bool) or not isinstance(self.skips, int) or not 0 <= self.skips <= L:
                raise ValueError(f"skips must be an integer in 0..{L}; got {self.skips!r}")
            if self.skips > 0 and self.skips_mode == "exact" and "_" not in self.options:
                raise ValueError(f"impossible constraints: exactly {self.skips} skips "
                                 f"but options {self.options} have no _ (skip)")
        budgets = parse_budgets(self.budgets if not isinstance(self.budgets, tuple) else list(self.budgets), L)
        feasible = tuple(k for k in range(L + 1) if self._count_members(k, (k,) if self.budget_mode == "exact" else None) > 0)
        if not feasible:
            raise ValueError(f"impossible constraints: no pattern has {self.describe()}")
        if budgets is None:
            budgets = feasible
        else:
            for k in budgets:
                if k not in feasible:
                    raise ValueError(
                        f"impossible constraints: budget k={k} has no candidate pattern with {self.describe()}"
                    )
        object.__setattr__(self, "budgets", budgets)

    # -- descriptions -------------------------------------------------------------------
    def describe(self) -> str:
        s = f"options {self.options}"
        if self.skips is not None:
            s += f" and {'exactly' if self.skips_mode == 'exact' else 'at most'} {self.skips} skips"
        return s

    # -- counting -----------------------------------------------------------------------
    def n_compositions(self, bigs: int, skips: int) -> int:
        """Patterns with exactly ``bigs`` big and ``skips`` skipped layers (the rest small)."""
        L = self.n_layers
        smalls = L - bigs - skips
        if bigs < 0 or skips < 0 or smalls < 0:
            return 0
        for letter, n in (("B", bigs), ("_", skips), ("S", smalls)):
            if n and letter not in self.options:
                return 0
        return math.comb(L, bigs) * math.comb(L - bigs, skips)

    def skips_ok(self, skips: int) -> bool:
        if self.skips is None:
            return True
        return skips == self.skips if self.skips_mode == "exact" else skips <= self.skips

    def _count_members(self, k: int, exact_set) -> int:
        L = self.n_layers
        total = 0
        for b in range(L + 1):
            if exact_set is not None and b not in exact_set:
                continue
            if exact_set is None and b > k:
                continue
            for s in range(L + 1 - b):
                if self.skips_ok(s):
                    total += self.n_compositions(b, s)
        return total

    def in_budget(self, bigs, k: int):
        """Whether a pattern with ``bigs`` big layers counts for budget ``k`` (array-friendly)."""
        return (bigs == k) if self.budget_mode == "exact" else (bigs <= k)

    def allowed(self, bigs: int, skips: int) -> bool:
        """Whether counts (bigs, skips) belong to the candidate set (any reported budget)."""
        if not self.skips_ok(skips):
            return False
        if self.budget_mode == "exact":
            return bigs in self.budgets
        return bigs <= max(self.budgets)

    def count(self, k: int | None = None) -> int:
        """Candidates of budget ``k`` (None: of the whole set)."""
        if k is None:
            L = self.n_layers
            return sum(self.n_compositions(b, s) for b in range(L + 1) for s in range(L + 1 - b) if self.allowed(b, s))
        return self._count_members(k, (k,) if self.budget_mode == "exact" else None)

    def feasible_prefix(self, depth: int, bigs: int, skips: int) -> bool:
        """Can a prefix of ``depth`` layers with these counts still end in a candidate?"""
        rest = self.n_layers - depth
        for b2 in range(rest + 1):
            for s2 in range(rest + 1 - b2):
                m2 = rest - b2 - s2
                if (b2 and "B" not in self.options) or (s2 and "_" not in self.options) or (m2 and "S" not in self.options):
                    continue
                if self.allowed(bigs + b2, skips + s2):
                    return True
        return False

    # -- enumeration and sampling -------------------------------------------------------
    def _compositions(self, pairs) -> np.ndarray:
        """All patterns with (bigs, skips) in ``pairs``: ``route_PL`` int8, sorted by code."""
        L = self.n_layers
        rows = []
        for b, s in pairs:
            if self.n_compositions(b, s) == 0:
                continue
            for big_pos in itertools.combinations(range(L), b):
                rest = [i for i in range(L) if i not in big_pos]
                for skip_pos in itertools.combinations(rest, s):
                    r = [SMALL] * L
                    for i in big_pos:
                        r[i] = BIG
                    for i in skip_pos:
                        r[i] = SKIP
                    rows.append(r)
        route_PL = np.array(rows, dtype=np.int8).reshape(-1, L)
        return route_PL[np.argsort(pattern_codes(route_PL), kind="stable")]

    def enumerate(self, limit: int = 1 << 20) -> np.ndarray:
        """Every candidate pattern, ``route_PL`` (int8), sorted by code (lexicographic)."""
        n = self.count()
        if n > limit:
            raise ValueError(
                f"{n:,} candidate patterns ({self.describe()}, {self.n_layers} layers) are too many to enumerate "
                f"(limit {limit:,}); use --search beam"
            )
        L = self.n_layers
        if len(self.options) ** L <= 4 * n + 4096:  # dense: every option product, then filter
            routes_O = np.array([ROUTE_OF_LETTER[c] for c in self.options], dtype=np.int8)
            n_opt = len(routes_O)
            digits_PL = (np.arange(n_opt**L, dtype=np.int64)[:, None] // n_opt ** np.arange(L - 1, -1, -1)) % n_opt
            route_PL = routes_O[digits_PL]
            bigs_P, skips_P = (route_PL == BIG).sum(1), (route_PL == SKIP).sum(1)
            ok = {(b, s): self.allowed(b, s) for b in range(L + 1) for s in range(L + 1 - b)}
            keep_P = np.array([ok[b, s] for b, s in zip(bigs_P.tolist(), skips_P.tolist())], dtype=bool)
            route_PL = route_PL[keep_P]
            return route_PL[np.argsort(pattern_codes(route_PL), kind="stable")]
        pairs = [(b, s) for b in range(L + 1) for s in range(L + 1 - b) if self.allowed(b, s)]
        return self._compositions(pairs)

    def sample(self, n: int, k: int, seed: int = 0) -> np.ndarray:
        """``n`` distinct candidates of budget ``k`` drawn uniformly (all of them if fewer), seeded.

        Used for "best of 100 random patterns" (paper section 4.1), the same draw whatever the search.
        """
        L = self.n_layers
        pairs = [(b, s) for b in range(L + 1) for s in range(L + 1 - b)
                 if self.in_budget(b, k) and self.skips_ok(s) and self.n_compositions(b, s)]
        total = sum(self.n_compositions(b, s) for b, s in pairs)
        if total <= n:
            return self._compositions(pairs)
        rng = np.random.default_rng([seed, k, L])
        weights = np.array([self.n_compositions(b, s) for b, s in pairs], dtype=np.float64)
        weights /= weights.sum()
        seen, rows = set(), []
        while len(rows) < n:
            b, s = pairs[rng.choice(len(pairs), p=weights)]
            r = np.full(L, SMALL, dtype=np.int8)
            perm = rng.permutation(L)
            r[perm[:b]] = BIG
            r[perm[b : b + s]] = SKIP
            code = int(pattern_codes(r[None])[0])
            if code not in seen:
                seen.add(code)
                rows.append(r)
        return np.stack(rows)
