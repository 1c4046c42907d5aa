import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors: one intra-op thread avoids thread wake-up costs (10x on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpora" / "tinyshakespeare.txt"


def cli(*args, check=True):
    """The command line in this process (``cli.main``; seconds faster than a subprocess): an object with
    ``returncode``, ``stdout`` and ``stderr`` like ``subprocess.CompletedProcess``."""
    import contextlib
    import io
    import types

    from duollm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    proc = types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())
    if check and rc != 0:
        raise AssertionError(f"duollm {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not progress bars or training logs."""
    return [ln for ln in stderr.splitlines() if ln.strip() and "\r" not in ln and "it/s" not in ln and "s/it" not in ln
            and "tok/s" not in ln
            and not ln.startswith(("pretrain", "router ", "step "))]


def assert_one_line_error(proc, *fragments):
    """Bad input: a non-zero exit, no traceback, one line on stderr holding every fragment."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def duollm(*args, check=True, cwd=None):
    """Run the real command line in a subprocess; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "duollm.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"duollm {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny model trained on the embedded corpus (a few seconds), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    duollm("train", "--config", "tiny", "--out", out)
    return out


def copy_trained(run: Path, dst: Path) -> Path:
    """A copy of a run's training outputs only (config, tokenizer, data, checkpoint, metrics): other
    tests add oracles and routers to the shared ``tiny_run``, and a copy must not depend on their order."""
    import shutil

    shutil.copytree(run, dst, symlinks=True, ignore=lambda d, names: [n for n in names if Path(d) == Path(run)
                                                                     and n in ("oracle", "routers", "study", "report")])
    return dst


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder``: file bytes (hash) and mode, symlink targets, folders."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode & 0o777)
    return out
