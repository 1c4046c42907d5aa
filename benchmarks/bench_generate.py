"""Wall-clock of routed generation on a preset at initialisation (issue 14): `duollm bench` without a run.

Times prefill and decode (``duollm.inference.bench.measure``: static KV cache, interleaved rounds) at batch 1
and 8 under all-big, all-small, fixed patterns at k = L/3, L/2, 2L/3 and a *router*: a ``Router``
with random projections whose big logit is calibrated (``routers.calibrate``) so that 1/3 of the
routes go big, mixed per token and layer as a trained router's are. Speed-ups over all-big are
compared with FLOP-proportional (prefill) and weight-bytes-proportional (decode) ideals.

Targets (issue 14, the `wide` preset at k = 4 of 12; share of the ideal gain, (x - 1) / (ideal - 1)):
batch-1 decode under a fixed pattern >= 80%, under the router >= 70%; batch-8 decode under the
router >= 70%; prefill (8 x 128) under the router >= 70%.

    python benchmarks/bench_generate.py                    # the wide preset, ~3-5 min on 2 cores
    python benchmarks/bench_generate.py --preset cpu --quick
    python benchmarks/bench_generate.py --json gen.json --strict
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from duollm.config import load_config
from duollm.inference.bench import default_policies, format_table, measure
from duollm.model.model import DuoModel
from duollm.model.policy import Router
from duollm.routers.calibrate import calibrate_budget

TARGETS = [  # (what, policy prefix, batch, field, share of the ideal gain)
    ("batch-1 decode, fixed@4", "fixed@4", 1, "decode_gain_share", 0.8),
    ("batch-1 decode, router", "router", 1, "decode_gain_share", 0.7),
    ("batch-8 decode, router", "router", 8, "decode_gain_share", 0.7),
    ("prefill 8 x T, router", "router", 8, "prefill_gain_share", 0.7),
]


def gain_share_ok(result: dict, policy_prefix: str, batch: int, field: str, target: float) -> bool | None:
    """Whether every row of ``policy_prefix`` at ``batch`` reaches ``target`` of its ideal gain (None: no row)."""
    vals = [r[field] for r in result["rows"] if r["policy"].startswith(policy_prefix) and r["batch"] == batch
            and r[field] is not None]
    return all(v >= target for v in vals) if vals else None


def random_router(model, idx_ST: torch.Tensor, target: float, seed: int = 0) -> Router:
    """A hard router with random projections, its big logit shifted so ``target`` of the routes go big."""
    cfg = model.cfg
    torch.manual_seed(seed)
    router = Router(cfg.n_layers, cfg.d_model, "SB", mode="hard")
    with torch.no_grad():
        for p in router.proj:
            p.weight.normal_(0.0, cfg.d_model**-0.5)
    _, realised = calibrate_budget(model, router, idx_ST, idx_ST, target, batch_size=idx_ST.shape[0], iters=12)
    router.name = f"router(random, big {realised:.2f})"
    return router


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="wide", help="model preset (default wide: 12 x 1024, FFN 4096 / 256)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one round, 8 new tokens (a smoke run)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.new_tokens = 1, 8
    cfg = load_config(args.preset).model
    torch.manual_seed(0)
    model = DuoModel(cfg).eval()
    prompt_len = min(args.prompt_len, cfg.max_seq_len - args.new_tokens)  # the cpu preset's context is 128
    idx_ST = torch.randint(0, cfg.vocab_size, (8, prompt_len))
    policies = default_policies(None, cfg.n_layers)
    policies["router"] = random_router(model, idx_ST, 1 / 3)
    print(f"preset {args.preset}: {cfg.n_layers} x {cfg.d_model}, FFN {cfg.d_ff_big} / {cfg.d_ff_small}; "
          f"{policies['router'].name}")
    result = measure(model, policies, idx_ST, new_tokens=args.new_tokens, rounds=args.rounds)
    print(result["machine"])
    print(format_table(result))
    missed = 0
    for what, prefix, batch, field, target in TARGETS:
        ok = gain_share_ok(result, prefix, batch, field, target)
        missed += ok is False
        print(f"target {what}: >= {target:.0%} of the ideal gain: {'-' if ok is None else 'ok' if ok else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
