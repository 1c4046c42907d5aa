"""Stage 1 training: seeded runs repeat exactly, resume == uninterrupted, DDP == one process, NaN stops."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import duollm
from safetensors.torch import load_file

from duollm import train as train_mod  # the loop draws its batches with train.sample_batch
from duollm.config import load_config
from duollm.train import pretrain

QUICK = ["train.steps=12", "train.save_every=4", "train.eval_every=6", "train.log_every=2"]


def losses(run):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("train/loss"), r.get("val/all_big")) for r in rows]


def weights(run):
    return load_file(str(run / "latest" / "model.safetensors"))


def assert_same_weights(a, b, **tol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if tol:
            torch.testing.assert_close(wa[k], wb[k], **tol)
        else:
            assert torch.equal(wa[k], wb[k]), k


def test_seeded_runs_repeat_exactly(tmp_path):
    cfg = load_config("tiny", QUICK)
    pretrain(cfg, tmp_path / "a", log=lambda *_: None)
    pretrain(cfg, tmp_path / "b", log=lambda *_: None)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    other = load_config("tiny", QUICK + ["train.seed=7"])
    pretrain(other, tmp_path / "c", log=lambda *_: None)
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = load_config("tiny", QUICK)
    pretrain(cfg, tmp_path / "full", log=lambda *_: None)

    real_sample = train_mod.sample_batch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):  # the process dies during step 7, after the step-4 checkpoint
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(train_mod, "sample_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "cut", log=lambda *_: None)
    assert (tmp_path / "cut" / "latest").resolve().name == "step-0000004"
    monkeypatch.setattr(train_mod, "sample_batch", real_sample)
    pretrain(cfg, tmp_path / "cut", resume=True, log=lambda *_: None)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert_same_weights(tmp_path / "cut", tmp_path / "full")


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU (gloo) processes, same global batch: same losses and weights (to tolerance)."""
    common = ["--config", "tiny", "--set", "train.steps=6", "train.save_every=6", "train.eval_every=6",
              "train.log_every=1", "train.batch_size=8"]
    duollm("train", "--out", tmp_path / "one", *common)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "duollm.cli", "train", "--out", tmp_path / "two", *common],
        capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [row for row in losses(tmp_path / "one") if row[1] is not None]
    two = [row for row in losses(tmp_path / "two") if row[1] is not None]
    assert [s for s, *_ in one] == [s for s, *_ in two] == [1, 2, 3, 4, 5, 6]
    for (_, a, _), (_, b, _) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-4)
    assert_same_weights(tmp_path / "one", tmp_path / "two", rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    """A fresh run that diverges (the reliability issue's item 4 is in test_faults.py too)."""
    run = tmp_path / "nan"
    proc = duollm("train", "--config", "tiny", "--out", run, "--set", "train.steps=30", "train.save_every=2",
                  "train.lr=1e12", "train.min_lr=0", "train.warmup_steps=0", "train.grad_clip=0", check=False)
    assert proc.returncode != 0
    msg = proc.stderr.strip().splitlines()[-1]
    assert "training diverged" in msg and "Traceback" not in proc.stderr
    kept = (run / "latest").resolve().name if (run / "latest").exists() else None
    if kept is not None:
        assert kept in msg
        assert all(torch.isfinite(v).all() for v in weights(run).values())
    else:
        assert "no checkpoint was written yet" in msg
