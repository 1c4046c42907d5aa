"""The prepared GPU check (``benchmarks/gpu_check.sh``; issue 17): the CUDA paths in one short run.

1. training: ``--steps`` steps of the preset through the real loop (bf16 autocast on CUDA), tokens/s
   and MFU against the device's bf16 peak, the peak memory against the plan (``duollm.train.memory``);
2. the oracle on the device on a slice of patterns (budget L/2, ``--oracle-tokens`` tokens), its
   numbers checked finite;
3. the same slice on the CPU in float32 where that is cheap (``--cpu-reference``), oracle@k compared;
4. routed generation (random routing at 0.5 and a fixed pattern), batch 4, checked finite and sane.

Each part prints one line, and a JSON summary goes to ``--json``. Exit 1 when a check fails.

    python benchmarks/gpu_check.py --config paper --device cuda      # the H200 reference, < 8 minutes
    python benchmarks/gpu_check.py --config tiny --device cpu        # CI: the same code on the CPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

# dense bf16 tensor-core peaks (FLOP/s) by device name fragment, for the MFU
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def device_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="paper")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (the paper preset's 256 needs many GPUs)")
    ap.add_argument("--oracle-tokens", type=int, default=2048)
    ap.add_argument("--cpu-reference", action="store_true", help="also run the oracle slice on the CPU (float32)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", help="run folder (default: a temporary one)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from duollm import rundir
    from duollm.checkpoint import load_model
    from duollm.config import load_config
    from duollm.data.cache import load_tokenizer
    from duollm.inference.generate import generate_batch
    from duollm.model.routing import FlopModel, RandomPolicy
    from duollm.oracle.command import run_oracle_command
    from duollm.runtime.distributed import resolve_device
    from duollm.train import loop as train
    from duollm.train import memory

    device = resolve_device(args.device)
    tmp = tempfile.TemporaryDirectory()
    out = Path(args.out) if args.out else Path(tmp.name) / "run"
    steps = args.steps
    cfg = load_config(args.config, [f"train.steps={steps}", f"train.batch_size={args.batch}", f"train.device={args.device}",
                                    f"train.save_every={steps}", f"train.eval_every={steps}", "train.eval_tokens=2048",
                                    f"train.log_every={max(1, steps // 3)}", f"train.compile={str(args.compile).lower()}",
                                    f"train.warmup_steps={max(1, steps // 3)}"])
    summary, failures = {"device": str(device), "config": args.config}, []

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)
            print(f"FAILED: {what}")

    # 1. training
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    last = train.pretrain(cfg, out, resume=rundir.has_run(out), log=lambda *a: None)
    seconds = time.time() - t0
    tok_s = last.get("tokens_per_s", float("nan"))  # the last logging window: after compilation and warm-up
    fm = FlopModel.from_config(cfg.model, cfg.train.seq_len)
    train_flops = 3 * (fm.all_big() + fm.pattern([1] * cfg.model.n_layers)) / 2  # random routing at 0.5, fwd + bwd
    peak = device_peak(device)
    mfu = tok_s * train_flops / peak if peak else None
    planned = memory.plan(cfg, 1, "ddp")["bytes"]["total"]
    measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    summary["train"] = {"steps": steps, "seconds": round(seconds, 1), "tokens_per_s": tok_s, "mfu": mfu,
                        "loss": last.get("train/loss"), "val_all_big": last.get("val/all_big"),
                        "memory_planned": planned, "memory_measured": measured}
    print(f"train: {steps} steps of {args.batch} x {cfg.train.seq_len} in {seconds:.0f} s, {tok_s:,.0f} tokens/s, "
          f"MFU {'—' if mfu is None else f'{mfu:.1%}'} (bf16 peak {peak or '—'}), loss {last.get('train/loss'):.3f}; "
          f"memory planned {planned / 2**30:.2f} GiB" + (f", measured {measured / 2**30:.2f} GiB" if measured else ""))
    check(all(math.isfinite(last.get(k, float("nan"))) for k in ("train/loss", "val/all_big", "val/all_small")),
          "training losses finite")

    # 2-3. the oracle on the device on a slice, against the CPU
    k = cfg.model.n_layers // 2

    def oracle(dev: str, dtype: str) -> dict:
        name = run_oracle_command(out, budgets=str(k), max_tokens=args.oracle_tokens, name=f"check-{dev}", device=dev,
                                  dtype=dtype, batch_tokens=min(4096, args.oracle_tokens), progress=False)
        return rundir.oracle_summary(rundir.oracle_dir(out, name))["budgets"][0]

    t0 = time.time()
    on_device = oracle(args.device, "auto")
    summary["oracle"] = {"k": k, "seconds": round(time.time() - t0, 1), "oracle_ppl": on_device["oracle_ppl"],
                         "fixed_ppl": on_device["fixed_ppl"]}
    print(f"oracle on {device}: k={k}, {args.oracle_tokens} tokens in {summary['oracle']['seconds']} s, "
          f"oracle@k {on_device['oracle_ppl']:.3f}, fixed@k {on_device['fixed_ppl']:.3f}")
    check(math.isfinite(on_device["oracle_ppl"]) and on_device["oracle_ppl"] <= on_device["fixed_ppl"] + 1e-6,
          "oracle finite and no worse than its fixed pattern")
    if args.cpu_reference:
        ref = oracle("cpu", "float32")
        rel = abs(ref["oracle_ppl"] - on_device["oracle_ppl"]) / ref["oracle_ppl"]
        summary["oracle"]["cpu_oracle_ppl"], summary["oracle"]["relative_difference"] = ref["oracle_ppl"], rel
        print(f"oracle on the CPU (float32): oracle@k {ref['oracle_ppl']:.3f}, relative difference {rel:.2%}")
        check(rel < 0.01, "device oracle within 1% of the CPU's")

    # 4. routed generation
    model, _ = load_model(out, device)
    tok = load_tokenizer(out)
    prompts = [tok.encode(t) for t in ("The ", "def ", "import os\n", "class A:")]
    gens = {}
    for label, routes in (("random:0.5", RandomPolicy(0.5, seed=0)), ("fixed", "BS" * (cfg.model.n_layers // 2))):
        t0 = time.time()
        res = generate_batch(model, prompts, routes, max_new_tokens=32)
        gens[label] = {"seconds": round(time.time() - t0, 2), "tokens": sum(len(g.new_ids) for g in res)}
        check(all(0 <= i < cfg.model.vocab_size for g in res for i in g.new_ids) and gens[label]["tokens"] > 0,
              f"generation under {label}")
    summary["generate"] = gens
    print("generate: " + ", ".join(f"{k_}: {v['tokens']} tokens in {v['seconds']} s" for k_, v in gens.items()))

    summary["failures"] = failures
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print("gpu check:", "passed" if not failures else f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
