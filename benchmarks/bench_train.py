"""Training throughput under random routing vs all-big dense training (DESIGN section 6).

Two copies of the same model (same initial weights), each with its own AdamW, train on the
same batch; the steps alternate between them (so a load spike on a shared machine hits both
alike), and each keeps the median step time after a warm-up:

    random   per token and layer, big or small with probability 0.5 each (paper section 3.1),
             fresh routes every step, the routed path
    all-big  no routes (every token takes the big FFN: the dense model)

A step is forward, loss.backward(), optimizer.step(), zero_grad — a plain loop, independent
of ``duollm.train.loop``. The predicted speed-up is the FLOP ratio from ``routing.FlopModel``
(training FLOPs ~ 3 x forward FLOPs, so the factor cancels): all-big FLOPs per token over the
mean FLOPs per token of the routes actually drawn. Target: the measured speed-up is at least
80% of the predicted one.

    python benchmarks/bench_train.py                     # cpu preset, 32 x 128 tokens per step
    python benchmarks/bench_train.py --steps 10          # a shorter run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from duollm.config import load_config
from duollm.inference.timing import report_machine, sync
from duollm.model.model import DuoModel
from duollm.model.routing import FlopModel, RouteProbs, sample_routes

TARGET = 0.8  # measured speed-up / predicted speed-up, at least


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="cpu", help="preset or YAML whose model is trained (default cpu)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--p-big", type=float, default=0.5, help="probability of big (the rest small)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    B, T = args.batch, args.seq_len

    cfg = load_config(args.config).model
    torch.manual_seed(0)
    models = {"random": DuoModel(cfg).to(device)}
    models["all-big"] = copy.deepcopy(models["random"])
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1) for k, m in models.items()}
    g = torch.Generator().manual_seed(0)
    tokens_BT = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(device)
    probs = RouteProbs(skip=0.0, small=1.0 - args.p_big, big=args.p_big)
    flops = FlopModel.from_config(cfg, context=T)
    drawn_flops = []  # mean forward FLOPs per token of each step's random routes

    def step(name: str):
        routes = None
        if name == "random":
            route_LBT = sample_routes(probs, cfg.n_layers, B, T, generator=g)
            drawn_flops.append(flops.of_routes(route_LBT).mean().item())
            routes = route_LBT.to(device)
        out = models[name](tokens_BT[:, :-1], tokens_BT[:, 1:], routes=routes, return_logits=False)
        out.loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    print(report_machine(device))
    for _ in range(args.warmup):
        for name in models:
            step(name)
    sync(device)
    times = {name: [] for name in models}
    for _ in range(args.steps):
        for name in models:
            t0 = time.perf_counter()
            step(name)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    print()

    tok_s = {name: B * T / statistics.median(ts) for name, ts in times.items()}
    random_flops = statistics.mean(drawn_flops)
    predicted = flops.all_big() / random_flops
    measured = tok_s["random"] / tok_s["all-big"]
    ok = measured >= TARGET * predicted
    print(f"model: {args.config} preset, {cfg.n_layers} layers x {cfg.d_model}, FFN {cfg.d_ff_big} / {cfg.d_ff_small}; "
          f"{B} x {T} tokens per step; AdamW; median of {args.steps} steps each, interleaved")
    print(f"{'setting':<34}{'tokens/s':>10}{'fwd GFLOP/step':>16}")
    print(f"{'all-big (dense)':<34}{tok_s['all-big']:>10.0f}{flops.all_big() * B * T / 1e9:>16.2f}")
    print(f"{f'random routing (big p={args.p_big})':<34}{tok_s['random']:>10.0f}{random_flops * B * T / 1e9:>16.2f}")
    print(f"\nspeed-up random / all-big: measured {measured:.3f}, predicted by the FLOP model {predicted:.3f}, "
          f"measured / predicted {measured / predicted:.3f}")
    print(f"target: measured / predicted >= {TARGET} (within 20%, DESIGN section 6): {'met' if ok else 'MISSED'}")
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
