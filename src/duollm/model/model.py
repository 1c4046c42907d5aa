"""The Duo model: a Llama-style decoder whose every FFN is a big/small/skip unit.

Paper: Alizadeh et al., "Duo-LLM", arXiv 2410.10846, section 3. Every layer keeps one
attention block and two SwiGLU FFNs side by side; each token takes one route per layer:
skip (no FFN, the residual passes), small, or big. Attention always runs (unless
``skip_mode="block"``, where a skipped token also drops its attention output).

The defaults are the paper's Llama-2 layer (RMSNorm, RoPE, SwiGLU, no biases). Four options
(``norm``, ``pos``, ``mlp``, ``bias``) also express a GPT-2 layer exactly, so that pretrained
GPT-2 checkpoints convert into Duo models (``duollm.integrations.hf.convert``) without changing their outputs.

Tensor name legend (torchtitan style, the suffix carries the shape):
    B  batch                 T  sequence positions (query)     C  key positions (cached + new)
    D  model width           H  query heads                    K  key/value heads
    E  head dimension        F  FFN inner width                V  vocabulary
    L  layers                R  routes (skip, small, big)      N  flattened tokens
(a subset of the project's legend, ``docs/NOTATION.md``)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kvcache import KVCache
from .routing import BIG, SKIP, SMALL, FlopModel, parse_pattern, replaying


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    n_layers: int = 12
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (full multi-head attention, the paper's choice)
    d_ff_big: int = 512
    d_ff_small: int = 32  # 16x narrower than big, as in the paper
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    skip_mode: str = "ffn"  # "ffn": skip drops the FFN only (default); "block": attention output too
    init_std: float = 0.02
    # architecture options; the defaults are Llama's, the alternatives GPT-2's (used by conversion)
    norm: str = "rms"  # "rms": RMSNorm | "layer": LayerNorm with bias
    pos: str = "rope"  # "rope": rotary | "learned": absolute position embeddings added to the tokens
    mlp: str = "swiglu"  # "swiglu": gated SiLU | "gelu_tanh", "gelu": fc -> GELU -> proj (not gated)
    bias: bool = False  # biases on the attention and FFN projections

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.n_kv_heads < 0 or self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for RoPE")
        if self.skip_mode not in ("ffn", "block"):
            raise ValueError(f"model.skip_mode must be 'ffn' or 'block'; got {self.skip_mode!r}")
        for name, known in (("norm", ("rms", "layer")), ("pos", ("rope", "learned")),
                            ("mlp", ("swiglu", "gelu_tanh", "gelu"))):
            if getattr(self, name) not in known:
                raise ValueError(f"model.{name} must be one of {', '.join(known)}; got {getattr(self, name)!r}")
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "d_ff_big", "d_ff_small", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive; got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


# ----------------------------------------------------------------------------- routing input


class RoutingPolicy(Protocol):
    """Decides routes layer by layer from the hidden state entering the FFN (paper section 3.3).

    Returns either hard routes ``route_BT`` (int64: 0 skip, 1 small, 2 big) or soft route
    weights ``prob_BTR`` (float, summing to 1 over R), in which case the layer output is
    the probability-weighted mix of the routes (router training).
    """

    def __call__(self, layer: int, x_BTD: torch.Tensor) -> torch.Tensor: ...


Routes = Union[None, str, torch.Tensor, RoutingPolicy]
PATHS = ("routed", "masked")  # how a routed FFN runs: the fast path, and the reference it must equal


def route_fn(routes: Routes, n_layers: int, B: int, T: int, device) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Normalise every accepted form of ``routes`` into ``f(layer, x_BTD) -> route_BT | prob_BTR``.

    Accepted: None (all big: the dense model), a pattern string, ``route_L`` (one
    pattern for every token), ``route_LBT``, or a policy object. A pattern decides each layer
    as a Python int (one route for every token, known on the host): the block then calls that
    module directly, with no gather and no host sync (issue 14).
    """
    if routes is None:
        routes = "B" * n_layers
    if isinstance(routes, str):
        route_L = parse_pattern(routes, n_layers)
        return lambda layer, x_BTD: route_L[layer]
    if isinstance(routes, torch.Tensor):
        if routes.dim() == 1:
            if routes.numel() != n_layers:
                raise ValueError(f"route_L has {routes.numel()} entries for {n_layers} layers")
            route_L = tuple(int(r) for r in routes.tolist())
            if any(r not in (SKIP, SMALL, BIG) for r in route_L):
                raise ValueError(f"routes must be 0 (skip), 1 (small) or 2 (big); got {list(route_L)}")
            return lambda layer, x_BTD: route_L[layer]
        if routes.shape != (n_layers, B, T):
            raise ValueError(f"route_LBT has shape {tuple(routes.shape)}, expected {(n_layers, B, T)}")
        route_LBT = routes.to(device=device, dtype=torch.long)
        return lambda layer, x_BTD: route_LBT[layer]
    if callable(routes):
        return routes
    raise ValueError(f"routes must be None, a pattern, a tensor or a policy; got {type(routes).__name__}")


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        return (x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.norm == "rms" else nn.LayerNorm(cfg.d_model, cfg.norm_eps)


class Embedding(nn.Embedding):
    """Token embedding (``weight``, tied to the LM head), plus learned absolute positions
    (``pos``) when ``cfg.pos == "learned"`` (GPT-2). Positions live here so that every caller
    of ``model.embed(idx_BT)`` (the oracle too) gets the full input of the first layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None

    def forward(self, idx_BT: torch.Tensor, pos_BT: torch.Tensor | None = None) -> torch.Tensor:
        h_BTD = super().forward(idx_BT)
        if self.pos is None:
            return h_BTD
        if pos_BT is None:
            pos_BT = torch.arange(idx_BT.shape[-1], device=idx_BT.device)
        return h_BTD + self.pos(pos_BT)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_TE, sin_TE for positions 0..max_seq_len-1 (rotate-half convention, as in Llama/HF)."""
    E = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, E, 2, dtype=torch.float32, device=device) / E))
    t = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device)
    freqs_TE = torch.outer(t, inv_freq).repeat(1, 2)
    return freqs_TE.cos(), freqs_TE.sin()


