"""Context policies: how the tokens around a scored token are routed while the oracle varies its route.

The paper (section 3.2) applies a candidate pattern to the sequence and keeps, per token, the
pattern with the lowest loss; it does not say how the *context* tokens are routed meanwhile
(DESIGN section 2, "unknown in the paper"). We offer both readings and name the one used in
every output:

- ``shared``: the candidate pattern routes every token of the sequence; each token then keeps
  its own best pattern (our reading of the paper). A prefix state is a whole sequence.
- ``frozen``: the context keeps a reference routing (all-big, all-small, a pattern, a router)
  and only the scored token's own route varies; its attention at layer l reads the reference
  keys/values of earlier positions and its own key/value. This is the causally consistent
  oracle: every token's choice is realisable given the context's.

Both classes expose ``residual(layer, h_BTMD) -> h + attention``: the residual stream after
layer ``layer``'s attention, for M independent hidden-state variants per position. ``shared``
treats each variant m as its own sequence (variant m of every position shares one prefix);
``frozen`` treats every (position, variant) as its own scored token.

Tensor name legend: B sequences, T positions (queries), C key positions (the reference context), M variants (prefixes)
per position, D model width, H query heads, K key/value heads, E head dim, L layers, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.model import DuoModel, apply_rope
from ..model.routing import SKIP, parse_pattern
from . import kernels as K
from .kernels import norm as layer_input  # (the local K below counts KV heads)


class SharedContext:
    """Variant m of every position belongs to one sequence routed by one prefix (``shared``)."""

    name = "shared"

    def __init__(self, model: DuoModel, T: int, kernels: K.Kernels = K.EAGER):
        self.model, self.kernels = model, kernels
        self.cos_TE, self.sin_TE = model.rope_cos[:T], model.rope_sin[:T]

    def residual(self, layer: int, h_BTMD: torch.Tensor) -> torch.Tensor:
        block = self.model.layers[layer]
        B, T, M, D = h_BTMD.shape
        h_XTD = h_BTMD.permute(0, 2, 1, 3).reshape(B * M, T, D)  # a view when M == 1
        out_XTD = self.kernels(K.shared_attn_residual, block, h_XTD, self.cos_TE, self.sin_TE)
        return out_XTD.view(B, M, T, D).permute(0, 2, 1, 3)


def reference_routes(model: DuoModel, idx_BT: torch.Tensor, reference) -> torch.Tensor:
    """The context's routes ``route_LBT`` under a reference: a pattern string or a policy object.

    A policy decides from the hidden state, so we run it once; causality makes its decisions at
    positions < t independent of what token t does later (the frozen oracle varies t only).
    """
    L = model.cfg.n_layers
    B, T = idx_BT.shape
    if isinstance(reference, str):
        route_L = torch.tensor(parse_pattern(reference, L), device=idx_BT.device)
        return route_L.view(L, 1, 1).expand(L, B, T)
    if not callable(reference):
        raise ValueError(f"reference must be a pattern or a routing policy; got {type(reference).__name__}")
    soft = []

    def recording(layer, x_BTD):
        route = reference(layer, x_BTD)
        soft.append(route.is_floating_point())
        return route

    out = model(idx_BT, None, recording, return_logits=False)
    if any(soft):
        raise ValueError("a frozen-context reference must route hard (route_BT), not with soft weights")
    return out.route_LBT


class FrozenContext:
    """Every (position, variant) is a scored token attending to the reference context (``frozen``)."""

    name = "frozen"

    def __init__(self, model: DuoModel, idx_BT: torch.Tensor, reference, kernels: K.Kernels = K.EAGER):
        self.model, self.kernels = model, kernels
        cfg = model.cfg
        B, T = idx_BT.shape
        self.cos_TE, self.sin_TE = model.rope_cos[:T], model.rope_sin[:T]
        self.route_LBT = reference_routes(model, idx_BT, reference)
        self.k_ref, self.v_ref = self._reference_kv(idx_BT)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.strict_TC = torch.ones(T, T, dtype=torch.bool, device=idx_BT.device).tril(-1)

    @torch.no_grad()
    def _reference_kv(self, idx_BT):
        """Keys/values (post-RoPE) of every layer under the reference routing: the model's forward,
        step by step, keeping what the scored tokens will read."""
        model = self.model
        h_BTD = model.embed(idx_BT)
        k_ref, v_ref = [], []
        for layer, block in enumerate(model.layers):
            x_BTD = block.attn_norm(h_BTD)
            attn = block.attn
            q_BHTE, k_BKTE, v_BKTE = attn.qkv(x_BTD, self.cos_TE, self.sin_TE)
            k_ref.append(k_BKTE)
            v_ref.append(v_BKTE)
            y_BHTE = F.scaled_dot_product_attention(
                q_BHTE, k_BKTE, v_BKTE, is_causal=True, enable_gqa=attn.n_kv_heads != attn.n_heads
            )
            a_BTD = attn.o_proj(y_BHTE.transpose(1, 2).reshape(*h_BTD.shape[:2], -1))
            route_BT = self.route_LBT[layer]
            if block.skip_mode == "block":
                a_BTD = a_BTD * (route_BT != SKIP).unsqueeze(-1).type_as(a_BTD)
            h_BTD = h_BTD + a_BTD
            h_BTD = h_BTD + block.ffn.routed(block.ffn_norm(h_BTD), route_BT)
        return k_ref, v_ref

    def residual(self, layer: int, h_BTMD: torch.Tensor) -> torch.Tensor:
        block = self.model.layers[layer]
        return self.kernels(
            frozen_attn_residual, block, h_BTMD, self.k_ref[layer], self.v_ref[layer], self.cos_TE, self.sin_TE,
            self.strict_TC, self.scale,
        )


def frozen_attn_residual(block, h_BTMD, k_BKCE, v_BKCE, cos_TE, sin_TE, strict_TC, scale: float):
    """h + attention where each (position t, variant m) attends to the context keys/values that
    ``strict_TC`` allows ([T, C]: the reference's positions < t for the frozen context, every cached
    position for the sequential oracle) and to its own key/value."""
    attn = block.attn
    B, T, M, D = h_BTMD.shape
    H, K, E = attn.n_heads, attn.n_kv_heads, attn.head_dim
    x_BTMD = layer_input(block.attn_norm, h_BTMD)
    cos_T11E, sin_T11E = cos_TE[:, None, None, :], sin_TE[:, None, None, :]
    q_BTMHE = attn.q_proj(x_BTMD).view(B, T, M, H, E)
    k_BTMKE = attn.k_proj(x_BTMD).view(B, T, M, K, E)
    if attn.rope:  # learned absolute positions (GPT-2) are already in the input embedding
        q_BTMHE, k_BTMKE = apply_rope(q_BTMHE, cos_T11E, sin_T11E), apply_rope(k_BTMKE, cos_T11E, sin_T11E)
    v_BTMKE = attn.v_proj(x_BTMD).view(B, T, M, K, E)
    if K != H:  # grouped KV heads: query head h reads KV head h // (H / K), as SDPA's enable_gqa
        k_BTMHE = k_BTMKE.repeat_interleave(H // K, dim=3)
        v_BTMHE = v_BTMKE.repeat_interleave(H // K, dim=3)
        k_BHCE = k_BKCE.repeat_interleave(H // K, dim=1)
        v_BHCE = v_BKCE.repeat_interleave(H // K, dim=1)
    else:
        k_BTMHE, v_BTMHE, k_BHCE, v_BHCE = k_BTMKE, v_BTMKE, k_BKCE, v_BKCE
    q_BHXE = q_BTMHE.permute(0, 3, 1, 2, 4).reshape(B, H, T * M, E)  # X = (position, variant)
    # context: reference keys of strictly earlier positions; self: the token's own key
    ctx_BHXC = (q_BHXE @ k_BHCE.transpose(-1, -2)).float() * scale
    mask_XC = strict_TC.repeat_interleave(M, dim=0)
    ctx_BHXC = ctx_BHXC.masked_fill(~mask_XC, float("-inf"))
    own_BHX = (q_BTMHE * k_BTMHE).sum(-1).permute(0, 3, 1, 2).reshape(B, H, T * M).float() * scale
    p_BHXC1 = torch.softmax(torch.cat([ctx_BHXC, own_BHX.unsqueeze(-1)], -1), dim=-1).to(q_BHXE.dtype)
    C = k_BKCE.shape[2]  # T for the frozen context; the cached positions < t for the sequential oracle
    y_BHXE = p_BHXC1[..., :C] @ v_BHCE
    v_own_BHXE = v_BTMHE.permute(0, 3, 1, 2, 4).reshape(B, H, T * M, E)
    y_BHXE = y_BHXE + p_BHXC1[..., C:] * v_own_BHXE
    y_BTMD = y_BHXE.view(B, H, T, M, E).permute(0, 2, 3, 1, 4).reshape(B, T, M, H * E)
    return h_BTMD + attn.o_proj(y_BTMD)


def make_context(model: DuoModel, context: str, idx_BT: torch.Tensor, reference=None, kernels: K.Kernels = K.EAGER):
    """The tree engine's context object of the policy ``context`` for the sequences ``idx_BT``."""
    policy = CONTEXTS[context]
    assert policy.make is not None, "OracleSpec sends contexts with their own engine elsewhere"
    return policy.make(model, idx_BT, reference, kernels)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class OracleContext:
    """One context policy: how the context tokens are routed while a token's pattern varies.

    ``make(model, idx_BT, reference, kernels)`` builds what the tree engine walks with (a class with
    ``residual``, like ``SharedContext``); a policy with an engine of its own (``engine="sequential"``,
    oracle/sequential.py) has none. ``reference``: the policy routes the context tokens by a reference
    (``--reference``, ``study.reference``). ``beam_unit``: what beam search keeps its best prefixes for —
    each ``sequence`` (its tokens share one prefix) or each scored ``token``. ``note``: the sentence every
    summary of this policy carries.
    """

    name: str
    note: str
    make: Callable | None = None
    engine: str = "tree"  # tree: the exhaustive walk and beam search; sequential: oracle/sequential.py
    reference: bool = False
    beam_unit: str = "sequence"


