"""Oracle engine benchmark (DESIGN section 6): tree vs naive on the same tokens, as ratios.

For the 2^12 small/big patterns of the ``cpu`` preset (random weights: speed does not depend on
training) it measures, in one run:

- the machine's dense matmul rate (2048^3 products, best of 5) per dtype;
- the tree evaluator over all 4096 patterns (with the engine's streaming reductions);
- the naive evaluator (one ``DuoModel.forward`` per pattern) on a seeded sample of patterns,
  extrapolated to all 4096 by FLOPs (every pattern costs the same up to its big/small mix);
  ``--naive-sample 0`` times all 4096 instead;
- the ideal speed-up: naive FLOPs / tree FLOPs from ``routing.FlopModel`` (attention at the
  evaluated context length), and the measured speed-up next to it.

Targets: measured speed-up >= 80% of the ideal; tree FLOP/s >= 50% of dense matmul FLOP/s; the bf16
engine >= 4x the fp32 eager engine and >= 30% of the bf16 dense rate (issue 12; see docs/LOG.md for
why the first is out of reach without a bf16 head with fp32 outputs).

``--memory`` measures the engine's peak resident memory (``ru_maxrss`` of a fresh process)
on the ``cpu`` preset as the number of evaluation tokens grows (up to 64K tokens), and at a
fixed token count as the number of patterns grows, to show what the peak depends on.

``--agreement RUN`` compares the bfloat16 engine with float32 on a trained run's own evaluation
tokens: per budget the oracle and fixed perplexity, the fixed pattern, and the share of tokens
whose oracle pattern changes (target: perplexities within 0.1%).

Usage: python benchmarks/bench_oracle.py [--tokens 512] [--dtypes float32,bfloat16]
       [--naive-sample 256] [--threads N] [--memory] [--agreement RUN [--agreement-tokens 1024]]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from duollm.checkpoint import load_model
from duollm.config import load_config, load_run_config
from duollm.data.cache import eval_tokens
from duollm.model.model import DuoModel
from duollm.model.routing import FlopModel
from duollm.oracle import build_spec, naive_losses
from duollm.oracle.kernels import Kernels
from duollm.oracle.plan import build_plan
from duollm.oracle.runner import compute_chunk, engine_model
from duollm.oracle.tree import naive_flops, tree_flops

CLOCK = time.perf_counter  # set in main: process CPU time on one thread, wall time otherwise


def dense_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = CLOCK()
        a @ b
        best = min(best, CLOCK() - t)
    return 2 * n**3 / best


def speed(args) -> list[dict]:
    cfg = load_config("cpu")
    T = cfg.train.seq_len
    S = max(1, args.tokens // T)
    torch.manual_seed(0)
    model = DuoModel(cfg.model).eval()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.model.vocab_size, (S, T), generator=g)
    tgt = torch.randint(0, cfg.model.vocab_size, (S, T), generator=g)
    spec = build_spec(cfg.model.n_layers, options="SB")
    plan = build_plan(spec)
    cand = plan.route_PL  # 4096 patterns (the baselines and random draws are among them)
    assert len(cand) == 2**cfg.model.n_layers
    fm = FlopModel.from_config(cfg.model, context=T)
    flops_tree, flops_naive = tree_flops(cand, fm) * S * T, naive_flops(cand, fm) * S * T
    rng = np.random.default_rng(0)
    sample = cand[np.sort(rng.choice(len(cand), size=args.naive_sample, replace=False))] if args.naive_sample else cand
    rows = []
    for dtype in args.dtypes.split(","):
        em = engine_model(model, dtype)
        rate = dense_rate(em.embed.weight.dtype)
        with torch.no_grad():
            list(naive_losses(em, idx[:1], tgt[:1], cand[:2]))  # warm-up
            t = CLOCK()
            for _ in naive_losses(em, idx, tgt, sample, batch_size=S):
                pass
            t_sample = CLOCK() - t
            times, warmup = {}, {}
            for compiled in (False, True):
                kernels = Kernels(compiled)
                t = time.perf_counter()
                warm = build_plan(build_spec(cfg.model.n_layers, options="SB", budgets="0,12"))
                compute_chunk(em, warm, idx, tgt, batch_tokens=S * T, kernels=kernels)
                warmup[compiled] = time.perf_counter() - t  # first calls: compilation (on-disk cache afterwards)
                t = CLOCK()
                compute_chunk(em, plan, idx, tgt, batch_tokens=S * T, kernels=kernels)
                times[compiled] = CLOCK() - t
        t_naive = t_sample * naive_flops(cand, fm) / naive_flops(sample, fm)
        for compiled, t_tree in times.items():
            rate_tree = flops_tree / t_tree
            row = {
                "dtype": dtype, "compiled_kernels": compiled, "tokens": S * T, "patterns": len(cand),
                "threads": torch.get_num_threads(), "dense_matmul_gflops": rate / 1e9,
                "tree_s": t_tree, "tree_gflops": rate_tree / 1e9, "tree_share_of_dense": rate_tree / rate,
                "naive_s": t_naive, "naive_patterns_timed": len(sample), "naive_gflops": flops_naive / t_naive / 1e9,
                "ideal_speedup": flops_naive / flops_tree, "measured_speedup": t_naive / t_tree,
                "warmup_wall_s": warmup[compiled],
            }
            row["speedup_share_of_ideal"] = row["measured_speedup"] / row["ideal_speedup"]
            rows.append(row)
            print(
                f"{dtype:>9} {'compiled' if compiled else 'eager':>8}: dense {row['dense_matmul_gflops']:6.1f} "
                f"GFLOP/s | tree {t_tree:6.1f} s {row['tree_gflops']:6.1f} GFLOP/s = "
                f"{100 * row['tree_share_of_dense']:5.1f}% of dense (target >= 50%) | naive {t_naive:7.1f} s "
                f"({len(sample)} patterns timed) | speed-up {row['measured_speedup']:5.2f}x vs ideal "
                f"{row['ideal_speedup']:4.2f}x = {100 * row['speedup_share_of_ideal']:5.1f}% (target >= 80%)",
                flush=True,
            )
    base = next((r for r in rows if r["dtype"] == "float32" and not r["compiled_kernels"]), None)
    if base is not None:
        for r in rows:
            r["speedup_over_fp32_eager"] = base["tree_s"] / r["tree_s"]
        print("speed-up over the fp32 eager engine (target >= 4x): " + ", ".join(
            f"{r['dtype']} {'compiled' if r['compiled_kernels'] else 'eager'} {r['speedup_over_fp32_eager']:.2f}x"
            for r in rows) + "; share of the dtype's dense rate (target >= 30% in bf16): " + ", ".join(
            f"{r['dtype']} {'compiled' if r['compiled_kernels'] else 'eager'} {100 * r['tree_share_of_dense']:.1f}%"
            for r in rows), flush=True)
    return rows


CHILD = """
import json, resource, sys, tempfile, torch
from duollm.config import load_config
from duollm.model.model import DuoModel
from duollm.oracle import build_spec, run_oracle
tokens, budgets, dtype = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = load_config("cpu")
T = cfg.train.seq_len
model = DuoModel(cfg.model).eval()
idx = torch.randint(0, cfg.model.vocab_size, (tokens // T, T))
tgt = torch.randint(0, cfg.model.vocab_size, (tokens // T, T))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if budgets == "ladder":  # one pattern per budget k = 0..12: the per-token outputs of a full study
    spec = build_spec(12, patterns=",".join("B" * k + "S" * (12 - k) for k in range(13)))
else:
    spec = build_spec(12, budgets=budgets)
with tempfile.TemporaryDirectory() as d:
    s = run_oracle(model, idx, tgt, spec, d, progress=False, dtype=dtype)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"tokens": tokens, "budgets": budgets, "dtype": dtype, "patterns": s["patterns_evaluated"],
                  "reported_budgets": len(s["budgets"]),
                  "rss_before_mib": before / 1024, "peak_rss_mib": after / 1024}))
"""


def memory(args) -> list[dict]:
    """Peak RSS of fresh processes (Linux ru_maxrss, KiB): the before figure is the process with
    torch, the model and the tokens loaded; the peak includes the whole oracle run and its outputs.

    The engine's memory is one chunk's working set (set by --batch-tokens, not by the pattern
    count) plus O(tokens x budgets) per-token results; "ladder" (13 patterns, one per budget
    k = 0..12) gives 64K tokens the per-token outputs of a full 13-budget study without the
    hour a full 2^12 enumeration of 64K tokens takes on one core."""
    runs = [(8192, "0,12"), (16384, "0,12"), (65536, "0,12"), (65536, "ladder"),
            (4096, "0,12"), (4096, "0-1,11-12"), (4096, "0-2,10-12")]
    out = []
    for tokens, budgets in runs:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(tokens), budgets, "float32"],
                              capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        out.append(row)
        print(f"memory: {row['tokens']:6d} tokens, {row['patterns']:4d} patterns, {row['reported_budgets']:2d} budgets "
              f"({budgets:>9}): "
              f"before {row['rss_before_mib']:6.0f} MiB, peak {row['peak_rss_mib']:6.0f} MiB, "
              f"engine +{row['peak_rss_mib'] - row['rss_before_mib']:5.0f} MiB", flush=True)
    return out


def agreement(args) -> dict:
    """bfloat16 vs float32 on a trained run's own evaluation tokens (the study's token set): per budget
    the oracle and fixed perplexity, whether the fixed pattern is the same, and the share of tokens
    whose oracle pattern changes; target: every perplexity within 0.1%."""
    import tempfile
    from pathlib import Path

    import pyarrow.parquet as pq

    from duollm.oracle import run_oracle

    run = Path(args.agreement)
    model = load_model(run)
    model = model[0] if isinstance(model, tuple) else model
    cfg = load_run_config(run)
    idx, tgt = eval_tokens(run, cfg, max_tokens=args.agreement_tokens)[:2]
    spec = build_spec(cfg.model.n_layers, options="SB")
    out, times = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for dtype in ("float32", "bfloat16"):
            t = time.perf_counter()
            s = run_oracle(model, idx, tgt, spec, Path(d) / dtype, progress=False, dtype=dtype, compile=False,
                           batch_tokens=1024)
            times[dtype] = time.perf_counter() - t
            out[dtype] = (s, pq.read_table(Path(d) / dtype / "per_token.parquet").to_pandas())
    (f, ft), (b, bt) = out["float32"], out["bfloat16"]
    rows, worst = [], 0.0
    for ef, eb in zip(f["budgets"], b["budgets"]):
        k = ef["k"]
        row = {"k": k, "oracle_ppl_f32": ef["oracle_ppl"], "oracle_ppl_bf16": eb["oracle_ppl"],
               "oracle_rel": eb["oracle_ppl"] / ef["oracle_ppl"] - 1,
               "fixed_rel": eb["fixed_ppl"] / ef["fixed_ppl"] - 1, "fixed_same": ef["fixed_pattern"] == eb["fixed_pattern"],
               "random_rel": eb["random_mean_ppl"] / ef["random_mean_ppl"] - 1,
               "pattern_changed": float((ft[f"best_pattern_k{k}"].astype(str) != bt[f"best_pattern_k{k}"].astype(str)).mean())}
        worst = max(worst, abs(row["oracle_rel"]), abs(row["fixed_rel"]))
        rows.append(row)
        print(f"agreement k={k:2d}: oracle {ef['oracle_ppl']:8.3f} vs {eb['oracle_ppl']:8.3f} ({100 * row['oracle_rel']:+.3f}%)"
              f" | fixed {100 * row['fixed_rel']:+.3f}% same pattern {row['fixed_same']}"
              f" | random@k {100 * row['random_rel']:+.3f}%"
              f" | oracle pattern changed for {100 * row['pattern_changed']:.1f}% of tokens",
              flush=True)
    big_rel = b["all_big_ppl"] / f["all_big_ppl"] - 1
    print(f"agreement on {idx.numel()} tokens: worst oracle/fixed difference {100 * worst:.3f}% (target <= 0.1%); "
          f"all-big {100 * big_rel:+.3f}%; wall time float32 {times['float32']:.1f} s, bfloat16 {times['bfloat16']:.1f} s "
          f"({times['float32'] / times['bfloat16']:.2f}x), {torch.get_num_threads()} threads", flush=True)
    return {"tokens": int(idx.numel()), "rows": rows, "worst_rel": worst, "all_big_rel": big_rel, "wall_s": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512, help="evaluation tokens (multiples of 128)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--naive-sample", type=int, default=256, help="patterns the naive evaluator times (0: all 4096)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: times are then process CPU seconds, which other jobs "
                        "on a shared machine do not inflate; with more threads, wall seconds)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory vs tokens and patterns")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--agreement", metavar="RUN", help="also compare bfloat16 with float32 on this trained run's tokens")
    p.add_argument("--agreement-tokens", type=int, default=1024, help="evaluation tokens for --agreement")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    print(f"threads {torch.get_num_threads()}, clock: {'process CPU time' if CLOCK is time.process_time else 'wall'}")
    result = {}
    if not args.skip_speed:
        result["speed"] = speed(args)
    if args.memory:
        result["memory"] = memory(args)
    if args.agreement:
        result["agreement"] = agreement(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
