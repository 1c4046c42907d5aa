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

import math
from dataclasses import dataclass

import torch

SKIP, SMALL, BIG = 0, 1, 2
ROUTE_NAMES = ("skip", "small", "big")
LETTER_OF_ROUTE = {SKIP: "_", SMALL: "S", BIG: "B"}
ROUTE_OF_LETTER = {v: k for k, v in LETTER_OF_ROUTE.items()}
# how the oracle routes the context of a scored token (DESIGN 4.2): the candidate pattern routes
# the whole sequence (``shared``), or the context keeps a reference routing (``frozen``)


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
        ffn = lambda f: 2 * matrices * D * f
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


# ----------------------------------------------------------------------------- per-layer options


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
