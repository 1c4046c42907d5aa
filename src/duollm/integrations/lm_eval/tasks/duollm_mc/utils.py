"""Loader of the duollm_mc task (lm-evaluation-harness imports this file by path)."""

import glob
import os
import random
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "duollm_ppl" / "duollm_ppl.txt"
CHOICES = 4


def _text(spec: str) -> str:
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
    if not files:
        raise ValueError(f"duollm_mc: data_file {spec!r} matches no file")
    return "\n".join(p.read_text(encoding="utf-8") for p in files)


def items(text: str, window_words: int = 48, seed: int = 0) -> list[dict]:
    """One item per window of ``window_words`` words: context the first 3/4, choices the rest of this
    window and of the windows n/4, n/2 and 3n/4 further on (each continuation is once the answer and three
    times a distractor), in a seeded order."""
    words = text.split()
    n = len(words) // window_words
    if n < CHOICES:
        raise ValueError(f"duollm_mc: the text has {len(words)} words, fewer than {CHOICES} windows of {window_words}")
    cut = (3 * window_words) // 4
    windows = [words[i * window_words:(i + 1) * window_words] for i in range(n)]
    shifts = [0] + [round(j * n / CHOICES) % n for j in range(1, CHOICES)]
    rng = random.Random(seed)
    out = []
    for i, w in enumerate(windows):
        order = list(range(CHOICES))
        rng.shuffle(order)
        out.append({"context": " ".join(w[:cut]), "gold": order.index(0),
                    "choices": [" ".join(windows[(i + shifts[j]) % n][cut:]) for j in order]})
    return out


def load_items(data_file=None, window_words=48, **_):
    """A DatasetDict with a ``test`` split of items (``context``, ``choices``, ``gold``)."""
    import datasets

    docs = items(_text(str(data_file or DEFAULT_TEXT)), int(window_words))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
