"""``duollm oracle`` end to end on a tiny trained run: the output contract and the line-up with ``duollm eval``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import duollm

from duollm.cli import main
from duollm.config import load_run_config
from duollm.data.cache import eval_tokens
from duollm.oracle.runner import resolve_dtype


def test_oracle_command_writes_the_contract_and_lines_up_with_eval(tiny_run, tmp_path, capsys):
    proc = duollm("oracle", tiny_run, "--budgets", "0-4", "--dtype", "float32")  # one real subprocess: the installed command
    name = proc.stdout.strip().splitlines()[-1]
    assert name == "SB-shared"
    out = tiny_run / "oracle" / name
    s = json.loads((out / "summary.json").read_text())
    for key in ("all_big_ppl", "all_small_ppl", "tokens", "context", "options", "n_layers"):
        assert key in s
    assert [b["k"] for b in s["budgets"]] == [0, 1, 2, 3, 4] and s["context"] == "shared" and s["options"] == "SB"
    for b in s["budgets"]:
        for key in ("k", "candidates", "oracle_ppl", "fixed_ppl", "fixed_pattern", "random_mean_ppl", "best_of_100_ppl"):
            assert key in b
    # the command prints a table of the budgets before the name: oracle with its interval, fixed, best of 100
    lines = proc.stdout.strip().splitlines()
    assert f"{s['tokens']} tokens, context shared" in lines[-7]
    b2 = s["budgets"][2]
    assert lines[-4].startswith("  k=2") and f"oracle {b2['oracle_ppl']:.2f} [{b2['oracle_ppl_lo']:.2f}" in lines[-4]
    assert f"fixed {b2['fixed_ppl']:.2f} [" in lines[-4] and f"({b2['fixed_pattern']})" in lines[-4]
    loss_JN = np.load(out / "oracle_loss.npy")
    assert loss_JN.dtype == np.float32 and loss_JN.shape == (5, s["tokens"])
    table = pq.read_table(out / "per_token.parquet")
    assert table.num_rows == s["tokens"] and "best_pattern_k2" in table.column_names

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # frozen, candidate {P}, reference P scores every token exactly as `duollm eval --pattern P`
        P = "SBS_"
        assert main(["oracle", str(tiny_run), "--context", "frozen", "--reference", P, "--patterns", P,
                     "--dtype", "float32"]) == 0
        name = capsys.readouterr().out.split()[-1]
        assert name == f"list-frozen-{P}"
        assert main(["eval", str(tiny_run), "--pattern", P, "--per-token", str(tmp_path / "eval.npy")]) == 0
        np.testing.assert_allclose(
            np.load(tiny_run / "oracle" / name / "oracle_loss.npy")[0], np.load(tmp_path / "eval.npy").reshape(-1),
            atol=2e-5,
        )
        # the all-big column equals eval's all-big per-token losses, in the same canonical order
        assert main(["eval", str(tiny_run), "--pattern", "BBBB", "--per-token", str(tmp_path / "big.npy")]) == 0
        np.testing.assert_allclose(
            table.column("loss_all_big").to_numpy(), np.load(tmp_path / "big.npy").reshape(-1), atol=2e-5
        )
        # greedy search reports its gap to the exhaustive oracle computed above
        assert main(["oracle", str(tiny_run), "--search", "greedy", "--dtype", "float32"]) == 0
        assert capsys.readouterr().out.split()[-1] == "SB-shared-greedy"
        g = json.loads((tiny_run / "oracle" / "SB-shared-greedy" / "summary.json").read_text())
        assert g["exhaustive_reference"] == "SB-shared"
        for entry, ex in zip(g["budgets"], s["budgets"]):
            assert entry["exhaustive_oracle_ppl"] == ex["oracle_ppl"] and entry["gap_ppl"] >= -1e-6
            assert 0.0 <= entry["share_tokens_at_optimum"] <= 1.0 and entry["fixed_pattern"] == ex["fixed_pattern"]
        assert g["budgets"][0]["share_tokens_at_optimum"] == 1.0  # k = 0 has one candidate
        # the default dtype is float32 (exact on every CPU: OracleSpec); auto means bfloat16 layers where the CPU
        # has bf16 matrix units, and the summary names the one used
        assert main(["oracle", str(tiny_run), "--budgets", "0", "--name", "default"]) == 0
        assert json.loads((tiny_run / "oracle" / "default" / "summary.json").read_text())["dtype"] == "float32"
        assert main(["oracle", str(tiny_run), "--budgets", "0", "--name", "auto", "--dtype", "auto"]) == 0
        a = json.loads((tiny_run / "oracle" / "auto" / "summary.json").read_text())
        assert a["dtype"] == resolve_dtype("auto", torch.device("cpu")) and s["dtype"] == "float32"
        assert a["all_big_ppl"] == pytest.approx(s["all_big_ppl"], rel=1e-2)
    finally:
        torch.set_num_threads(threads)


def test_oracle_command_bad_inputs_exit_with_one_line(tiny_run, tmp_path, capsys):
    proc = duollm("oracle", tiny_run, "--budgets", "7", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "duollm oracle: error: budget 7 is outside 0..4 (the model has 4 layers)"
    ]
    cases = [
        (["--options", "SQ"], "not a subset of SB_"),
        (["--options", "SB", "--skips", "2"], "impossible constraints"),
        (["--context", "upside"], "unknown context"),
        (["--context", "frozen", "--reference", "SSZ_"], "pattern 'SSZ_'"),
    ]
    for args, message in cases:
        assert main(["oracle", str(tiny_run), *args]) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert main(["oracle", str(tmp_path / "missing")]) != 0
    assert "does not exist" in capsys.readouterr().err
    assert not (tiny_run / "oracle" / "SB_-shared").exists()  # a refused run leaves nothing behind


def test_an_oracle_of_the_training_split_is_named_and_kept_apart(tiny_run, tmp_path, capsys):
    """``--split train``: oracle tables for training tokens (what routers may learn from), named apart and
    never taken for the validation oracle by the report, the findings or the routers' comparison."""
    from duollm.analysis.rundata import RunData
    from duollm.routers.labels import find_oracle

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["oracle", str(run), "--split", "train", "--budgets", "0-2", "--max-tokens", "256",
                 "--dtype", "float32"]) == 0
    name = capsys.readouterr().out.split()[-1]
    assert name == "SB-shared-train"
    s = json.loads((run / "oracle" / name / "summary.json").read_text())
    assert s["split"] == "train" and s["data"] == "train split" and s["tokens"] == 256
    idx, _ = eval_tokens(run, load_run_config(run), max_tokens=256, split="train")
    table = pq.read_table(run / "oracle" / name / "per_token.parquet")
    assert np.array_equal(table.column("token").to_numpy(), idx.reshape(-1).numpy())
    val_idx, _ = eval_tokens(run, load_run_config(run), max_tokens=256)
    assert not np.array_equal(idx.numpy(), val_idx.numpy())
    assert name not in {o.name for o in RunData(run).sweeps.values()} and find_oracle(run, "SB", 1) != name
    assert main(["oracle", str(run), "--split", "train", "--context", "sequential", "--budgets", "1"]) == 2
    assert "--split train" in capsys.readouterr().err
    # an imitation router learns from the training-split table, and is evaluated on validation tokens only
    assert main(["router", str(run), "--method", "imitation", "--target", "0.5", "--steps", "3"]) == 0
    out = capsys.readouterr()
    assert "imitation: 8 training-split oracle sequences (SB-shared-train, k=2)" in out.out + out.err
    e = json.loads((run / "routers" / "imitation-0.50" / "eval.json").read_text())
    assert e["tokens"] == eval_tokens(run, load_run_config(run))[0].numel()  # the validation tokens


