"""The run folder's contract (DESIGN 7, 8): every path and name, the loaders, one writer at a time.

This is the one module that knows the layout of a run folder::

    RUN/config.yaml                    the resolved config            load_run_config
    RUN/tokenizer.json | tokenizer/    BPE file | pretrained folder   load_tokenizer, save_tokenizer
    RUN/data/{train,val}.bin, meta.json token ids (memmaps)           load_tokens, eval_tokens, write_data
    RUN/metrics.jsonl                  training metrics               metrics_path
    RUN/latest -> step-N/              the checkpoint (format: checkpoint.py)  load_model
    RUN/oracle/<name>/                 one oracle run                 oracle_dir, oracle_names, find_oracle
        summary.json run.json per_token.parquet oracle_loss.npy usage.npy patterns.parquet .partial/
    RUN/routers/<name>/                one router                     router_dir, load_router, save_router
        router.yaml router.safetensors eval.json metrics.jsonl step-*/ latest
    RUN/study/stages/<stage>.json      what a study stage was run on  stage_marker
    RUN/study/routers/<name>.json      a router on the oracle's tokens  study_router_eval
    RUN/report/                        index.html report.md results.json figures/  report_dir
    RUN/bench/bench.json               wall-clock of prefill and decode (duollm bench)  bench_path
    RUN/null/                          the null control: a run folder of the model at initialisation  null_dir
    RUN/.lock                          only while a command writes    writing

``writing(run)`` is held by every command that writes into a run folder (train, oracle, router,
report, run). It takes an exclusive ``flock`` on ``RUN/.lock`` holding the writer's pid; a second
writer is refused with one line naming that pid. Within one process it is re-entrant (``duollm
run`` trains, runs oracles and routers under one hold). The lock file is removed on release, so
a command leaves no trace of it; a lock file left by a killed process is not locked and is simply
taken over. Under ``torchrun`` only rank 0 takes it (the other ranks belong to the same job).
On taking the lock, temporaries a crashed writer left (``.*.tmp``, see ``io.atomic_path``) are
removed: nobody else can be writing them.

``routing_policy`` resolves a routing spec (``routing.parse_routing``) against a run folder
(``router:NAME`` is one of its routers) into what ``DuoModel.forward`` takes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from .checkpoint import latest_checkpoint, load_weights, module_tensors, save_checkpoint, save_tensors, step_of
from .config import RunConfig, from_dict, read_config_file, save_config, to_dict
from .data import (
    PreparedData,
    TextTokenizer,
    build_data,
    data_fingerprint,
    load_bpe,
    pretrained_tokenizer,
    read_corpus,
    sequences,
)
from .io import TMP_SUFFIX, as_os_error, atomic_path, atomic_write_json, atomic_write_text
from .model import DuoModel
from .routers.config import RouterConfig
from .routers.policy import Router, policy_without_folder
from .routing import parse_routing

CONFIG, TOKENIZER_FILE, TOKENIZER_DIR, DATA, METRICS = "config.yaml", "tokenizer.json", "tokenizer", "data", "metrics.jsonl"
ORACLE, ROUTERS, STUDY, REPORT, NULL, BENCH, STAGE1 = "oracle", "routers", "study", "report", "null", "bench", "stage1"
# inside RUN/oracle/<name>/ (written by oracle/runner.py)
SUMMARY, RUN_JSON, PER_TOKEN, ORACLE_LOSS, USAGE, PATTERNS, PARTIAL = (
    "summary.json", "run.json", "per_token.parquet", "oracle_loss.npy", "usage.npy", "patterns.parquet", ".partial")
# inside RUN/routers/<name>/
ROUTER_YAML, ROUTER_WEIGHTS, ROUTER_EVAL = "router.yaml", "router.safetensors", "eval.json"
ROUTER_DAGGER, DAGGER_RECORD = "dagger", "dagger.json"  # a value router's rounds (routers/value.py)


def _json(path: Path):
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------- config, tokenizer, data


def config_path(run: Path) -> Path:
    return Path(run) / CONFIG


def has_run(run: Path) -> bool:
    return config_path(run).is_file()


def load_run_config(run: Path) -> RunConfig:
    path = config_path(run)
    if not path.is_file():
        raise ValueError(f"{run} is not a run folder (no {CONFIG})")
    return read_config_file(path)


def metrics_path(run: Path) -> Path:
    return Path(run) / METRICS


def save_tokenizer(tok: TextTokenizer, run: Path) -> None:
    tok.save(Path(run) / (TOKENIZER_FILE if tok.kind == "bpe" else TOKENIZER_DIR))


def load_tokenizer(run: Path) -> TextTokenizer:
    run = Path(run)
    if (run / TOKENIZER_FILE).is_file():
        return load_bpe(run / TOKENIZER_FILE)
    if (run / TOKENIZER_DIR).is_dir():
        return pretrained_tokenizer(str(run / TOKENIZER_DIR))
    raise ValueError(f"{run} has no tokenizer ({TOKENIZER_FILE} or {TOKENIZER_DIR}/)")


def tokenizer_file(run: Path) -> Path:
    """The BPE tokenizer file, or the pretrained tokenizer's folder (exports copy it)."""
    run = Path(run)
    return run / TOKENIZER_FILE if (run / TOKENIZER_FILE).is_file() else run / TOKENIZER_DIR


