"""Count versus compute and out-of-sample baselines (oracle/selection.py, issue 27): the nulls and the
cross-fitted fixed@k / best-of-100 of the exhaustive pass against their definitions on the full loss
matrix of one plain forward per pattern (the naive evaluator); the study keeps that matrix itself.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import copy_trained

from duollm.model.routing import BIG
from duollm.oracle import build_plan, build_spec, naive_losses, run_oracle
from duollm.oracle.selection import DRAWS
from duollm.oracle.space import code_strings
from test_oracle import tiny_model, tokens


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def naive_matrix(model, idx, tgt, plan) -> np.ndarray:
    """``loss_PN`` (float64): one full forward per pattern of the plan."""
    loss_PN = np.zeros((len(plan.route_PL), idx.numel()))
    for p, loss_ST in naive_losses(model, idx, tgt, plan.route_PL):
        loss_PN[p] = loss_ST.reshape(-1).numpy()
    return loss_PN


def subsets(plan) -> list[np.ndarray]:
    """The patterns of each subset x, from the plan's per-pattern membership."""
    X = plan.nulls.n_subsets
    return [np.array([p for p, x_P in enumerate(plan.nulls.subsets_of_P) if x in x_P]) for x in range(X)]


def test_count_null_and_equal_count_oracle_equal_brute_force(model, tmp_path):
    """At most k of 4 big (k = 1, 3): the count null draws n = candidates(k) patterns with 2 big layers, capped
    at the 6 there are (k = 3 has 15 candidates); the equal-count oracle draws 4 and 6 of the budget's own."""
    idx, tgt = tokens(S=4, T=8)
    spec = build_spec(4, options="SB", budgets="1,3", budget_mode="max")
    s = run_oracle(model, idx, tgt, spec, tmp_path / "o", batch_tokens=16, progress=False)
    plan = build_plan(spec)
    assert build_plan(spec).fingerprint() == plan.fingerprint()  # the same draw every time
    loss_PN = naive_matrix(model, idx, tgt, plan)
    bigs_P = (plan.route_PL == BIG).sum(1)
    members_X = subsets(plan)
    table = pq.read_table(tmp_path / "o" / "per_token.parquet").to_pandas()
    seen = set()
    for u, fam in enumerate(plan.nulls.families):
        draws = members_X[u * DRAWS:(u + 1) * DRAWS]
        pool = (bigs_P == 2) & plan.member_JP.any(0) if fam.kind == "count_null" else plan.member_JP[fam.j]
        for m in draws:
            assert len(m) == fam.n and pool[m].all()  # n distinct patterns of the pool
        assert len({tuple(m) for m in draws}) > 1 or fam.n == pool.sum()  # the draws differ where they can
        want_N = np.mean([loss_PN[m].min(0) for m in draws], axis=0)
        np.testing.assert_allclose(table[fam.column].to_numpy(), want_N, atol=1e-4)
        seen.add(fam.column)
    assert seen == {"count_null_loss_k1", "count_null_loss_k3", "equal_count_n4_loss_k1", "equal_count_n4_loss_k3",
                    "equal_count_n6_loss_k3"}
    k1, k3 = s["budgets"]
    assert (k1["count_null_n"], k1["count_null_capped"]) == (5, False)
    assert (k3["count_null_n"], k3["count_null_capped"]) == (6, True)
    assert set(k1["equal_count_ppl"]) == {"4"} and set(k3["equal_count_ppl"]) == {"4", "6"}
    assert k3["equal_count_ppl"]["6"] == pytest.approx(math.exp(table["equal_count_n6_loss_k3"].mean()), rel=1e-5)
    assert k3["count_null_ppl_lo"] <= k3["count_null_ppl"] <= k3["count_null_ppl_hi"]
    assert s["selection_nulls"] == {"draws": DRAWS, "count_null_bigs": 2, "count_null_pool": 6, "equal_count_n": [4, 6]}


def test_equal_count_of_every_candidate_is_the_oracle_and_a_beam_has_no_nulls(model, tmp_path):
    idx, tgt = tokens(S=2, T=8)
    s = run_oracle(model, idx, tgt, build_spec(4, options="SB"), tmp_path / "x", batch_tokens=16, progress=False)
    for b in s["budgets"]:
        if b["candidates"] == 6:  # k = 2: six of six is every candidate, and the count null's pool is budget 2 itself
            assert b["equal_count_ppl"]["6"] == pytest.approx(b["oracle_ppl"], rel=1e-6)
            assert b["count_null_ppl"] == pytest.approx(b["oracle_ppl"], rel=1e-6)
        assert b["count_null_n"] == b["candidates"]
    beam = run_oracle(model, idx, tgt, build_spec(4, options="SB", search="beam"), tmp_path / "b", batch_tokens=16,
                      progress=False)
    assert all(b["count_null_ppl"] is None and b["equal_count_ppl"] is None and b["fixed_oos_ppl"] is None
               for b in beam["budgets"])
    assert not [c for c in pq.read_table(tmp_path / "b" / "per_token.parquet").column_names if "null" in c or "oos" in c]


