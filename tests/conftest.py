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
