"""Stage 1 training: seeded runs repeat exactly, resume == uninterrupted, DDP == one process, NaN stops."""

import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import duollm
from safetensors.torch import load_file

from duollm.config import load_config
from duollm.train import loop as train_mod  # the loop draws its batches with sample_batch
from duollm.train.loop import pretrain

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


def test_compiled_cpu_training_runs_deterministic_algorithms_and_restores_the_mode(tmp_path, monkeypatch):
    # inductor's CPU scatter kernels add atomically in thread order: two compiled cpu-preset runs of one seed
    # parted at step 9 (docs/LOG.md 2026-12-02); deterministic mode lowers them to ordered kernels
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)  # the mode is what is tested, not the compiler
    real_loss = train_mod.Objective.__init__

    def spying_init(self, module, loss, *a, **kw):
        def spy(net, mb):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return loss(net, mb)
        real_loss(self, module, spy, *a, **kw)

    monkeypatch.setattr(train_mod.Objective, "__init__", spying_init)
    pretrain(load_config("tiny", QUICK[:1] + ["train.compile=true"]), tmp_path / "c", log=lambda *_: None)
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()
    seen.clear()
    pretrain(load_config("tiny", QUICK[:1]), tmp_path / "e", log=lambda *_: None)  # eager: ordered already
    assert seen and not any(seen)


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


# ----------------------------------------------------------------------------- retention, pins, W&B


def step_folders(run):
    return sorted(p.name for p in run.glob("step-*"))


def test_keep_checkpoints_keeps_the_newest_step_folders(tmp_path):
    pretrain(load_config("tiny", QUICK), tmp_path / "one", log=lambda *_: None)
    assert step_folders(tmp_path / "one") == ["step-0000012"]  # the default: the newest only
    pretrain(load_config("tiny", QUICK + ["train.keep_checkpoints=2"]), tmp_path / "two", log=lambda *_: None)
    assert step_folders(tmp_path / "two") == ["step-0000008", "step-0000012"]
    assert (tmp_path / "two" / "latest").resolve().name == "step-0000012"
    assert_same_weights(tmp_path / "one", tmp_path / "two")  # retention changes nothing else


def test_a_pinned_step_folder_survives_training(tmp_path):
    """A step folder holding KEEP (duollm convert's step-0, or one a user pinned) is never deleted."""
    from duollm.checkpoint import PIN, latest_checkpoint

    run = tmp_path / "run"
    pretrain(load_config("tiny", QUICK + ["train.steps=4"]), run, log=lambda *_: None)
    (run / "step-0000004" / PIN).touch()  # what README documents: touch RUN/step-0000004/KEEP
    pretrain(load_config("tiny", QUICK + ["train.keep_checkpoints=1"]), run, resume=True, log=lambda *_: None)
    assert step_folders(run) == ["step-0000004", "step-0000012"]
    assert (run / "latest").resolve().name == "step-0000012"
    (run / "latest").unlink()
    assert latest_checkpoint(run).name == "step-0000012"  # the fall-back takes the newest, pinned or not


def test_save_checkpoint_pins_and_a_rerun_of_the_step_keeps_the_pin(tmp_path):
    from duollm.checkpoint import PIN, commit_checkpoint, latest_checkpoint, save_checkpoint, stage_checkpoint

    module = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, module, {"step": 0}, pin=True)  # as duollm convert writes step-0
    save_checkpoint(tmp_path, module, {"step": 0})  # the same step again: swapped whole, still pinned
    assert (tmp_path / "step-0000000" / PIN).is_file()
    for step in (1, 2, 3):
        commit_checkpoint(stage_checkpoint(tmp_path, module, {"step": step}), keep=2)
    assert step_folders(tmp_path) == ["step-0000000", "step-0000002", "step-0000003"]
    assert latest_checkpoint(tmp_path).name == "step-0000003"


@pytest.mark.parametrize("override,message", [
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1"),
    ("train.wandb_project=team/duo", "train.wandb_project must be at most 128 characters"),
    (f"train.wandb_tags=ok,{'x' * 65}", "W&B tags are at most 64 characters"),
])
def test_bad_retention_and_wandb_settings(tmp_path, override, message):
    from conftest import assert_one_line_error, cli

    with pytest.raises(ValueError, match=message):
        load_config("tiny", [override])
    proc = cli("train", "--config", "tiny", "--out", tmp_path / "run", "--set", override, check=False)
    assert proc.returncode == 2
    assert_one_line_error(proc, message)