def apply_rope(x_BHTE: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor) -> torch.Tensor:
    half = x_BHTE.shape[-1] // 2
    rot = torch.cat((-x_BHTE[..., half:], x_BHTE[..., :half]), dim=-1)
    return (x_BHTE * cos_TE + rot * sin_TE).type_as(x_BHTE)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.rope = cfg.pos == "rope"
        D, E = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(D, cfg.n_heads * E, bias=cfg.bias)
        self.k_proj = nn.Linear(D, cfg.kv_heads * E, bias=cfg.bias)
        self.v_proj = nn.Linear(D, cfg.kv_heads * E, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_heads * E, D, bias=cfg.bias)

    def qkv(self, x_BTD, cos_TE, sin_TE):
        """Projections; RoPE tables may also be per sequence (``cos_B1TE``, explicit positions)."""
        B, T, _ = x_BTD.shape
        q_BHTE = self.q_proj(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BKTE = self.k_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BKTE = self.v_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if not self.rope:  # learned absolute positions were added to the input embedding
            return q_BHTE, k_BKTE, v_BKTE
        return apply_rope(q_BHTE, cos_TE, sin_TE), apply_rope(k_BKTE, cos_TE, sin_TE), v_BKTE

    def forward(self, x_BTD, cos_TE, sin_TE, cache: KVCache | None = None, layer: int = 0, mask_B1TC=None):
        """``mask_B1TC``: which keys each query sees (padding); None: causal over cache + new tokens."""
        B, T, _ = x_BTD.shape
        q_BHTE, k_BKTE, v_BKTE = self.qkv(x_BTD, cos_TE, sin_TE)
        past = 0
        if cache is not None:
            past = cache.seen(layer)  # per layer: earlier layers already cached this forward's tokens
            k_BKTE, v_BKTE = cache.update(layer, k_BKTE, v_BKTE)
        gqa = self.n_kv_heads != self.n_heads
        if mask_B1TC is not None:
            y_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BKTE, v_BKTE, attn_mask=mask_B1TC, enable_gqa=gqa)
        elif past == 0:
            y_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BKTE, v_BKTE, is_causal=True, enable_gqa=gqa)
        elif T == 1:  # one decoded token sees every cached key: no mask (a masked kernel costs ~5x here)
            y_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BKTE, v_BKTE, enable_gqa=gqa)
        else:  # queries at positions past..past+T-1 see keys 0..past+t
            C = k_BKTE.shape[2]
            mask_TC = torch.ones(T, C, dtype=torch.bool, device=x_BTD.device).tril(diagonal=past)
            y_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BKTE, v_BKTE, attn_mask=mask_TC, enable_gqa=gqa)
        return self.o_proj(y_BHTE.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_ND)) * self.up_proj(x_ND))


