"""Checkpoints: safetensors weights + trainer state, swapped in atomically.

A checkpoint is a folder ``<dir>/step-000300/`` holding ``model.safetensors`` and
``trainer_state.pt``; ``<dir>/latest`` is a symlink replaced atomically (``os.replace``)
once the folder is complete, so an interruption leaves either the old or the new
checkpoint, never half of one. For a pretraining run ``<dir>`` is the run folder itself.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

LATEST = "latest"


def save_checkpoint(ckpt_dir: Path, module: torch.nn.Module, state: dict) -> Path:
    """Write weights and ``state`` (optimizer, step, ...) as a new checkpoint; keep only it."""
    ckpt_dir = Path(ckpt_dir)
    name = f"step-{state['step']:07d}"
    final = ckpt_dir / name
    tmp = ckpt_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    st_save_model(module, str(tmp / "model.safetensors"), metadata={"step": str(state["step"])})
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    previous = latest_checkpoint(ckpt_dir)
    link_tmp = ckpt_dir / f".{LATEST}.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(name)
    os.replace(link_tmp, ckpt_dir / LATEST)
    if previous is not None and previous.name != name:
        shutil.rmtree(previous, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    link = Path(ckpt_dir) / LATEST
    if not link.is_symlink():
        return None
    target = Path(ckpt_dir) / os.readlink(link)
    return target if target.is_dir() else None


def load_weights(module: torch.nn.Module, ckpt: Path) -> None:
    path = Path(ckpt) / "model.safetensors"
    try:
        missing, unexpected = st_load_model(module, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"corrupt checkpoint {path}: {first}") from None
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_state(ckpt: Path) -> dict:
    path = Path(ckpt) / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"corrupt checkpoint {path}: {first}") from None


def load_model(run: Path, device: str | torch.device = "cpu"):
    """The trained Duo model of a run folder, in eval mode: ``(model, cfg)``."""
    from .config import load_run_config
    from .model import DuoModel

    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"run folder {run} does not exist")
    cfg = load_run_config(run)
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise ValueError(f"run folder {run} has no checkpoint (train it first)")
    model = DuoModel(cfg.model)
    load_weights(model, ckpt)
    return model.to(device).eval(), cfg
