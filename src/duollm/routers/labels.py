"""The oracle's per-token best patterns at one budget, as imitation labels and for agreement.

Reads ``RUN/oracle/<name>/per_token.parquet`` (and ``oracle_loss.npy``) onto the evaluation grid,
checking that the oracle scored this run's evaluation tokens.

Tensor legend (``docs/NOTATION.md``): L layers, S evaluation sequences, T positions, N tokens, P patterns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import rundir
from ..io import read_table
from ..model.routing import canonical_options, parse_pattern


@dataclass
class OracleTable:
    """The oracle's per-token best patterns at one budget, placed on the evaluation grid [S, T]."""

    name: str
    k: int
    summary: dict  # summary.json
    budget: dict  # the summary's entry for k
    route_LST: torch.Tensor  # best pattern per token (int64); meaningful where covered_ST
    covered_ST: torch.Tensor  # bool: tokens the oracle scored
    loss_ST: torch.Tensor | None  # oracle loss per token at k (from oracle_loss.npy), where covered
    folder: Path | None = None  # RUN/oracle/<name>

    def column_ST(self, column: str) -> torch.Tensor | None:
        """A per-token float column of the oracle's table on the evaluation grid (NaN where not
        covered), e.g. ``fixed_loss_k4``; None when the table has no such column."""
        if self.folder is None:
            return None
        table = read_table(self.folder / rundir.PER_TOKEN)
        if column not in table.column_names:
            return None
        out_ST = torch.full(self.covered_ST.shape, float("nan"))
        seq_N = torch.from_numpy(table.column("sequence").to_numpy().astype(np.int64))
        pos_N = torch.from_numpy(table.column("position").to_numpy().astype(np.int64))
        out_ST[seq_N, pos_N] = torch.from_numpy(table.column(column).to_numpy().astype(np.float32))
        return out_ST

    @property
    def sequences(self) -> torch.Tensor:
        """Indices of the evaluation sequences the oracle covered completely."""
        return self.covered_ST.all(1).nonzero().squeeze(1)


def find_oracle(run: Path, options: str, k: int, name: str = "", split: str = "validation") -> str | None:
    """The oracle to compare with: ``name`` if given, else one of ``split`` (validation: the comparison;
    train: labels to learn from, ``duollm oracle --split train``) with these options and budget k,
    preferring the paper's ``shared`` context, then the newest."""
    run = Path(run)
    names = rundir.oracle_names(run)
    if name:
        if name not in names:
            raise ValueError(f"no oracle {name!r} in {run / rundir.ORACLE} (found: {', '.join(names) or 'none'})")
        return name
    matches = []
    for n in names:
        folder = rundir.oracle_dir(run, n)
        summary = rundir.oracle_summary(folder)
        if canonical_options(str(summary.get("options", "SB"))) == options and any(
            b.get("k") == k for b in summary.get("budgets", [])
        ) and summary.get("split", "validation") == split:  # a training-split table is never the comparison
            matches.append((summary.get("context") == "shared", (folder / rundir.SUMMARY).stat().st_mtime, n))
    return max(matches)[2] if matches else None