def data_dir(run: Path) -> Path:
    return Path(run) / DATA


def cached_meta(cfg: RunConfig, run: Path) -> dict | None:
    """``RUN/data/meta.json`` if the run's token cache was made from exactly this data config."""
    folder = data_dir(run)
    try:
        meta = _json(folder / "meta.json")
    except (OSError, ValueError):
        return None
    ok = meta.get("fingerprint") == data_fingerprint(cfg) and all(
        (folder / f"{split}.bin").is_file() for split in ("train", "val"))
    return meta if ok else None


def write_data(prepared: PreparedData, run: Path) -> dict:
    """The tokenizer and ``RUN/data/{train,val}.bin`` + ``meta.json`` (meta last: it vouches for the rest)."""
    save_tokenizer(prepared.tokenizer, run)
    for split, ids in prepared.splits.items():
        with atomic_path(data_dir(run) / f"{split}.bin") as tmp:
            tmp.write_bytes(ids.astype(prepared.meta["dtype"]).tobytes())  # Python's write: errors with errno
    atomic_write_json(data_dir(run) / "meta.json", prepared.meta)
    return prepared.meta


def prepare_data(cfg: RunConfig, run: Path, log=print) -> dict:
    """The run's token cache for ``cfg``: reused when it matches, else built and written. Idempotent."""
    return cached_meta(cfg, run) or write_data(build_data(cfg, log), run)


def load_tokens(run: Path, split: str) -> np.ndarray:
    folder = data_dir(run)
    meta_path, path = folder / "meta.json", folder / f"{split}.bin"
    if not meta_path.is_file() or not path.is_file():
        raise ValueError(f"{run} has no {split} token cache ({DATA}/{split}.bin); train the run first")
    return np.memmap(path, dtype=np.dtype(_json(meta_path)["dtype"]), mode="r")


SPLITS = {"validation": "val", "train": "train"}  # --split names -> token cache files


def eval_tokens(run: Path, cfg: RunConfig, spec: str | None = None, max_tokens: int | None = None,
                split: str = "validation"):
    """The evaluation tokens shared by ``eval``, ``oracle`` and routers: (``idx_ST``, ``tgt_ST``).

    ``spec`` None: the run's ``split`` (validation, or train: oracle tables that routers learn from);
    otherwise the whole text of ``spec`` encoded with the run's tokenizer. ``max_tokens`` None:
    ``cfg.eval.max_tokens``; 0: no cap. Windows spread over the whole split (``data.sequences``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be validation or train; got {split!r}")
    if spec is None:
        tokens = load_tokens(run, SPLITS[split])
    else:
        tok = load_tokenizer(run)
        tokens = np.asarray(tok.encode(read_corpus(spec, cfg.data.text_column, cfg.data.max_chars)), dtype=np.int64)
    cap = cfg.eval.max_tokens if max_tokens is None else max_tokens
    return sequences(tokens, cfg.train.seq_len, cap)


# ----------------------------------------------------------------------------- the model


def trained_step(run: Path) -> int:
    """The step of the run's checkpoint (0: none)."""
    ckpt = latest_checkpoint(run)
    return step_of(ckpt) if ckpt is not None and has_run(run) else 0


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


