"""What routing buys in wall-clock: prefill and decode speed under patterns and routers (issue 14).

``measure`` times generation (``generate.generate_batch``, the path users get: static KV cache,
left padding) under each routing policy at each batch size, interleaved in one run, and puts every
speed-up over all-big next to two ideals computed from the routes the policy actually took:

- **FLOP-proportional** (prefill): all-big's forward FLOPs over the policy's (``routing.FlopModel``);
- **bytes-proportional** (decode): weight bytes one decode step reads under all-big over the
  policy's. Small-batch decode is memory-bound: a layer reads its big FFN's weights if any token of
  the batch goes big there, its small FFN's if any goes small; attention, norms and the head always.

The *share of the ideal gain* is ``(speed-up - 1) / (ideal - 1)``: 1 is the ideal, 0 no gain at all.
Prefill time is one forward of the prompts with its head and first token; decode time per token is
(generation of 1 + n tokens - that prefill) / n.

``duollm bench RUN`` runs it on a run's model with the run's own validation text as prompts and
writes ``RUN/bench/bench.json``; ``benchmarks/bench_generate.py`` does the same for presets at
initialisation.

Tensor legend (``docs/NOTATION.md``): B batch, T positions, L layers, N decode steps.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import rundir
from ..checkpoint import load_model, trained_step
from ..data.cache import eval_tokens
from ..io import atomic_write_json
from ..model.routing import BIG, SKIP, SMALL
from ..routers.store import routing_policy
from .generate import generate_batch
from .timing import report_machine, time_interleaved

BATCHES = (1, 8)


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the weights a forward may read, by part (the embedding: one row per token, left out)."""

    attention: int  # per layer (attention, its norm, the FFN norm)
    big: int  # per layer
    small: int  # per layer
    rest: int  # final norm and head
    n_layers: int

    @classmethod
    def of(cls, model) -> WeightBytes:
        def size(module) -> int:
            return sum(p.numel() * p.element_size() for p in module.parameters())

        block = model.layers[0]
        return cls(attention=size(block.attn) + size(block.attn_norm) + size(block.ffn_norm),
                   big=size(block.ffn.big), small=size(block.ffn.small),
                   rest=size(model.norm) + size(model.lm_head), n_layers=len(model.layers))

    def decode_step(self, route_LB: torch.Tensor) -> float:
        """Weight bytes of one decode step whose tokens took ``route_LB``."""
        big_L = (route_LB == BIG).any(1).double()
        small_L = (route_LB == SMALL).any(1).double()
        return float(self.rest + self.n_layers * self.attention + self.big * big_L.sum() + self.small * small_L.sum())


def default_policies(run: Path | None, n_layers: int) -> dict[str, object]:
    """all-big, all-small, fixed patterns at L/3, L/2 and 2L/3 big layers (the last k layers big: every
    layer has the same shape, so which k does not change bytes or FLOPs) and the run's routers."""
    out: dict[str, object] = {"all-big": "B" * n_layers, "all-small": "S" * n_layers}
    for k in sorted({round(n_layers * f) for f in (1 / 3, 1 / 2, 2 / 3)}):
        out[f"fixed@{k}"] = "S" * (n_layers - k) + "B" * k
    for name in rundir.router_names(run) if run is not None else []:
        out[f"router:{name}"] = routing_policy(f"router:{name}", n_layers, root=run)[1]
    return out


def _ratio(reference_s: float | None, policy_s: float | None) -> float | None:
    """A speed-up over all-big; None where either time was not measurable."""
    return reference_s / policy_s if reference_s and policy_s else None


def _gain_share(speedup: float | None, ideal: float) -> float | None:
    # no gain to share in (ideal ~1), or no speed-up measured: undefined
    return (speedup - 1) / (ideal - 1) if speedup is not None and ideal > 1.02 else None


