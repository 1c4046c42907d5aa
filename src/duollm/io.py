"""Atomic file writes and environment errors that name their path (DESIGN section 7).

Every file duollm writes goes through ``atomic_path``: a temporary file in the same folder
(named ``.<name>.<random>.tmp``, so a crash leaves only such names, which ``rundir`` cleans),
renamed onto the final name only if the body succeeded, removed on every failure path.
Whatever the writing library raised (Python's ``OSError``, safetensors' or tokenizers' Rust
``os error N``), an I/O failure leaves as one ``OSError`` carrying the *final* path, which the
command line prints as one line.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"  # every temporary name ends so and starts with a dot (``rundir.clean_stale``)

# Rust libraries' I/O errors in their text: "... (os error 28)", or safetensors' "IoError(Os { code: 28, ..."
_RUST_OS_ERROR = re.compile(r"os error (\d+)|Os \{ code: (\d+)")


def as_os_error(e: BaseException, path) -> OSError | None:
    """``e`` as an ``OSError`` naming ``path`` if it is an I/O failure (of any library), else None."""
    if isinstance(e, OSError):
        code = e.errno
    else:  # safetensors and tokenizers raise their own types with the OS error in the text
        m = _RUST_OS_ERROR.search(str(e))
        if m is None:
            return None
        code = int(m.group(1) or m.group(2))
    strerror = os.strerror(code) if code else (getattr(e, "strerror", None) or str(e))
    return OSError(code or errno_mod.EIO, strerror, str(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def os_errors_naming(path):
    """Inside the block, an I/O failure of any library becomes one ``OSError`` naming ``path``."""
    try:
        yield
    except Exception as e:
        err = as_os_error(e, path)
        if err is None:
            raise
        raise err from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the body succeeds."""
    path = Path(path)
    tmp = None
    try:
        with os_errors_naming(path):
            if path.is_dir():
                raise IsADirectoryError(errno_mod.EISDIR, "Is a directory", str(path))
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
            os.close(fd)
            yield Path(tmp)
            # mkstemp creates 0600 and some writers (safetensors) recreate the file: ordinary permissions
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)


def replace_folder(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the complete folder ``src`` onto ``dst``. An existing ``dst`` is first renamed aside whole and
    removed after, so at every moment ``dst`` is the old folder or the new one, never a mixture."""
    src, dst = Path(src), Path(dst)
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", suffix=TMP_SUFFIX, dir=dst.parent))
    try:
        if dst.exists():
            os.replace(dst, old)  # onto the empty folder just made: a rename, atomic
        os.replace(src, dst)
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield an empty temporary folder of its own next to ``path``; if the body succeeds it replaces ``path``
    whole (``replace_folder``), otherwise it is removed. An export or a converted run is complete or absent,
    whatever happens: a full disk (one OSError naming the path), or a second writer of the same folder (each
    writes its own temporary; the last complete one wins)."""
    path = Path(path)
    with os_errors_naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would keep the folder from everyone else
    try:
        with os_errors_naming(path):
            yield tmp
            replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_table(path, columns: dict) -> None:
    """``columns`` (name -> numpy array or pyarrow array) as a parquet file, written atomically. With
    ``read_table``, the one place duollm writes and reads parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))


def read_table(path, columns: list[str] | None = None):
    """A parquet file as a pyarrow Table, read on the calling thread. ``pq.read_table`` goes through
    pyarrow's dataset scanner, which waits on arrow's own thread pools, and a study once sat forever in
    it at zero CPU (issue 28, item 5); the single-file reader without threads or pre-buffering uses no
    pool. A damaged file is a one-line ValueError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(str(path), pre_buffer=False).read(columns=columns, use_threads=False)
    except OSError as e:
        raise as_os_error(e, path) or e from None
    except pa.ArrowException as e:
        raise ValueError(f"{path} is not a readable parquet file ({str(e).splitlines()[0][:120]})") from None


def read_json(path, kind: type = dict):
    """A JSON file of a run folder, which must hold a ``kind`` (an object by default). Damaged or of another
    shape: one ValueError naming the file (a parser's message alone names no file, and a list where an object
    belongs ended in a TypeError three calls later)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise as_os_error(e, path) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is damaged: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(obj, kind):
        want = "an object" if kind is dict else kind.__name__
        raise ValueError(f"{path} is damaged: it holds a JSON {type(obj).__name__}, not {want}")
    return obj


def append_line(path, line: str) -> None:
    """Append one line with a single ``write`` on an ``O_APPEND`` descriptor (a crash tears at most it)."""
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as e:
        raise as_os_error(e, path) from None


def read_json_lines(path, *, warn=None) -> list[dict]:
    """The objects of a JSON-lines file; a torn *last* line (a crash mid-append) is dropped with a
    warning, a bad line elsewhere is a one-line ValueError naming the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == len(lines):
                if warn is not None:
                    warn(f"warning: {path}: dropped a torn last line (an earlier run was interrupted while writing it)")
                break
            raise ValueError(f"{path} line {i} is not a JSON object; fix or remove that line") from None
        rows.append(row)
    return rows