# ----------------------------------------------------------------------------- oracle outputs


def oracle_dir(run: Path, name: str) -> Path:
    return Path(run) / ORACLE / name


def is_complete_oracle(folder: Path) -> bool:
    """An oracle folder whose run finished: the summary and ``run.json`` (written last) exist and
    no partial chunks remain (``oracle/runner.py``)."""
    folder = Path(folder)
    return (folder / SUMMARY).is_file() and (folder / RUN_JSON).is_file() and not (folder / PARTIAL).exists()


def oracle_summary(folder: Path) -> dict:
    return _json(Path(folder) / SUMMARY)


def oracle_folders(run: Path) -> list[Path]:
    """The finished oracle folders of a run, sorted by name."""
    root = Path(run) / ORACLE
    return sorted(p for p in root.iterdir() if is_complete_oracle(p)) if root.is_dir() else []


def oracle_names(run: Path) -> list[str]:
    """Oracles with a per-token table (those a router can learn from or be compared with)."""
    root = Path(run) / ORACLE
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / SUMMARY).is_file() and (p / PER_TOKEN).is_file())


# ----------------------------------------------------------------------------- routers


def router_dir(run: Path, name: str) -> Path:
    return Path(run) / ROUTERS / name


def router_names(run: Path) -> list[str]:
    """Names of the routers of a run that finished (have an ``eval.json``)."""
    root = Path(run) / ROUTERS
    return sorted(p.name for p in root.iterdir() if (p / ROUTER_EVAL).is_file()) if root.is_dir() else []


def router_eval(run: Path, name: str) -> dict | None:
    """A router's evaluation: the study's (on the oracle's tokens) when present, else ``eval.json``."""
    for path in (study_router_eval(run, name), router_dir(run, name) / ROUTER_EVAL):
        if path.is_file():
            return _json(path)
    return None


def save_router(folder: Path, router: Router, cfg: RouterConfig) -> None:
    """``router.safetensors`` and ``router.yaml`` (config + shape), both written atomically."""
    save_tensors(Path(folder) / ROUTER_WEIGHTS, module_tensors(router), {"options": router.options})
    write_router_yaml(folder, router, cfg)


def write_router_yaml(folder: Path, router: Router, cfg: RouterConfig) -> None:
    meta = {"n_layers": router.n_layers, "d_model": router.d_model, "options": router.options,
            "config": to_dict(cfg)}
    atomic_write_text(Path(folder) / ROUTER_YAML, yaml.safe_dump(meta, sort_keys=False))


def load_router_folder(folder: Path, device="cpu") -> tuple[Router, RouterConfig]:
    folder = Path(folder)
    if not (folder / ROUTER_YAML).is_file() or not (folder / ROUTER_WEIGHTS).is_file():
        raise ValueError(f"{folder} holds no trained router ({ROUTER_YAML} and {ROUTER_WEIGHTS})")
    try:
        meta = yaml.safe_load((folder / ROUTER_YAML).read_text())
        cfg = from_dict(RouterConfig, meta["config"])
        L = int(meta["n_layers"])
        router = Router(L, int(meta["d_model"]), meta["options"], budget_k=cfg.budget_k(L) if cfg.enforce else None)
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / ROUTER_YAML} is corrupt: {type(e).__name__}") from None
    # routers saved before calibration existed lack the offset
    load_weights(router, folder / ROUTER_WEIGHTS, what="router weights", optional=("offset_O",))
    return router.to(device).eval(), cfg


def load_router(run: Path, name: str, device="cpu") -> Router:
    """The trained router ``RUN/routers/<name>`` in hard mode, ready to pass as ``routes=``."""
    folder = router_dir(run, name)
    if not folder.is_dir():
        root = Path(run) / ROUTERS
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


# ----------------------------------------------------------------------------- study and report


def stage_marker(run: Path, stage_id: str) -> Path:
    return Path(run) / STUDY / "stages" / f"{stage_id}.json"


def study_router_eval(run: Path, name: str) -> Path:
    return Path(run) / STUDY / ROUTERS / f"{name}.json"


def report_dir(run: Path) -> Path:
    return Path(run) / REPORT


