"""The command line: contract outputs, and bad input -> one line, non-zero exit, nothing half-written."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, cli


def test_eval_json_and_per_token(tiny_run, tmp_path):
    proc = cli("eval", tiny_run, "--pattern", "SBSB", "--json", "--per-token", tmp_path / "l.npy")
    out = json.loads(proc.stdout)
    assert {"loss", "ppl", "tokens"} <= out.keys()
    assert out["ppl"] == pytest.approx(np.exp(out["loss"]))
    per_token = np.load(tmp_path / "l.npy")
    assert per_token.dtype == np.float32 and per_token.shape == (out["tokens"],)
    assert per_token.mean() == pytest.approx(out["loss"], rel=1e-5)
    assert out["big_fraction"] == 0.5


def test_eval_per_token_matches_the_model(tiny_run, tmp_path):
    """The canonical token order: row-major over the run's validation sequences."""
    from duollm.checkpoint import load_model
    from duollm.data.cache import eval_tokens

    cli("eval", tiny_run, "--pattern", "BBSS", "--per-token", tmp_path / "l.npy")
    model, cfg = load_model(tiny_run)
    idx_ST, tgt_ST = eval_tokens(tiny_run, cfg)
    with torch.no_grad():
        ref = model(idx_ST, tgt_ST, routes="BBSS").loss_BT.reshape(-1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), ref, rtol=1e-5, atol=1e-6)


def test_eval_table_and_info(tiny_run):
    table = cli("eval", tiny_run).stdout
    assert "all-big" in table and "all-small" in table and "random-big-0.5" in table
    info = json.loads(cli("info", tiny_run, "--json").stdout)
    assert info["params"]["total"] > 0
    assert set(info["flops_per_token"]["per_layer"]) == {"skip", "small", "big"}
    paper = json.loads(cli("info", "--config", "paper", "--json").stdout)
    assert round(paper["params"]["total"] / 1e9, 3) == 1.399


def test_train_tiny_on_a_local_file_and_resume(tmp_path):
    from conftest import SHARED_CORPUS

    run = tmp_path / "shakespeare"
    cli("train", "--config", "tiny", "--data", f"file:{SHARED_CORPUS}", "--out", run, "--set", "train.steps=4")
    assert (run / "config.yaml").is_file() and (run / "tokenizer.json").is_file()
    assert "file:" in (run / "config.yaml").read_text()
    again = cli("train", "--config", "tiny", "--out", run, check=False)
    assert_one_line_error(again, "already holds a checkpoint", "--resume")
    cli("train", "--resume", "--out", run, "--set", "train.steps=6")
    assert (run / "latest").resolve().name == "step-0000006"


@pytest.mark.parametrize("args,fragments", [
    (["train", "--config", "huge"], ["unknown preset 'huge'"]),
    (["train", "--config", "tiny", "--set", "train.stepz=3"], ["unknown config key train.stepz"]),
    (["train", "--config", "tiny", "--set", "train.steps=many"], ["train.steps expects an integer"]),
    (["train", "--config", "tiny", "--set", "routing.p_big=-0.5", "routing.p_small=1.5"], [">= 0"]),
    (["train", "--config", "tiny", "--set", "routing.p_big=0.6"], ["sum to 1"]),
    (["train", "--config", "tiny", "--data", "file:/no/such/file.txt"], ["no file matches"]),
    (["eval", "/no/such/run"], ["does not exist"]),
    (["info", "/no/such/run"], ["does not exist"]),
])
def test_bad_input_before_any_run_exists(tmp_path, args, fragments):
    out = tmp_path / "run"
    proc = cli(*args, *(["--out", out] if args[0] == "train" else []), check=False)
    assert_one_line_error(proc, *fragments)
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("pattern,fragment", [
    ("SBS", "has 3 letters but the model has 4 layers"),
    ("SBXQ", "letter(s) 'QX'"),
])
def test_malformed_pattern(tiny_run, tmp_path, pattern, fragment):
    proc = cli("eval", tiny_run, "--pattern", pattern, "--per-token", tmp_path / "x.npy", check=False)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "x.npy").exists()


