"""Per-sequence views of a run's outputs: what the findings resample (DESIGN 4.4a).

Every finding's statistic is a function of the sequences drawn (``stats.estimate``: a jackknife t-interval), so it needs
the outputs per sequence: an oracle's per-token table reshaped to [sequences, positions], and a
router's per-sequence numbers from its ``eval.json``. The null control's views have the same
shape on the same tokens, which makes every effect-minus-null comparison paired.

Array name legend (``docs/NOTATION.md``): S sequences, T positions, L layers.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from ..stats import estimate
from .rundata import Oracle


class OracleView:
    """An oracle's ``per_token.parquet`` as [S, T] arrays."""

    def __init__(self, o: Oracle):
        self.oracle = o
        table = o.per_token()
        if table is None:
            raise ValueError(f"oracle {o.name} has no per-token table")
        self.table = table
        seq = table.column("sequence").to_numpy()
        pos = table.column("position").to_numpy()
        self.T = int(pos.max()) + 1
        self.S = len(seq) // self.T
        assert (seq == np.repeat(np.arange(self.S), self.T)).all() and (pos == np.tile(np.arange(self.T), self.S)).all(), \
            "per-token rows are sequence-major"
        self._cache: dict[str, np.ndarray] = {}

    def has(self, column: str) -> bool:
        return column in self.table.column_names

    def loss(self, column: str) -> np.ndarray:
        """``loss_ST`` (float64) of a loss column, e.g. ``oracle_loss_k4``, ``loss_all_big``."""
        if column not in self._cache:
            self._cache[column] = self.table.column(column).to_numpy().astype(np.float64).reshape(self.S, self.T)
        return self._cache[column]

    def seq_loss(self, column: str) -> np.ndarray:
        """Mean loss per sequence ``[S]``."""
        return self.loss(column).mean(1)

    def letters(self, column: str) -> np.ndarray:
        """``letter_STL`` (one-character strings B/S/_) of a pattern column, e.g. ``best_pattern_k4``."""
        key = f"letters:{column}"
        if key not in self._cache:
            strings = self.table.column(column).combine_chunks()
            strings = strings.dictionary_decode() if hasattr(strings, "dictionary_decode") else strings
            flat = np.array(strings.to_pylist(), dtype="U")
            self._cache[key] = flat.view("U1").reshape(self.S, self.T, -1)
        return self._cache[key]

    def share_SL(self, column: str, letter: str) -> np.ndarray:
        """Per sequence and layer: the share of tokens whose pattern takes ``letter`` there."""
        return (self.letters(column) == letter).mean(1)

    @cached_property
    def groups(self) -> np.ndarray | None:
        """``doc_S``: the document each sequence starts in (the unit intervals resample), where the oracle
        recorded it and the text has at least half as many documents as windows; None: every sequence its own
        unit."""
        docs = self.oracle.summary.get("documents")
        if docs is None or len(docs) != self.S:
            return None
        # a text of few long documents (tinyshakespeare is one) would leave too few units for an interval: there
        # the windows, spread over the whole split, are the unit
        return np.asarray(docs) if len(set(docs)) >= max(2, self.S / 2) else None

    def estimate(self, stat, **kw) -> dict:
        """``stats.estimate`` of a statistic of these sequences, resampling by document where recorded."""
        return estimate(stat, self.S, groups_S=self.groups, **kw)

    @cached_property
    def budgets(self) -> list[int]:
        return sorted(int(c[len("oracle_loss_k"):]) for c in self.table.column_names if c.startswith("oracle_loss_k"))


def view(o: Oracle | None) -> OracleView | None:
    if o is None or o.per_token() is None:
        return None
    return OracleView(o)


def ppl_of(loss_S: np.ndarray) -> float:
    return float(np.exp(loss_S.mean()))


def gain(better_S: np.ndarray, worse_S: np.ndarray) -> float:
    """Relative perplexity gain ``1 - ppl(better) / ppl(worse)`` of per-sequence mean losses: a
    scale-free effect, comparable between a trained model and the null (perplexities ~20x apart)."""
    return float(1.0 - np.exp(better_S.mean() - worse_S.mean()))


def slope(share_L: np.ndarray) -> float:
    """Least-squares slope of a per-layer share over the layer index, per layer (> 0: rises with depth)."""
    x = np.arange(len(share_L), dtype=np.float64)
    x -= x.mean()
    return float((x * (share_L - share_L.mean())).sum() / (x * x).sum())


def max_drop(rate_L: np.ndarray) -> float:
    """The largest fall of a per-layer rate going deeper, max over i < j of rate_i - rate_j: 0 for any
    rate that never falls (early exit: 0 ... 0 then 1 ... 1)."""
    running_max = np.maximum.accumulate(rate_L)
    return float((running_max - rate_L).max())