def load_oracle_table(run: Path, name: str, k: int, idx_ST: torch.Tensor, tgt_ST: torch.Tensor,
                      options: str | None = None, pattern: str = "best") -> OracleTable:
    """Read ``RUN/oracle/<name>`` at budget ``k`` onto the evaluation grid of ``idx_ST``. ``pattern``: whose
    per-token patterns ``route_LST`` holds: ``best`` (the oracle's, least loss) or ``belief`` (the belief
    oracle's: the pattern whose predictive distribution is closest in KL to all-big's, chosen without labels).

    The table's rows carry ``sequence`` and ``position`` in the canonical evaluation order
    (DESIGN 5) and ``token``; the tokens are checked against ``idx_ST`` (or ``tgt_ST``) so an
    oracle computed on other text is refused rather than silently compared.
    """
    folder = rundir.oracle_dir(run, name)
    summary = rundir.oracle_summary(folder)
    L = int(summary.get("n_layers", 0)) or None
    if options is not None and canonical_options(str(summary.get("options", "SB"))) != options:
        raise ValueError(f"oracle {name} has options {summary.get('options')}; the router uses {options}")
    ks = [b.get("k") for b in summary.get("budgets", [])]
    if k not in ks:
        raise ValueError(f"oracle {name} has no budget k={k} (has {', '.join(map(str, ks))})")
    column = f"{pattern}_pattern_k{k}"
    table = read_table(folder / rundir.PER_TOKEN)
    if column not in table.column_names:
        hint = " (the belief oracle's patterns come from an exhaustive oracle of duollm >= engine 6)" if pattern != "best" else ""
        raise ValueError(f"oracle {name}: per_token.parquet has no column {column}{hint}")
    seq_N = torch.from_numpy(table.column("sequence").to_numpy().astype(np.int64))
    pos_N = torch.from_numpy(table.column("position").to_numpy().astype(np.int64))
    S, T = idx_ST.shape
    if len(seq_N) and (seq_N.max() >= S or pos_N.max() >= T or seq_N.min() < 0 or pos_N.min() < 0):
        raise ValueError(f"oracle {name} covers positions outside the evaluation tokens ({S} x {T}); "
                         f"was it computed with another sequence length or data?")
    if "token" in table.column_names:
        tok_N = torch.from_numpy(table.column("token").to_numpy().astype(np.int64))
        if not (torch.equal(tok_N, idx_ST[seq_N, pos_N]) or torch.equal(tok_N, tgt_ST[seq_N, pos_N])):
            raise ValueError(f"oracle {name} was computed on other tokens than this run's evaluation tokens")
    patterns = np.asarray(table.column(column).to_pylist(), dtype=object)
    uniq, inverse = np.unique(patterns.astype(str), return_inverse=True)
    L = L or len(uniq[0])
    route_PL = torch.tensor([parse_pattern(p, L) for p in uniq], dtype=torch.long).view(len(uniq), L)
    route_LN = route_PL[torch.from_numpy(inverse.reshape(-1)).long()].T
    route_LST = torch.zeros(L, S, T, dtype=torch.long)
    covered_ST = torch.zeros(S, T, dtype=torch.bool)
    route_LST[:, seq_N, pos_N] = route_LN
    covered_ST[seq_N, pos_N] = True
    loss_ST = None
    npy = folder / rundir.ORACLE_LOSS
    if f"oracle_loss_k{k}" in table.column_names:
        loss_ST = torch.full((S, T), float("nan"))
        loss_ST[seq_N, pos_N] = torch.from_numpy(table.column(f"oracle_loss_k{k}").to_numpy().astype(np.float32))
    elif npy.is_file():  # rows in the order of budgets, columns in canonical token order (DESIGN 5)
        losses = np.load(npy, mmap_mode="r")
        row = np.array(losses[ks.index(k)], dtype=np.float32)  # a copy: the memmap is read-only
        if row.size <= S * T:
            loss_ST = torch.full((S * T,), float("nan"))
            loss_ST[: row.size] = torch.from_numpy(row)
            loss_ST = loss_ST.view(S, T)
    return OracleTable(name=name, k=k, summary=summary, budget=summary["budgets"][ks.index(k)],
                       route_LST=route_LST, covered_ST=covered_ST, loss_ST=loss_ST, folder=folder)


def expected_benefit(table: OracleTable) -> torch.Tensor | None:
    """``benefit_LST``: per token and layer, the mean loss of the oracle's budget-k patterns (big/small, exactly
    k big) with that layer small minus their mean with it big: the expected gain from big there, averaged over
    the other layers' choices. An expectation over C(L,k) sub-networks, where the oracle's label is their
    minimum, which rewards whatever keeps many lottery tickets open (issue 29). From the kept loss matrix
    (``rundir.LOSS_MATRIX``: row p the pattern of row p of ``patterns.parquet``, column n the token of row n of
    ``per_token.parquet``); NaN where the oracle did not score; None without the matrix or at k = 0, L."""
    folder = table.folder
    L, S, T = table.route_LST.shape
    if folder is None or not 0 < table.k < L:
        return None
    matrix, patterns = folder / rundir.LOSS_MATRIX, folder / rundir.PATTERNS
    if not matrix.is_file() or not patterns.is_file():
        return None
    t = read_table(patterns, columns=["pattern", "bigs", "skips"]).to_pydict()
    rows = [i for i, (b, sk) in enumerate(zip(t["bigs"], t["skips"])) if b == table.k and sk == 0]
    big_PL = torch.tensor([[c == "B" for c in t["pattern"][i]] for i in rows], dtype=torch.float64)
    loss_PN = torch.from_numpy(np.asarray(np.load(matrix, mmap_mode="r")[rows], dtype=np.float64))
    big_LN = big_PL.T @ loss_PN / big_PL.sum(0)[:, None]
    small_LN = (1 - big_PL).T @ loss_PN / (1 - big_PL).sum(0)[:, None]
    grid = read_table(folder / rundir.PER_TOKEN, columns=["sequence", "position"])
    seq_N = torch.from_numpy(grid.column("sequence").to_numpy().astype(np.int64))
    pos_N = torch.from_numpy(grid.column("position").to_numpy().astype(np.int64))
    out_LST = torch.full((L, S, T), float("nan"))
    out_LST[:, seq_N, pos_N] = (small_LN - big_LN).float()
    return out_LST


def holdout_split(seq_S: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) sequence indices: every ``every``-th sequence is held out (0: none)."""
    if every == 0:
        return seq_S, seq_S[:0]
    held = (torch.arange(len(seq_S)) % every) == every - 1
    return seq_S[~held], seq_S[held]


