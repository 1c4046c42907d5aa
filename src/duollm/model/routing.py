"""Routes, the pattern notation, routing specs, random route sampling and the FLOP cost model.

Notation (DESIGN section 3): a *route* is the choice at one layer for one token,
``SKIP=0``, ``SMALL=1``, ``BIG=2``. A *pattern* is one route per layer written as a
string over ``B`` (big), ``S`` (small) and ``_`` (skip), first layer first.

A *routing spec* is how every command names a routing (``parse_routing``, the one parser):
``all-big`` / ``B`` / ``big``, ``all-small`` / ``S`` / ``small``, a ``PATTERN``, ``random:P``
(each token and layer big with probability P, else small), ``router:NAME`` (a trained router,
resolved against a run folder by ``routers.store.routing_policy``).

Tensor name legend (a subset of ``docs/NOTATION.md``): L layers, B batch, T positions,
R routes (3), P patterns, N tokens.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

SKIP, SMALL, BIG = 0, 1, 2
ROUTE_NAMES = ("skip", "small", "big")
LETTER_OF_ROUTE = {SKIP: "_", SMALL: "S", BIG: "B"}
ROUTE_OF_LETTER = {v: k for k, v in LETTER_OF_ROUTE.items()}
# how the oracle routes the context of a scored token (DESIGN 4.2): the candidate pattern routes
# the whole sequence (``shared``), or the context keeps a reference routing (``frozen``)
CONTEXTS = ("shared", "frozen", "sequential")  # oracle/context.py, oracle/sequential.py


def parse_pattern(pattern: str, n_layers: int) -> tuple[int, ...]:
    """``"SSBB"`` -> ``(1, 1, 2, 2)``; raises ValueError saying what is wrong."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string over B, S, _; got {type(pattern).__name__}")
    bad = sorted({c for c in pattern if c not in ROUTE_OF_LETTER})
    if bad:
        raise ValueError(
            f"pattern {pattern!r} has letter(s) {''.join(bad)!r}; use B (big), S (small), _ (skip)"
        )
    if len(pattern) != n_layers:
        raise ValueError(
            f"pattern {pattern!r} has {len(pattern)} letters but the model has {n_layers} layers"
        )
    return tuple(ROUTE_OF_LETTER[c] for c in pattern)


def format_pattern(routes) -> str:
    """``(1, 1, 2, 2)`` (or a 1-D tensor) -> ``"SSBB"``."""
    return "".join(LETTER_OF_ROUTE[int(r)] for r in routes)


@dataclass(frozen=True)
class RouteProbs:
    """Probabilities of skip / small / big for random routing (paper section 3.1: 0 / 0.5 / 0.5)."""

    skip: float = 0.0
    small: float = 0.5
    big: float = 0.5

    def __post_init__(self):
        p = (self.skip, self.small, self.big)
        if not all(math.isfinite(x) and x >= 0 for x in p):
            raise ValueError(f"route probabilities must be >= 0; got skip={self.skip} small={self.small} big={self.big}")
        if abs(sum(p) - 1.0) > 1e-6:
            raise ValueError(
                f"route probabilities must sum to 1; skip+small+big = {sum(p):.6g}"
            )

    def tensor(self) -> torch.Tensor:
        return torch.tensor([self.skip, self.small, self.big], dtype=torch.float64)


