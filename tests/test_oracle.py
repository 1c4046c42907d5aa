"""The oracle engine (stage 2): equivalences on tiny random models, CPU, seconds.

Tree == naive for every pattern; reductions against brute force over the full loss matrix;
the orderings oracle <= fixed <= random; k = L is all-big and k = 0 is all-small; frozen with
candidate {P} and reference P equals the model's own forward under P; beam at full width equals
exhaustive; resume == uninterrupted; two processes == one; bad inputs name their fault.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from duollm.config import load_config
from duollm.model.model import DuoModel
from duollm.model.routing import BIG, SKIP, SMALL, parse_pattern
from duollm.oracle import build_plan, build_spec, naive_losses, pattern_losses, run_oracle
from duollm.oracle.context import Head, make_context
from duollm.oracle.reductions import default_schedules, linear_schedule
from duollm.oracle.runner import engine_model, resolve_dtype
from duollm.oracle.space import CandidateSpace, code_strings, pattern_codes
from duollm.oracle.tree import walk_tree
from duollm.runtime.distributed import has_bf16_matrix_units

ATOL = 2e-5


def tiny_model(seed=0, **overrides) -> DuoModel:
    torch.manual_seed(seed)
    cfg = load_config("tiny").model
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = DuoModel(cfg).eval()
    # random init barely separates the routes; spread the weights so patterns really differ
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


def tokens(S=4, T=12, vocab=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (S, T), generator=g), torch.randint(0, vocab, (S, T), generator=g)



@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def toks():
    return tokens()


def routes_of(patterns: list[str], L=4) -> np.ndarray:
    return np.array([parse_pattern(p, L) for p in patterns], dtype=np.int8)


class SignPolicy:
    """A hard routing policy (a stand-in for a trained router): big where the state's mean is positive."""

    name = "sign"

    def __call__(self, layer, x_BTD):
        return torch.where(x_BTD.mean(-1) > 0, BIG, SMALL if layer % 2 else SKIP)


# ----------------------------------------------------------------------------- tree vs naive


@pytest.mark.parametrize("context,reference,options", [
    ("shared", None, "SB_"),
    ("frozen", "SBS_", "SB"),
    ("frozen", None, "B_"),
    ("frozen", SignPolicy(), "SB"),
])
def test_tree_equals_naive_for_every_pattern(model, toks, context, reference, options):
    idx, tgt = toks
    route_PL = CandidateSpace(4, options).enumerate()
    tree_PST = pattern_losses(model, idx, tgt, route_PL, context=context, reference=reference)
    n = 0
    for p, naive_ST in naive_losses(model, idx, tgt, route_PL, context=context, reference=reference):
        torch.testing.assert_close(tree_PST[p], naive_ST, atol=ATOL, rtol=0)
        n += 1
    assert n == len(route_PL) and tree_PST.std(0).mean() > 1e-3  # the patterns really differ


def test_frozen_reference_policy_is_named_and_must_be_hard(model, toks, tmp_path):
    idx, tgt = toks
    spec = build_spec(4, context="frozen", reference=SignPolicy())
    assert spec.name() == "SB-frozen-sign"
    s = run_oracle(model, idx, tgt, spec, tmp_path / "p", batch_tokens=48, progress=False)
    assert s["reference"] == "sign"

    def soft(layer, x_BTD):
        return torch.full((*x_BTD.shape[:2], 3), 1 / 3)

    with pytest.raises(ValueError, match="must route hard"):
        run_oracle(model, idx, tgt, build_spec(4, context="frozen", reference=soft), tmp_path / "s", progress=False)


def test_tree_equals_naive_with_grouped_kv_and_block_skip():
    m = tiny_model(seed=3, n_kv_heads=1, skip_mode="block")
    idx, tgt = tokens(S=2, T=8)
    route_PL = routes_of(["SB_B", "__BS", "B__B", "BBBB", "_S_S"])
    for context in ("shared", "frozen"):
        tree_PST = pattern_losses(m, idx, tgt, route_PL, context=context, reference="B_SB" if context == "frozen" else None)
        reference = "B_SB" if context == "frozen" else None
        for p, naive_ST in naive_losses(m, idx, tgt, route_PL, context=context, reference=reference):
            torch.testing.assert_close(tree_PST[p], naive_ST, atol=ATOL, rtol=0)