CONTEXTS: dict[str, OracleContext] = {}


def register(context: OracleContext) -> OracleContext:
    """Add a context policy; ``duollm oracle --context NAME`` and ``study.contexts`` then take it."""
    CONTEXTS[context.name] = context
    return context


register(OracleContext(
    "shared", "each candidate pattern routes every token of the sequence; each token keeps its best",
    make=lambda model, idx_BT, reference, kernels: SharedContext(model, idx_BT.shape[1], kernels)))
register(OracleContext(
    "frozen", "context tokens keep the reference routing; only the scored token's own routes vary "
              "(all-big/all-small baselines too: the scored token's routes, the context at the reference)",
    make=lambda model, idx_BT, reference, kernels: FrozenContext(
        model, idx_BT, reference if reference is not None else "B" * model.cfg.n_layers, kernels),
    reference=True, beam_unit="token"))
register(OracleContext(
    "sequential", "left to right: each token chooses its pattern given the earlier tokens' own choices",
    engine="sequential"))


class Head:
    """Next-token loss (float32) of final hidden states, in row blocks.

    Blocks of 512 rows keep one block of logits in cache (measured 1.3-2x faster than unblocked
    on the cpu preset, V = 2048); eager blocks write their logits into one reused buffer. The head
    runs in float32 whatever the engine's dtype (``model.fp32_head``, set by ``runner.engine_model``):
    bfloat16 logits are rounded to 8 bits, which moved each pattern's loss by ~0.009 nats and biased
    the oracle's minimum by 0.2-0.3% (docs/LOG.md, 2026-12-01 "the oracle engine in bf16, and a busy CPU").
    """

    def __init__(self, model: DuoModel, rows: int = 512, kernels: K.Kernels = K.EAGER):
        self.model, self.rows, self.kernels = model, rows, kernels
        self.norm, self.w_VD = getattr(model, "fp32_head", (model.norm, model.lm_head.weight))
        self.buf_nV = None
        self.reference = None  # (p_MV, negent_M): a distribution per token of the chunk (set_reference)

    def set_reference(self, h_MD: torch.Tensor) -> None:
        """The belief oracle's reference: the next-token distribution of the final hidden states ``h_MD`` (one
        per token of the chunk, in the leaves' token order) through this head; with it, ``__call__(doubt=True)``
        also returns each row's KL(reference || its distribution)."""
        logp_MV = torch.log_softmax(torch.nn.functional.linear(self.norm(h_MD.to(self.w_VD.dtype)), self.w_VD).float(), -1)
        p_MV = logp_MV.exp()
        self.reference = (p_MV, (p_MV * logp_MV).sum(-1))

    def __call__(self, h_XD: torch.Tensor, tgt_X: torch.Tensor, *, doubt: bool = False):
        """``loss_X``; with ``doubt``, ``(loss_X, doubt_X)``: also -log of the top-1 probability, and with a
        reference (``set_reference``) ``(loss_X, doubt_X, kl_X)``. Rows are blocks within one leaf's tokens, so
        a block's reference rows are one slice."""
        shape = h_XD.shape[:-1]
        h_ND = h_XD.reshape(-1, h_XD.shape[-1]).to(self.w_VD.dtype)
        tgt_N = tgt_X.reshape(-1)
        out_N = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
        doubt_N = torch.empty_like(out_N) if doubt else None
        ref = self.reference if doubt else None
        kl_N = torch.empty_like(out_N) if ref is not None else None
        M = ref[0].shape[0] if ref is not None else h_ND.shape[0]
        assert h_ND.shape[0] % M == 0, "the reference has one row per token of a leaf"
        eager = not self.kernels.compile and self.w_VD.dtype == torch.float32
        if eager and self.buf_nV is None:
            self.buf_nV = torch.empty(self.rows, self.w_VD.shape[0], dtype=torch.float32, device=h_ND.device)
        for r0 in range(0, h_ND.shape[0], M):
            for a in range(r0, r0 + M, self.rows):
                n = min(self.rows, r0 + M - a)
                args = (h_ND[a : a + n], self.norm, self.w_VD, tgt_N[a : a + n], self.buf_nV[:n] if eager else None)
                if ref is not None:
                    args += (ref[0][a - r0 : a - r0 + n], ref[1][a - r0 : a - r0 + n])
                out = self.kernels(K.head_block, *args)
                out_N[a : a + n] = out[0]
                if doubt:
                    doubt_N[a : a + n] = out[1]
                if ref is not None:
                    kl_N[a : a + n] = out[2]
        if not doubt:
            return out_N.view(shape)
        return (out_N.view(shape), doubt_N.view(shape)) + ((kl_N.view(shape),) if ref is not None else ())