def sample_routes(
    probs: RouteProbs,
    n_layers: int,
    batch: int,
    seq_len: int,
    *,
    per: str = "token",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random routes ``route_LBT`` (int64).

    ``per="token"``: every token and layer draws independently (paper section 3.1).
    ``per="sequence"``: one pattern per sequence, shared by all its tokens.
    """
    if per not in ("token", "sequence"):
        raise ValueError(f"routing granularity must be 'token' or 'sequence'; got {per!r}")
    p_R = probs.tensor()
    n_draws = n_layers * batch * (seq_len if per == "token" else 1)
    draws = torch.multinomial(p_R, n_draws, replacement=True, generator=generator)
    if per == "token":
        return draws.view(n_layers, batch, seq_len)
    return draws.view(n_layers, batch, 1).expand(n_layers, batch, seq_len).contiguous()


class RandomPolicy:
    """A routing policy that draws each token's route at each layer with ``sample_routes``: big with
    ``p_big``, skip with ``p_skip``, else small (paper section 3.1 at ``p_big=0.5``). Seeded: the same
    seed and the same sequence of calls give the same routes (one CPU generator, any device)."""

    def __init__(self, p_big: float, p_skip: float = 0.0, seed: int = 0):
        self.probs = RouteProbs(skip=p_skip, small=1.0 - p_big - p_skip, big=p_big)  # checks the ranges
        self.p_big, self.p_skip, self.seed = p_big, p_skip, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.name = f"random:{p_big:g}"

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def __call__(self, layer: int, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T = x_BTD.shape[:2]
        return sample_routes(self.probs, 1, B, T, generator=self.generator)[0].to(x_BTD.device)


def replaying(decide):
    """``decide(layer, x_BTD)`` whose hard routes are recorded and replayed on a second call for the same
    layer: an activation-checkpointed layer is recomputed in the backward, where a random or budgeted
    policy would decide anew. Hard routes carry no gradient, so they are decided without autograd (the
    recompute must save what the forward saved); soft weights are decided again, with their gradient."""
    seen = {}

    def replay(layer: int, x_BTD: torch.Tensor):
        if layer in seen:
            return seen[layer]
        with torch.no_grad():
            route = decide(layer, x_BTD)
        if isinstance(route, int) or not route.is_floating_point():
            seen[layer] = route
            return route
        return decide(layer, x_BTD)  # soft (a router's mix, a function of x): again, with autograd

    return replay


@dataclass(frozen=True)
class RoutingSpec:
    """A parsed routing spec: ``kind`` pattern (``pattern`` set), random (``p_big``) or router (``router``)."""

    kind: str
    text: str  # the canonical name: all-big, all-small, the pattern, random:P, router:NAME
    pattern: str | None = None
    p_big: float | None = None
    router: str | None = None


_SHORT = {"all-big": "B", "b": "B", "big": "B", "all-small": "S", "s": "S", "small": "S"}


def parse_routing(spec, n_layers: int) -> RoutingSpec:
    """The one routing-spec parser (module docstring); a one-line ValueError saying what is wrong."""
    if spec is None:
        spec = "all-big"
    if not isinstance(spec, str):
        raise ValueError(f"a routing must be all-big, all-small, a pattern, random:P or router:NAME; got {spec!r}")
    text = spec.strip()
    letter = _SHORT.get(text.lower())
    if letter is not None:
        return RoutingSpec("pattern", "all-big" if letter == "B" else "all-small", pattern=letter * n_layers)
    kind, colon, arg = text.partition(":")
    if colon and kind == "random":
        try:
            p_big = float(arg)
        except ValueError:
            p_big = math.nan
        if not 0.0 <= p_big <= 1.0:
            raise ValueError(f"routing {spec!r}: random:P needs a number P in [0, 1], e.g. random:0.5")
        return RoutingSpec("random", f"random:{p_big:g}", p_big=p_big)
    if colon and kind == "router":
        if not arg:
            raise ValueError("routing router: needs a router name, e.g. router:budget-0.50")
        return RoutingSpec("router", f"router:{arg}", router=arg)
    if colon:
        raise ValueError(f"unknown routing {spec!r}: use all-big, all-small, a pattern over B/S/_, random:P or router:NAME")
    parse_pattern(text, n_layers)
    return RoutingSpec("pattern", text, pattern=text)


@dataclass(frozen=True)
class FlopModel:
    """Forward FLOPs per token (multiply-add = 2 FLOPs), DESIGN section 3.

    ``attention`` counts the q/k/v/o projections plus the score and value products at
    the average causal context of ``context`` tokens. ``ffn[route]`` is the FFN cost of
    a route. ``head`` is the LM head (final projection to the vocabulary).
    """

    attention: float
    ffn: tuple[float, float, float]  # indexed by route: skip, small, big
    head: float
    n_layers: int

    @classmethod
    def from_config(cls, cfg, context: int | None = None) -> FlopModel:
        D, E = cfg.d_model, cfg.head_dim
        H, K = cfg.n_heads, cfg.kv_heads
        ctx = (context or cfg.max_seq_len) / 2  # mean causal context length
        proj = 2 * D * (H * E) * 2 + 2 * D * (K * E) * 2  # q, o and k, v
        scores = 2 * 2 * H * E * ctx  # q.k and p.v
        matrices = 3 if getattr(cfg, "mlp", "swiglu") == "swiglu" else 2  # SwiGLU: gate, up, down; GELU: up, down
        ffn = lambda f: 2 * matrices * D * f  # noqa: E731
        return cls(
            attention=float(proj + scores),
            ffn=(0.0, float(ffn(cfg.d_ff_small)), float(ffn(cfg.d_ff_big))),
            head=float(2 * D * cfg.vocab_size),
            n_layers=cfg.n_layers,
        )

    def per_route(self) -> dict[str, float]:
        """FLOPs per token for one layer under each route (attention included)."""
        return {name: self.attention + self.ffn[r] for r, name in enumerate(ROUTE_NAMES)}

    def pattern(self, routes) -> float:
        """FLOPs per token of a whole forward (all layers + head) under a pattern."""
        return self.n_layers * self.attention + sum(self.ffn[int(r)] for r in routes) + self.head

    def all_big(self) -> float:
        return self.pattern([BIG] * self.n_layers)

    def of_routes(self, route_LBT: torch.Tensor) -> torch.Tensor:
        """Per-token FLOPs ``flops_BT`` of a routed forward (all layers + head)."""
        ffn_R = torch.tensor(self.ffn, dtype=torch.float64, device=route_LBT.device)
        return ffn_R[route_LBT].sum(0) + self.n_layers * self.attention + self.head


# ----------------------------------------------------------------------------- candidate sets
#
# The oracle (paper section 3.2) enumerates routing patterns under a budget: k big layers
# out of L (exactly k by default, or at most k). The skip study constrains the number of
# skipped layers the same way (the paper: big-or-skip with exactly 6 of 12 skipped).
# Patterns are also written as base-3 integer codes, first layer most significant, so that
# sorting codes sorts patterns lexicographically (skip < small < big) and prefixes share
# contiguous ranges — the shape the oracle's tree walk needs.
# Legend here: P patterns, L layers, N tokens.


OPTION_ORDER = "SB_"  # canonical order of per-layer options in names and outputs


def parse_options(options: str) -> str:
    """Per-layer options ``"SB"``, ``"B_"``, ``"SB_"`` ... -> canonical order (S, B, _)."""
    if not isinstance(options, str) or not options:
        raise ValueError(f"options must be a non-empty subset of SB_ (e.g. SB, B_, SB_); got {options!r}")
    bad = sorted(set(options) - set(OPTION_ORDER))
    if bad:
        raise ValueError(f"options {options!r} are not a subset of SB_ (bad letter(s) {''.join(bad)!r})")
    if len(set(options)) != len(options):
        raise ValueError(f"options {options!r} repeat a letter")
    return "".join(c for c in OPTION_ORDER if c in options)


def canonical_options(options: str) -> str:
    """A router's options in canonical order: SB, B_ or SB_ (big must be allowed)."""
    canon = parse_options(options)
    if canon not in ("SB", "B_", "SB_"):
        raise ValueError(f"router options must be SB, B_ or SB_ (big must be allowed); got {options!r}")
    return canon


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
