"""Token difficulty: what a token gains from compute, set against its raw loss (DESIGN 2, 4.4).

The paper defines a token's difficulty not by its loss but by its potential to gain from more
compute: the gap between its loss with every layer small and its loss when the oracle may
spend k big layers. Per token, from the primary oracle's per-token table:

    loss_small_N, loss_big_N       all-small and all-big routing
    oracle_JN                      the oracle's loss at each budget k
    gap_JN = loss_small_N - oracle_JN         difficulty at budget k (the paper's definition)
    gain_big_N = loss_small_N - loss_big_N    what the big modules everywhere buy

The summary asks how raw loss and benefit disagree: the Spearman rank correlation of raw
small-model loss with the gap at the middle budget (k = L/2, where the oracle is near its
best), the share of high-loss tokens (top quartile) that gain little (gap below the median;
0.5 if loss said nothing about gain, 0 if it said everything), and the overlap of the top
tenth by loss with the top tenth by gap.

Outputs: ``RUN/report/difficulty.json`` (the summary and the tokens at the top of both
rankings) and ``RUN/report/difficulty.parquet`` (every token's losses and gaps).

Array name legend: N tokens, J budgets.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import rundir
from ..io import atomic_write_json, write_table
from ..stats import finite_round
from .rundata import RunData, reference_budgets

TOP = 15  # tokens listed at the head of each ranking


# ----------------------------------------------------------------------------- rank statistics


def rankdata(x_N: np.ndarray) -> np.ndarray:
    """Ranks 1..N with ties given their average rank (as ``scipy.stats.rankdata``, method average)."""
    x_N = np.asarray(x_N)
    _, inverse_N, counts_U = np.unique(x_N, return_inverse=True, return_counts=True)
    last_U = np.cumsum(counts_U)  # rank of the last element of each group of equal values
    return (last_U - (counts_U - 1) / 2.0)[inverse_N.reshape(-1)].astype(np.float64)


def spearman(x_N: np.ndarray, y_N: np.ndarray) -> float | None:
    """Spearman rank correlation: Pearson correlation of the average ranks (None if a side is constant)."""
    rx_N, ry_N = rankdata(x_N), rankdata(y_N)
    rx_N, ry_N = rx_N - rx_N.mean(), ry_N - ry_N.mean()
    denom = math.sqrt(float((rx_N**2).sum() * (ry_N**2).sum()))
    return float((rx_N * ry_N).sum() / denom) if denom > 0 else None


# ----------------------------------------------------------------------------- per-token table


def token_table(rd: RunData) -> dict | None:
    """Per-token arrays of the primary oracle (None when the run has no budget sweep)."""
    oracle = rd.primary
    table = oracle.per_token() if oracle is not None else None
    if table is None:
        return None
    cols = table.column_names
    ks = [k for k in oracle.ks if f"oracle_loss_k{k}" in cols]
    col = lambda name: table.column(name).to_numpy()
    return {
        "oracle": oracle,
        "ks": ks,
        "sequence_N": col("sequence").astype(np.int64),
        "position_N": col("position").astype(np.int64),
        "token_N": col("token").astype(np.int64),
        "target_N": col("target").astype(np.int64),
        "loss_small_N": col("loss_all_small").astype(np.float64),
        "loss_big_N": col("loss_all_big").astype(np.float64),
        "oracle_JN": np.stack([col(f"oracle_loss_k{k}").astype(np.float64) for k in ks]),
    }


def reference_k(ks: list[int], n_layers: int) -> int:
    """The budget difficulty is measured at: the middle budget L/2, or the nearest one present."""
    mid = reference_budgets(n_layers)["middle"]
    return min(ks, key=lambda k: (abs(k - mid), k))


def context_text(rd: RunData, tab: dict, i: int, before: int = 3) -> str:
    """``…input tokens [target]``: the target token of row i after a few tokens of its context."""
    s, t = tab["sequence_N"][i], tab["position_N"][i]
    rows = np.flatnonzero((tab["sequence_N"] == s) & (tab["position_N"] > t - before) & (tab["position_N"] <= t))
    rows = rows[np.argsort(tab["position_N"][rows])]
    ctx = "".join(rd.token_text(tab["token_N"][rows]))
    return f"{ctx}[{rd.token_text([tab['target_N'][i]])[0]}]"


# ----------------------------------------------------------------------------- summary


def _r(x, nd: int = 6):
    return finite_round(x, nd)


def summarize(rd: RunData, tab: dict) -> dict:
    """The difficulty summary of a per-token table (see the module docstring)."""
    L = rd.n_layers
    ks = tab["ks"]
    k_ref = reference_k(ks, L)
    small_N, big_N = tab["loss_small_N"], tab["loss_big_N"]
    gap_JN = small_N[None] - tab["oracle_JN"]
    gap_N = gap_JN[ks.index(k_ref)]
    N = len(small_N)

    high_loss_N = small_N >= np.quantile(small_N, 0.75)
    low_gain_N = gap_N < np.median(gap_N)
    n_top = max(1, N // 10)
    # stable orders (ties broken by canonical token order) keep the output deterministic
    by_loss_N = np.argsort(-small_N, kind="stable")
    by_gap_N = np.argsort(-gap_N, kind="stable")
    overlap = len(set(by_loss_N[:n_top].tolist()) & set(by_gap_N[:n_top].tolist())) / n_top
    quartile_N = np.minimum(3, (rankdata(small_N) - 1) * 4 // N).astype(int)

    def listing(order_N):
        return [{
            "sequence": int(tab["sequence_N"][i]), "position": int(tab["position_N"][i]),
            "target": int(tab["target_N"][i]), "text": context_text(rd, tab, int(i)),
            "loss_small": _r(small_N[i], 4), "loss_big": _r(big_N[i], 4),
            "loss_oracle": _r(tab["oracle_JN"][ks.index(k_ref), i], 4), "gap": _r(gap_N[i], 4),
            "loss_rank": int(np.flatnonzero(by_loss_N == i)[0]) + 1,
            "gap_rank": int(np.flatnonzero(by_gap_N == i)[0]) + 1,
        } for i in order_N[:TOP]]

    return {
        "oracle": tab["oracle"].name,
        "context": tab["oracle"].context,
        "tokens": int(N),
        "k_ref": int(k_ref),
        "definition": f"gap = loss(all small) - loss(oracle at k); difficulty is the gap at k = {k_ref}",
        "mean_loss_small": _r(small_N.mean()),
        "mean_loss_big": _r(big_N.mean()),
        "mean_gain_big": _r((small_N - big_N).mean()),
        "per_budget": [{"k": int(k), "mean_loss_oracle": _r(tab["oracle_JN"][j].mean()),
                        "mean_gap": _r(gap_JN[j].mean()),
                        "share_gaining": _r((gap_JN[j] > 0).mean())} for j, k in enumerate(ks)],
        "spearman_small_loss_vs_gap": _r(spearman(small_N, gap_N)),
        "spearman_small_loss_vs_big_gain": _r(spearman(small_N, small_N - big_N)),
        "spearman_big_gain_vs_gap": _r(spearman(small_N - big_N, gap_N)),
        "high_loss_low_gain_share": _r(low_gain_N[high_loss_N].mean()),
        "high_loss_low_gain_note": "share of the top quarter by all-small loss whose gap is below the median gap "
                                   "(0.5: loss says nothing about gain; 0: high loss always means high gain)",
        "top_decile_overlap": _r(overlap),
        "top_decile_note": f"share of the {n_top} highest-loss tokens that are also among the {n_top} highest-gap tokens",
        "mean_gap_by_loss_quartile": [_r(gap_N[quartile_N == q].mean()) if (quartile_N == q).any() else None
                                      for q in range(4)],
        "top_by_gap": listing(by_gap_N),
        "top_by_loss": listing(by_loss_N),
    }


def difficulty(run: Path) -> dict | None:
    """The difficulty summary of a run folder (None when it has no budget sweep)."""
    rd = RunData(run)
    tab = token_table(rd)
    return summarize(rd, tab) if tab is not None else None


def difficulty_table(rd: RunData) -> tuple[dict | None, dict | None]:
    """``(summary, columns)`` of ``difficulty.json`` and ``difficulty.parquet`` (the report writes them), or
    ``(None, None)`` when the run has no oracle to measure difficulty with."""
    tab = token_table(rd)
    if tab is None:
        return None, None
    summary = summarize(rd, tab)
    cols = {
        "sequence": tab["sequence_N"].astype(np.int32),
        "position": tab["position_N"].astype(np.int32),
        "token": tab["token_N"].astype(np.int32),
        "target": tab["target_N"].astype(np.int32),
        "target_text": rd.token_text(tab["target_N"]),
        "loss_all_small": tab["loss_small_N"].astype(np.float32),
        "loss_all_big": tab["loss_big_N"].astype(np.float32),
        "gain_big": (tab["loss_small_N"] - tab["loss_big_N"]).astype(np.float32),
    }
    for j, k in enumerate(tab["ks"]):
        cols[f"oracle_loss_k{k}"] = tab["oracle_JN"][j].astype(np.float32)
    for j, k in enumerate(tab["ks"]):
        cols[f"gap_k{k}"] = (tab["loss_small_N"] - tab["oracle_JN"][j]).astype(np.float32)
    return summary, cols


def write_difficulty(folder: Path, summary: dict, cols: dict) -> None:
    """``difficulty.json`` and ``difficulty.parquet`` into ``folder`` (the report being written)."""
    write_table(Path(folder) / rundir.DIFFICULTY_TABLE, cols)
    atomic_write_json(Path(folder) / rundir.DIFFICULTY_SUMMARY, summary)
