"""Corpora, tokenizers and the deterministic train/validation split, in memory.

Data specs (DESIGN section 5):
    builtin:pydoc         the English prose of the Python documentation shipped with the standard library:
                          the reference manual topics (``pydoc_data.topics``, ~465K characters) followed by
                          the module, class and function docstrings of the stdlib sources (~1.4M characters)
    builtin:pydoc-topics  the reference manual topics alone
    file:PATH             a text file, a folder (every file under it, sorted) or a glob
    hf:NAME[:CONFIG]      a Hugging Face dataset through ``datasets`` (streamed, capped by data.max_chars)
    hf:FOLDER             a folder written by ``Dataset.save_to_disk`` (a ``DatasetDict``: its train split)
    hf:json|parquet|csv   ``datasets``' file builders on exactly the files of ``data.data_files``

Documents (files of a folder, rows of a dataset, the builtin corpus' topics and docstrings) are
joined with the tokenizer's end-of-text token (``EOS`` for the BPE trained here), which encodes
to that one id: the model sees where a document ends instead of guessing it from blank lines.

Split: the corpus text is cut into chunks of ``data.split_chunk_chars`` characters and every
k-th chunk (k = round(1 / val_fraction)) goes to validation, so validation is disjoint from
training and spread over the whole corpus. The BPE tokenizer is trained on the training
chunks only. ``build_data`` does all of it in memory; ``cache.py`` writes it into a run folder
(the token ids as memmaps) and reads it back.

Tensor name legend: S sequences, T positions, B batch.
"""

from __future__ import annotations

import ast
import glob as globlib
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_path

EOS = "<|endoftext|>"


# ----------------------------------------------------------------------------- corpora


BUILTIN = ("pydoc", "pydoc-topics")
# the kinds of data spec, for --help (a new kind: here, in parse_data_spec and in read_documents)
SPEC_HELP = "builtin:pydoc | file:PATH | hf:NAME[:CONFIG] | hf:FOLDER (save_to_disk) | hf:json|parquet|csv (data.data_files)"


def one_line(e: BaseException, limit: int = 300) -> str:
    """A library's error as one line: its whole message with the line breaks folded (the first line alone
    cut some at a colon, "Couldn't instantiate the backend tokenizer from one of:"), capped."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_local_path(name: str) -> bool:
    """A name written as a path on this machine (absolute, ./, ../, ~), not a Hub id like org/model."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def parse_data_spec(spec: str) -> tuple[str, str]:
    """``(kind, argument)`` of a data spec, taken literally; a one-line ValueError if malformed."""
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in ("builtin", "file", "hf"):
        raise ValueError(f"data spec {spec!r} must start with builtin:, file: or hf:")
    if kind == "builtin" and arg not in BUILTIN:
        raise ValueError(f"unknown builtin corpus {arg!r} (known: {', '.join(BUILTIN)})")
    if kind == "file" and not arg:
        raise ValueError("data spec file: needs a path, e.g. file:corpus.txt")
    if kind == "hf" and not arg.partition(":")[0]:
        raise ValueError("data spec hf: needs a dataset name, e.g. hf:wikitext:wikitext-2-raw-v1")
    return kind, arg


def read_corpus(spec: str, text_column: str = "text", max_chars: int = 0, data_files: str = "", sep: str = EOS) -> str:
    """The text of a data spec, documents joined by ``sep`` (the end-of-text token); ValueError with a
    one-line reason on bad specs or empty corpora."""
    docs = read_documents(spec, text_column, max_chars, data_files)
    text = sep.join(d for d in docs if d.strip())  # an empty row or file is no document: no runs of EOS
    if max_chars and len(text) > max_chars:
        text = text[: safe_cut(text, max_chars, sep)]
    if not text.strip():
        raise ValueError(f"corpus {spec} is empty")
    return text


