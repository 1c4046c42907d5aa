"""A trained router as a file: ``RUN/routers/<name>/router.safetensors`` + ``router.yaml``, saved and
loaded; and ``routing_policy``, which resolves a routing spec against a run folder (``router:NAME`` is one
of its routers) into what ``DuoModel.forward`` takes."""

from __future__ import annotations

from pathlib import Path

import yaml

from .. import rundir
from ..checkpoint import load_weights, module_tensors, save_tensors
from ..config import from_dict, to_dict
from ..io import atomic_write_text
from ..model.policy import Router, policy_without_folder
from ..model.routing import parse_routing
from .config import RouterConfig


def save_router(folder: Path, router: Router, cfg: RouterConfig) -> None:
    """``router.safetensors`` and ``router.yaml`` (config + shape), both written atomically."""
    save_tensors(Path(folder) / rundir.ROUTER_WEIGHTS, module_tensors(router), {"options": router.options})
    write_router_yaml(folder, router, cfg)


def write_router_yaml(folder: Path, router: Router, cfg: RouterConfig) -> None:
    meta = {"n_layers": router.n_layers, "d_model": router.d_model, "options": router.options,
            **({"peek": router.peek} if router.peek is not None else {}), "config": to_dict(cfg)}
    atomic_write_text(Path(folder) / rundir.ROUTER_YAML, yaml.safe_dump(meta, sort_keys=False))


def _router_yaml(folder: Path) -> tuple[dict, RouterConfig]:
    try:
        meta = yaml.safe_load((Path(folder) / rundir.ROUTER_YAML).read_text())
        return meta, from_dict(RouterConfig, meta["config"])
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(f"{Path(folder) / rundir.ROUTER_YAML} is corrupt: {type(e).__name__}") from None


def load_router_config(folder: Path) -> RouterConfig:
    """The ``RouterConfig`` a router was (or is being) trained with: its ``router.yaml``."""
    return _router_yaml(folder)[1]


def load_router_folder(folder: Path, device="cpu") -> tuple[Router, RouterConfig]:
    folder = Path(folder)
    if not (folder / rundir.ROUTER_YAML).is_file() or not (folder / rundir.ROUTER_WEIGHTS).is_file():
        raise ValueError(f"{folder} holds no trained router ({rundir.ROUTER_YAML} and {rundir.ROUTER_WEIGHTS})")
    meta, cfg = _router_yaml(folder)
    try:
        L = int(meta["n_layers"])
        router = Router(L, int(meta["d_model"]), meta["options"], budget_k=cfg.budget_k(L) if cfg.enforce else None,
                        peek=meta.get("peek"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder / rundir.ROUTER_YAML} is corrupt: {type(e).__name__}") from None
    # routers saved before calibration existed lack the offset
    load_weights(router, folder / rundir.ROUTER_WEIGHTS, what="router weights", optional=("offset_O",))
    router.check_finite(folder / rundir.ROUTER_WEIGHTS)
    return router.to(device).eval(), cfg


def load_router(run: Path, name: str, device="cpu") -> Router:
    """The trained router ``RUN/routers/<name>`` in hard mode, ready to pass as ``routes=``."""
    folder = rundir.router_dir(run, name)
    if not folder.is_dir():
        root = Path(run) / rundir.ROUTERS
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ValueError(f"no router {name!r} in {root} (found: {', '.join(have) or 'none'})")
    router = load_router_folder(folder, device)[0]
    router.name = f"router:{name}"  # how the oracle names a frozen-context reference that is a policy
    return router


def routing_policy(spec, n_layers: int, *, root: str | Path | None = None, seed: int = 0, device="cpu"):
    """A routing spec -> ``(name, routes)`` for ``DuoModel.forward``: a pattern string, a
    ``RandomPolicy`` or a hard ``Router``. ``root`` is the folder holding ``routers/`` (a run or an
    export); ``router:PATH`` may also name a router folder directly. A callable passes through."""
    simple = policy_without_folder(spec, n_layers, seed)
    if simple is not None:
        return simple
    r = parse_routing(spec, n_layers)
    if Path(r.router).is_dir():
        router = load_router_folder(Path(r.router), device)[0]
        router.name = f"router:{Path(r.router).name}"
    elif root is None:
        raise ValueError(f"routing {r.text!r}: no folder to look for routers in; give a router folder path")
    else:
        router = load_router(Path(root), r.router, device)
    if router.n_layers != n_layers:
        raise ValueError(f"router {r.router!r} has {router.n_layers} layers but the model has {n_layers}")
    router.mode = "hard"
    return router.name, router