class GeluMLP(nn.Module):
    """GPT-2's FFN: ``down(gelu(up(x)))``, not gated; ``approximate="tanh"`` is GPT-2's ``gelu_new``."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = True, approximate: str = "tanh"):
        super().__init__()
        self.approximate = approximate
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x_ND), approximate=self.approximate))


def make_mlp(cfg: ModelConfig, d_ff: int) -> nn.Module:
    return build_mlp(cfg.mlp, cfg.d_model, d_ff, cfg.bias)


def build_mlp(kind: str, d_model: int, d_ff: int, bias: bool) -> nn.Module:
    """An FFN of ``ModelConfig.mlp``'s kind (also a peeking router's copy of the small FFN: model/policy.py)."""
    if kind == "swiglu":
        return SwiGLU(d_model, d_ff, bias)
    return GeluMLP(d_model, d_ff, bias, "tanh" if kind == "gelu_tanh" else "none")


class DuoFFN(nn.Module):
    """The Duo unit: a big and a small FFN side by side; route per token (paper section 3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.big = make_mlp(cfg, cfg.d_ff_big)
        self.small = make_mlp(cfg, cfg.d_ff_small)

    def masked(self, x_BTD: torch.Tensor, route_BT: torch.Tensor) -> torch.Tensor:
        """Reference path: run both modules on every token, keep the chosen output."""
        big_BT1 = (route_BT == BIG).unsqueeze(-1).type_as(x_BTD)
        small_BT1 = (route_BT == SMALL).unsqueeze(-1).type_as(x_BTD)
        return big_BT1 * self.big(x_BTD) + small_BT1 * self.small(x_BTD)

    def uniform(self, x_BTD: torch.Tensor, route: int) -> torch.Tensor:
        """Every token takes ``route``: the module itself (the dense model, a pattern, one decoded token)."""
        if route == BIG:
            return self.big(x_BTD)
        if route == SMALL:
            return self.small(x_BTD)
        return torch.zeros_like(x_BTD)

    def routed(self, x_BTD: torch.Tensor, route_BT: torch.Tensor) -> torch.Tensor:
        """Fast path: each module runs only on the tokens sent to it (gather, compute, scatter).

        One stable sort of the routes (skip=0 < small=1 < big=2) lines the tokens up in
        contiguous segments; one gather feeds both modules (each reads a slice), one scatter
        writes their outputs back, and skipped tokens are never copied (their FFN output is 0).
        The segment sizes cost one host sync per call.
        """
        route_N = route_BT.reshape(-1)
        N = route_N.numel()
        if N == 1:  # one token (batch-1 decode under a router): its module, no sort, no gather
            route = int(route_N)
            if route not in (SKIP, SMALL, BIG):
                raise ValueError(f"routes must be 0 (skip), 1 (small) or 2 (big); got {route}")
            return self.uniform(x_BTD, route)
        counts = torch.bincount(route_N, minlength=3).tolist()
        if len(counts) != 3:
            raise ValueError(f"routes must be 0 (skip), 1 (small) or 2 (big); got {route_N.max().item()}")
        n_skip, n_small, n_big = counts
        for route, n in ((BIG, n_big), (SMALL, n_small), (SKIP, n_skip)):
            if n == N:  # uniform routes need no gather (e.g. a router that sends a whole layer one way)
                return self.uniform(x_BTD, route)
        x_ND = x_BTD.reshape(N, -1)
        idx_M = torch.argsort(route_N, stable=True)[n_skip:]  # the M = N - n_skip tokens with an FFN
        x_MD = x_ND.index_select(0, idx_M)  # small tokens first, then big
        y_MD = torch.cat([self.small(x_MD[:n_small]), self.big(x_MD[n_small:])])
        # zeros of the modules' dtype (bf16 under autocast), then one in-place scatter
        return x_ND.new_zeros(N, y_MD.shape[1], dtype=y_MD.dtype).index_copy_(0, idx_M, y_MD).view_as(x_BTD)

    def soft(self, x_BTD: torch.Tensor, prob_BTR: torch.Tensor) -> torch.Tensor:
        """Probability-weighted mix of the routes (router training, paper section 3.3)."""
        p = prob_BTR.type_as(x_BTD)
        return p[..., BIG : BIG + 1] * self.big(x_BTD) + p[..., SMALL : SMALL + 1] * self.small(x_BTD)


class DuoBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.skip_mode = cfg.skip_mode
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.ffn = DuoFFN(cfg)

    def forward(
        self,
        h_BTD: torch.Tensor,
        decide: Callable[[int, torch.Tensor], torch.Tensor],
        layer: int,
        cos_TE: torch.Tensor,
        sin_TE: torch.Tensor,
        *,
        cache: KVCache | None = None,
        path: str = "routed",
        mask_B1TC: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer. ``decide(layer, x_BTD)`` returns ``route_BT``, ``prob_BTR`` or an int (one route
        for every token); ``path`` is "routed" (gather, compute, scatter) or "masked" (the reference:
        every module on every token).

        Returns the new hidden state and the hard routes taken (argmax for soft weights; the int as is).
        """
        if self.skip_mode == "block":  # the route is decided before the block it may skip
            route = decide(layer, h_BTD)
            attn_BTD = self.attn(self.attn_norm(h_BTD), cos_TE, sin_TE, cache, layer, mask_B1TC)  # keys cached
            h_BTD = h_BTD + self._keep(route) * attn_BTD
            x_BTD = self.ffn_norm(h_BTD)
        else:  # attention always runs; the router sees the hidden state entering the FFN
            h_BTD = h_BTD + self.attn(self.attn_norm(h_BTD), cos_TE, sin_TE, cache, layer, mask_B1TC)
            x_BTD = self.ffn_norm(h_BTD)
            route = decide(layer, x_BTD)

        # --- the routing decision: big, small or skip, per token (an int: the same for every token) ---
        if isinstance(route, int):
            if path == "masked":  # the reference runs every module on every token, whatever the routes
                route = torch.full(x_BTD.shape[:2], route, dtype=torch.long, device=x_BTD.device)
            else:
                return h_BTD + self.ffn.uniform(x_BTD, route), route
        if route.is_floating_point():
            ffn_BTD, route_BT = self.ffn.soft(x_BTD, route), route.argmax(-1)
        elif path == "masked":
            ffn_BTD, route_BT = self.ffn.masked(x_BTD, route), route
        else:
            ffn_BTD, route_BT = self.ffn.routed(x_BTD, route), route
        return h_BTD + ffn_BTD, route_BT

    @staticmethod
    def _keep(route) -> torch.Tensor | float:
        """The attention gate of ``skip_mode="block"``: 0 where the token skips, ``keep_BT1``."""
        if isinstance(route, int):
            return float(route != SKIP)
        if route.is_floating_point():
            return (1.0 - route[..., SKIP]).unsqueeze(-1)
        return (route != SKIP).float().unsqueeze(-1)


@dataclass
class DuoOutput:
    logits: torch.Tensor | None  # logits_BTV (None when only the loss was asked for)
    loss: torch.Tensor | None  # mean next-token cross-entropy over the targets
    loss_BT: torch.Tensor | None  # per-token cross-entropy
    route_LBT: torch.Tensor  # hard routes taken (argmax where the mix was soft)
    flops_BT: torch.Tensor  # forward FLOPs spent per token (cost model of routing.FlopModel)


class DuoModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.layers = nn.ModuleList(DuoBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos_TE, sin_TE = rope_tables(cfg)
        self.register_buffer("rope_cos", cos_TE, persistent=False)
        self.register_buffer("rope_sin", sin_TE, persistent=False)
        self.flop_model = FlopModel.from_config(cfg)
        self.gradient_checkpointing, self._gradient_checkpointing_func = False, None  # transformers' switch
        self.apply(self._init)
        # GPT-2 style: scale residual-branch outputs with depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init(self, m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def init_rope(self):
        """Recompute the RoPE tables (after building on the meta device and moving to a real one)."""
        self.rope_cos, self.rope_sin = rope_tables(self.cfg, device=self.embed.weight.device)

    def forward(
        self,
        idx_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        routes: Routes = None,
        *,
        path: str = "routed",
        cache: KVCache | None = None,
        return_logits: bool = True,
        pos_BT: torch.Tensor | None = None,
        keep_BC: torch.Tensor | None = None,
    ) -> DuoOutput:
        """Run the model under ``routes`` (None = all big). ``path``: "routed" or "masked".

        For padded batches (generation, evaluation harnesses): ``keep_BC`` marks the real
        tokens among all key positions (cached and new; 0 = padding), ``pos_BT`` gives each
        new token's position (default: consecutive after the cache).
        """
        if path not in PATHS:
            raise ValueError(f"path must be one of {', '.join(PATHS)}; got {path!r}")
        B, T = idx_BT.shape
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        decide = route_fn(routes, self.cfg.n_layers, B, T, idx_BT.device)
        if pos_BT is None:
            cos_TE, sin_TE = self.rope_cos[past : past + T], self.rope_sin[past : past + T]
        else:  # per-sequence positions: tables broadcast over heads as [B, 1, T, E]
            cos_TE, sin_TE = self.rope_cos[pos_BT].unsqueeze(1), self.rope_sin[pos_BT].unsqueeze(1)
        mask_B1TC = None
        if keep_BC is not None:
            C = past + T
            if keep_BC.shape != (B, C):
                raise ValueError(f"keep_BC has shape {tuple(keep_BC.shape)}, expected {(B, C)} (cached + new tokens)")
            causal_TC = torch.ones(T, C, dtype=torch.bool, device=idx_BT.device).tril(diagonal=past)
            # every query also sees itself, so a padding query has one key and stays finite (no NaN to leak)
            self_TC = torch.zeros(T, C, dtype=torch.bool, device=idx_BT.device).diagonal_scatter(
                torch.ones(T, dtype=torch.bool, device=idx_BT.device), offset=past)
            mask_B1TC = ((causal_TC & keep_BC.bool()[:, None, :]) | self_TC).unsqueeze(1)
        h_BTD = self.embed(idx_BT, pos_BT if pos_BT is not None else past + torch.arange(T, device=idx_BT.device))
        routes_taken = []  # route_BT per layer, or an int where every token took the same route
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        decide = replaying(decide) if ckpt else decide  # transformers' activation checkpointing sets the function
        for layer, block in enumerate(self.layers):
            args, kw = (h_BTD, decide, layer, cos_TE, sin_TE), dict(cache=cache, path=path, mask_B1TC=mask_B1TC)
            h_BTD, route = self._gradient_checkpointing_func(block.__call__, *args, **kw) if ckpt else block(*args, **kw)
            routes_taken.append(route)
        loss = loss_BT = logits_BTV = None
        if return_logits or targets_BT is not None:  # the head only when something needs it
            logits_BTV = self.lm_head(self.norm(h_BTD))
        if targets_BT is not None:
            loss_BT = F.cross_entropy(
                logits_BTV.float().flatten(0, 1), targets_BT.flatten(), reduction="none"
            ).view(B, T)
            loss = loss_BT.mean()
        if all(isinstance(r, int) for r in routes_taken):  # a pattern: one small host-to-device copy
            route_LBT = torch.tensor(routes_taken, device=idx_BT.device).view(-1, 1, 1).expand(-1, B, T).contiguous()
        else:
            route_LBT = torch.stack([torch.full((B, T), r, device=idx_BT.device) if isinstance(r, int)
                                     else r.expand(B, T) for r in routes_taken])
        return DuoOutput(
            logits=logits_BTV if return_logits else None,
            loss=loss,
            loss_BT=loss_BT,
            route_LBT=route_LBT,
            flops_BT=self.flop_model.of_routes(route_LBT),
        )


def param_counts(model: DuoModel) -> dict[str, int]:
    """Parameters by part (tied embeddings counted once: ``named_parameters`` skips shared ones), DESIGN section 2."""
    parts = dict.fromkeys(("embeddings", "attention", "big_ffn", "small_ffn", "norms"), 0)
    for name, p in model.named_parameters():
        key = ("embeddings" if name.startswith(("embed", "lm_head")) else "attention" if ".attn." in name
               else "big_ffn" if ".ffn.big." in name else "small_ffn" if ".ffn.small." in name else "norms")
        parts[key] += p.numel()
    parts["total"] = sum(parts.values())
    return parts
