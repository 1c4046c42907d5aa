"""Loader and metrics of the duollm_ppl task (lm-evaluation-harness imports this file by path)."""

import glob
import os
import re
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parent / "duollm_ppl.txt"


def _files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
    if not files:
        raise ValueError(f"duollm_ppl: data_file {spec!r} matches no file")
    return files


def load_docs(data_file=None, **_):
    """A DatasetDict with a ``test`` split: one document (``text``) per file.

    lm-eval passes the task metadata (``--metadata`` and, from the Python API, the model
    arguments) as keyword arguments; only ``data_file`` is used here.
    """
    import datasets

    docs = [{"text": p.read_text(encoding="utf-8"), "source": str(p)} for p in _files(str(data_file or DEFAULT_TEXT))]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def process_results(doc, results):
    (loglikelihood,) = results
    text = doc["text"]
    n_words = len(re.split(r"\s+", text.strip()))
    n_bytes = len(text.encode("utf-8"))
    out = {
        "word_perplexity": (float(loglikelihood), n_words),
        "byte_perplexity": (float(loglikelihood), n_bytes),
        "bits_per_byte": (float(loglikelihood), n_bytes),
    }
    # the duollm wrapper's log-likelihood is a float that also carries the number of tokens it scored
    n_tokens = getattr(loglikelihood, "tokens", None)
    if n_tokens:
        out["token_perplexity"] = (float(loglikelihood), n_tokens)
    return out