def test_retention_and_wandb_settings_may_change_on_resume():
    from duollm.config import resume_conflict

    saved = load_config("tiny")
    for key in ("train.keep_checkpoints=3", "train.wandb_project=p", "train.wandb_tags=a,b", "train.wandb_dir=/x"):
        assert resume_conflict(saved, load_config("tiny", [key])) is None, key


class FakeWandbRun:
    """What the training loop calls on a W&B run."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def test_wandb_settings_reach_wandb_init(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    calls = []

    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or FakeWandbRun())
    monkeypatch.delenv("WANDB_DIR", raising=False)
    common = ["train.steps=2", "train.eval_every=2", "train.save_every=2", "train.wandb=true"]
    cfg = load_config("tiny", common + ["train.wandb_project=duo-tests", "train.wandb_tags=a, b ,",
                                        f"train.wandb_dir={tmp_path / 'wb'}"])
    pretrain(cfg, tmp_path / "a", log=lambda *_: None)
    assert {k: calls[0][k] for k in ("project", "tags", "dir")} == {"project": "duo-tests", "tags": ["a", "b"],
                                                                     "dir": str(tmp_path / "wb")}
    pretrain(load_config("tiny", common), tmp_path / "b", log=lambda *_: None)
    assert (calls[1]["project"], calls[1]["tags"], calls[1]["dir"]) == (None, None, str(tmp_path / "b"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "env"))
    pretrain(load_config("tiny", common), tmp_path / "c", log=lambda *_: None)
    assert calls[2]["dir"] == str(tmp_path / "env")  # an empty train.wandb_dir respects WANDB_DIR


def test_an_offline_wandb_run_records_project_tags_and_folder(tmp_path, monkeypatch):
    """The real wandb, offline: the run lands under train.wandb_dir and its record names project and tags."""
    pytest.importorskip("wandb")
    from duollm.config import TrainConfig
    from duollm.train.loop import MetricsLog

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "run").mkdir()
    t = TrainConfig(wandb=True, wandb_project="duo-offline", wandb_tags="tag-one,tag-two", wandb_dir=str(tmp_path / "wb"))
    log = MetricsLog(tmp_path / "run", t, 0, True, {})
    log.write(1, {"train/loss": 1.0})
    log.close()
    (record,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.time() + 30  # wandb's service process may still be writing the record (seen on a busy machine)
    while b"tag-two" not in (raw := record.read_bytes()) and time.time() < deadline:
        time.sleep(0.2)
    assert b"duo-offline" in raw and b"tag-one" in raw and b"tag-two" in raw
    assert not (tmp_path / "run" / "wandb").exists()


def test_converted_weights_survive_fine_tuning(tiny_run, tmp_path):
    """duollm convert pins its step-0: `train --resume` with the default retention keeps it beside the newest."""
    pytest.importorskip("transformers")
    from conftest import SHARED_CORPUS, cli

    from duollm.checkpoint import PIN
    from test_convert import convert_cli, pretrained

    pretrained("gpt2", tmp_path / "src", tiny_run)
    run = tmp_path / "run"
    convert_cli(tmp_path / "src", run, "--data", f"file:{SHARED_CORPUS}", "--set", "train.seq_len=32",
                "train.batch_size=4", "train.eval_tokens=64")
    assert (run / "step-0000000" / PIN).is_file()
    cli("train", "--resume", "--out", run, "--set", "train.steps=4", "train.save_every=2", "train.eval_every=4")
    assert step_folders(run) == ["step-0000000", "step-0000004"]
    assert (run / "latest").resolve().name == "step-0000004"


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """Issue 28, item 6: a resume started a second W&B run (no id was kept). The id lives in the run folder,
    and training, its resume and the study's results all pass the same one."""
    wandb = pytest.importorskip("wandb")
    calls = []

    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or FakeWandbRun())
    common = ["train.eval_every=2", "train.save_every=2", "train.wandb=true", "train.log_every=1"]
    pretrain(load_config("tiny", ["train.steps=2", *common]), tmp_path / "r", log=lambda *_: None)
    pretrain(load_config("tiny", ["train.steps=4", *common]), tmp_path / "r", resume=True, log=lambda *_: None)
    assert len(calls) == 2 and calls[0]["id"] == calls[1]["id"] and calls[1]["resume"] == "allow"
    assert json.loads((tmp_path / "r" / "wandb_run.json").read_text()) == {"id": calls[0]["id"]}
    pretrain(load_config("tiny", ["train.steps=2", *common]), tmp_path / "other", log=lambda *_: None)
    assert calls[2]["id"] != calls[0]["id"]  # another run folder, another W&B run
