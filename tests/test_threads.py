"""The thread governor (duollm/threads.py): threads follow the cores other processes leave free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from duollm.cli import main
from duollm.config import load_config
from duollm.runtime import threads


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
    threads.configure(None)


def test_the_count_is_the_free_cores_rounded(restore_threads):
    g = threads.ThreadGovernor(None, max_threads=2)
    g.cores = [0, 1]
    assert [g.decide(o) for o in (0.0, 0.3, 0.67, 1.0, 1.6, 5.0)] == [2, 2, 1, 1, 1, 1]
    g.max_threads = 8
    g.cores = list(range(8))
    assert g.decide(2.2) == 6 and g.decide(0.0) == 8


def test_poll_follows_the_readings_and_a_fixed_count_stays(restore_threads, monkeypatch):
    g = threads.ThreadGovernor(None, interval=0.0, max_threads=2)
    g.cores = [0, 1]
    monkeypatch.setattr(g, "others", lambda: 1.0)
    assert g.poll() == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(g, "others", lambda: 0.0)
    assert g.poll() == 2 and torch.get_num_threads() == 2 and g.changes == 2
    fixed = threads.ThreadGovernor(1, interval=0.0, max_threads=2)
    monkeypatch.setattr(fixed, "others", lambda: 0.0)
    assert fixed.poll() == 1 and torch.get_num_threads() == 1


def _others_beside(start) -> float:
    g = threads.ThreadGovernor(None)
    stop = start()
    try:
        time.sleep(0.3)
        g.others()  # start the reading with the process running
        time.sleep(1.0)
        return g.others()
    finally:
        stop()


@pytest.mark.skipif(threads.busy_jiffies([0]) is None, reason="needs /proc/stat")
def test_a_busy_process_is_seen_as_one_core_and_our_own_child_as_none(restore_threads):
    def stranger():  # not our descendant: started by a shell that exits at once (the hog is reparented)
        out = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True)
        pid = int(out.stdout)
        return lambda: os.kill(pid, signal.SIGKILL)

    def child():  # ours, as torch.compile's compile workers are
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return lambda: (hog.kill(), hog.wait())

    assert 0.6 < _others_beside(stranger) < 1.6
    assert _others_beside(child) < 0.4


def test_threads_is_validated_everywhere(restore_threads, capsys):
    with pytest.raises(ValueError, match="threads must be"):
        threads.ThreadGovernor(-1)
    assert main(["info", "--config", "tiny", "--threads", "-1"]) == 2
    assert "threads must be" in capsys.readouterr().err
    with pytest.raises(ValueError, match="threads must be"):
        load_config("tiny", ["threads=-2"])
    assert main(["info", "--config", "tiny", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    # a config's value does not override the command line's
    threads.configure(2)
    assert torch.get_num_threads() == 1


def test_importing_duollm_flushes_denormals_to_zero():
    # a model at initialisation makes denormals, and x86 cores compute them many times slower (duollm/__init__.py)
    tiny_BD = torch.full((4, 4), 1e-39)  # below float32's smallest normal, 1.18e-38
    assert (tiny_BD * 1.0).abs().max().item() == 0.0


def test_the_governor_says_once_when_it_first_changes_the_count(restore_threads, monkeypatch, capsys):
    """Issue 28, item 14: the governor changed torch's thread count silently. The first change is said on
    stderr, with how to fix the count; later changes are not repeated."""
    g = threads.ThreadGovernor(None, interval=0.0, max_threads=2)
    g.cores = [0, 1]
    for busy in (1.0, 0.0, 1.0):
        monkeypatch.setattr(g, "others", lambda busy=busy: busy)
        g.poll()
    lines = capsys.readouterr().err.strip().splitlines()
    assert g.changes == 3 and len(lines) == 1
    assert "torch threads 2 -> 1" in lines[0] and "--threads N" in lines[0]


def test_an_out_of_range_thread_count_is_refused_before_torch_sees_it(tiny_run):
    """Issue 28, item 21: `--threads 1000000` on `info` or `eval` exhausted the system's threads and crashed
    the process (exit 139, nothing on stderr). It is now one line, exit 2, before torch is asked."""
    for args in (["info", "--config", "tiny"], ["eval", str(tiny_run)]):
        proc = subprocess.run([sys.executable, "-m", "duollm", *args, "--threads", "1000000"], capture_output=True,
                              text=True, timeout=120)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "threads must be at most" in lines[0], proc.stderr
    with pytest.raises(ValueError, match="threads must be at most"):
        load_config("tiny", [f"threads={threads.thread_limit() + 1}"])
