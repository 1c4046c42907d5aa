"""Fault injection: no input, crash, full disk or second process may lose or corrupt a run folder.

Each numbered reproduction of the reliability issue is a test here (the number in the test's
docstring). Refusals must leave the run folder byte-identical (``snapshot``), give one line on
stderr and a non-zero exit. Most commands run in-process through ``cli.main`` (seconds faster
than a subprocess); cross-process behaviour (the lock, hash seeds, undecodable argv) uses real
subprocesses.
"""

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_CORPUS, assert_one_line_error, copy_trained, duollm, error_lines, snapshot
from conftest import cli as run_cli

QUIET = ["train.log_every=5"]


def cli(*args):
    """``duollm ARGS`` in-process: (exit code, the stderr lines that are not progress bars)."""
    proc = run_cli(*args, check=False)
    return proc.returncode, error_lines(proc.stderr)


def refused(*args, fragment: str = "", code: int = 2):
    proc = run_cli(*args, check=False)
    assert proc.returncode == code, proc.stderr
    return assert_one_line_error(proc, fragment)


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy of the trained tiny run (30 steps, checkpoint step-0000030)."""
    return copy_trained(tiny_run, tmp_path / "run")


@pytest.fixture
def other_text(tmp_path) -> Path:
    path = tmp_path / "other.txt"
    path.write_text(SHARED_CORPUS.read_text()[:200_000])
    return path


@contextlib.contextmanager
def mounted(target: Path, options: str, source: str | None = None):
    """A tmpfs (``source`` None) or a bind mount of ``source`` on ``target`` with mount ``options``;
    skips the test where mounting is not allowed (CI runs as root)."""
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting needs root")
    steps = ([["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)]] if source is None else
             [["mount", "--bind", source, str(target)], ["mount", "-o", f"remount,bind,{options}", str(target)]])
    try:
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"mounting is not allowed here: {proc.stderr.strip()}")
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def temporaries(folder: Path) -> list[str]:
    return [str(p) for p in Path(folder).rglob(".*.tmp")]


# ----------------------------------------------------------------------------- 1, 3: refused train / resume


@pytest.mark.parametrize("extra,fragment", [
    (["--data", "file:{other}"], "already holds a checkpoint"),
    (["--set", "model.vocab_size=1024"], "already holds a checkpoint"),
    (["--set", "model.d_model=64"], "already holds a checkpoint"),
    (["--resume", "--data", "file:{other}"], "data.spec"),
    (["--resume", "--set", "model.vocab_size=1024"], "model.vocab_size is 512 in the run but 1024"),
    (["--resume", "--set", "train.steps=10"], "already trained to step 30"),
    (["--resume", "--set", "train.lr=0.01"], "train.lr"),
    (["--resume", "--config", "cpu"], "in the run but"),
])
def test_refused_train_leaves_the_run_byte_identical(run, other_text, extra, fragment):
    """1 and 3: a refused train or resume changes nothing (tokenizer, data, config stay)."""
    before = snapshot(run)
    extra = [a.format(other=other_text) for a in extra]
    base = [] if "--resume" in extra else ["--config", "tiny"]
    refused("train", *base, "--out", run, *extra, fragment=fragment)
    assert snapshot(run) == before


def test_resume_may_extend_steps_and_says_which_keys_it_may_change(run):
    rc, _ = cli("train", "--resume", "--out", run, "--set", "train.steps=35", "train.save_every=35", *QUIET)
    assert rc == 0 and (run / "latest").resolve().name == "step-0000035"
    assert "steps: 35" in (run / "config.yaml").read_text()
    line = refused("train", "--resume", "--out", run, "--set", "train.seed=3")
    assert "train.steps" in line and "train.seed" in line


def test_train_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    refused("train", "--config", "tiny", "--out", tmp_path / "notes", fragment="holds no run")
    assert os.listdir(tmp_path / "notes") == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    refused("train", "--config", "tiny", "--out", tmp_path / "file", fragment="is not a folder")
    refused("run", "--config", "tiny", "--out", tmp_path / "file", fragment="is not a folder")
    assert (tmp_path / "file").read_text() == "x"


# ----------------------------------------------------------------------------- 2: dangling latest


def test_dangling_latest_falls_back_to_the_newest_complete_checkpoint(run):
    """2: latest -> step-9999999 (missing): resume continues step-0000030, deletes nothing, keeps metrics."""
    rows_before = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "latest").unlink()
    (run / "latest").symlink_to("step-9999999")
    rc, _ = cli("train", "--resume", "--out", run, "--set", "train.steps=45", "train.save_every=15", *QUIET)
    assert rc == 0
    assert (run / "latest").resolve().name == "step-0000045"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[: len(rows_before)] == rows_before and rows[-1]["step"] == 45


def test_no_complete_checkpoint_behind_a_dangling_latest_refuses(run):
    shutil.rmtree(run / "step-0000030")
    before = snapshot(run)
    refused("train", "--resume", "--out", run, fragment="not a complete checkpoint")
    assert snapshot(run) == before


def test_an_incomplete_newer_step_folder_is_not_used_or_deleted_wrongly(run):
    """A crash can leave only temporaries; a step folder without its state is not a checkpoint."""
    (run / "step-0000099").mkdir()
    (run / "step-0000099" / "model.safetensors").write_bytes(b"half")
    from duollm.checkpoint import latest_checkpoint

    assert latest_checkpoint(run).name == "step-0000030"
    (run / "latest").unlink()
    assert latest_checkpoint(run).name == "step-0000030"  # a missing latest: the newest complete one


# ----------------------------------------------------------------------------- 4: non-finite guard


def test_divergence_names_a_checkpoint_that_is_really_good(tmp_path):
    """4: lr=1e6 diverges; the named last good checkpoint holds finite weights with a finite loss."""
    out = tmp_path / "hot"
    line = refused("train", "--config", "tiny", "--out", out, "--set", "train.lr=1e6", "train.min_lr=0",
                   "train.save_every=1", "train.eval_every=100", *QUIET, fragment="training diverged")
    assert "at step" in line
    from duollm.checkpoint import latest_checkpoint, load_model
    from duollm.data.cache import eval_tokens

    kept = latest_checkpoint(out)
    if kept is None:
        assert "no checkpoint was written yet" in line
        return
    assert kept.name in line
    model, cfg = load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    idx_ST, tgt_ST = eval_tokens(out, cfg)
    with torch.no_grad():
        assert torch.isfinite(model(idx_ST[:4], tgt_ST[:4], routes="B" * 4).loss)


def test_the_loop_checks_the_gradient_norm_before_the_step(tmp_path, monkeypatch):
    """4: a non-finite gradient norm stops training before the optimizer sees it. The step-4 weights
    gave that gradient, so their checkpoint is not called good: step-0000002 is the last good one."""
    import duollm.train.loop as train_mod
    from duollm.config import load_config

    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def poisoned(params, max_norm, *a, **k):
        calls["n"] += 1
        norm = real(params, max_norm, *a, **k)
        return torch.tensor(float("inf")) if calls["n"] == 5 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    cfg = load_config("tiny", ["train.steps=8", "train.save_every=2", "train.eval_every=100"])
    with pytest.raises(ValueError, match="gradient norm is inf at step 5; the last good checkpoint .step-0000002"):
        train_mod.pretrain(cfg, tmp_path / "g", log=lambda *_: None)


# ----------------------------------------------------------------------------- 5, 10: ranges


@pytest.mark.parametrize("setting,fragment", [
    ("train.grad_clip=-1", "grad_clip must be"),
    ("train.warmup_steps=-3", "warmup_steps must be >= 0"),
    ("train.lr=nan", "lr must be a finite positive"),
    ("train.beta1=2", "beta1 must be in [0, 1)"),
    ("train.weight_decay=-0.1", "weight_decay"),
    ("train.device=tpu", "train.device must be"),
    ("routing.p_big=nan", "route probabilities"),
    ("data.split_chunk_chars=0", "split_chunk_chars"),
    ("eval.max_tokens=0", "eval.max_tokens"),
])
def test_out_of_range_values_are_refused_before_anything_is_written(tmp_path, setting, fragment):
    refused("train", "--config", "tiny", "--out", tmp_path / "r", "--set", setting, fragment=fragment)
    assert not (tmp_path / "r").exists()


def test_a_refused_router_leaves_no_trace(run):
    """5: a router refused for its settings (or for a missing oracle) writes nothing."""
    before = snapshot(run)
    refused("router", run, "--target", "0.5", "--set", "train.lr=nan", fragment="router train.lr")
    refused("router", run, "--target", "0.5", "--method", "imitation", fragment="imitation needs an oracle")
    refused("router", run, "--target", "0.5", "--set", "train.grad_clip=-1", fragment="grad_clip")
    assert snapshot(run) == before


@pytest.mark.parametrize("args,fragment", [
    (["eval", "{run}", "--max-tokens", "0"], "--max-tokens must be an integer >= 1, or all"),
    (["eval", "{run}", "--max-tokens", "-5"], "--max-tokens must be an integer >= 1"),
    (["oracle", "{run}", "--max-tokens", "0"], "--max-tokens must be an integer >= 1"),
    (["oracle", "{run}", "--batch-tokens", "0"], "--batch-tokens must be positive"),
    (["oracle", "{run}", "--device", "quantum"], "device must be"),
    (["generate", "{run}", "--prompt", "x", "--temperature", "nan"], "--temperature must be a finite"),
    (["generate", "{run}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "{run}", "--per-token", "{run}"], "is a folder"),
])
def test_bad_numbers_and_paths_get_one_line(run, args, fragment):
    before = snapshot(run)
    refused(*[a.format(run=run) for a in args], fragment=fragment)
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- 6: environment errors


def test_disk_full_during_train_is_one_line_and_leaves_no_temporaries(tmp_path):
    with mounted(tmp_path / "small", "size=160k") as disk:
        rc, lines = cli("train", "--config", "tiny", "--out", disk / "r", "--set", *QUIET)
        assert rc == 1 and len(lines) == 1, lines
        assert "No space left on device" in lines[0] and str(disk / "r") in lines[0]
        assert temporaries(disk) == []


def test_disk_full_during_the_oracle_and_stale_temporaries_cleaned(run, tmp_path):
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    with mounted(tmp_path / "small", f"size={size // 1024 + 1200}k") as disk:  # room for the outputs
        copy = disk / "run"
        shutil.copytree(run, copy, symlinks=True)
        stale = copy / "oracle" / f".summary.json.{uuid.uuid4().hex[:6]}.tmp"  # what a kill -9 leaves
        stale.parent.mkdir(parents=True)
        stale.write_text("{")
        filler = disk / "filler"  # leave ~40 KB free: some chunks fit, the outputs do not
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 40_000))
        # the loss matrix (16 patterns x 1024 tokens) is reserved up front: no SIGBUS from a memory map later
        rc, lines = cli("oracle", copy, "--batch-tokens", "256", "--save-matrix")
        assert rc == 1 and len(lines) == 1 and "loss_matrix.npy: No space left on device" in lines[0], lines
        assert temporaries(copy) == []  # its own and the stale one
        rc, lines = cli("oracle", copy, "--batch-tokens", "256")
        assert rc == 1 and len(lines) == 1 and "No space left on device" in lines[0], lines
        assert temporaries(copy) == []
        filler.unlink()
        rc, lines = cli("oracle", copy, "--batch-tokens", "256")  # resumes from the saved chunks
        assert rc == 0, lines
        assert cli("oracle", run, "--batch-tokens", "256")[0] == 0  # uninterrupted, on the disk
        for name in ("oracle_loss.npy", "per_token.parquet", "patterns.parquet"):
            assert (copy / "oracle" / "SB-shared" / name).read_bytes() == (run / "oracle" / "SB-shared" / name).read_bytes()


def test_read_only_run_folder(run, tmp_path):
    with mounted(tmp_path / "ro", "ro", source=str(run)) as ro:
        before = snapshot(ro)
        rc, lines = cli("oracle", ro, "--patterns", "BBBB")
        assert rc == 1 and len(lines) == 1 and "Read-only file system" in lines[0], lines
        rc, lines = cli("report", ro)
        assert rc == 1 and len(lines) == 1 and "Read-only file system" in lines[0], lines
        assert snapshot(ro) == before
        rc, _ = cli("eval", ro, "--json")  # reading still works
        assert rc == 0


# ----------------------------------------------------------------------------- 7: one writer


def test_a_second_writer_is_refused_with_the_holders_pid(run):
    from duollm.rundir import writing

    with writing(run):
        proc = duollm("train", "--resume", "--out", run, "--set", "train.steps=40", check=False)
        assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stderr.strip().splitlines()[-1], proc.stderr
        proc = duollm("oracle", run, "--patterns", "BBBB", check=False)
        assert proc.returncode == 2 and "in use by another duollm command" in proc.stderr
    assert not (run / ".lock").exists()  # released and removed: a finished command leaves no lock file
    rc, _ = cli("train", "--resume", "--out", run, "--set", "train.steps=35", *QUIET)
    assert rc == 0


def test_two_concurrent_trainings_into_one_folder(tmp_path):
    out = tmp_path / "race"
    cmd = [sys.executable, "-m", "duollm.cli", "train", "--config", "tiny", "--out", str(out), "--set",
           "train.steps=200", "train.save_every=50"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until the first holds the lock
            if (out / ".lock").exists() and (out / "config.yaml").exists():
                break
            if first.poll() is not None:
                break
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "in use by another duollm command" in second.stderr or "already holds a checkpoint" in second.stderr
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len([s for s in steps if s == 200]) == 2  # one train row, one val row


# ----------------------------------------------------------------------------- 8: torn metrics line


def test_a_torn_last_metrics_line_is_dropped_on_resume(run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "train/lo')
    rc, err = cli("train", "--resume", "--out", run, "--set", "train.steps=35", *QUIET)
    assert rc == 0 and any("torn last line" in ln for ln in err), err
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 35


# ----------------------------------------------------------------------------- 9: router reference


def test_frozen_oracle_with_a_router_reference_through_the_cli(run):
    rc, _ = cli("router", run, "--target", "0.5", "--steps", "4")
    assert rc == 0
    rc, _ = cli("oracle", run, "--context", "frozen", "--reference", "router:budget-0.50", "--max-tokens", "64")
    assert rc == 0
    summary = json.loads((run / "oracle" / "SB-frozen-router:budget-0.50" / "summary.json").read_text())
    assert summary["context"] == "frozen" and summary["tokens"] == 64
    refused("oracle", run, "--context", "frozen", "--reference", "router:nope", fragment="no router 'nope'")


# ----------------------------------------------------------------------------- 10: literal paths, messages, bytes


@pytest.mark.parametrize("name", ["a #b.txt", "my: notes.txt"])
def test_data_paths_are_taken_literally(tmp_path, other_text, name):
    shutil.copy(other_text, tmp_path / name)
    rc, _ = cli("train", "--config", "tiny", "--data", f"file:{tmp_path / name}", "--out", tmp_path / "r",
                "--set", "train.steps=2", *QUIET)
    assert rc == 0
    assert name in (tmp_path / "r" / "config.yaml").read_text()


@pytest.mark.parametrize("spec,fragment", [
    ("hf:", "hf: needs a dataset name"),
    ("file:", "file: needs a path"),
    ("corpus.txt", "must start with builtin:, file: or hf:"),
    ("builtin:nope", "unknown builtin corpus"),
])
def test_malformed_data_specs(tmp_path, spec, fragment):
    refused("train", "--config", "tiny", "--data", spec, "--out", tmp_path / "r", fragment=fragment)
    assert not (tmp_path / "r").exists()


def test_a_vocabulary_mismatch_is_named_as_such(run):
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("vocab_size: 512", "vocab_size: 1024"))
    line = refused("eval", run, fragment="does not match the model config")
    assert "corrupt" not in line and "vocab_size" in line


def test_checkpoints_are_byte_deterministic_with_normal_permissions(tmp_path):
    """Two identical runs in processes with different hash seeds write identical files, mode 0644."""
    for i, seed in enumerate(("1", "2")):
        subprocess.run([sys.executable, "-m", "duollm.cli", "train", "--config", "tiny", "--out", str(tmp_path / str(i)),
                        "--set", "train.steps=3"], env={**os.environ, "PYTHONHASHSEED": seed}, check=True,
                       capture_output=True)
    a, b = (snapshot(tmp_path / str(i) / "step-0000003") for i in range(2))
    assert a == b and a["model.safetensors"][2] == 0o666 & ~_umask()
    metrics = [(tmp_path / str(i) / "metrics.jsonl").read_text() for i in range(2)]
    assert [json.loads(ln)["train/loss"] for ln in metrics[0].splitlines() if "train/loss" in ln] == \
           [json.loads(ln)["train/loss"] for ln in metrics[1].splitlines() if "train/loss" in ln]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- loading runs no code


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_crafted_trainer_state_runs_no_code(run, tmp_path):
    ckpt = run / "step-0000030"
    for name in ("trainer_state.json", "optimizer.safetensors"):
        (ckpt / name).unlink()
    marker = tmp_path / "pwned"
    with open(ckpt / "trainer_state.pt", "wb") as f:  # the legacy format, pickled by an attacker
        pickle.dump({"step": 30, "optimizer": _Payload(marker)}, f)
    refused("train", "--resume", "--out", run, "--set", "train.steps=35", fragment="trainer_state.pt")
    assert not marker.exists()


def test_a_legacy_trainer_state_still_resumes(run):
    from duollm.checkpoint import load_state

    ckpt = run / "step-0000030"
    torch.save(load_state(ckpt), ckpt / "trainer_state.pt")
    for name in ("trainer_state.json", "optimizer.safetensors"):
        (ckpt / name).unlink()
    rc, _ = cli("train", "--resume", "--out", run, "--set", "train.steps=32", "train.log_every=1")
    assert rc == 0 and (run / "latest").resolve().name == "step-0000032"


# ----------------------------------------------------------------------------- copies, moves, links


def test_copied_moved_and_linked_runs_resume_like_the_original(run, tmp_path):
    from safetensors.torch import load_file

    copies = {"cp -a": tmp_path / "a", "cp -rL": tmp_path / "L", "mv": tmp_path / "moved"}
    shutil.copytree(run, copies["cp -a"], symlinks=True)
    shutil.copytree(run, copies["cp -rL"], symlinks=False)  # latest becomes a plain folder
    original = tmp_path / "orig"
    shutil.copytree(run, original, symlinks=True)
    run.rename(copies["mv"])
    (tmp_path / "link").symlink_to(copies["mv"])
    copies["symlink"] = tmp_path / "link"
    rc, _ = cli("train", "--resume", "--out", original, "--set", "train.steps=33", "train.log_every=1")
    assert rc == 0
    want = load_file(str(original / "latest" / "model.safetensors"))
    for how, folder in copies.items():
        rc, _ = cli("train", "--resume", "--out", folder, "--set", "train.steps=33", "train.log_every=1")
        assert rc == 0, how
        assert (folder / "latest").is_symlink() and (folder / "latest").resolve().name == "step-0000033", how
        got = load_file(str(folder / "latest" / "model.safetensors"))
        assert all(torch.equal(want[k], got[k]) for k in want), how
        assert losses(folder) == losses(original), how


def losses(run: Path) -> list:
    return [(r["step"], r["train/loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r]


def test_undecodable_prompt_is_one_line(run):
    proc = subprocess.run([sys.executable, "-m", "duollm.cli", "generate", str(run), "--prompt", b"caf\xff".decode(
        "utf-8", "surrogateescape")], capture_output=True, text=True)
    assert proc.returncode == 2 and "not valid UTF-8" in proc.stderr and "Traceback" not in proc.stderr


def test_per_token_output_is_written_whole(run, tmp_path):
    rc, _ = cli("eval", run, "--per-token", tmp_path / "deep" / "l.npy")
    assert rc == 0 and np.load(tmp_path / "deep" / "l.npy").dtype == np.float32
    assert temporaries(tmp_path) == []


# ----------------------------------------------------------------------------- kill -9


def _outputs(folder: Path, names) -> dict:
    return {n: (folder / n).read_bytes() for n in names}


@pytest.mark.parametrize("what", ["train", "oracle", "router", "run"])
def test_kill_9_mid_run_then_rerun_gives_identical_outputs(tiny_run, tmp_path, what):
    """SIGKILL once the command has saved some work (plus a random delay), rerun: byte-identical results."""
    import random
    import signal

    rng = random.Random(f"kill-{what}")
    if what == "train":
        args = lambda out: ["train", "--config", "tiny", "--out", out, "--set", "train.steps=90", "train.save_every=10",
                            "train.eval_every=30"]
        again = lambda out: args(out) + ["--resume"]
        started = lambda out: (out / "latest").exists()
        compare = lambda out: (_outputs(out / "latest", ["model.safetensors", "optimizer.safetensors"]),
                               losses(out))
    elif what == "run":  # the whole tiny study, killed inside its first oracle
        args = again = lambda out: ["run", "--config", "tiny", "--out", out]
        started = lambda out: (out / "oracle" / "SB-shared" / ".partial").is_dir()
        compare = lambda out: _outputs(out / "report", ["results.json", "report.md"])
    else:
        sub = "oracle/SB-shared" if what == "oracle" else "routers/budget-0.50"
        args = (lambda out: ["oracle", out, "--batch-tokens", "128"]) if what == "oracle" else \
            (lambda out: ["router", out, "--target", "0.5", "--steps", "60", "--set", "train.save_every=5"])
        again = (lambda out: args(out)) if what == "oracle" else (lambda out: args(out) + ["--resume"])
        marker = ".partial" if what == "oracle" else "latest"
        started = lambda out: (out / sub / marker).exists() and any((out / sub / marker).iterdir())
        files = ["oracle_loss.npy", "per_token.parquet", "patterns.parquet"] if what == "oracle" else \
            ["router.safetensors", "eval.json"]
        compare = lambda out: _outputs(out / sub, files)

    def fresh(name):  # the same folder name (the report names it), in two places
        folder = tmp_path / name / "run"
        if what not in ("train", "run"):
            copy_trained(tiny_run, folder)
        return folder

    whole = fresh("whole")
    duollm(*args(whole))
    cut = fresh("cut")
    proc = subprocess.Popen([sys.executable, "-m", "duollm.cli", *map(str, args(cut))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not started(cut) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    duollm(*again(cut))
    assert compare(cut) == compare(whole)
    assert temporaries(cut) == [] and not (cut / ".lock").exists()
    assert killed or what == "oracle", "the command finished before the kill: make it longer"


@pytest.mark.parametrize("again", [[], ["--resume"]])
def test_a_run_killed_before_its_data_was_written_restarts(tmp_path, monkeypatch, again):
    """The config is written first: a folder killed while its token cache was being written is a run
    with no checkpoint, which `train` (or `train --resume`) simply starts again."""
    import duollm.train.loop

    out = tmp_path / "r"
    real = duollm.train.loop.write_data
    monkeypatch.setattr(duollm.train.loop, "write_data", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli("train", "--config", "tiny", "--out", out, "--set", "train.steps=2")[0] == 130
    monkeypatch.setattr(duollm.train.loop, "write_data", real)
    rc, lines = cli("train", "--config", "tiny", "--out", out, "--set", "train.steps=2", *again)
    assert rc == 0, lines
    assert (out / "latest").resolve().name == "step-0000002"


def test_parquet_reads_need_no_arrow_thread_pool(tmp_path):
    """Issue 28, item 5: a study hung forever in pyarrow's AsyncScanner (its thread pools). duollm's one reader
    runs on the calling thread: with ARROW_IO_THREADS=1 and one CPU thread it reads what the writer wrote, in
    a subprocess that must finish well within its timeout; a damaged file is one line naming it."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import numpy as np, pyarrow as pa
        pa.set_cpu_count(1)
        from duollm.io import read_table, write_table
        path = {str(tmp_path / "t.parquet")!r}
        strings = pa.array(["SB", "BS"] * 500, type=pa.string()).dictionary_encode()
        write_table(path, {{"sequence": np.arange(1000), "loss": np.linspace(0, 1, 1000, dtype=np.float32),
                            "best_pattern_k1": strings}})
        for _ in range(50):
            t = read_table(path)
            assert t.num_rows == 1000 and t.column("best_pattern_k1").to_pylist()[:2] == ["SB", "BS"]
            assert read_table(path, columns=["loss"]).column_names == ["loss"]
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ARROW_IO_THREADS": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    from duollm.io import read_table

    damaged = tmp_path / "t.parquet"
    damaged.write_bytes(damaged.read_bytes()[:200])
    with pytest.raises(ValueError, match="t.parquet is not a readable parquet file"):
        read_table(damaged)


