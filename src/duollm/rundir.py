"""The run folder as a thing to protect (DESIGN section 7): one writer at a time, no stale temporaries.

``writing(run)`` is held by every command that writes into a run folder (train, oracle, router,
report, run). It takes an exclusive ``flock`` on ``RUN/.lock`` holding the writer's pid; a second
writer is refused with one line naming that pid. Within one process it is re-entrant (``duollm
run`` trains, runs oracles and routers under one hold). The lock file is removed on release, so
a command leaves no trace of it; a lock file left by a killed process is not locked and is simply
taken over. Under ``torchrun`` only rank 0 takes it (the other ranks belong to the same job).

On taking the lock, temporary files and folders that a crashed writer left (``.*.tmp``, see
``io.atomic_path`` and ``checkpoint.save_checkpoint``) are removed: nobody else can be writing them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path

from .io import TMP_SUFFIX, as_os_error

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