def read_documents(spec: str, text_column: str = "text", max_chars: int = 0, data_files: str = "") -> list[str]:
    """The documents of a data spec, in order (an hf dataset's reading stops after ``max_chars``)."""
    kind, arg = parse_data_spec(spec)
    check_data_files(spec, data_files)
    if kind == "builtin":
        from pydoc_data.topics import topics

        docs = [topics[k].strip() for k in sorted(topics)]
        return docs + stdlib_docstrings() if arg == "pydoc" else docs
    if kind == "file":
        return [_read_file(p) for p in _expand_path(arg)]
    return _read_hf(arg, text_column, max_chars, data_files)


def safe_cut(text: str, at: int, sep: str) -> int:
    """``at``, or the start of the separator it would cut in two (a half ``<|endoftext|>`` is plain text)."""
    if not sep or at <= 0 or at >= len(text):
        return at
    hit = text.find(sep, max(0, at - len(sep) + 1), at + len(sep) - 1)
    return hit if 0 <= hit < at else at


def stdlib_docstrings(min_chars: int = 80) -> list[str]:
    """Docstrings of the standard library sources, read with ``ast`` (nothing is imported).

    The 465K characters of ``pydoc_data.topics`` alone are too few tokens for the ``cpu``
    preset's training budget (the model would see them ~20 times); the docstrings are the
    same kind of English technical prose and triple the corpus. Test suites are left out.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


def _expand_path(arg: str) -> list[Path]:
    path = Path(arg).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"folder {arg} holds no files")
        return files
    matches = sorted(Path(p) for p in globlib.glob(os.path.expanduser(arg), recursive=True) if Path(p).is_file())
    if not matches:
        raise ValueError(f"no file matches {arg}")
    return matches


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


FILE_BUILDERS = ("json", "parquet", "csv")  # datasets' packaged builders: hf:json reads data.data_files


def parse_data_files(text: str) -> list[str]:
    """``data.data_files``: one path or glob, or several comma-separated."""
    return [x.strip() for x in str(text).split(",") if x.strip()]


def check_data_files(spec: str, data_files: str) -> None:
    """hf:json, hf:parquet and hf:csv read exactly ``data.data_files`` (never the working directory);
    no other spec reads it, so a set ``data_files`` elsewhere is a mistake."""
    kind, arg = parse_data_spec(spec)
    builder = arg.partition(":")[0] if kind == "hf" else ""
    if builder in FILE_BUILDERS and not parse_data_files(data_files):
        raise ValueError(f"data spec {spec} reads the files of data.data_files; set data.data_files=PATH_OR_GLOB[,...]")
    if parse_data_files(data_files) and builder not in FILE_BUILDERS:
        raise ValueError(f"data.data_files is read only by hf:{', hf:'.join(FILE_BUILDERS)}; the data spec is {spec}")


def expand_data_files(text: str) -> list[str]:
    """The files of ``data.data_files``, globs expanded here (sorted), so nothing else is ever read."""
    files: list[str] = []
    for item in parse_data_files(text):
        pattern = os.path.expanduser(item)
        found = sorted(p for p in globlib.glob(pattern, recursive=True) if Path(p).is_file())
        if not found:
            raise ValueError(f"data.data_files: no file matches {item}")
        files += [str(Path(p).resolve()) for p in found if str(Path(p).resolve()) not in files]
    if not files:
        raise ValueError("data.data_files is empty; set it to the files to read, e.g. data.data_files=corpus/*.jsonl")
    return files


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` (``state.json``) or ``DatasetDict.save_to_disk``."""
    path = Path(path).expanduser()
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _hf_rows(datasets, arg: str, data_files: str):
    """The rows of an hf: spec: a saved folder through ``load_from_disk`` (load_dataset would scan it
    as loose files), a file builder on ``data_files`` only, anything else streamed from the Hub or a folder."""
    if is_saved_dataset(Path(arg)):
        ds = datasets.load_from_disk(str(Path(arg).expanduser()))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"saved dataset {arg} has no train split (it has {', '.join(ds)})")
            others = [s for s in ds if s != "train"]
            if others:  # duollm's own split keeps validation disjoint and spread over the corpus (module docstring)
                print(f"hf:{arg}: its train split is read and split by data.val_fraction; its {', '.join(others)} "
                      f"split{'s are' if len(others) > 1 else ' is'} not used", file=sys.stderr)
            ds = ds["train"]
        return ds
    if Path(arg).expanduser().is_file():
        raise ValueError(f"hf:{arg} names a file: read local files with hf:json, hf:parquet or hf:csv and "
                         f"data.data_files={arg} (or file:{arg} for plain text)")
    name, _, config = arg.partition(":")
    if name in FILE_BUILDERS:  # read_documents checked that data_files is set
        return datasets.load_dataset(name, config or None, data_files=expand_data_files(data_files), split="train",
                                     streaming=True)
    return datasets.load_dataset(name, config or None, split="train", streaming=True)


