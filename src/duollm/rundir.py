"""The run folder's contract (DESIGN 7, 8): every path and name in it, and one writer at a time.

This is the one module that knows the layout of a run folder; it imports nothing of duollm but
``io``, so every stage can use it. What reads and writes the files lives with its stage::

    RUN/config.yaml                    the resolved config            config.load_run_config
    RUN/tokenizer.json | tokenizer/    BPE file | pretrained folder   data.cache.load_tokenizer
    RUN/data/{train,val}.bin, meta.json token ids (memmaps)           data.cache.load_tokens, eval_tokens
    RUN/metrics.jsonl                  training metrics               metrics_path
    RUN/wandb_run.json                 the W&B run's id (train.wandb)  wandb_run_path
    RUN/tb/                            TensorBoard events (train.tensorboard)  tensorboard_dir
    RUN/latest -> step-N/              the checkpoint                 checkpoint.load_model
    RUN/oracle/<name>/                 one oracle run                 oracle_dir, oracle_names
        summary.json run.json per_token.parquet oracle_loss.npy usage.npy patterns.parquet .partial/
    RUN/routers/<name>/                one router                     router_dir; routers.store
        router.yaml router.safetensors eval.json metrics.jsonl dagger/ step-*/ latest
    RUN/study/stages/<stage>.json      what a study stage was run on  stage_marker
    RUN/study/routers/<name>.json      a router on the oracle's tokens  study_router_eval
    RUN/report/                        index.html report.md results.json figures/  report_dir, report_files
    RUN/bench/bench.json               wall-clock of prefill and decode (duollm bench)  bench_path
    RUN/null/                          the null control: a run folder of the model at initialisation  null_dir
    RUN/seeds/seed-<s>/                the study with another training seed (a run folder)  seed_dir
    RUN/stage1/<model>/, evaluation.json  the Stage-1 study's models and their scores  stage1_dir
    RUN/scale/d<d>-x<m>/               the study at width d, m x the training steps (a run folder)  scale_dir
    RUN/.lock                          only while a command writes    writing

``writing(run)`` is held by every command that writes into a run folder (train, oracle, router,
report, run). It takes an exclusive ``flock`` on ``RUN/.lock`` holding the writer's pid; a second
writer is refused with one line naming that pid. Within one process it is re-entrant (``duollm
run`` trains, runs oracles and routers under one hold). The lock file is removed on release, so
a command leaves no trace of it; a lock file left by a killed process is not locked and is simply
taken over. Under ``torchrun`` only rank 0 takes it (the other ranks belong to the same job).
On taking the lock, temporaries a crashed writer left (``.*.tmp``, see ``io.atomic_path``) are
removed: nobody else can be writing them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path

from .io import TMP_SUFFIX, as_os_error, read_json

CONFIG, TOKENIZER_FILE, TOKENIZER_DIR, DATA, DATA_META, METRICS = (
    "config.yaml", "tokenizer.json", "tokenizer", "data", "meta.json", "metrics.jsonl")
WANDB_RUN = "wandb_run.json"  # the W&B run's id, so that a resume continues that run (train/tracking.py)
TENSORBOARD = "tb"  # TensorBoard events (train.tensorboard)
ORACLE, ROUTERS, STUDY, REPORT, NULL, BENCH, STAGE1 = "oracle", "routers", "study", "report", "null", "bench", "stage1"
# inside RUN/oracle/<name>/ (written by oracle/runner.py)
SUMMARY, RUN_JSON, PER_TOKEN, ORACLE_LOSS, USAGE, PATTERNS, PARTIAL = (
    "summary.json", "run.json", "per_token.parquet", "oracle_loss.npy", "usage.npy", "patterns.parquet", ".partial")
# float32 [patterns, tokens], written on request (--save-matrix) and by the study's tree-engine sweeps: row p is
# the pattern of row p of PATTERNS (code order), column n the token of row n of PER_TOKEN (n = s * T + t)
LOSS_MATRIX = "loss_matrix.npy"
# inside RUN/oracle/<name>/.partial/ while it runs: what the chunks were computed for, then one file per chunk
PARTIAL_FINGERPRINT = "fingerprint.json"
# inside RUN/routers/<name>/
ROUTER_YAML, ROUTER_WEIGHTS, ROUTER_EVAL = "router.yaml", "router.safetensors", "eval.json"
ROUTER_TOKENS = "per_token.parquet"  # beside eval.json: each evaluated token's loss and route (the report's explorer)
ROUTER_DAGGER, DAGGER_RECORD = "dagger", "dagger.json"  # a value router's rounds (routers/value.py)
# inside RUN/report/ (analysis/report.py)
REPORT_HTML, REPORT_MD, REPORT_RESULTS, REPORT_FIGURES = "index.html", "report.md", "results.json", "figures"
DIFFICULTY_TABLE, DIFFICULTY_SUMMARY = "difficulty.parquet", "difficulty.json"  # token difficulty (analysis/difficulty.py)




# ----------------------------------------------------------------------------- config, tokenizer, data


def config_path(run: Path) -> Path:
    return Path(run) / CONFIG


def has_run(run: Path) -> bool:
    return config_path(run).is_file()


def metrics_path(run: Path) -> Path:
    return Path(run) / METRICS


def tensorboard_dir(folder: Path) -> Path:
    return Path(folder) / TENSORBOARD


def wandb_run_path(folder: Path) -> Path:
    """``<folder>/wandb_run.json``: the W&B run of a run folder or a router's folder (its id)."""
    return Path(folder) / WANDB_RUN


def data_dir(run: Path) -> Path:
    return Path(run) / DATA


def data_meta(run: Path) -> Path:
    """``RUN/data/meta.json``: what the token cache was made from (written last, it vouches for the rest)."""
    return data_dir(run) / DATA_META


