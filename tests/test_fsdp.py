"""FSDP (``train.parallel=fsdp``, issue 17) on CPU: 2 gloo processes under torchrun train like 1
process, survive a kill, and write the one checkpoint format every other command loads."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import cli

from duollm import rundir
from test_train import assert_same_weights, losses

STEPS = 24  # long enough to be killed mid-run after its first checkpoint (step 2)
COMMON = ["--config", "tiny", "--set", f"train.steps={STEPS}", "train.save_every=2", f"train.eval_every={STEPS}",
          "train.log_every=1", "train.batch_size=8"]


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
    """One FSDP run, killed (the whole torchrun group, SIGKILL) after its first checkpoint and resumed under
    FSDP, against one process: every step's loss and the final weights (torchrun's start-up is most of the cost)."""
    cli("train", "--out", tmp_path / "one", *COMMON)
    two = tmp_path / "two"
    proc = torchrun("train", "--out", two, *COMMON, "train.parallel=fsdp", stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (two / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before the kill"
    torchrun("train", "--out", two, "--resume", *COMMON, "train.parallel=fsdp")
    one = [row for row in losses(tmp_path / "one") if row[1] is not None]
    got = [row for row in losses(two) if row[1] is not None]
    assert [s for s, *_ in one] == [s for s, *_ in got] == list(range(1, STEPS + 1))
    for (_, a, _), (_, b, _) in zip(one, got):
        assert a == pytest.approx(b, rel=1e-4)  # the stated tolerance: float sums in another order
    assert_same_weights(tmp_path / "one", two, rtol=1e-4, atol=1e-5)

    # the checkpoint is the one format: one process evaluates it, runs the oracle and a router on it, resumes it
    proc = cli("eval", two, "--json")
    assert '"ppl"' in proc.stdout
    cli("oracle", two, "--budgets", "2", "--max-tokens", "256")
    cli("router", two, "--target", "0.5", "--steps", "4")
    assert rundir.oracle_names(two) and rundir.router_names(two)
    cli("train", "--out", two, "--resume", *COMMON, f"train.steps={STEPS + 2}")
    assert losses(two)[-1][0] == STEPS + 2


def test_parallel_must_be_ddp_or_fsdp(tmp_path):
    proc = cli("train", "--config", "tiny", "--out", tmp_path / "r", "--set", "train.parallel=zero3", check=False)
    assert proc.returncode != 0 and "train.parallel ddp or fsdp" in proc.stderr and not (tmp_path / "r").exists()
