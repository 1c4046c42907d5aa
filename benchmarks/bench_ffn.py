"""Routed Duo FFN vs the masked reference vs the FLOP-proportional ideal (DESIGN section 6).

For each width (the `cpu` preset's, and a wider one) and each route mix, times one Duo FFN
layer three ways, side by side in one run:

    dense    the big FFN on every token (what an all-big model runs)
    routed   ``DuoFFN.routed``: each module runs only on its own tokens
    masked   ``DuoFFN.masked``: both modules on every token, the chosen output kept

The ideal is ``dense time x FLOP share of the mix``, with the share from ``routing.FlopModel``
(small = 1/16 of big at the paper's ratio, skip = 0) over the routes actually drawn.
Targets at the 1/3 skip, 1/3 small, 1/3 big mix: routed/ideal <= 1.3, masked/routed >= 1.5.

Timing: every variant is warmed up, then the variants run in interleaved rounds (so a load
spike on a shared machine hits them all alike), in a fresh random order each round and each
timed right after an untimed call of itself (so none always meets caches another left cold);
each keeps its median over the rounds.
Threads: torch's default.

    python benchmarks/bench_ffn.py                 # both widths, forward and forward+backward
    python benchmarks/bench_ffn.py --quick         # fewer rounds (a smoke run)
    python benchmarks/bench_ffn.py --strict        # exit 1 when a target is missed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch

from duollm.config import load_config
from duollm.inference.timing import report_machine, time_interleaved
from duollm.model.model import DuoFFN
from duollm.model.routing import BIG, FlopModel, RouteProbs, sample_routes

MIXES = {  # name -> route probabilities (skip, small, big)
    "all-big": RouteProbs(skip=0.0, small=0.0, big=1.0),
    "1/3 _SB": RouteProbs(skip=1 / 3, small=1 / 3, big=1 / 3),
    "1/2 SB": RouteProbs(skip=0.0, small=0.5, big=0.5),
}
TARGET_MIX = "1/3 _SB"
TARGET_ROUTED_OVER_IDEAL = 1.3  # at most
TARGET_MASKED_OVER_ROUTED = 1.5  # at least


def widths(args) -> list[tuple[str, object, int, int]]:
    """(label, model config, batch, seq_len) for each width."""
    cpu = load_config("cpu").model
    wide = dataclasses.replace(cpu, d_model=1024, n_heads=8, d_ff_big=4096, d_ff_small=256)
    out = [("cpu", cpu, args.batch, args.seq_len), ("wide", wide, args.wide_batch, args.seq_len)]
    return [w for w in out if args.width in ("all", w[0])]


def bench_width(label, cfg, B, T, args, device) -> list[dict]:
    torch.manual_seed(0)
    ffn = DuoFFN(cfg).to(device)
    flops = FlopModel.from_config(cfg)
    ffn_R = torch.tensor(flops.ffn, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    routes = {name: sample_routes(p, 1, B, T, generator=g)[0].to(device) for name, p in MIXES.items()}
    share = {name: (ffn_R[r.cpu()].mean() / flops.ffn[BIG]).item() for name, r in routes.items()}

    x_BTD = torch.randn(B, T, cfg.d_model, device=device)
    dy_BTD = torch.randn(B, T, cfg.d_model, device=device)
    rounds = args.rounds if label == "cpu" else args.wide_rounds
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        if mode == "fwd":
            def case(f):
                def run():
                    with torch.no_grad():
                        f(x_BTD)
                return run
        else:
            x_grad = x_BTD.clone().requires_grad_(True)

            def case(f):
                def run():
                    f(x_grad).backward(dy_BTD)
                    x_grad.grad = None
                    for p in ffn.parameters():
                        p.grad = None
                return run

        fns = {"dense": case(ffn.big)}
        for name, r in routes.items():
            fns[f"routed {name}"] = case(lambda x, r=r: ffn.routed(x, r))
            fns[f"masked {name}"] = case(lambda x, r=r: ffn.masked(x, r))
        times = time_interleaved(fns, rounds, args.warmup, device)
        t = {name: statistics.median(ts) for name, ts in times.items()}
        best = {name: min(ts) for name, ts in times.items()}  # the round least disturbed by other load
        for name in MIXES:
            ideal = t["dense"] * share[name]
            rows.append(dict(
                width=label, d_model=cfg.d_model, d_ff_big=cfg.d_ff_big, d_ff_small=cfg.d_ff_small,
                tokens=B * T, mode=mode, mix=name, flop_share=share[name], rounds=rounds,
                dense_ms=t["dense"] * 1e3, ideal_ms=ideal * 1e3,
                routed_ms=t[f"routed {name}"] * 1e3, masked_ms=t[f"masked {name}"] * 1e3,
                routed_over_ideal=t[f"routed {name}"] / ideal,
                masked_over_routed=t[f"masked {name}"] / t[f"routed {name}"],
                best_routed_over_ideal=best[f"routed {name}"] / (best["dense"] * share[name]),
                best_masked_over_routed=best[f"masked {name}"] / best[f"routed {name}"],
            ))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", choices=("all", "cpu", "wide"), default="all")
    ap.add_argument("--batch", type=int, default=32, help="sequences at the cpu width (default 32)")
    ap.add_argument("--wide-batch", type=int, default=8, help="sequences at the wide width (default 8)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=25, help="timed rounds at the cpu width")
    ap.add_argument("--wide-rounds", type=int, default=7, help="timed rounds at the wide width")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up (smoke run; noisy)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = args.wide_rounds = 3
        args.warmup = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(report_machine(device))
    rows = []
    for label, cfg, B, T in widths(args):
        rows += bench_width(label, cfg, B, T, args, device)
    print()

    head = (f"{'width':<6}{'D/Fbig/Fsmall':>16}{'tokens':>8}  {'mode':<8}{'mix':<9}{'share':>7}"
            f"{'dense ms':>10}{'ideal ms':>10}{'routed ms':>11}{'masked ms':>11}{'routed/ideal':>14}{'masked/routed':>15}"
            f"{'best-round r/i, m/r':>21}")
    print(head)
    print("-" * len(head))
    ok = True
    for r in rows:
        mark = ""
        if r["mix"] == TARGET_MIX:
            good = (r["routed_over_ideal"] <= TARGET_ROUTED_OVER_IDEAL
                    and r["masked_over_routed"] >= TARGET_MASKED_OVER_ROUTED)
            ok &= good
            mark = "  ok" if good else "  MISSED"
        dims = f"{r['d_model']}/{r['d_ff_big']}/{r['d_ff_small']}"
        print(f"{r['width']:<6}{dims:>16}{r['tokens']:>8}  {r['mode']:<8}{r['mix']:<9}{r['flop_share']:>7.3f}"
              f"{r['dense_ms']:>10.2f}{r['ideal_ms']:>10.2f}{r['routed_ms']:>11.2f}{r['masked_ms']:>11.2f}"
              f"{r['routed_over_ideal']:>14.2f}{r['masked_over_routed']:>15.2f}"
              f"{r['best_routed_over_ideal']:>14.2f}, {r['best_masked_over_routed']:.2f}{mark}")
    print(f"\nratios of medians over interleaved rounds; best-round: of the fastest round of each (a check on a busy"
          f" machine)\ntargets at {TARGET_MIX}: routed/ideal <= {TARGET_ROUTED_OVER_IDEAL}, "
          f"masked/routed >= {TARGET_MASKED_OVER_ROUTED} (DESIGN section 6, on the medians): {'met' if ok else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