def token_file(run: Path, split: str) -> Path:
    """``RUN/data/<split>.bin``: the token ids of ``train`` or ``val`` (a memmap)."""
    return data_dir(run) / f"{split}.bin"


def tokenizer_file(run: Path) -> Path:
    """The BPE tokenizer file, or the pretrained tokenizer's folder (exports copy it)."""
    run = Path(run)
    return run / TOKENIZER_FILE if (run / TOKENIZER_FILE).is_file() else run / TOKENIZER_DIR




# ----------------------------------------------------------------------------- the model


# ----------------------------------------------------------------------------- oracle outputs


def oracle_dir(run: Path, name: str) -> Path:
    return Path(run) / ORACLE / name


def is_complete_oracle(folder: Path) -> bool:
    """An oracle folder whose run finished: the summary and ``run.json`` (written last) exist and
    no partial chunks remain (``oracle/runner.py``)."""
    folder = Path(folder)
    return (folder / SUMMARY).is_file() and (folder / RUN_JSON).is_file() and not (folder / PARTIAL).exists()


def partial_chunk(partial: Path, index: int) -> Path:
    """One finished chunk of an oracle still running: ``.partial/chunk_<i>.npz``."""
    return Path(partial) / f"chunk_{index:05d}.npz"


def oracle_summary(folder: Path) -> dict:
    return read_json(Path(folder) / SUMMARY)


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


def study_router_tokens(run: Path, name: str) -> Path:
    """Per-token loss and route of the study's evaluation of router ``name`` (beside its JSON)."""
    return study_router_eval(run, name).with_suffix(".parquet")


def _router_evaluation(run: Path, name: str) -> tuple[Path, Path] | None:
    """``(evaluation JSON, its per-token table)`` of router ``name``: the study's (on the oracle's tokens) when
    present, else ``eval.json``; None for a router not evaluated."""
    for evaluation, tokens in ((study_router_eval(run, name), study_router_tokens(run, name)),
                               (router_dir(run, name) / ROUTER_EVAL, router_dir(run, name) / ROUTER_TOKENS)):
        if evaluation.is_file():
            return evaluation, tokens
    return None


def router_tokens(run: Path, name: str) -> Path | None:
    """The per-token table of the evaluation ``router_eval`` reads (None for a router evaluated before they
    were kept)."""
    found = _router_evaluation(run, name)
    return found[1] if found and found[1].is_file() else None


def router_eval(run: Path, name: str) -> dict | None:
    """A router's evaluation: the study's (on the oracle's tokens) when present, else ``eval.json``."""
    found = _router_evaluation(run, name)
    return read_json(found[0]) if found else None


# ----------------------------------------------------------------------------- study and report


def stage_marker(run: Path, stage_id: str) -> Path:
    return Path(run) / STUDY / "stages" / f"{stage_id}.json"


def study_router_eval(run: Path, name: str) -> Path:
    return Path(run) / STUDY / ROUTERS / f"{name}.json"


def report_dir(run: Path) -> Path:
    return Path(run) / REPORT


def report_html(run: Path) -> Path:
    return report_dir(run) / REPORT_HTML


def report_results(run: Path) -> Path:
    """``RUN/report/results.json``: every number of the report (``duollm compare`` and ``info`` read it)."""
    return report_dir(run) / REPORT_RESULTS


def bench_path(run: Path) -> Path:
    return Path(run) / BENCH / "bench.json"


def null_dir(run: Path) -> Path:
    return Path(run) / NULL


def seed_dir(run: Path, seed: int) -> Path:
    """``RUN/seeds/seed-<s>/``: the study repeated with another training seed (``study.seeds``)."""
    return Path(run) / "seeds" / f"seed-{int(seed)}"


def seed_dirs(run: Path) -> list[Path]:
    """The finished seed runs of a multi-seed study, by seed."""
    root = Path(run) / "seeds"
    found = [p for p in root.glob("seed-*") if p.is_dir() and has_run(p)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]) if p.name.split("-", 1)[1].isdigit() else 0)


SCALE = "scale"


def scale_name(d_model: int, steps_multiple: int) -> str:
    """``d<d>-x<m>``: a size of the scale axis (``study.widths``, ``study.train_tokens``)."""
    return f"d{int(d_model)}-x{int(steps_multiple)}"


def scale_dir(run: Path, name: str) -> Path:
    """``RUN/scale/d<d>-x<m>/``: the study at another model size (study/scale.py)."""
    return Path(run) / SCALE / name


def scale_dirs(run: Path) -> list[Path]:
    """The scale axis's run folders that hold a run, by width then multiple."""
    root = Path(run) / SCALE
    found = [p for p in root.glob("d*-x*") if p.is_dir() and has_run(p)] if root.is_dir() else []
    key = lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name[1:].split("-x", 1))
    return sorted(found, key=key)


def stage1_dir(run: Path) -> Path:  # the Stage-1 study's models (study/stage1.py)
    return Path(run) / STAGE1


def stage1_model_dir(run: Path, name: str) -> Path:
    """``RUN/stage1/<name>/``: one Stage-1 model (a run folder: ``duo``, ``dense-p0.50``, ``bigfirst``, ...)."""
    return stage1_dir(run) / name


def stage1_model_name(arm: str, seed_index: int) -> str:
    """The name of an arm's model for its i-th seed (``study.stage1_seeds``): ``dense-p0.50``, ``dense-p0.50-s1``."""
    return f"{arm}-s{seed_index}" if seed_index else arm


def stage1_arm(name: str) -> str:
    """The arm a Stage-1 model belongs to: its name without the seed suffix."""
    head, _, tail = name.rpartition("-s")
    return head if head and tail.isdigit() else name


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