def test_a_stage_that_makes_no_progress_says_so():
    """Issue 28, item 5: the hung study printed nothing for 12 minutes. The study runs every stage under a
    watchdog that prints a line each interval in which the process used no CPU."""
    import time

    from duollm.runtime.watchdog import watchdog

    lines = []
    # os.times() counts in 10 ms ticks: at a 0.1 s interval one tick of anything (the collector, pytest) is 10% of
    # it, so the test allows half a core per interval (a sleep uses none, the busy loop all of one)
    with watchdog(lines.append, "waiting stage", every=0.1, idle_share=0.5):
        time.sleep(0.55)  # no CPU at all: a hang on a lock or a thread pool
    assert len(lines) >= 3 and all("waiting stage: no progress for" in line for line in lines)
    assert lines[1].split("for ")[1].startswith("0.2")  # the idle time adds up
    busy = []
    with watchdog(busy.append, "busy stage", every=0.1, idle_share=0.5):
        end = time.time() + 0.4
        while time.time() < end:
            sum(range(1000))
    assert busy == []


def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(run, tmp_path):
    """Issue 28, item 17: `export` onto a full disk ended in a SafetensorError traceback. Now one line naming the
    folder, exit 1 (an environment failure), and no export or temporary left on the disk."""
    with mounted(tmp_path / "small", "size=160k") as disk:
        rc, lines = cli("export", run, disk / "hf")
        assert rc == 1 and len(lines) == 1 and "No space left on device" in lines[0] and "hf" in lines[0], lines
        assert list(disk.iterdir()) == []


