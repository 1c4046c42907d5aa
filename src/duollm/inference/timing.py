"""Timing of variants side by side: interleaved rounds, a quiet-machine check (``duollm bench``, ``benchmarks/``).

On a busy CPU multi-threaded timings stop measuring FLOPs (every parallel op waits for its slowest
thread), so the ratios of variants timed in the same rounds are what to compare, and
``report_machine`` says how busy the CPU was before the run.
"""

from __future__ import annotations

import os
import random
import time

import torch


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, rounds: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each callable in every round, after a warm-up.

    The rounds interleave the callables, so a load spike on a shared machine hits them all
    alike. Each round runs them in a fresh random order, each one untimed and then timed, so
    that none is always the one that finds the caches cold after another's big working set.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    order = random.Random(0)
    names = list(fns)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            fns[name]()
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPU time that other processes used over ``seconds`` (Linux; None elsewhere)."""

    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except OSError:
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def report_machine(device: torch.device) -> str:
    """One line on the setting, with a warning when other work is using the CPU.

    Other processes distort multi-threaded CPU timings far beyond their share: every parallel
    op waits for its slowest thread, so a descheduled thread costs a time slice per op and the
    timings end up counting ops rather than FLOPs.
    """
    busy = cpu_busy()
    line = (f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} cores, CPU busy before the run: "
            + ("?" if busy is None else f"{busy:.0%}"))
    if device.type == "cpu" and busy is not None and busy > 0.2:
        line += ("\nWARNING: other work is using the CPU; multi-threaded timings on a busy CPU mostly count"
                 " ops, not FLOPs: rerun when the machine is quiet (or compare with --threads 1)")
    return line
