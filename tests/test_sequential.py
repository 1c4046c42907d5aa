"""The sequential oracle (issue 11, item 6): exact against a brute-force reference on tiny models,
the all-big schedule is the model's own forward, and a position-varying budget is no longer the
per-token prediction Σ w_k·oracle@k (the identity that makes the shared oracle's comparison empty)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import duollm

from duollm.oracle import build_spec
from duollm.oracle.naive import naive_sequential
from duollm.oracle.sequential import run_sequential, sequential_oracle
from duollm.oracle.space import CandidateSpace
from test_oracle import tiny_model, tokens


def candidates(L: int, options: str = "SB"):
    table = {k: CandidateSpace(L, options=options, budgets=[k]).enumerate() for k in range(L + 1)}
    return table.__getitem__


@pytest.mark.parametrize("overrides,options", [({}, "SB"), ({"skip_mode": "block"}, "SB_"), ({"n_kv_heads": 1}, "SB_")])
def test_sequential_equals_naive_for_every_candidate_at_L4(overrides, options):
    model = tiny_model(**overrides).double()  # float64: no near-tie decided by rounding
    idx, tgt = tokens(S=3, T=7)
    schedule_T = np.array([2, 1, 3, 2, 0, 4, 2])
    loss, code = sequential_oracle(model, idx, tgt, schedule_T, candidates(4, options))
    loss_ref, code_ref = naive_sequential(model, idx, tgt, schedule_T, candidates(4, options))
    np.testing.assert_array_equal(code, code_ref)
    torch.testing.assert_close(loss.double(), loss_ref.double(), atol=1e-6, rtol=0)


def test_the_all_big_schedule_is_the_models_forward():
    model = tiny_model()
    idx, tgt = tokens(S=2, T=9)
    loss, code = sequential_oracle(model, idx, tgt, np.full(9, 4), candidates(4))
    ref = model(idx, tgt, "BBBB", return_logits=False).loss_BT
    torch.testing.assert_close(loss, ref, atol=2e-5, rtol=0)
    assert (code == code[0, 0]).all()


def test_position_budgets_under_sequential_differ_from_the_per_token_prediction(tmp_path):
    model = tiny_model()
    idx, tgt = tokens(S=4, T=12)
    spec = build_spec(4, budgets="0-2", context="sequential")
    summary = run_sequential(model, idx, tgt, spec, tmp_path / "seq", progress=False)
    entries = {e["name"]: e for e in summary["position_budgets"]}
    assert set(entries) == {"constant", "falling", "rising"}  # L = 4: constant 1, falling 2->0, rising 0->2
    # a constant schedule is its own prediction; a varying one shapes its successors' context
    assert entries["constant"]["predicted_ppl"] == pytest.approx(entries["constant"]["oracle_ppl"], rel=1e-9)
    for name in ("falling", "rising"):
        e = entries[name]
        assert abs(e["oracle_ppl"] / e["predicted_ppl"] - 1) > 1e-3, e
        assert e["minus_constant"]["lo"] <= e["minus_constant"]["diff"] <= e["minus_constant"]["hi"]
    # the constant budgets agree with the engine run on their own
    loss, _ = sequential_oracle(model, idx, tgt, np.full(12, 2), candidates(4))
    k2 = next(b for b in summary["budgets"] if b["k"] == 2)
    assert k2["oracle_loss"] == pytest.approx(float(loss.double().mean()), abs=1e-6)
    table = pq.read_table(tmp_path / "seq" / "per_token.parquet").to_pydict()
    assert {"oracle_loss_k2", "best_pattern_k2", "schedule_loss_falling", "schedule_pattern_rising"} <= set(table)


def test_oracle_command_runs_the_sequential_context(tiny_run, tmp_path):
    from conftest import copy_trained

    run = copy_trained(tiny_run, tmp_path / "run")
    duollm("oracle", run, "--context", "sequential", "--budgets", "0-2", "--max-tokens", "128")
    s = json.loads((run / "oracle" / "SB-sequential" / "summary.json").read_text())
    assert s["context"] == "sequential" and [b["k"] for b in s["budgets"]] == [0, 1, 2]
    assert {e["name"] for e in s["position_budgets"]} == {"constant", "falling", "rising"}
    bad = duollm("oracle", run, "--context", "sequential", "--search", "beam", check=False)
    assert bad.returncode == 2 and "sequential oracle" in bad.stderr
