"""A run folder's tokenizer and token cache: written once from ``corpus.build_data``, read by every stage.

``RUN/tokenizer.json`` (or ``tokenizer/``), ``RUN/data/{train,val}.bin`` (memmaps) and ``meta.json``
(written last: it vouches for the rest); the names are ``rundir``'s. ``eval_tokens`` is the one
definition of the evaluation tokens ``eval``, ``oracle`` and the routers share.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import rundir
from ..config import RunConfig
from ..io import atomic_path, atomic_write_json, read_json
from .corpus import (
    PreparedData,
    TextTokenizer,
    build_data,
    data_fingerprint,
    load_bpe,
    pretrained_tokenizer,
    read_corpus,
    sequence_documents,
    sequences,
)

SPLITS = {"validation": "val", "train": "train"}  # --split names -> token cache files


def save_tokenizer(tok: TextTokenizer, run: Path) -> None:
    tok.save(Path(run) / (rundir.TOKENIZER_FILE if tok.kind == "bpe" else rundir.TOKENIZER_DIR))


def load_tokenizer(run: Path) -> TextTokenizer:
    run = Path(run)
    if (run / rundir.TOKENIZER_FILE).is_file():
        return load_bpe(run / rundir.TOKENIZER_FILE)
    if (run / rundir.TOKENIZER_DIR).is_dir():
        return pretrained_tokenizer(str(run / rundir.TOKENIZER_DIR))
    raise ValueError(f"{run} has no tokenizer ({rundir.TOKENIZER_FILE} or {rundir.TOKENIZER_DIR}/)")


def cached_meta(cfg: RunConfig, run: Path) -> dict | None:
    """``RUN/data/meta.json`` if the run's token cache was made from exactly this data config."""
    try:
        meta = read_json(rundir.data_meta(run))
    except (OSError, ValueError):
        return None
    ok = meta.get("fingerprint") == data_fingerprint(cfg) and all(
        rundir.token_file(run, split).is_file() for split in ("train", "val"))
    return meta if ok else None


def write_data(prepared: PreparedData, run: Path) -> dict:
    """The tokenizer and ``RUN/data/{train,val}.bin`` + ``meta.json`` (meta last: it vouches for the rest)."""
    save_tokenizer(prepared.tokenizer, run)
    for split, ids in prepared.splits.items():
        with atomic_path(rundir.token_file(run, split)) as tmp:
            tmp.write_bytes(ids.astype(prepared.meta["dtype"]).tobytes())  # Python's write: errors with errno
    atomic_write_json(rundir.data_meta(run), prepared.meta)
    return prepared.meta


def prepare_data(cfg: RunConfig, run: Path, log=print) -> dict:
    """The run's token cache for ``cfg``: reused when it matches, else built and written. Idempotent."""
    return cached_meta(cfg, run) or write_data(build_data(cfg, log), run)


def load_tokens(run: Path, split: str) -> np.ndarray:
    meta_path, path = rundir.data_meta(run), rundir.token_file(run, split)
    if not meta_path.is_file() or not path.is_file():
        raise ValueError(f"{run} has no {split} token cache ({path.relative_to(run)}); train the run first")
    return np.memmap(path, dtype=np.dtype(read_json(meta_path)["dtype"]), mode="r")


def eval_tokens(run: Path, cfg: RunConfig, spec: str | None = None, max_tokens: int | None = None,
                split: str = "validation"):
    """The evaluation tokens shared by ``eval``, ``oracle`` and routers: (``idx_ST``, ``tgt_ST``).

    ``spec`` None: the run's ``split`` (validation, or train: oracle tables that routers learn from);
    otherwise the whole text of ``spec`` encoded with the run's tokenizer. ``max_tokens`` None:
    ``cfg.eval.max_tokens``; 0: no cap. Windows spread over the whole split (``corpus.sequences``).
    """
    cap = cfg.eval.max_tokens if max_tokens is None else max_tokens
    return sequences(_eval_stream(run, cfg, spec, split), cfg.train.seq_len, cap)


def _eval_stream(run: Path, cfg: RunConfig, spec: str | None, split: str) -> np.ndarray:
    """The token stream the evaluation windows are cut from: the run's ``split`` or the text of ``spec``."""
    if split not in SPLITS:
        raise ValueError(f"split must be validation or train; got {split!r}")
    if spec is None:
        return load_tokens(run, SPLITS[split])
    tok = load_tokenizer(run)
    return np.asarray(tok.encode(read_corpus(spec, cfg.data.text_column, cfg.data.max_chars)), dtype=np.int64)


def eval_documents(run: Path, cfg: RunConfig, spec: str | None = None, max_tokens: int | None = None,
                   split: str = "validation") -> list[int]:
    """The document of each of ``eval_tokens``' sequences (``corpus.sequence_documents``): the unit that
    intervals resample, so that windows of one document count once."""
    cap = cfg.eval.max_tokens if max_tokens is None else max_tokens
    tok = load_tokenizer(run)
    (sep_id,) = tok.encode(tok.separator)
    return sequence_documents(_eval_stream(run, cfg, spec, split), cfg.train.seq_len, cap, sep_id).tolist()
