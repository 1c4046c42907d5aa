"""The memory plan (``duollm info --memory``, ``duollm.memory``) against the measured peak of training.

Each case trains a few steps of a preset in a fresh process (``train.pretrain`` on a run folder whose
token cache is already written, so the corpus and tokenizer are not in the figure) and measures the
growth of its peak anonymous resident memory (``RssAnon``, sampled every 0.5 ms: heap and tensors, not
the pages of torch's libraries that running kernels maps in) over what the process held just before
(the interpreter, torch, the tokens). On a GPU (``--device cuda``) the peak is ``torch.cuda.max_memory_allocated``. Target
(issue 17): the plan's total within 10% of the measured peak.

    python benchmarks/bench_memory.py                 # the cpu preset, fp32, batch 32 and 8 (~1 min)
    python benchmarks/bench_memory.py --config paper --device cuda --set train.batch_size=8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, threading, time, torch
from pathlib import Path
from duollm import rundir, train
from duollm.config import load_config
cfg = load_config(sys.argv[1], json.loads(sys.argv[3]))
out = Path(sys.argv[2])
cuda = cfg.train.device.startswith("cuda")
def anon():  # anonymous resident memory (heap, tensors), not the pages of torch's libraries it maps in
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
rundir.load_tokens(out, "train")[:].sum()  # the token cache paged in: not the training's
before, peak, done = anon(), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)
if cuda:
    torch.cuda.reset_peak_memory_stats()
else:
    threading.Thread(target=sample, daemon=True).start()
train.pretrain(cfg, out, resume=True, log=lambda *a: None)
done.append(1)
print(json.dumps({"peak": torch.cuda.max_memory_allocated() if cuda else peak[0] - before}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every case")
    ap.add_argument("--batches", default="32,8", help="train.batch_size values to measure")
    ap.add_argument("--strict", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from duollm import memory, rundir
    from duollm.config import load_config, save_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "data"
        for batch in map(int, args.batches.split(",")):
            sets = [*args.set, f"train.batch_size={batch}", "train.steps=3", "train.save_every=1000",
                    "train.eval_every=1000", "train.compile=false", f"train.device={args.device}"]
            cfg = load_config(args.config, sets)
            if not rundir.has_run(base):
                base.mkdir(parents=True)
                save_config(cfg, rundir.config_path(base))
                rundir.prepare_data(cfg, base, log=lambda *a: None)
            out = Path(tmp) / f"b{batch}"
            rundir.make_sub_run(base, out, cfg)
            proc = subprocess.run([sys.executable, "-c", CHILD, args.config, str(out), json.dumps(sets)],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
            plan = memory.plan(cfg, 1, "ddp", "float32" if args.device == "cpu" else None)
            rows.append({"batch": batch, "planned": plan["bytes"]["total"], "measured": measured,
                         "ratio": plan["bytes"]["total"] / measured, **{k: v for k, v in plan["bytes"].items()}})
    print(f"{'batch':>6} {'planned MiB':>12} {'measured MiB':>13} {'plan/measured':>14}")
    for r in rows:
        print(f"{r['batch']:>6} {r['planned'] / 2**20:>12.1f} {r['measured'] / 2**20:>13.1f} {r['ratio']:>14.3f}")
    print("(measured: peak anonymous resident memory growth over the process before training; cuda: max_memory_allocated)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    ok = all(0.9 <= r["ratio"] <= 1.1 for r in rows)
    print("target (plan within 10% of the measured peak):", "met" if ok else "missed")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