def test_tree_equals_naive_on_a_gpt2_style_model():
    """Converted GPT-2 models: LayerNorm, learned positions, GELU MLPs with biases."""
    m = tiny_model(seed=4, norm="layer", pos="learned", mlp="gelu_tanh", bias=True)
    idx, tgt = tokens(S=2, T=8)
    route_PL = routes_of(["SBSB", "BBBB", "SSSS", "BSSB"])
    for context, reference in (("shared", None), ("frozen", "SBBS")):
        tree_PST = pattern_losses(m, idx, tgt, route_PL, context=context, reference=reference)
        for p, naive_ST in naive_losses(m, idx, tgt, route_PL, context=context, reference=reference):
            torch.testing.assert_close(tree_PST[p], naive_ST, atol=ATOL, rtol=0)
    own_ST = m(idx, tgt, routes="SBSB").loss_BT
    torch.testing.assert_close(pattern_losses(m, idx, tgt, route_PL[:1])[0], own_ST, atol=ATOL, rtol=0)


def test_frozen_singleton_equals_own_forward(model, toks, tmp_path):
    """Frozen, candidate set {P}, reference P: exactly the model's forward under P (== duollm eval --pattern P)."""
    from duollm.train.evaluate import per_token_loss

    idx, tgt = toks
    for P in ("SBB_", "BBBB"):
        spec = build_spec(4, patterns=P, context="frozen", reference=P)
        summary = run_oracle(model, idx, tgt, spec, tmp_path / P, batch_tokens=24, progress=False)
        got_N = np.load(tmp_path / P / "oracle_loss.npy")[0]
        want_N = per_token_loss(model, idx, tgt, P)["loss_ST"].reshape(-1).numpy()
        np.testing.assert_allclose(got_N, want_N, atol=ATOL, rtol=0)
        assert summary["context"] == "frozen" and summary["reference"] == ("B" if P == "BBBB" else P)
        assert math.isclose(summary["budgets"][0]["oracle_ppl"], summary["budgets"][0]["fixed_ppl"], rel_tol=1e-6)


# ----------------------------------------------------------------------------- reductions


def _brute(loss_PN, route_PL, budgets, in_budget):
    bigs_P = (route_PL == BIG).sum(1)
    out = {}
    for k in budgets:
        m = in_budget(bigs_P, k)
        out[k] = dict(
            oracle=loss_PN[m].min(0).mean(),
            fixed=loss_PN[m].mean(1).min(),
            fixed_pattern=np.flatnonzero(m)[loss_PN[m].mean(1).argmin()],
            random=loss_PN[m].mean(1).mean(),
        )
    return out