def test_two_exports_into_one_folder_at_once_leave_a_complete_export(run, tmp_path, monkeypatch):
    """Issue 28, item 17: two exports into one OUT at once both exited 0 and left OUT without config.json (they
    shared one temporary folder). Here a second export runs whole in the middle of the first: each writes its
    own temporary and swaps it in complete, so both succeed and OUT is a whole export (the last one's)."""
    import duollm.integrations.hf.export as export

    out = tmp_path / "hf"
    real, inner = export.load_state, []

    def second_export_meanwhile(ckpt):
        if not inner:
            inner.append(None)
            inner[0] = export.export_run(run, out, routing="S" * 4)
        return real(ckpt)

    monkeypatch.setattr(export, "load_state", second_export_meanwhile)
    assert export.export_run(run, out) == out and inner == [out]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_duo.py", "tokenizer.json", "duollm_export.json"} <= names
    assert json.loads((out / "config.json").read_text()).get("routing") != "SSSS"  # the first one swapped in last
    assert temporaries(tmp_path) == []
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


@pytest.fixture(scope="module")
def studied(tiny_run, tmp_path_factory):
    """The tiny run with an oracle and a router: the files info, report and compare read."""
    out = copy_trained(tiny_run, tmp_path_factory.mktemp("studied") / "run")
    run_cli("oracle", out, "--budgets", "1,2", "--max-tokens", "128")
    run_cli("router", out, "--target", "0.5", "--steps", "2", "--set", "train.log_every=1000")
    return out


