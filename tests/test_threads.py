"""The thread governor (duollm/threads.py): threads follow the cores other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from duollm import threads
from duollm.cli import main
from duollm.config import load_config


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


@pytest.mark.skipif(threads.busy_jiffies([0]) is None, reason="needs /proc/stat")
def test_a_busy_process_is_seen_as_one_core(restore_threads):
    g = threads.ThreadGovernor(None)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        g.others()  # start the reading with the competitor running
        time.sleep(1.0)
        others = g.others()
    finally:
        hog.kill()
        hog.wait()
    assert 0.6 < others < 1.6


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
