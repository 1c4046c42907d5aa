"""FSDP (``train.parallel=fsdp``, issue 17) on CPU: 2 gloo processes under torchrun train like 1
process, survive a kill, and write the one checkpoint format every other command loads."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import duollm

from test_train import assert_same_weights, losses

COMMON = ["--config", "tiny", "--set", "train.steps=8", "train.save_every=2", "train.eval_every=8", "train.log_every=1",
          "train.batch_size=8"]


def torchrun(*args, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "duollm.cli",
           *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, env=env, start_new_session=True, **popen)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_fsdp_two_processes_match_one_resume_after_a_kill_and_load_anywhere(tmp_path):
    duollm("train", "--out", tmp_path / "one", *COMMON)
    torchrun("train", "--out", tmp_path / "two", *COMMON, "train.parallel=fsdp")
    one = [row for row in losses(tmp_path / "one") if row[1] is not None]
    two = [row for row in losses(tmp_path / "two") if row[1] is not None]
    assert [s for s, *_ in one] == [s for s, *_ in two] == list(range(1, 9))
    for (_, a, _), (_, b, _) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-4)  # the stated tolerance: float sums in another order
    assert_same_weights(tmp_path / "one", tmp_path / "two", rtol=1e-4, atol=1e-5)

    # killed (the whole torchrun group) after its first checkpoint, then resumed under FSDP: the same run
    cut = tmp_path / "cut"
    proc = torchrun("train", "--out", cut, *COMMON, "train.parallel=fsdp", "train.steps=40",
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before the kill"
    torchrun("train", "--out", cut, "--resume", *COMMON, "train.parallel=fsdp", "train.steps=40")
    duollm("train", "--out", tmp_path / "whole", *COMMON, "train.steps=40")
    assert max(s for s, *_ in losses(cut)) == 40
    assert_same_weights(cut, tmp_path / "whole", rtol=1e-3, atol=1e-5)

    # the checkpoint is the one format: one process evaluates it and resumes it (under DDP's default)
    proc = duollm("eval", tmp_path / "two", "--json")
    assert '"ppl"' in proc.stdout
    duollm("train", "--out", tmp_path / "two", "--resume", *COMMON, "train.steps=10")
    assert losses(tmp_path / "two")[-1][0] == 10


def test_parallel_must_be_ddp_or_fsdp(tmp_path):
    proc = duollm("train", "--config", "tiny", "--out", tmp_path / "r", "--set", "train.parallel=zero3", check=False)
    assert proc.returncode != 0 and "train.parallel ddp or fsdp" in proc.stderr and not (tmp_path / "r").exists()
