"""Checkpoints: safetensors weights + trainer state, swapped in atomically, never lost.

A checkpoint is a folder ``<dir>/step-0000300/`` holding ``model.safetensors`` (the weights),
``optimizer.safetensors`` (the optimizer's tensors) and ``trainer_state.json`` (step and the
optimizer's other values). Nothing is pickled, so loading a checkpoint someone sent you runs no
code (DESIGN 7); folders written before this format (``trainer_state.pt``) load with
``torch.load(weights_only=True)``.

The folder is written as ``.step-0000300.tmp`` (``stage_checkpoint``) and renamed once complete
and vouched for (``commit_checkpoint``); ``<dir>/latest`` is then a symlink replaced atomically.
So an interruption leaves either the old or the new checkpoint, never half of one, and older
step folders are deleted only after a newer one is complete and linked. If ``latest`` is
missing, dangling or a plain copy (``cp -rL``), the newest complete step folder is the
checkpoint. For a pretraining run ``<dir>`` is the run folder itself.

Retention: a commit keeps the ``keep`` newest step folders (``train.keep_checkpoints``, default 1)
and deletes older ones, except pinned ones: a step folder holding a file ``KEEP`` is never
deleted (``duollm convert`` pins its ``step-0``; ``touch RUN/step-0000300/KEEP`` pins by hand).
A pin changes nothing else: ``latest`` still names the newest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import rundir
from .config import load_run_config
from .io import TMP_SUFFIX, as_os_error, atomic_path, atomic_write_json, replace_folder
from .model.model import DuoModel

LATEST = "latest"
PIN = "KEEP"  # a step folder holding this file is never deleted by retention
STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHTS, OPTIMIZER, STATE, LEGACY_STATE = "model.safetensors", "optimizer.safetensors", "trainer_state.json", "trainer_state.pt"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def step_of(ckpt: Path) -> int:
    return int(STEP_DIR.match(Path(ckpt).name).group(1))


# ----------------------------------------------------------------------------- tensors <-> files


def tied_groups(module: torch.nn.Module) -> list[list[str]]:
    """Names of the module's state, grouped by shared storage (``lm_head.weight`` is ``embed.weight``)."""
    groups: dict = {}
    for name, t in module.state_dict(keep_vars=False).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state as a name -> tensor dict, tied weights once (under the first name)."""
    state = module.state_dict(keep_vars=False)
    return {g[0]: state[g[0]].detach().cpu().contiguous() for g in tied_groups(module)}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors, atomically, sorted by name: identical tensors give identical bytes."""
    with atomic_path(path) as tmp:
        save_file({k: tensors[k] for k in sorted(tensors)}, str(tmp), metadata=metadata)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_weights(module: torch.nn.Module, ckpt: Path, what: str = "checkpoint", optional: tuple[str, ...] = ()) -> None:
    """Load ``ckpt/model.safetensors`` (or a weights file) into ``module``; one line on any mismatch.
    ``optional``: names an older file may lack (they keep the module's values)."""
    path = Path(ckpt) / WEIGHTS if Path(ckpt).is_dir() else Path(ckpt)
    state = module.state_dict()
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        loaded = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"corrupt {what} {path}: {_first_line(e)}") from None
    # a tied group is present under any of its names
    missing = [g[0] for g in tied_groups(module) if not any(k in shapes for k in g) and g[0] not in optional]
    unexpected = [k for k in shapes if k not in state]
    if missing or unexpected:
        raise ValueError(f"{what} {path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in shapes.items():
        if shape != tuple(state[k].shape):
            raise ValueError(f"{what} {path} does not match the model config: {k} has shape {list(shape)} there "
                             f"but {list(state[k].shape)} from the config (a changed model.* size, e.g. vocab_size?)")
    module.load_state_dict(loaded, strict=False)


# the optimizer's state dict: tensors into a safetensors file, the rest (ints, floats, tuples) into JSON
def _flatten(obj, prefix: str, tensors: dict):
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"tensor": prefix}
    if isinstance(obj, dict):
        return {"dict": [[k, _flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"tuple" if isinstance(obj, tuple) else "list": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")  # internal: optimizers hold none


def _unflatten(node, tensors: dict):
    (kind, value), = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: _unflatten(v, tensors) for k, v in value}
    if kind in ("list", "tuple"):
        items = [_unflatten(v, tensors) for v in value]
        return tuple(items) if kind == "tuple" else items
    return value


def tensors_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ----------------------------------------------------------------------------- checkpoints


def stage_checkpoint(ckpt_dir: Path, module: torch.nn.Module, state: dict, pin: bool = False,
                     weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write weights and ``state`` (``step``, ``optimizer``, ...) as a complete folder under a temporary
    name; ``commit_checkpoint`` makes it the checkpoint. A crash in between leaves only a temporary.
    ``pin``: the folder holds ``KEEP`` from the start, so no later commit deletes it. ``weights``: the
    module's tensors gathered elsewhere (a sharded module: ``fsdp.full_state``)."""
    ckpt_dir = Path(ckpt_dir)
    weights = module_tensors(module) if weights is None else weights
    assert tensors_finite(weights.values()), "the training loop checks the weights before it saves"
    tmp = ckpt_dir / f".{step_dir_name(state['step'])}{TMP_SUFFIX}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_tensors(tmp / WEIGHTS, weights, {"step": str(state["step"])})
        opt_tensors: dict = {}
        skeleton = {k: _flatten(v, k, opt_tensors) for k, v in state.items()}
        save_tensors(tmp / OPTIMIZER, opt_tensors)
        atomic_write_json(tmp / STATE, skeleton)
        if pin:
            (tmp / PIN).touch()
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise as_os_error(e, getattr(e, "filename", None) or tmp) from None
    return tmp


def is_pinned(folder: Path) -> bool:
    return (Path(folder) / PIN).is_file()


def commit_checkpoint(staged: Path, keep: int = 1) -> Path:
    """Rename a staged folder to ``step-N``, point ``latest`` at it, then drop older step folders but
    the ``keep`` - 1 newest of them and the pinned ones."""
    staged = Path(staged)
    ckpt_dir, name = staged.parent, staged.name[1 : -len(TMP_SUFFIX)]
    final = ckpt_dir / name
    try:
        if is_pinned(final):  # a step folder of the same step (a rerun after a fall-back) that stays pinned
            (staged / PIN).touch()
        replace_folder(staged, final)
        link_tmp = ckpt_dir / f".{LATEST}{TMP_SUFFIX}"
        if os.path.lexists(link_tmp):
            os.unlink(link_tmp)
        link_tmp.symlink_to(name)
        link = ckpt_dir / LATEST
        if link.is_dir() and not link.is_symlink():  # a dereferenced copy (cp -rL) of an older checkpoint
            shutil.rmtree(link)
        os.replace(link_tmp, link)
    except OSError as e:
        shutil.rmtree(staged, ignore_errors=True)
        raise as_os_error(e, getattr(e, "filename", None) or final) from None
    older = [c for c in complete_checkpoints(ckpt_dir) if step_of(c) < step_of(final)]
    for c in older[: max(0, len(older) - (keep - 1))]:  # only now that a newer one is complete and linked
        if not is_pinned(c):
            shutil.rmtree(c, ignore_errors=True)
    return final


def save_checkpoint(ckpt_dir: Path, module: torch.nn.Module, state: dict, pin: bool = False) -> Path:
    """Stage and commit in one go (conversion; the training loop commits only after its checks)."""
    return commit_checkpoint(stage_checkpoint(ckpt_dir, module, state, pin=pin))


def is_complete(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / WEIGHTS).is_file() and ((folder / STATE).is_file() or (folder / LEGACY_STATE).is_file())


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The complete ``step-*`` folders of ``ckpt_dir``, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if STEP_DIR.match(p.name) and p.is_dir() and is_complete(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """``latest`` if it names a complete step folder, else the newest complete step folder, else None."""
    link = Path(ckpt_dir) / LATEST
    if link.is_symlink():
        target = Path(ckpt_dir) / os.readlink(link)
        if STEP_DIR.match(target.name) and target.parent.resolve() == Path(ckpt_dir).resolve() and is_complete(target):
            return target
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint holds, from its small JSON state (the optimizer's tensors stay unread)."""
    path = Path(ckpt) / STATE
    if not path.is_file():
        return load_state(ckpt)["step"]
    try:
        step = _unflatten(json.loads(path.read_text())["step"], {})
        if not isinstance(step, int):
            raise ValueError("no step")
        return step
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"corrupt checkpoint {path}: {_first_line(e)}") from None


def load_state(ckpt: Path) -> dict:
    """The trainer state of a checkpoint (``step``, ``optimizer``); one line naming the file if it is bad."""
    ckpt = Path(ckpt)
    if (ckpt / STATE).is_file():
        path = ckpt / STATE
        try:
            skeleton = json.loads(path.read_text())
            tensors = load_file(str(ckpt / OPTIMIZER)) if (ckpt / OPTIMIZER).is_file() else {}
            state = {k: _unflatten(v, tensors) for k, v in skeleton.items()}
            if not isinstance(state.get("step"), int):
                raise ValueError("no step")
            return state
        except (ValueError, KeyError, TypeError, AttributeError, SafetensorError, OSError) as e:
            raise ValueError(f"corrupt checkpoint {path}: {_first_line(e)}") from None
    path = ckpt / LEGACY_STATE
    try:
        with warnings.catch_warnings():  # torch's advice to retry unsafely is not ours to print
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:
        raise ValueError(f"corrupt checkpoint {path}: {_first_line(e)}") from None


# ----------------------------------------------------------------------------- a run's model


def trained_step(run: Path) -> int:
    """The step of the run's checkpoint (0: none)."""
    ckpt = latest_checkpoint(run)
    return step_of(ckpt) if ckpt is not None and rundir.has_run(run) else 0


def load_model(run: Path, device: str | torch.device = "cpu"):
    """The trained Duo model of a run folder, in eval mode: ``(model, cfg)``."""
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
