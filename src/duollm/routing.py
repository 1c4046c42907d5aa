"""Routes, the pattern notation, random route sampling and the FLOP cost model.

Notation (DESIGN section 3): a *route* is the choice at one layer for one token,
``SKIP=0``, ``SMALL=1``, ``BIG=2``. A *pattern* is one route per layer written as a
string over ``B`` (big), ``S`` (small) and ``_`` (skip), first layer first.

Tensor name legend: L layers, B batch, T sequence positions, R routes (3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SKIP, SMALL, BIG = 0, 1, 2
ROUTE_NAMES = ("skip", "small", "big")
LETTER_OF_ROUTE = {SKIP: "_", SMALL: "S", BIG: "B"}
ROUTE_OF_LETTER = {v: k for k, v in LETTER_OF_ROUTE.items()}


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


def uniform_pattern(route: int, n_layers: int) -> str:
    return LETTER_OF_ROUTE[route] * n_layers


@dataclass(frozen=True)
class RouteProbs:
    """Probabilities of skip / small / big for random routing (paper section 3.1: 0 / 0.5 / 0.5)."""

    skip: float = 0.0
    small: float = 0.5
    big: float = 0.5

    def __post_init__(self):
        p = (self.skip, self.small, self.big)
        if any(x < 0 for x in p):
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
    def from_config(cls, cfg, context: int | None = None) -> "FlopModel":
        D, E = cfg.d_model, cfg.head_dim
        H, K = cfg.n_heads, cfg.kv_heads
        ctx = (context or cfg.max_seq_len) / 2  # mean causal context length
        proj = 2 * D * (H * E) * 2 + 2 * D * (K * E) * 2  # q, o and k, v
        scores = 2 * 2 * H * E * ctx  # q.k and p.v
        swiglu = lambda f: 2 * 3 * D * f  # noqa: E731  (gate, up, down)
        return cls(
            attention=float(proj + scores),
            ffn=(0.0, float(swiglu(cfg.d_ff_small)), float(swiglu(cfg.d_ff_big))),
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