def _read_hf(arg: str, text_column: str, max_chars: int, data_files: str = "") -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError("hf: data needs the datasets package: pip install 'duollm[hf]'") from None
    try:
        parts, total = [], 0
        for row in _hf_rows(datasets, arg, data_files):
            if text_column not in row:
                raise ValueError(f"dataset {arg} has no column {text_column!r} (set data.text_column)")
            value = row[text_column] or ""
            if not isinstance(value, str):
                raise ValueError(f"dataset {arg}: column {text_column!r} holds {type(value).__name__} values, not text")
            parts.append(value)
            total += len(value)
            if max_chars and total >= max_chars:
                break
    except ValueError:
        raise
    except Exception as e:  # offline, unknown dataset, ...: one line, no traceback
        raise ValueError(f"cannot load Hugging Face dataset {arg}: {one_line(e)}") from None
    return parts


def split_text(text: str, chunk_chars: int, val_fraction: float, seed: int = 0,
               sep: str = EOS) -> tuple[list[str], list[str]]:
    """Deterministic split into training and validation chunks (every k-th chunk validates).

    A chunk boundary that would cut a separator in two moves to the separator's start, so every
    separator reaches the tokenizer whole (one end-of-text id); other boundaries stay put."""
    k = max(2, round(1 / val_fraction))
    cuts = sorted({safe_cut(text, i, sep) for i in range(chunk_chars, len(text), chunk_chars)} - {0})
    bounds = [0, *cuts, len(text)]
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    train = [c for i, c in enumerate(chunks) if i % k != seed % k]
    val = [c for i, c in enumerate(chunks) if i % k == seed % k]
    if not val:  # a corpus shorter than k chunks: hold out its last fraction instead
        cut = safe_cut(text, int(len(text) * (1 - val_fraction)), sep)
        train, val = [text[:cut]], [text[cut:]]
    return train, val


# ----------------------------------------------------------------------------- tokenizer


class TextTokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` or a transformers tokenizer."""

    def __init__(self, backend, kind: str):
        self.backend, self.kind = backend, kind

    @property
    def vocab_size(self) -> int:
        if self.kind == "bpe":
            return self.backend.get_vocab_size()
        return len(self.backend)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "bpe":
            return [e.ids for e in self.backend.encode_batch(texts)]
        return [self.backend(t, add_special_tokens=False)["input_ids"] for t in texts]

    @property
    def separator(self) -> str:
        """The text that joins documents: the end-of-text token, which encodes to that one id (a
        registered special token); blank lines for a pretrained tokenizer without one."""
        if self.kind == "bpe":
            return EOS if self.backend.token_to_id(EOS) is not None else "\n\n"
        return getattr(self.backend, "eos_token", None) or "\n\n"

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids) -> str:
        return self.backend.decode(list(map(int, ids)))

    def token_strings(self, ids) -> list[str]:
        """Per-token text (for per-token tables and coloured-token figures)."""
        return [self.decode([i]) for i in ids]

    def save(self, path: Path) -> None:
        """A BPE tokenizer to the file ``path``, a pretrained one to the folder ``path``."""
        if self.kind == "bpe":
            with atomic_path(path) as tmp:
                self.backend.save(str(tmp))
        else:
            self.backend.save_pretrained(str(path))


def load_bpe(path: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    try:
        return TextTokenizer(Tokenizer.from_file(str(path)), "bpe")
    except Exception:
        raise ValueError(f"{path} is corrupt") from None


def train_bpe(texts: list[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE trained offline on ``texts`` (no network).

    The trainer does not split at special tokens: it would learn merges of ``<|endoftext|>``'s
    characters (``<|``, ``endoftext``) from the separators. It sees the documents between them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [piece for t in texts for piece in t.split(EOS) if piece]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return TextTokenizer(tok, "bpe")


def pretrained_tokenizer(name: str) -> TextTokenizer:
    if is_local_path(name) and not Path(name).expanduser().exists():
        raise ValueError(f"cannot load tokenizer {name}: no such folder")
    try:
        from transformers import AutoTokenizer

        return TextTokenizer(AutoTokenizer.from_pretrained(name), "pretrained")
    except Exception as e:
        raise ValueError(f"cannot load tokenizer {name}: {one_line(e)}") from None


# ----------------------------------------------------------------------------- token cache


def dtype_for(vocab: int):
    return np.uint16 if vocab <= 65535 else np.uint32


def data_fingerprint(cfg) -> str:
    """What the token cache was made from. ``data_files`` joins only when set: caches made before the key
    existed keep their fingerprint, so resuming such a run never re-tokenizes (and re-trains its BPE)."""
    fields = {k: v for k, v in cfg.data.__dict__.items() if k != "data_files" or v}
    return hashlib.sha256(json.dumps([fields, cfg.model.vocab_size]).encode()).hexdigest()[:16]


@dataclass
class PreparedData:
    """A tokenized corpus in memory, not yet written: ``build_data`` may refuse, ``write_data`` writes."""

    tokenizer: TextTokenizer
    splits: dict  # "train"/"val" -> int64 ids
    meta: dict


def build_data(cfg, log=print) -> PreparedData:
    """Read the corpus, train/load the tokenizer and encode both splits, in memory (writes nothing).

    A pretrained tokenizer is loaded first: its end-of-text token is the documents' separator."""
    d = cfg.data
    tok = None if d.tokenizer == "bpe" else pretrained_tokenizer(d.tokenizer)
    sep = EOS if tok is None else tok.separator
    text = read_corpus(d.spec, d.text_column, d.max_chars, d.data_files, sep=sep)
    train_chunks, val_chunks = split_text(text, d.split_chunk_chars, d.val_fraction, d.seed, sep=sep)
    if tok is None:
        log(f"training a byte-level BPE tokenizer ({cfg.model.vocab_size} tokens) on {sum(map(len, train_chunks)):,} characters")
        tok = train_bpe(train_chunks, cfg.model.vocab_size)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer {cfg.data.tokenizer} has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size={tok.vocab_size} or larger"
        )
    splits = {}
    for split, chunks in (("train", train_chunks), ("val", val_chunks)):
        splits[split] = np.fromiter((i for seq in tok.encode_batch(chunks) for i in seq), dtype=np.int64)
        check_length(splits[split], cfg.train.seq_len, {"train": "training", "val": "validation"}[split])
    meta = {
        "fingerprint": data_fingerprint(cfg),
        "spec": cfg.data.spec,
        "tokenizer": cfg.data.tokenizer,
        "tokenizer_vocab": tok.vocab_size,
        "chars": len(text),
        "train_tokens": int(splits["train"].size),
        "val_tokens": int(splits["val"].size),
        "dtype": np.dtype(dtype_for(cfg.model.vocab_size)).name,
    }
    return PreparedData(tok, splits, meta)


def check_length(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"corpus too short: the {what} split has {len(tokens)} tokens, need at least {seq_len + 1} "
            f"for one sequence of train.seq_len={seq_len}"
        )


def sample_batch(tokens: np.ndarray, batch: int, seq_len: int, generator: torch.Generator):
    """Random windows (``idx_BT``, ``tgt_BT``) drawn with ``generator`` (seeded per step by the trainer)."""
    starts = torch.randint(0, len(tokens) - seq_len, (batch,), generator=generator).tolist()
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    w = torch.from_numpy(windows)
    return w[:, :-1], w[:, 1:]


def window_order(n_windows: int, n: int) -> np.ndarray:
    """The first ``n`` of ``n_windows`` windows in van der Corput order: window floor(v(i) * W) for the
    base-2 radical inverses v(0), v(1), ... = 0, 1/2, 1/4, 3/4, 1/8, ..., repeats skipped.

    Every prefix is spread evenly over the split, and a smaller cap takes a prefix of a larger one,
    so evaluations with different caps (an oracle on 1,024 tokens, ``eval`` on 8,192) share rows.
    """
    m = max(1, int(np.ceil(np.log2(max(n_windows, 2)))))
    i = np.arange(1 << m, dtype=np.int64)
    rev = np.zeros_like(i)
    for bit in range(m):  # reverse the m bits of i: v(i) = rev / 2^m
        rev |= ((i >> bit) & 1) << (m - 1 - bit)
    w = rev * n_windows >> m  # floor(v * W); j = 0..2^m-1 with 2^m >= W reach every window
    _, first = np.unique(w, return_index=True)
    return w[np.sort(first)][:n]


def sequences(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None):
    """Canonical evaluation sequences (``idx_ST``, ``tgt_ST``): whole non-overlapping windows of
    ``seq_len`` tokens, spread over the whole split (DESIGN 4.4a), never just its first pages.

    The split holds W = (len - 1) // seq_len windows; S of them are taken (all, or as many as
    ``max_tokens`` allows) in ``window_order``. The canonical token order is row-major over [S, T]
    in that order, so the evaluation of a smaller cap is the first rows of a larger one.
    """
    check_length(tokens, seq_len, "evaluation")
    start_S = _window_starts(len(tokens), seq_len, max_tokens)
    n_seq = len(start_S)
    window_ST = start_S[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    w = torch.from_numpy(np.asarray(tokens[window_ST.reshape(-1)], dtype=np.int64).reshape(n_seq, seq_len + 1))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _window_starts(n_tokens: int, seq_len: int, max_tokens: int | None) -> np.ndarray:
    """``start_S``: the first token of each evaluation window, in ``window_order``."""
    n_windows = (n_tokens - 1) // seq_len
    n_seq = n_windows if not max_tokens else max(1, min(n_windows, max_tokens // seq_len))
    return window_order(n_windows, n_seq) * seq_len


def sequence_documents(tokens: np.ndarray, seq_len: int, max_tokens: int | None, sep_id: int) -> np.ndarray:
    """``doc_S``: the document each of ``sequences``' windows starts in (the number of separators before its
    first token), in the same order. Windows of one document share its topic and style, so they are one
    unit when intervals resample sequences (DESIGN 4.4a): measured, 16 windows of the embedded corpus's
    validation split fall in 15 documents, 64 in 54."""
    start_S = _window_starts(len(tokens), seq_len, max_tokens)
    sep_pos = np.flatnonzero(np.asarray(tokens) == sep_id)
    return np.searchsorted(sep_pos, start_S, side="right")


def parse_max_tokens(value, flag: str = "--max-tokens") -> int | None:
    """A token cap from the command line: None (the config's), ``all`` (0: no cap) or an integer >= 1."""
    if value is None:
        return None
    if str(value).strip().lower() == "all":
        return 0
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, bool):
        raise ValueError(f"{flag} must be an integer >= 1, or all for no cap; got {value!r}")
    return n