def test_empty_and_too_short_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  ")
    proc = cli("train", "--config", "tiny", "--data", f"file:{tmp_path / 'empty.txt'}", "--out", tmp_path / "a",
                  check=False)
    assert_one_line_error(proc, "is empty")
    (tmp_path / "short.txt").write_text("to be or not to be, that is the question. " * 3)
    proc = cli("train", "--config", "tiny", "--data", f"file:{tmp_path / 'short.txt'}", "--out", tmp_path / "b",
                  check=False)
    assert_one_line_error(proc, "corpus too short")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_corrupt_and_truncated_checkpoint(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run, symlinks=True)
    weights = run / "latest" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(cli("eval", run, check=False), "corrupt checkpoint")
    weights.write_bytes(b"\x00" * 64)
    assert_one_line_error(cli("eval", run, check=False), "corrupt checkpoint")
    (run / "latest" / "trainer_state.json").write_bytes(b"garbage")
    assert_one_line_error(cli("train", "--resume", "--out", run, check=False), "corrupt checkpoint", "trainer_state.json")


def test_version(capsys):
    import pytest

    from duollm import __version__
    from duollm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"duollm {__version__} (torch ")


def test_python_dash_m_duollm_is_the_command(tiny_run):
    """`python -m duollm` runs the same command line as `duollm` (a user error exits 2 with one line)."""
    import subprocess
    import sys

    from duollm import __version__

    proc = subprocess.run([sys.executable, "-m", "duollm", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and __version__ in proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "duollm", "eval", str(tiny_run), "--pattern", "BBX"],
                          capture_output=True, text=True)
    assert_one_line_error(proc, "BBX")


def test_repeated_set_flags_all_apply(tmp_path, tiny_run):
    """Issue 28, item 2: `--set a=1 --set b=2` kept only the last one (argparse's default for nargs="*"), so
    this trained the preset's 30 steps without a word. Every command with --set accumulates them."""
    out = tmp_path / "r"
    cli("train", "--config", "tiny", "--out", out, "--set", "train.steps=3", "--set", "train.log_every=1",
        "train.eval_every=100")
    assert (out / "latest").resolve().name == "step-0000003"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2, 3]
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    cli("router", run, "--target", "0.5", "--steps", "2", "--set", "alpha=3", "--set", "train.batch_size=4",
        "train.log_every=1000")
    import yaml

    saved = yaml.safe_load((run / "routers" / "budget-0.50" / "router.yaml").read_text())["config"]
    assert saved["alpha"] == 3 and saved["train"]["batch_size"] == 4 and saved["train"]["log_every"] == 1000


def test_an_empty_pattern_or_router_name_is_refused(tiny_run):
    """Issue 28, item 20: `eval --pattern ''` was taken as "no pattern" and printed the default table."""
    for flag, fragment in (("--pattern", "pattern ''"), ("--router", "router")):
        proc = cli("eval", tiny_run, flag, "", check=False)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert_one_line_error(proc, fragment)


def test_help_and_readme_name_what_exists(capsys):
    """Issue 28, item 13: --help listed presets without `wide` and data specs without hf:FOLDER / hf:json; the
    README's synopsis of export missed --policy and cited "DESIGN section N" and "the issues", which a clone
    does not have; there was no way to print the resolved config."""
    import argparse
    from pathlib import Path

    from duollm.cli import main
    from duollm.config import PRESETS
    from duollm.integrations.hf import export

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(p in help_text for p in PRESETS) and "hf:FOLDER" in help_text and "hf:json" in help_text
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    synopsis = next(line for line in readme.splitlines() if line.startswith("duollm export"))
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert flags and all(f in synopsis for f in flags), synopsis
    assert "DESIGN section" not in readme and "the issues" not in readme
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme  # item 8: CPU anywhere
    assert "gradient_checkpointing_enable()`," not in readme.replace("deprecated `gradient_checkpointing_enable()`", "")


def test_config_prints_the_resolved_config(tiny_run):
    """`duollm config` prints what a run would save: the preset, the YAML, every --set, checked the same way."""
    import yaml

    from duollm.config import load_config, to_dict

    out = cli("config", "--config", "tiny", "--set", "train.steps=3", "--set", "study.tokens=64").stdout
    assert yaml.safe_load(out) == to_dict(load_config("tiny", ["train.steps=3", "study.tokens=64"]))
    saved = yaml.safe_load(cli("config", "--config", tiny_run).stdout)
    assert saved == yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert_one_line_error(cli("config", "--config", "tiny", "--set", "study.router_methods=magic", check=False), "magic")