def test_a_context_policy_registered_from_outside_runs_through_the_command(tiny_run, tmp_path, monkeypatch, capsys):
    """docs/ARCHITECTURE.md's "to add an oracle context": one registry entry. A policy registered here (the
    frozen context with the context tokens all small, under its own name) runs through `duollm oracle` and
    gives exactly the frozen policy's numbers with --reference S."""
    from duollm.oracle.context import CONTEXTS, FrozenContext, OracleContext

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True, ignore=shutil.ignore_patterns("oracle"))
    monkeypatch.setitem(CONTEXTS, "small-context", OracleContext(
        "small-context", "context tokens all small; only the scored token's routes vary",
        make=lambda model, idx_BT, reference, kernels: FrozenContext(model, idx_BT, "S" * model.cfg.n_layers, kernels),
        beam_unit="token"))
    assert main(["oracle", str(run), "--budgets", "1,2", "--context", "small-context"]) == 0
    assert capsys.readouterr().out.split()[-1] == "SB-small-context"
    assert main(["oracle", str(run), "--budgets", "1,2", "--context", "frozen", "--reference", "S"]) == 0
    mine, frozen = (json.loads((run / "oracle" / n / "summary.json").read_text()) for n in ("SB-small-context", "SB-frozen-S"))
    assert mine["context"] == "small-context"
    assert [b["oracle_ppl"] for b in mine["budgets"]] == [b["oracle_ppl"] for b in frozen["budgets"]]
    np.testing.assert_array_equal(np.load(run / "oracle" / "SB-small-context" / "oracle_loss.npy"),
                                  np.load(run / "oracle" / "SB-frozen-S" / "oracle_loss.npy"))
