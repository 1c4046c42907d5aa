"""Text generation from a run under a routing policy, and the `duollm generate` command.

The policy is a routing spec (``routing.parse_routing``: all-big, all-small, a pattern, random:P,
router:NAME), resolved against the run by ``rundir.routing_policy`` as everywhere else.

Generation runs the prompt once, then one token per step with the KV cache
(``duollm.model.KVCache``), so every token is routed exactly once, as the policy decided
when it was processed.

Tensor name legend: B batch, T positions, L layers, D width, V vocabulary.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import rundir
from .data import EOS
from .model import KVCache
from .routing import BIG, LETTER_OF_ROUTE, SKIP, SMALL

# ----------------------------------------------------------------------------- generation


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    route_LN: torch.Tensor  # routes of the forward step that produced each new token (N new tokens)
    flops_N: torch.Tensor  # forward FLOPs of that step for that token
    stopped: str  # "max_new_tokens" | "eos" | "context"


@torch.no_grad()
def generate_ids(
    model,
    prompt_ids: list[int],
    routes=None,
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    eos_id: int | None = None,
) -> Generation:
    """Autoregressive decoding of one prompt with the KV cache. ``temperature`` 0: greedy."""
    if not prompt_ids:
        raise ValueError("the prompt is empty (it encodes to no tokens)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    ctx = model.cfg.max_seq_len
    if len(prompt_ids) > ctx:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {ctx} (model.max_seq_len)")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(model.cfg.n_layers)
    idx_BT = torch.tensor([prompt_ids], device=device)
    new_ids, routes_taken, flops = [], [], []
    stopped = "max_new_tokens"
    for _ in range(max_new_tokens):
        out = model(idx_BT, routes=routes, cache=cache)
        routes_taken.append(out.route_LBT[:, 0, -1].cpu())
        flops.append(out.flops_BT[0, -1].cpu())
        logits_V = out.logits[0, -1].float().cpu()
        if temperature == 0:
            next_id = int(logits_V.argmax())
        else:
            logits_V = logits_V / temperature
            if top_k > 0:
                kth = torch.topk(logits_V, min(top_k, logits_V.numel())).values[-1]
                logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
            next_id = int(torch.multinomial(torch.softmax(logits_V, -1), 1, generator=gen))
        new_ids.append(next_id)
        if eos_id is not None and next_id == eos_id:
            stopped = "eos"
            break
        if cache.length >= ctx:  # the next step would need a position beyond the context
            stopped = "context"
            break
        idx_BT = torch.tensor([[next_id]], device=device)
    L = model.cfg.n_layers
    return Generation(
        prompt_ids=list(prompt_ids),
        new_ids=new_ids,
        route_LN=torch.stack(routes_taken, 1) if routes_taken else torch.zeros(L, 0, dtype=torch.long),
        flops_N=torch.stack(flops) if flops else torch.zeros(0, dtype=torch.float64),
        stopped=stopped,
    )


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
    model, cfg = rundir.load_model(run)
    tok = rundir.load_tokenizer(run)
    name, routes = rundir.routing_policy(args.policy, cfg.model.n_layers, root=run, seed=args.seed)
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