def measure(model, policies: dict[str, object], prompts_BT: torch.Tensor, *, new_tokens: int = 32,
            batches=BATCHES, rounds: int = 3, log=print) -> dict:
    """Tokens/s of prefill and decode for every policy and batch size, with their ideals (module doc)."""
    if "all-big" not in policies:
        raise ValueError("the policies must include all-big (the reference of every speed-up)")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (decode is timed as generation minus prefill); got {new_tokens}")
    if prompts_BT.shape[1] + new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompts of {prompts_BT.shape[1]} tokens + {new_tokens} new tokens must fit the model's "
                         f"context of {model.cfg.max_seq_len} tokens")
    device = next(model.parameters()).device
    machine = report_machine(device)  # how busy the CPU is before the timing, not after
    wb = WeightBytes.of(model)
    rows = []
    for B in batches:
        if B > prompts_BT.shape[0]:
            raise ValueError(f"batch {B} needs {B} prompts; got {prompts_BT.shape[0]}")
        prompts = prompts_BT[:B].tolist()
        T = len(prompts[0])
        fns, shape = {}, {}
        for name, routes in policies.items():
            with torch.no_grad():
                flops = model(prompts_BT[:B].to(device), routes=routes, return_logits=False).flops_BT.double().sum()
            gens = generate_batch(model, prompts, routes, max_new_tokens=new_tokens)
            route_NLB = torch.stack([g.route_LN for g in gens], 2).permute(1, 0, 2)[1:]  # decode steps only
            shape[name] = (float(flops), statistics.fmean(wb.decode_step(r) for r in route_NLB),
                           float((route_NLB == BIG).double().mean()), float((route_NLB == SKIP).double().mean()))
            fns[f"{name}|prefill"] = lambda r=routes: generate_batch(model, prompts, r, max_new_tokens=1)
            fns[f"{name}|generate"] = lambda r=routes: generate_batch(model, prompts, r, max_new_tokens=new_tokens)
        times = {k: statistics.median(v) for k, v in time_interleaved(fns, rounds, 1, device).items()}
        for name in policies:
            prefill = times[f"{name}|prefill"]
            # decode is generation minus prefill: on a busy machine the two medians can cross, and a difference at
            # or below zero measures nothing (it once printed 7e9 tokens/s): the row says so instead of a figure
            decode = (times[f"{name}|generate"] - prefill) / (new_tokens - 1)
            decode = decode if decode > 0 and prefill > 0 else None
            rows.append(dict(policy=name, batch=B, prompt_len=T, prefill_s=prefill if prefill > 0 else None,
                             decode_s_per_step=decode,
                             prefill_tokens_per_s=B * T / prefill if prefill > 0 else None,
                             decode_tokens_per_s=B / decode if decode else None,
                             flops=shape[name][0], decode_bytes=shape[name][1], decode_big=shape[name][2],
                             decode_skip=shape[name][3]))
        base = next(r for r in rows if r["batch"] == B and r["policy"] == "all-big")
        for r in (r for r in rows if r["batch"] == B):
            r["prefill_speedup"] = _ratio(base["prefill_s"], r["prefill_s"])
            r["prefill_ideal"] = base["flops"] / r["flops"]
            r["prefill_gain_share"] = _gain_share(r["prefill_speedup"], r["prefill_ideal"])
            r["decode_speedup"] = _ratio(base["decode_s_per_step"], r["decode_s_per_step"])
            r["decode_ideal"] = base["decode_bytes"] / r["decode_bytes"]
            r["decode_gain_share"] = _gain_share(r["decode_speedup"], r["decode_ideal"])
        unmeasured = [r["policy"] for r in rows if r["batch"] == B and r["decode_s_per_step"] is None]
        if unmeasured:
            log(f"batch {B}: decode unmeasurable for {', '.join(unmeasured)} (generation timed no slower than its own "
                f"prefill: a busy machine?); rerun on an idle one")
        log(f"batch {B}: timed {len(policies)} policies")
    return {"rows": rows, "new_tokens": new_tokens, "rounds": rounds, "machine": machine,
            "threads": torch.get_num_threads(), "device": str(device)}