@pytest.mark.parametrize("context", ["shared", "frozen"])
def test_reductions_match_brute_force(model, toks, tmp_path, context):
    idx, tgt = toks
    spec = build_spec(4, options="SB", context=context)
    summary = run_oracle(model, idx, tgt, spec, tmp_path / "o", batch_tokens=24, keep_matrix=True, progress=False)
    plan = build_plan(spec)
    loss_PN = np.load(tmp_path / "o" / "loss_matrix.npy").astype(np.float64)
    direct_PN = pattern_losses(model, idx, tgt, plan.route_PL, context=context).reshape(len(plan.route_PL), -1)
    np.testing.assert_allclose(loss_PN, direct_PN.numpy(), atol=ATOL)
    brute = _brute(loss_PN, plan.route_PL, range(5), lambda b, k: b == k)
    names = code_strings(plan.code_P, 4)
    oracle_JN = np.load(tmp_path / "o" / "oracle_loss.npy")
    assert oracle_JN.dtype == np.float32 and oracle_JN.shape == (5, idx.numel())
    for j, entry in enumerate(summary["budgets"]):
        k = entry["k"]
        assert entry["candidates"] == math.comb(4, k)
        assert math.isclose(entry["oracle_ppl"], math.exp(brute[k]["oracle"]), rel_tol=1e-5)
        assert math.isclose(entry["fixed_ppl"], math.exp(brute[k]["fixed"]), rel_tol=1e-5)
        assert entry["fixed_pattern"] == names[brute[k]["fixed_pattern"]]
        assert math.isclose(entry["random_mean_ppl"], math.exp(brute[k]["random"]), rel_tol=1e-5)
        # the orderings the paper relies on, and both best-of-random readings
        assert entry["oracle_ppl"] <= entry["fixed_ppl"] * (1 + 1e-6) <= entry["random_mean_ppl"] * (1 + 2e-6)
        assert entry["best_of_100_per_token_ppl"] <= entry["best_of_100_ppl"] * (1 + 1e-6)
        assert entry["oracle_ppl"] <= entry["best_of_100_per_token_ppl"] * (1 + 1e-6)
        np.testing.assert_allclose(oracle_JN[j], loss_PN[(plan.route_PL == BIG).sum(1) == k].min(0), atol=ATOL)
    ends = {e["k"]: e for e in summary["budgets"]}
    assert math.isclose(ends[4]["oracle_ppl"], summary["all_big_ppl"], rel_tol=1e-6)  # k = L is all-big
    assert math.isclose(ends[0]["oracle_ppl"], summary["all_small_ppl"], rel_tol=1e-6)  # k = 0 (SB) is all-small
    assert ends[0]["oracle_ppl"] > ends[2]["oracle_ppl"]  # more compute helps the oracle on these weights

    table = pq.read_table(tmp_path / "o" / "per_token.parquet").to_pandas()
    assert list(table.columns[:6]) == ["sequence", "position", "token", "target", "loss_all_small", "loss_all_big"]
    np.testing.assert_array_equal(table["token"].to_numpy(), idx.reshape(-1).numpy())
    np.testing.assert_array_equal(table["target"].to_numpy(), tgt.reshape(-1).numpy())
    np.testing.assert_allclose(table["oracle_loss_k2"].to_numpy(), oracle_JN[2])
    # the reported best pattern really has that loss
    for n in range(0, idx.numel(), 7):
        p = int(np.flatnonzero(names == table["best_pattern_k2"][n])[0])
        assert abs(loss_PN[p, n] - oracle_JN[2, n]) < ATOL

    # usage heatmaps: shares over routes sum to one, and agree with the per-token patterns
    usage_JRLT = np.load(tmp_path / "o" / "usage.npy")
    assert usage_JRLT.shape == (5, 3, 4, idx.shape[1])
    np.testing.assert_allclose(usage_JRLT.sum(1), 1.0, atol=1e-6)
    big_at_0 = np.mean([p[0] == "B" for p in table["best_pattern_k1"][table["position"] == 0]])
    assert math.isclose(usage_JRLT[1, BIG, 0, 0], big_at_0, abs_tol=1e-6)

    # position-varying budgets: each token takes the oracle at its position's budget
    T = idx.shape[1]
    pos = np.tile(np.arange(T), idx.shape[0])
    for entry, (name, a, b) in zip(summary["position_budgets"], default_schedules(4)):
        sched = linear_schedule(a, b, T)
        assert entry["name"] == name
        want = math.exp(oracle_JN[sched[pos], np.arange(len(pos))].astype(np.float64).mean())
        assert math.isclose(entry["oracle_ppl"], want, rel_tol=1e-6)
        assert entry["mean_budget"] == (a + b) / 2


def test_budget_at_most_is_the_running_best(model, toks, tmp_path):
    idx, tgt = toks
    exact = run_oracle(model, idx, tgt, build_spec(4, options="SB"), tmp_path / "e", batch_tokens=48, progress=False)
    atmost = run_oracle(model, idx, tgt, build_spec(4, options="SB", budgets="1,3", budget_mode="max"),
                        tmp_path / "m", batch_tokens=48, progress=False)
    e_JN, m_JN = np.load(tmp_path / "e" / "oracle_loss.npy"), np.load(tmp_path / "m" / "oracle_loss.npy")
    np.testing.assert_allclose(m_JN[0], e_JN[:2].min(0))
    np.testing.assert_allclose(m_JN[1], e_JN[:4].min(0))
    assert [b["candidates"] for b in atmost["budgets"]] == [5, 15]
    assert atmost["budget_mode"] == "max" and exact["budget_mode"] == "exact"


