"""Run folders the study makes inside a run: the null control (``RUN/null``), the Stage-1 models; each shares
the run's tokenizer and token cache (hard links where possible), so it trains on and is scored on exactly
the run's tokens."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .. import rundir
from ..checkpoint import save_checkpoint
from ..config import RunConfig, load_run_config, save_config
from ..io import atomic_path
from ..model.model import DuoModel


def _link_or_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed: copy
            shutil.copyfile(src, tmp)


def make_sub_run(run: Path, out: Path, cfg: RunConfig) -> Path:
    """``out``: a run folder for ``cfg`` sharing ``run``'s tokenizer and token cache (hard links where
    possible), so that it trains on and is scored on exactly the run's tokens. No checkpoint yet."""
    with rundir.writing(out, create=True):
        save_config(cfg, rundir.config_path(out))
        src = rundir.tokenizer_file(run)
        if src.is_dir():
            shutil.copytree(src, out / src.name, dirs_exist_ok=True)
        else:
            _link_or_copy(src, out / src.name)
        for f in sorted(rundir.data_dir(run).iterdir()):
            if not f.name.startswith("."):
                _link_or_copy(f, rundir.data_dir(out) / f.name)  # token caches can be large: a hard link where possible
    return out


def make_null_run(run: Path) -> Path:
    """``RUN/null/``: the run's model at initialisation (its training seed, step 0) in a sub-run folder;
    the null control of DESIGN 4.4a."""
    cfg = load_run_config(run)
    out = make_sub_run(run, rundir.null_dir(run), cfg)
    with rundir.writing(out):
        torch.manual_seed(cfg.train.seed)  # as pretraining does before it builds the model
        save_checkpoint(out, DuoModel(cfg.model), {"step": 0})
    return out