def format_table(result: dict) -> str:
    """One line per policy and batch: tokens/s, speed-up over all-big, its ideal and the share of the gain."""
    def share(v):
        return "   -" if v is None else f"{v:4.0%}"

    def num(v, fmt, missing="-"):
        return missing if v is None else format(v, fmt)

    head = (f"{'policy':<26}{'B':>3}  {'prefill tok/s':>13} {'x':>5} {'ideal':>5} {'gain':>5}   "
            f"{'decode tok/s':>12} {'x':>5} {'ideal':>5} {'gain':>5}  big")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['policy']:<26}{r['batch']:>3}  {num(r['prefill_tokens_per_s'], ',.0f', 'unmeasurable'):>13} "
                     f"{num(r['prefill_speedup'], '.2f'):>5} {r['prefill_ideal']:>5.2f} {share(r['prefill_gain_share']):>5}   "
                     f"{num(r['decode_tokens_per_s'], ',.1f', 'unmeasurable'):>12} {num(r['decode_speedup'], '.2f'):>5} "
                     f"{r['decode_ideal']:>5.2f} {share(r['decode_gain_share']):>5}  {r['decode_big']:.2f}")
    lines.append("x: speed-up over all-big at the same batch; ideal: FLOP-proportional (prefill), weight-bytes-"
                 "proportional (decode); gain: (x - 1) / (ideal - 1); big: big share of the decode routes")
    if any(r["decode_tokens_per_s"] is None for r in result["rows"]):
        lines.append("unmeasurable: generation timed no slower than its own prefill (a busy machine?): rerun on an idle one")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``duollm bench RUN [...]``."""
    parser.add_argument("run", help="run folder")
    parser.add_argument("--policies", default="",
                        help="comma-separated routing specs to time besides all-big (default: all-small, fixed "
                             "patterns at L/3, L/2, 2L/3 and every router of the run)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (default 128)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per sequence (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, median kept (default 3)")


def run_command(args: argparse.Namespace) -> str:
    """``duollm bench``: print the table and write ``RUN/bench/bench.json``."""
    run = Path(args.run)
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise ValueError(f"--batches must be comma-separated positive integers; got {args.batches!r}") from None
    if any(b < 1 for b in batches):
        raise ValueError(f"--batches must be comma-separated positive integers; got {args.batches!r}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1; got {args.rounds}")
    with rundir.writing(run):
        model, cfg = load_model(run)
        L = cfg.model.n_layers
        if args.prompt_len < 1 or args.prompt_len + args.new_tokens > cfg.model.max_seq_len:
            raise ValueError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} must fit the model's "
                             f"context of {cfg.model.max_seq_len} tokens")
        if args.policies:
            policies = {"all-big": "B" * L}
            for spec in args.policies.split(","):
                name, routes = routing_policy(spec.strip(), L, root=run)
                policies[name] = routes
        else:
            policies = default_policies(run, L)
        need = max(batches)
        idx_ST, _ = eval_tokens(run, cfg, max_tokens=need * cfg.train.seq_len)
        if idx_ST.shape[0] < need or idx_ST.shape[1] < args.prompt_len:
            raise ValueError(f"the run's validation split holds {idx_ST.shape[0]} windows of {idx_ST.shape[1]} tokens; "
                             f"batch {need} x {args.prompt_len} prompt tokens do not fit")
        result = measure(model, policies, idx_ST[:need, : args.prompt_len], new_tokens=args.new_tokens,
                         batches=batches, rounds=args.rounds)
        result.update(run_step=trained_step(run), preset=cfg.preset, prompt_len=args.prompt_len)
        print(result["machine"])
        print(format_table(result))
        atomic_write_json(rundir.bench_path(run), result)
    return str(rundir.bench_path(run))