def test_skip_study_counts_and_names(model, toks, tmp_path):
    idx, tgt = toks
    spec = build_spec(4, options="B_", skips=2)
    assert spec.name() == "B_-skip2-shared"
    s = run_oracle(model, idx, tgt, spec, tmp_path / spec.name(), batch_tokens=48, progress=False)
    (entry,) = s["budgets"]
    assert entry["k"] == 2 and entry["candidates"] == 6
    for p in pq.read_table(tmp_path / spec.name() / "per_token.parquet").column("best_pattern_k2").to_pylist():
        assert p.count("_") == 2 and p.count("B") == 2
    assert 0.0 <= entry["oracle_early_exit_share"] <= 1.0
    assert abs(sum(entry["oracle_skip_share_by_layer"]) - 2.0) < 1e-5


# ----------------------------------------------------------------------------- beam search


@pytest.mark.parametrize("context", ["shared", "frozen"])
def test_beam_at_full_width_equals_exhaustive_and_greedy_is_bounded(model, toks, tmp_path, context):
    idx, tgt = toks
    ex = run_oracle(model, idx, tgt, build_spec(4, options="SB_", context=context), tmp_path / "x",
                    batch_tokens=24, progress=False)
    beam = run_oracle(model, idx, tgt, build_spec(4, options="SB_", context=context, search="beam", beam_width=64),
                      tmp_path / "b", batch_tokens=24, progress=False)
    greedy = run_oracle(model, idx, tgt, build_spec(4, options="SB_", context=context, search="greedy"),
                        tmp_path / "g", batch_tokens=24, progress=False)
    x_JN, b_JN, g_JN = (np.load(tmp_path / d / "oracle_loss.npy") for d in "xbg")
    np.testing.assert_allclose(b_JN, x_JN, atol=ATOL)
    assert (g_JN >= x_JN - ATOL).all()
    assert greedy["search"] == "greedy" and beam["search"] == "beam" and beam["budgets"][1]["fixed_ppl"] is None
    # the random baselines use the same seeded draw whatever the search
    for e, b in zip(ex["budgets"], beam["budgets"]):
        assert e["best_of_100_pattern"] == b["best_of_100_pattern"]
    # a search's oracle takes per token the better of the search and the random draw
    for g in greedy["budgets"]:
        assert g["oracle_ppl"] <= min(g["search_only_ppl"], g["best_of_100_per_token_ppl"]) * (1 + 1e-6)


# ----------------------------------------------------------------------------- resume and sharding


def _outputs(folder: Path) -> dict:
    out = {"summary": json.loads((folder / "summary.json").read_text())}
    for name in ("oracle_loss.npy", "usage.npy"):
        out[name] = np.load(folder / name)
    out["per_token"] = pq.read_table(folder / "per_token.parquet").to_pydict()
    return out


# the per-sequence reductions (cross-fitted baselines) and the count-versus-compute nulls (oracle/selection.py)
NEW_COLUMNS = ("fixed_oos_loss_k2", "best_of_100_oos_loss_k2", "count_null_loss_k2", "equal_count_n4_loss_k2",
               "equal_count_n6_loss_k2")


def _assert_same(a: dict, b: dict):
    assert a["summary"] == b["summary"]
    for name in ("oracle_loss.npy", "usage.npy"):
        np.testing.assert_array_equal(a[name], b[name])
    assert a["per_token"] == b["per_token"]