@pytest.mark.parametrize("relpath, damage", [
    ("routers/budget-0.50/eval.json", lambda text: "[]"),
    ("oracle/SB-shared/summary.json", lambda text: text[:300]),
    ("metrics.jsonl", lambda text: "[1, 2]\n" + text),  # a torn *last* line is a killed writer's: tolerated
])
def test_damaged_json_files_are_one_line_naming_them(studied, tmp_path, relpath, damage):
    """Issue 28, item 18: info, report and compare on a run with a truncated or wrong-shaped JSON file ended
    in a traceback (TypeError: 'list' object is not a mapping) or a parser's message naming no file, and a
    report that refused still wrote a new report/. Now one line naming the file, exit 2, nothing written."""
    run = tmp_path / "run"
    shutil.copytree(studied, run, symlinks=True)
    path = run / relpath
    path.write_text(damage(path.read_text()))
    before = snapshot(run)
    for command in ("info", "report", "compare"):
        if relpath == "metrics.jsonl" and command != "report":
            continue  # info and compare do not read the training metrics
        rc, lines = cli(command, run)
        assert rc == 2 and len(lines) == 1 and relpath.split("/")[-1] in lines[0], (command, lines)
        assert snapshot(run) == before


def test_report_on_an_oracle_without_the_routers_budgets(studied, tmp_path):
    """Found probing item 18: a router whose realised compute lies between budgets the (hand-run) oracle did not
    score crashed the report with KeyError 'oracle_loss_k3'. That router is left out of the finding."""
    run = tmp_path / "run"
    shutil.copytree(studied, run, symlinks=True)
    run_cli("router", run, "--target", "1.0", "--steps", "2", "--set", "train.log_every=1000")  # k = 4: not in 1,2
    rc, lines = cli("report", run)
    assert rc == 0, lines
    found = {f["id"]: f for f in json.loads((run / "report" / "results.json").read_text())["findings"]}
    rows = (found["routers_near_baselines"]["numbers"] or {}).get("routers", [])
    assert all(r["router"] != "budget-1.00" for r in rows)