def bench_path(run: Path) -> Path:
    return Path(run) / BENCH / "bench.json"


def null_dir(run: Path) -> Path:
    return Path(run) / NULL


def _link_or_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed: copy
            shutil.copyfile(src, tmp)


def seed_dir(run: Path, seed: int) -> Path:
    """``RUN/seeds/seed-<s>/``: the study repeated with another training seed (``study.seeds``)."""
    return Path(run) / "seeds" / f"seed-{int(seed)}"


def seed_dirs(run: Path) -> list[Path]:
    """The finished seed runs of a multi-seed study, by seed."""
    root = Path(run) / "seeds"
    found = [p for p in root.glob("seed-*") if p.is_dir() and has_run(p)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]) if p.name.split("-", 1)[1].isdigit() else 0)


def make_sub_run(run: Path, out: Path, cfg: RunConfig) -> Path:
    """``out``: a run folder for ``cfg`` sharing ``run``'s tokenizer and token cache (hard links where
    possible), so that it trains on and is scored on exactly the run's tokens. No checkpoint yet."""
    with writing(out, create=True):
        save_config(cfg, config_path(out))
        src = tokenizer_file(run)
        if src.is_dir():
            shutil.copytree(src, out / src.name, dirs_exist_ok=True)
        else:
            _link_or_copy(src, out / src.name)
        for f in sorted(data_dir(run).iterdir()):
            if not f.name.startswith("."):
                _link_or_copy(f, data_dir(out) / f.name)  # token caches can be large: a hard link where possible
    return out


def make_null_run(run: Path) -> Path:
    """``RUN/null/``: the run's model at initialisation (its training seed, step 0) in a sub-run folder;
    the null control of DESIGN 4.4a."""
    cfg = load_run_config(run)
    out = make_sub_run(run, null_dir(run), cfg)
    with writing(out):
        torch.manual_seed(cfg.train.seed)  # as pretraining does before it builds the model
        save_checkpoint(out, DuoModel(cfg.model), {"step": 0})
    return out


def stage1_dir(run: Path) -> Path:  # the Stage-1 study's models (stage1.py)
    return Path(run) / STAGE1


def stage1_evaluation(run: Path) -> Path:
    return stage1_dir(run) / "evaluation.json"


# ----------------------------------------------------------------------------- one writer


LOCK = ".lock"
_held: dict[str, int] = {}  # resolved run folder -> hold count, for re-entrance within a process


def check_out_folder(out: Path) -> None:
    """``--out`` must be a folder (or not exist yet); one line otherwise, before anything is written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is not a folder")


def clean_stale(run: Path) -> list[Path]:
    """Remove temporaries left by a crashed writer (names ``.*.tmp``) anywhere under ``run``."""
    removed = []
    for dirpath, dirnames, filenames in os.walk(run):
        for name in list(dirnames):
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                shutil.rmtree(Path(dirpath) / name, ignore_errors=True)
                dirnames.remove(name)
                removed.append(Path(dirpath) / name)
        for name in filenames:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(Path(dirpath) / name)
                removed.append(Path(dirpath) / name)
    return removed


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def _acquire(run: Path) -> int:
    """An open descriptor holding the exclusive lock on ``run/.lock`` (retries if the file was swapped)."""
    path = run / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise as_os_error(e, path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ValueError(f"{run} is in use by another duollm command ({_holder(path)}); "
                                 f"wait for it to finish or use another run folder") from None
            raise as_os_error(e, path) from None
        # the holder before us may have unlinked the file after we opened it: lock the current one
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


@contextlib.contextmanager
def writing(run: Path, *, create: bool = False):
    """Hold the run folder's writer lock for the body; ``create``: make the folder first."""
    run = Path(run)
    if int(os.environ.get("RANK", "0")) != 0:
        yield run
        return
    if create:
        check_out_folder(run)
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise as_os_error(e, run) from None
    elif not run.is_dir():
        raise ValueError(f"run folder {run} does not exist")
    key = str(run.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield run
        finally:
            _held[key] -= 1
        return
    fd = _acquire(run)
    _held[key] = 1
    try:
        clean_stale(run)
        yield run
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(run / LOCK)  # before the unlock: a waiter then sees the file swapped and retries
        os.close(fd)