def test_resume_after_interrupt_gives_identical_outputs(model, toks, tmp_path):
    idx, tgt = toks
    spec = build_spec(4, options="SB", context="frozen")

    class Stop(Exception):
        pass

    def stop_after_first(i):
        raise Stop

    with pytest.raises(Stop):
        run_oracle(model, idx, tgt, spec, tmp_path / "r", batch_tokens=12, progress=False, on_chunk=stop_after_first)
    assert not (tmp_path / "r" / "summary.json").exists()  # nothing final is written before the end
    assert sorted(p.name for p in (tmp_path / "r" / ".partial").glob("chunk_*.npz")) == ["chunk_00000.npz"]
    done = []
    run_oracle(model, idx, tgt, spec, tmp_path / "r", batch_tokens=12, progress=False, on_chunk=done.append)
    assert done == [1, 2, 3]  # chunk 0 came from disk
    run_oracle(model, idx, tgt, spec, tmp_path / "u", batch_tokens=12, progress=False)
    _assert_same(_outputs(tmp_path / "r"), _outputs(tmp_path / "u"))
    assert set(NEW_COLUMNS) <= set(_outputs(tmp_path / "r")["per_token"])  # compared too: one sequence per chunk
    assert not (tmp_path / "r" / ".partial").exists()
    assert json.loads((tmp_path / "r" / "run.json").read_text())["chunks_resumed"] == 1

    # different inputs invalidate saved chunks instead of mixing them in
    with pytest.raises(Stop):
        run_oracle(model, idx, tgt, spec, tmp_path / "r2", batch_tokens=12, progress=False, on_chunk=stop_after_first)
    run_oracle(tiny_model(seed=5), idx, tgt, spec, tmp_path / "r2", batch_tokens=12, progress=False, on_chunk=done.append)
    assert done[-4:] == [0, 1, 2, 3]


def test_a_damaged_saved_chunk_is_computed_again(model, toks, tmp_path, capsys):
    """Issue 28, item 4: a rerun over a truncated chunk file died with zipfile.BadZipFile. The chunk is now
    computed again (one line names the file) and the result equals an uninterrupted run's."""
    idx, tgt = toks
    spec = build_spec(4, options="SB")

    class Stop(Exception):
        pass

    def stop_after_second(i):
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        run_oracle(model, idx, tgt, spec, tmp_path / "r", batch_tokens=12, progress=False, on_chunk=stop_after_second)
    chunk = tmp_path / "r" / ".partial" / "chunk_00000.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])  # what a full disk or a copy cut short leaves
    done = []
    run_oracle(model, idx, tgt, spec, tmp_path / "r", batch_tokens=12, progress=False, on_chunk=done.append)
    assert done == [0, 2, 3]  # chunk 1 came from disk, the damaged chunk 0 was computed again
    assert "chunk_00000.npz is damaged" in capsys.readouterr().err
    run_oracle(model, idx, tgt, spec, tmp_path / "u", batch_tokens=12, progress=False)
    _assert_same(_outputs(tmp_path / "r"), _outputs(tmp_path / "u"))


WORKER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_oracle import tiny_model, tokens
    from duollm.oracle import build_spec, run_oracle
    torch.set_num_threads(1)
    idx, tgt = tokens(S=5, T=8)
    run_oracle(tiny_model(), idx, tgt, build_spec(4, options="SB_", context={context!r}), {out!r},
               batch_tokens=8, progress=False)