@pytest.mark.parametrize("context", ["shared", "frozen"])
def test_cross_fitted_baselines_equal_a_loop_over_held_out_sequences(model, tmp_path, context):
    """Held-out sequence s is scored under the pattern with the lowest mean loss on the other sequences, among
    the budget's candidates (fixed@k) or its random draw (best of 3 here); the first in code order on ties."""
    S, T = 5, 8
    idx, tgt = tokens(S=S, T=T)
    spec = build_spec(4, options="SB", context=context, n_random=3)
    s = run_oracle(model, idx, tgt, spec, tmp_path / "o", batch_tokens=16, progress=False)
    plan = build_plan(spec)
    loss_PN = np.zeros((len(plan.route_PL), S * T))
    for p, loss_ST in naive_losses(model, idx, tgt, plan.route_PL, context=context, reference=spec.reference):
        loss_PN[p] = loss_ST.reshape(-1).numpy()
    loss_PST = loss_PN.reshape(-1, S, T)
    names = code_strings(plan.code_P, 4)
    table = pq.read_table(tmp_path / "o" / "per_token.parquet").to_pandas()
    differs = 0
    for j, b in enumerate(s["budgets"]):
        k = b["k"]
        for key, choose_P in (("fixed", plan.member_JP[j]), ("best_of_100", plan.sample_JP[j])):
            members = np.flatnonzero(choose_P)
            chosen = [members[loss_PST[members][:, [o for o in range(S) if o != h]].mean((1, 2)).argmin()]
                      for h in range(S)]
            want_ST = np.stack([loss_PST[p, h] for h, p in enumerate(chosen)])
            np.testing.assert_allclose(table[f"{key}_oos_loss_k{k}"].to_numpy(), want_ST.reshape(-1), atol=1e-4)
            assert b[f"{key}_oos_ppl"] == pytest.approx(math.exp(want_ST.mean()), rel=1e-4)
            assert b[f"{key}_oos_ppl_lo"] <= b[f"{key}_oos_ppl"] <= b[f"{key}_oos_ppl_hi"]
            names_S = [names[p] for p in chosen]
            assert b[f"{key}_oos_patterns"] == {n: names_S.count(n) for n in set(names_S)}
            differs += len(set(chosen)) > 1
        # out of sample never beats the in-sample choice on all tokens together
        assert b["fixed_oos_ppl"] >= b["fixed_ppl"] * (1 - 1e-6)
    assert differs  # some held-out sequence chose another pattern: the test exercises the cross-fitting
    assert any("cross-fitted" in n for n in s["notes"])


def test_one_sequence_has_no_out_of_sample_baseline(model, tmp_path):
    idx, tgt = tokens(S=1, T=12)
    s = run_oracle(model, idx, tgt, build_spec(4, options="SB"), tmp_path / "o", batch_tokens=12, progress=False)
    for b in s["budgets"]:
        assert b["fixed_oos_ppl"] is None and b["fixed_oos_patterns"] is None and b["best_of_100_oos_ppl"] is None
        assert b["count_null_ppl"] is not None
    assert not [c for c in pq.read_table(tmp_path / "o" / "per_token.parquet").column_names if "oos" in c]


def test_the_study_keeps_the_loss_matrix_of_its_sweeps(tiny_run, tmp_path):
    """Rows in the order of patterns.parquet, columns in the order of per_token.parquet: a row's mean is
    that pattern's mean_loss; the column of the fixed pattern is its per-token loss."""
    from duollm.config import load_config
    from duollm.study.run import Study

    run = copy_trained(tiny_run, tmp_path / "run")
    study = Study(load_config(str(run / "config.yaml")), run, log=lambda line: None)
    assert not study.oracle_spec("sequential").keep_matrix  # its own engine: no matrix
    for options, skips in (("SB", None), ("B_", study.skips)):
        study.oracle_stage("t", 0.0, context=study.primary_context, options=options, skips=skips).run(False)
        folder = run / "oracle" / study.oracle_name(study.primary_context, options, skips)
        loss_PN = np.load(folder / "loss_matrix.npy")
        patterns = pq.read_table(folder / "patterns.parquet").to_pandas()
        table = pq.read_table(folder / "per_token.parquet").to_pandas()
        assert loss_PN.shape == (len(patterns), len(table))
        np.testing.assert_allclose(loss_PN.astype(np.float64).mean(1), patterns["mean_loss"], rtol=1e-6)
        row = {p: i for i, p in enumerate(patterns["pattern"])}
        for b in json.loads((folder / "summary.json").read_text())["budgets"]:
            np.testing.assert_allclose(loss_PN[row[b["fixed_pattern"]]], table[f"fixed_loss_k{b['k']}"], atol=1e-5)
