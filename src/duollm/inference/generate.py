"""Text generation from a run under a routing policy, and the `duollm generate` command.

The policy is a routing spec (``routing.parse_routing``: all-big, all-small, a pattern, random:P,
router:NAME), resolved against the run by ``routing_policy`` as everywhere else.

Generation runs the prompt once, then one token per step with a KV cache (``duollm.model.kvcache``:
static by default, preallocated and written in place), so every token is routed exactly once,
as the policy decided when it was processed. Batches are left-padded.

Tensor name legend: B batch, T positions, L layers, D width, V vocabulary.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..data.cache import load_tokenizer
from ..data.corpus import EOS
from ..model.kvcache import KVCache, StaticKVCache
from ..model.routing import BIG, LETTER_OF_ROUTE, SKIP, SMALL
from ..routers.store import routing_policy

# ----------------------------------------------------------------------------- generation


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    route_LN: torch.Tensor  # routes of the forward step that produced each new token (N new tokens)
    flops_N: torch.Tensor  # forward FLOPs of that step for that token
    stopped: str  # "max_new_tokens" | "eos" | "context"


def _check(model, prompts: list[list[int]], temperature: float, max_new_tokens: int) -> None:
    if not prompts or any(not p for p in prompts):
        raise ValueError("the prompt is empty (it encodes to no tokens)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    ctx = model.cfg.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest > ctx:
        raise ValueError(f"the prompt has {longest} tokens but the model's context is {ctx} (model.max_seq_len)")


def _next_tokens(logits_BV: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """``next_B``: greedy (temperature 0) or sampled from the tempered, top-k-truncated softmax (on the CPU,
    with ``gen``, so a seed gives the same text on every device)."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float().cpu() / temperature
    if top_k > 0:
        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    return torch.multinomial(torch.softmax(logits_BV, -1), 1, generator=gen)[:, 0]


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[list[int]],
    routes=None,
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    eos_id: int | None = None,
    static: bool = True,
) -> list[Generation]:
    """Autoregressive decoding of a batch of prompts, left-padded to the longest, with a KV cache.

    ``static`` (default): a ``StaticKVCache`` of exactly the positions the batch can use, written in
    place; otherwise the growing ``KVCache`` (the reference it must equal). The prompt runs in one
    forward, then one token per step; a sequence stops at ``eos_id`` (later steps still run for the
    others, their tokens are dropped), all stop at ``max_new_tokens`` or at the model's context.
    Greedy decoding never reads a token back to the host before the end unless ``eos_id`` is given.
    """
    _check(model, prompts, temperature, max_new_tokens)
    device = next(model.parameters()).device
    ctx, B = model.cfg.max_seq_len, len(prompts)
    P = max(len(p) for p in prompts)
    gen = torch.Generator().manual_seed(seed)
    cache = StaticKVCache(model.cfg.n_layers, min(ctx, P + max(max_new_tokens - 1, 0))) if static \
        else KVCache(model.cfg.n_layers)
    idx_BT = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], device=device)
    keep_BM = pos_BT = None  # left padding: which key positions are real, and each token's position
    if any(len(p) < P for p in prompts):
        keep_BM = torch.zeros(B, min(ctx, P + max_new_tokens), dtype=torch.long, device=device)
        keep_BM[:, P:] = 1
        for b, p in enumerate(prompts):
            keep_BM[b, P - len(p) : P] = 1
        pos_BT = (keep_BM[:, :P].cumsum(1) - 1).clamp_min(0)
    next_NB, route_NLB, flops_NB = [], [], []
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        C = cache.length + idx_BT.shape[1]
        out = model(idx_BT, routes=routes, cache=cache, pos_BT=pos_BT,
                    keep_BC=None if keep_BM is None else keep_BM[:, :C])
        next_B = _next_tokens(out.logits[:, -1], temperature, top_k, gen).to(device)
        next_NB.append(next_B)
        route_NLB.append(out.route_LBT[:, :, -1])
        flops_NB.append(out.flops_BT[:, -1])
        if eos_id is not None:
            done_B = done_B | (next_B == eos_id)
            if bool(done_B.all()):
                break
        if cache.length >= ctx:  # the next step would need a position beyond the context
            break
        idx_BT = next_B[:, None]
        if pos_BT is not None:
            pos_BT = pos_BT[:, -1:] + 1
    ids_BN = torch.stack(next_NB, 1).cpu() if next_NB else torch.zeros(B, 0, dtype=torch.long)
    route_LBN = torch.stack(route_NLB, 2).cpu() if route_NLB else torch.zeros(model.cfg.n_layers, B, 0, dtype=torch.long)
    flops_BN = torch.stack(flops_NB, 1).cpu() if flops_NB else torch.zeros(B, 0, dtype=torch.float64)
    out = []
    for b, prompt in enumerate(prompts):
        ids = ids_BN[b].tolist()
        n, stopped = len(ids), "max_new_tokens"
        if eos_id is not None and eos_id in ids:
            n, stopped = ids.index(eos_id) + 1, "eos"
        elif n < max_new_tokens:
            stopped = "context"
        out.append(Generation(prompt_ids=list(prompt), new_ids=ids[:n], route_LN=route_LBN[:, b, :n],
                              flops_N=flops_BN[b, :n], stopped=stopped))
    return out