""")


@pytest.mark.parametrize("context", ["shared"])
def test_two_processes_equal_one(tmp_path, context):
    """torchrun-style environment (RANK/WORLD_SIZE/MASTER_*): gloo, chunks strided over ranks, merged on rank 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = WORKER.format(tests=str(Path(__file__).parent), context=context, out=str(tmp_path / "sharded"))
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    idx, tgt = tokens(S=5, T=8)  # one thread here too (fixture), so matmul blocking matches the workers
    run_oracle(tiny_model(), idx, tgt, build_spec(4, options="SB_", context=context), tmp_path / "single",
               batch_tokens=8, progress=False)
    _assert_same(_outputs(tmp_path / "sharded"), _outputs(tmp_path / "single"))
    assert set(NEW_COLUMNS) <= set(_outputs(tmp_path / "single")["per_token"])
    assert json.loads((tmp_path / "sharded" / "run.json").read_text())["world_size"] == 2


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("kwargs,message", [
    (dict(budgets="13"), "budget 13 is outside 0..4"),
    (dict(budgets="-1"), "budget -1 is outside 0..4"),
    (dict(budgets="2-x"), "malformed"),
    (dict(options="SX"), "not a subset of SB_"),
    (dict(options=""), "non-empty subset"),
    (dict(options="SB", skips=2), "impossible constraints: exactly 2 skips"),
    (dict(options="B_", skips=1, budgets="4"), "impossible constraints: budget k=4"),
    (dict(options="S", budgets="1"), "impossible constraints: budget k=1"),
    (dict(skips=9, options="SB_"), "skips must be an integer in 0..4"),
    (dict(context="sideways"), "unknown context 'sideways'"),
    (dict(context="frozen", reference="SSX"), "pattern 'SSX' has letter(s) 'X'"),
    (dict(context="frozen", reference="SSB"), "has 3 letters but the model has 4 layers"),
    (dict(reference="SSBB"), "frozen context only"),
    (dict(search="astar"), "unknown search 'astar'"),
    (dict(search="beam", beam_width=0), "beam width must be a positive integer"),
    (dict(patterns="SSBB", budgets="2"), "drop --budgets"),
    (dict(patterns="SSBB,SSBB"), "duplicates"),
    (dict(budget_mode="most"), "budget mode must be 'exact' or 'max'"),
])
def test_bad_inputs_get_one_line_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        build_spec(4, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_candidate_counts_and_sampling():
    assert CandidateSpace(12, "SB").count() == 4096
    assert CandidateSpace(12, "B_", skips=6).count() == math.comb(12, 6)
    sp = CandidateSpace(12, "SB_")
    assert sp.count() == 3**12 and sp.budgets == tuple(range(13))
    assert sp.count(6) == math.comb(12, 6) * 2**6
    draw = sp.sample(100, 6, seed=0)
    assert len(draw) == 100 and len(set(pattern_codes(draw))) == 100 and ((draw == BIG).sum(1) == 6).all()
    np.testing.assert_array_equal(draw, sp.sample(100, 6, seed=0))
    small = CandidateSpace(4, "SB").sample(100, 2)
    assert len(small) == 6  # fewer candidates than draws: all of them
    assert set((CandidateSpace(6, "SB_", skips=2, skips_mode="max").enumerate() == SKIP).sum(1)) == {0, 1, 2}
    with pytest.raises(ValueError, match="too many to enumerate"):
        CandidateSpace(24, "SB").enumerate()


def test_names_follow_the_options():
    assert build_spec(12).name() == "SB-shared"
    assert build_spec(12, context="frozen").name() == "SB-frozen-B"
    assert build_spec(12, context="frozen", reference="small").name() == "SB-frozen-S"
    assert build_spec(12, options="B_", skips=6).name() == "B_-skip6-shared"
    assert build_spec(12, options="SB_", search="beam", beam_width=8).name() == "SB_-shared-beam8"
    assert build_spec(12, search="greedy", context="frozen", reference="SSSSSSBBBBBB").name() == "SB-frozen-SSSSSSBBBBBB-greedy"


def test_bfloat16_is_close_to_float32(model, toks, tmp_path):
    """Mixed precision: the layers in bf16, the stream, head and log-sum-exp in fp32 (runner.engine_model)."""
    idx, tgt = toks
    em = engine_model(model, "bfloat16")
    assert em.layers[0].ffn.big.up_proj.weight.dtype == torch.bfloat16
    head = Head(em)
    assert head.w_VD.dtype == torch.float32 and next(head.norm.parameters()).dtype == torch.float32
    leaves = []
    walk_tree(em, make_context(em, "shared", idx), routes_of(["SBSB", "BBBB"]), em.embed(idx).float(), tgt,
              lambda p_R, loss_RBT: leaves.append(loss_RBT.dtype), head)
    assert leaves == [torch.float32, torch.float32]
    spec = build_spec(4, options="SB")
    f = run_oracle(model, idx, tgt, spec, tmp_path / "f", batch_tokens=48, progress=False)
    b = run_oracle(model, idx, tgt, spec, tmp_path / "b", batch_tokens=48, progress=False, dtype="bfloat16")
    assert (f["dtype"], b["dtype"]) == ("float32", "bfloat16")
    for ef, eb in zip(f["budgets"], b["budgets"]):
        assert abs(math.log(ef["oracle_ppl"]) - math.log(eb["oracle_ppl"])) < 5e-3
        assert abs(math.log(ef["fixed_ppl"]) - math.log(eb["fixed_ppl"])) < 5e-3


def test_auto_dtype_is_bfloat16_only_where_there_are_bf16_units():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == ("bfloat16" if has_bf16_matrix_units(cpu) else "float32")
    assert resolve_dtype("float32", cpu) == "float32" and not has_bf16_matrix_units(torch.device("meta"))
    with pytest.raises(ValueError, match="dtype must be auto, float32 or bfloat16"):
        resolve_dtype("fp8", cpu)


def test_compiled_kernels_equal_eager(model, toks, tmp_path):
    """torch.compile fuses each node's elementwise work; the numbers must not move. (Frozen only:
    it compiles every kernel but the shared attention, which is the model's own module; ~20 s cold.)"""
    idx, tgt = toks
    for context in ("frozen",):
        spec = build_spec(4, options="SB", context=context)
        run_oracle(model, idx, tgt, spec, tmp_path / f"e{context}", batch_tokens=48, progress=False, compile=False)
        run_oracle(model, idx, tgt, spec, tmp_path / f"c{context}", batch_tokens=48, progress=False, compile=True)
        assert json.loads((tmp_path / f"c{context}" / "run.json").read_text())["compiled_kernels"] is True
        np.testing.assert_allclose(
            np.load(tmp_path / f"c{context}" / "oracle_loss.npy"), np.load(tmp_path / f"e{context}" / "oracle_loss.npy"),
            atol=ATOL,
        )


@pytest.mark.parametrize("context", ["shared", "frozen"])
def test_intervals_of_fixed_patterns_come_from_their_exact_per_token_losses(model, tmp_path, context):
    """fixed@k's interval is the t-interval of the fixed pattern's own per-token losses (checked against
    the naive evaluator), and the oracle never loses to it: the paired difference is <= 0."""
    from duollm.stats import paired_ppl_difference, ppl_interval

    idx, tgt = tokens(S=6, T=8)
    spec = build_spec(4, context=context, reference="B_SB" if context == "frozen" else None)
    s = run_oracle(model, idx, tgt, spec, tmp_path / context, batch_tokens=16, progress=False)
    oracle_JN = np.load(tmp_path / context / "oracle_loss.npy")
    for j, b in enumerate(s["budgets"]):
        (_, naive_ST), = naive_losses(model, idx, tgt, routes_of([b["fixed_pattern"]]), context=context,
                                      reference=spec.reference)
        want = ppl_interval(naive_ST.numpy())
        assert b["fixed_ppl"] == pytest.approx(want["ppl"], rel=1e-5)
        assert (b["fixed_ppl_lo"], b["fixed_ppl_hi"]) == pytest.approx((want["ppl_lo"], want["ppl_hi"]), rel=1e-5)
        gain = b["oracle_minus_fixed"]
        assert gain["diff"] <= 1e-6 and gain["lo"] <= gain["diff"] <= gain["hi"] and gain == pytest.approx(
            paired_ppl_difference(oracle_JN[j].reshape(6, 8), naive_ST.numpy()), abs=1e-2)  # engine vs naive rounding
        assert b["oracle_ppl_lo"] <= b["oracle_ppl"] <= b["oracle_ppl_hi"]
    by_name = {e["name"]: e for e in s["position_budgets"]}
    for name in ("falling", "rising"):  # paired against the constant schedule on the same tokens
        d = by_name[name]["minus_constant"]
        assert d["diff"] == pytest.approx(by_name[name]["oracle_ppl"] - by_name["constant"]["oracle_ppl"])
        assert d["lo"] <= d["diff"] <= d["hi"]


def test_label_free_oracles_equal_brute_force(model, tmp_path):
    """The confidence oracle (per token, the pattern with the highest top-1 probability), the belief
    oracle (the pattern whose distribution is closest, in KL, to all-big's) and the previous-token
    oracle (token t takes token t-1's oracle pattern) from the tree's one pass equal their definitions
    on the full loss matrix of one forward per pattern (ties: the first pattern in code order)."""
    from duollm.oracle.runner import compute_chunk

    idx, tgt = tokens(S=3, T=8)
    spec = build_spec(4, options="SB")
    plan = build_plan(spec)
    loss_PN, doubt_PN, logp_PNV = [], [], []
    with torch.no_grad():
        for route in plan.route_PL:
            logp_BTV = torch.log_softmax(model(idx, None, torch.as_tensor(route)).logits.float(), -1)
            loss_PN.append(-logp_BTV.gather(-1, tgt[..., None])[..., 0].reshape(-1))
            doubt_PN.append(-logp_BTV.amax(-1).reshape(-1))
            logp_PNV.append(logp_BTV.reshape(-1, logp_BTV.shape[-1]))
    loss_PN, doubt_PN = torch.stack(loss_PN).numpy(), torch.stack(doubt_PN).numpy()
    logp_PNV = torch.stack(logp_PNV).double()
    big = logp_PNV[plan.all_big]  # the belief oracle: the pattern closest (KL) to all-big's distribution
    kl_PN = (big.exp() * (big - logp_PNV)).sum(-1).numpy()
    res = compute_chunk(model, plan, idx, tgt, batch_tokens=idx.numel())
    N, T = idx.numel(), idx.shape[1]
    cols = np.arange(N)
    for j in range(len(plan.budgets)):
        members = np.flatnonzero(plan.member_JP[j])  # in code order
        surest = members[doubt_PN[members].argmin(0)]
        np.testing.assert_allclose(res["confidence_loss_JN"][j], loss_PN[surest, cols], atol=1e-4)
        closest = members[kl_PN[members].argmin(0)]
        np.testing.assert_allclose(res["belief_loss_JN"][j], loss_PN[closest, cols], atol=1e-4)
        np.testing.assert_array_equal(res["belief_code_JN"][j], plan.code_P[closest])  # the consistency router's label
        best = members[loss_PN[members].argmin(0)]
        later = cols[cols % T != 0]  # the previous token's best pattern, on the next token
        np.testing.assert_allclose(res["previous_loss_JN"][j][later], loss_PN[best[later - 1], later], atol=1e-4)
    s = run_oracle(model, idx, tgt, spec, tmp_path / "o", batch_tokens=idx.numel(), progress=False)
    for b in s["budgets"]:
        assert b["confidence_oracle_ppl"] >= b["oracle_ppl"] - 1e-6
        assert b["confidence_oracle_ppl_lo"] <= b["confidence_oracle_ppl"] <= b["confidence_oracle_ppl_hi"]
        if 0 < b["k"] < 4:  # a budget with a gain to recover: the share is a number, and the oracle's own is 1
            r = b["previous_token_recovered"]  # Fieller's interval: unbounded (NaN) when, on these 4 sequences,
            assert math.isfinite(r["value"])  # the oracle's gain over fixed is not clearly above zero
            assert (math.isnan(r["lo"]) and math.isnan(r["hi"])) or r["lo"] <= r["value"] <= r["hi"]
    table = pq.read_table(tmp_path / "o" / "per_token.parquet").to_pandas()
    assert table.loc[table.position == 0, "previous_token_loss_k2"].isna().all()
    np.testing.assert_allclose(table["confidence_loss_k2"].to_numpy(), res["confidence_loss_JN"][2], atol=1e-6)
    np.testing.assert_allclose(table["belief_loss_k4"].to_numpy(), loss_PN[plan.all_big], atol=1e-4)  # all-big: KL 0
    assert set(table["belief_pattern_k4"].astype(str)) == {"BBBB"}
    np.testing.assert_array_equal(table["belief_pattern_k2"].astype(str).to_numpy(),
                                  code_strings(res["belief_code_JN"][2], 4))
    assert all(b["belief_oracle_ppl_lo"] <= b["belief_oracle_ppl"] <= b["belief_oracle_ppl_hi"] for b in s["budgets"])
