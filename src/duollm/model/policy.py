"""The ``Router``: one linear map per layer from the hidden state entering the FFN to one logit per
allowed route (paper section 3.3). It is a routing policy: ``router(layer, x_BTD)``.

Tensor legend (``docs/NOTATION.md``): B batch, T positions, D width, R routes (3), O the router's options.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import build_mlp
from .routing import BIG, ROUTE_OF_LETTER, SMALL, RandomPolicy, canonical_options, parse_routing

MODES = ("hard", "soft", "straight-through")


class Router(nn.Module):
    """One linear router per layer on the hidden state entering the FFN (paper section 3.3).

    A ``RoutingPolicy``: ``router(layer, x_BTD)`` returns ``route_BT`` in ``"hard"`` mode and
    ``prob_BTR`` in ``"soft"`` / ``"straight-through"`` mode (``beta`` sharpens the softmax).

    With ``budget_k`` the router also sees how many big modules the token has used so far (a
    learned logit offset per layer and count, ``budget_LUO``) and, routing hard, spends exactly
    ``budget_k`` of them per token: big is forced where the layers left are just enough for the
    bigs left, and refused once they are spent. Every token then has fixed@k's compute. The count
    is state carried through one forward (reset at layer 0; the model calls layers in order).

    With ``peek`` (the small FFN's shape, ``peek_shape``) the router *peeks* (issue 29): at each layer it also
    sees the small FFN's output on the token before deciding, from its own frozen copy of the model's small FFNs
    (``copy_peek``), so it routes wherever it is loaded. Its compute is the small FFN at every layer plus the
    big one where it routes big (``peek_big_fraction``).
    """

    def __init__(self, n_layers: int, d_model: int, options: str = "SB", *, mode: str = "hard", beta: float = 1.0,
                 budget_k: int | None = None, peek: dict | None = None):
        super().__init__()
        self.options = canonical_options(options)
        self.n_layers, self.d_model = n_layers, d_model
        route_O = sorted(ROUTE_OF_LETTER[c] for c in self.options)  # ties in argmax go to the cheaper route
        self.register_buffer("route_O", torch.tensor(route_O, dtype=torch.long), persistent=False)
        self.register_buffer("onehot_OR", F.one_hot(self.route_O, 3).float(), persistent=False)
        option_of_route = torch.full((3,), -1, dtype=torch.long)
        option_of_route[self.route_O] = torch.arange(len(route_O))
        self.register_buffer("option_of_R", option_of_route, persistent=False)
        self.peek = peek
        if peek is not None:
            self.peek_ffn = nn.ModuleList(build_mlp(peek["mlp"], d_model, int(peek["d_ff"]), bool(peek["bias"]))
                                          for _ in range(n_layers)).requires_grad_(False)
        width = 2 * d_model if peek is not None else d_model
        self.proj = nn.ModuleList(nn.Linear(width, len(route_O)) for _ in range(n_layers))
        # a constant added to the logits, set by budget calibration (``calibrate_budget``), not trained
        self.register_buffer("offset_O", torch.zeros(len(route_O)))
        for p in self.proj:  # start from the token-independent router; training adds the dependence
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)
        self.mode, self.beta = mode, beta
        self.name = "router"
        if budget_k is not None and not 0 <= budget_k <= n_layers:
            raise ValueError(f"a router's budget must be 0..{n_layers} big layers per token; got {budget_k}")
        self.budget_k = budget_k
        if budget_k is not None:  # U: bigs used before the layer, 0..L
            self.budget_LUO = nn.Parameter(torch.zeros(n_layers, n_layers + 1, len(route_O)))
        self._used_BT = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"router mode must be one of {', '.join(MODES)}; got {mode!r}")
        self._mode = mode

    def init_bias(self, probs_R) -> None:
        """Biases so that softmax(logits) starts at the target route probabilities."""
        p_O = torch.tensor(probs_R, dtype=torch.float64)[self.route_O.cpu()].clamp_min(1e-3)
        with torch.no_grad():
            for p in self.proj:
                p.bias.copy_(p_O.log().float())

    def init_pattern(self, route_L) -> None:
        """Biases (weights zero) under which the hard router routes every token by one pattern."""
        with torch.no_grad():
            for proj, route in zip(self.proj, route_L):
                proj.weight.zero_()
                proj.bias.copy_((self.route_O == int(route)).float())

    def check_finite(self, source) -> None:
        """One ValueError naming ``source`` if a weight is NaN or infinite: such a router routes every token by
        an argmax over NaN, and its evaluation printed a perplexity as if it were trained (issue 28, item 16)."""
        if not all(bool(torch.isfinite(t).all()) for t in self.state_dict().values()):
            raise ValueError(f"{source} holds non-finite weights (NaN or inf): train the router again")

    def copy_peek(self, model) -> None:
        """Take the model's small FFNs as the peek's (frozen) copy."""
        with torch.no_grad():
            for layer, block in enumerate(model.layers):
                self.peek_ffn[layer].load_state_dict(block.ffn.small.state_dict())

    def logits(self, layer: int, x_BTD: torch.Tensor) -> torch.Tensor:
        """``logits_BTO`` in float32 (the softmax and its annealing are done in full precision)."""
        proj = self.proj[layer]
        if self.peek is not None:  # the token's state and what the small FFN would add to it (in the FFN's dtype)
            ffn = self.peek_ffn[layer]
            x_BTD = x_BTD.to(proj.weight.dtype)
            x_BTD = torch.cat([x_BTD, ffn(x_BTD.to(ffn.up_proj.weight.dtype)).to(x_BTD.dtype)], -1)
        return proj(x_BTD.to(proj.weight.dtype)).float() + self.offset_O

    def weights(self, logits_BTO: torch.Tensor, mode: str, beta: float = 1.0) -> torch.Tensor:
        """``route_BT`` (hard) or ``prob_BTR`` (soft, straight-through) from the logits."""
        if mode == "hard":
            return self.route_O[logits_BTO.argmax(-1)]
        p_BTO = torch.softmax(beta * logits_BTO, dim=-1)
        if mode == "straight-through":  # value: the hard one-hot; gradient: the softmax's
            hard_BTO = F.one_hot(logits_BTO.argmax(-1), p_BTO.shape[-1]).type_as(p_BTO)
            p_BTO = hard_BTO + p_BTO - p_BTO.detach()
        return p_BTO @ self.onehot_OR

    def budget_logits(self, layer: int, x_BTD: torch.Tensor, used_BT: torch.Tensor) -> torch.Tensor:
        """``logits_BTO`` of a budgeted router given the bigs ``used_BT`` before ``layer``, with the
        forced choices applied: -inf on big once the budget is spent, on the rest when every layer
        left must go big."""
        logits_BTO = self.logits(layer, x_BTD) + self.budget_LUO[layer][used_BT]
        left = self.budget_k - used_BT
        big_O = self.route_O == BIG
        refuse_BTO = ((left <= 0).unsqueeze(-1) & big_O) | ((left >= self.n_layers - layer).unsqueeze(-1) & ~big_O)
        return logits_BTO.masked_fill(refuse_BTO, float("-inf"))

    def forward(self, layer: int, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.budget_k is None or self.mode != "hard":
            return self.weights(self.logits(layer, x_BTD), self.mode, self.beta)
        if layer == 0 or self._used_BT is None or self._used_BT.shape != x_BTD.shape[:2]:
            self._used_BT = torch.zeros(x_BTD.shape[:2], dtype=torch.long, device=x_BTD.device)
        route_BT = self.weights(self.budget_logits(layer, x_BTD, self._used_BT), "hard")
        self._used_BT = self._used_BT + (route_BT == BIG)
        return route_BT


def peek_shape(model_cfg) -> dict:
    """What a peeking router needs to rebuild its copy of the small FFN (saved in ``router.yaml``)."""
    return {"mlp": model_cfg.mlp, "d_ff": model_cfg.d_ff_small, "bias": model_cfg.bias}


def peek_big_fraction(target: float, flop_model) -> float:
    """The big fraction at which a peeking router costs what a plain router at ``target`` does: it pays the
    small FFN at every layer: with FFN costs s < b per layer, s + f b = target b + (1 - target) s, so
    f = target (1 - s / b)."""
    small, big = flop_model.ffn[SMALL], flop_model.ffn[BIG]
    return target * (1.0 - small / big)


def compute_big_fraction(big_fraction: float, flop_model, peek: bool) -> float:
    """The big fraction of a plain big/small router of the same FFN compute (``peek_big_fraction`` inverted)."""
    if not peek:
        return big_fraction
    small, big = flop_model.ffn[SMALL], flop_model.ffn[BIG]
    return big_fraction * big / (big - small)


def policy_without_folder(spec, n_layers: int, seed: int = 0):
    """``(name, routes)`` for the routing specs that need no folder — a callable (passed through), a
    pattern, ``random:P`` — or None for ``router:NAME`` (its loaders: ``routers.store.routing_policy`` and an
    export's standalone copy)."""
    if callable(spec):
        return getattr(spec, "name", type(spec).__name__), spec
    r = parse_routing(spec, n_layers)
    if r.kind == "pattern":
        return r.text, r.pattern
    if r.kind == "random":
        policy = RandomPolicy(r.p_big, seed=seed)
        return policy.name, policy
    return None