def generate_ids(model, prompt_ids: list[int], routes=None, **kwargs) -> Generation:
    """Decoding of one prompt (``generate_batch`` of one; batch 1 needs no padding). ``temperature`` 0: greedy."""
    return generate_batch(model, [prompt_ids], routes, **kwargs)[0]


def format_routes(route_LN: torch.Tensor, flops_N: torch.Tensor | None = None, flops_all_big: float | None = None) -> str:
    """A compact layer x token view: one row per layer (first layer on top), one letter per token."""
    L, N = route_LN.shape
    lines = [f"routes: {L} layers x {N} generated tokens (B big, S small, _ skip; column = the step that produced the token)"]
    width = len(f"L{L - 1}")
    ticks = [" "] * N
    for j in range(0, N, 10):
        for i, ch in enumerate(str(j)):
            if j + i < N:
                ticks[j + i] = ch
    lines.append(" " * (width + 2) + "".join(ticks))
    for layer in range(L):
        row = "".join(LETTER_OF_ROUTE[int(r)] for r in route_LN[layer])
        lines.append(f"L{layer:<{width - 1}}  {row}")
    if N:
        frac = {name: (route_LN == r).float().mean().item() for name, r in (("big", BIG), ("small", SMALL), ("skip", SKIP))}
        summary = f"big {frac['big']:.0%}  small {frac['small']:.0%}  skip {frac['skip']:.0%}"
        if flops_N is not None and flops_all_big:
            summary += f"  compute {flops_N.double().mean().item() / flops_all_big:.2f} of all-big"
        lines.append(summary)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``duollm generate RUN --prompt TEXT [...]``."""
    parser.add_argument("run", help="run folder")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--policy", default="all-big",
                        help="routing: all-big (default), all-small, a pattern over B/S/_, random:P, router:NAME")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default 50)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and of random routing")
    parser.add_argument("--show-routes", action="store_true", help="print the route each generated token took")


def run_command(args: argparse.Namespace) -> None:
    """``duollm generate``: print the prompt and its continuation (and the routes with --show-routes)."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy); got {args.temperature}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1; got {args.max_new_tokens}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: all tokens); got {args.top_k}")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 arrive as lone surrogates
        raise ValueError("--prompt is not valid UTF-8 text") from None
    run = Path(args.run)
    model, cfg = load_model(run)
    tok = load_tokenizer(run)
    name, routes = routing_policy(args.policy, cfg.model.n_layers, root=run, seed=args.seed)
    prompt_ids = tok.encode(args.prompt)
    eos_id = None
    if tok.kind == "bpe":
        eos_id = tok.backend.token_to_id(EOS)
    else:
        eos_id = getattr(tok.backend, "eos_token_id", None)
    g = generate_ids(model, prompt_ids, routes, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, seed=args.seed, eos_id=eos_id)
    ids = g.new_ids[:-1] if g.stopped == "eos" else g.new_ids
    print(tok.decode(g.prompt_ids + ids))  # decoded together: a character may span the boundary
    if g.stopped == "context":
        print(f"(stopped at the model's context of {cfg.model.max_seq_len} tokens)")
    if args.show_routes:
        print()
        print(f"policy {name}")
        print(format_routes(g.route_LN, g.flops_N, model.flop_model.all_big()))