def test_router_weights_holding_nan_are_refused(studied, tmp_path):
    """Issue 28, item 16: a router whose weights hold NaN was accepted: `eval --router` printed a perplexity
    and `generate --policy router:NAME` ran, both exit 0. Both now refuse in one line naming the file."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(studied, run, symlinks=True)
    weights = run / "routers" / "budget-0.50" / "router.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights))
    before = snapshot(run)
    for args in (("eval", run, "--router", "budget-0.50"), ("generate", run, "--prompt", "The", "--policy",
                                                             "router:budget-0.50", "--max-new-tokens", "2")):
        rc, lines = cli(*args)
        assert rc == 2 and len(lines) == 1 and "router.safetensors holds non-finite weights" in lines[0], lines
    assert snapshot(run) == before


def test_resuming_a_router_with_other_options_is_refused(studied, tmp_path):
    """Issue 28, item 15: `router --name NAME --resume` with another target re-described the router: its
    router.yaml and eval.json said target 0.25 for a router trained at 0.5. A resume now continues the router
    as trained (more steps are fine) and refuses anything else in one line, changing nothing."""
    import yaml

    run = tmp_path / "run"
    shutil.copytree(studied, run, symlinks=True)
    quiet = ["--set", "train.log_every=1000", "train.save_every=1"]
    run_cli("router", run, "--name", "mine", "--target", "0.5", "--steps", "2", *quiet)
    before = snapshot(run)
    rc, lines = cli("router", run, "--name", "mine", "--target", "0.25", "--steps", "3", "--resume", *quiet)
    assert rc == 2 and len(lines) == 1 and "target=0.5" in lines[0] and "--resume continues it" in lines[0], lines
    assert snapshot(run) == before
    rc, lines = cli("router", run, "--name", "mine", "--target", "0.5", "--steps", "3", "--resume", *quiet)
    assert rc == 0, lines
    saved = yaml.safe_load((run / "routers" / "mine" / "router.yaml").read_text())["config"]
    assert saved["target"] == 0.5 and saved["train"]["steps"] == 3
    assert json.loads((run / "routers" / "mine" / "eval.json").read_text())["target"] == 0.5


def test_data_tokenizer_and_convert_mistakes_name_what_is_wrong(tmp_path):
    """Issue 28, item 12: `--data hf:FILE.jsonl` said it "couldn't find any data file" for a file that exists;
    `convert` of a missing folder said "Repo id must be in the form…"; a tokenizer failure was cut at a
    colon. Each is now one line naming the file or folder and what is wrong."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    line = refused("train", "--config", "tiny", "--data", f"hf:{data}", "--out", tmp_path / "a", fragment="names a file")
    assert f"data.data_files={data}" in line and "hf:json" in line
    line = refused("convert", tmp_path / "no-such-model", tmp_path / "b", fragment="no such folder")
    assert "no-such-model" in line and "Repo id" not in line
    refused("train", "--config", "tiny", "--set", f"data.tokenizer={tmp_path / 'no-tok'}", "--out", tmp_path / "c",
            fragment="no-tok: no such folder")
    bad = tmp_path / "badtok"
    bad.mkdir()
    (bad / "tokenizer_config.json").write_text("{}")
    line = refused("train", "--config", "tiny", "--set", f"data.tokenizer={bad}", "--out", tmp_path / "d",
                   fragment=str(bad))
    assert not line.rstrip().endswith(":") and len(line.split(f"{bad}: ", 1)[1]) > 40  # the reason, not cut at a colon


def test_a_saved_dataset_dicts_other_splits_are_said_to_be_unused(tmp_path):
    """Issue 28, item 12: a DatasetDict folder's own validation split was silently ignored (its train split is
    split by data.val_fraction, as every corpus is): the run says so."""
    datasets = pytest.importorskip("datasets")
    text = SHARED_CORPUS.read_text()[:120_000].split("\n\n")
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": text[:-50]}),
                          "validation": datasets.Dataset.from_dict({"text": text[-50:]})}).save_to_disk(str(folder))
    proc = run_cli("train", "--config", "tiny", "--data", f"hf:{folder}", "--out", tmp_path / "r", "--set",
                   "train.steps=1", "train.eval_every=100")
    assert "its validation split is not used" in proc.stderr
