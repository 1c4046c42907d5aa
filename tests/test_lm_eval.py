"""lm-evaluation-harness: the `duollm` model wrapper and the shipped offline `duollm_ppl` task."""

import json
import math

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from duollm.integrations.lm_eval.model import DuoLM  # noqa: E402  (registers --model duollm)
from duollm.integrations.lm_eval.tasks import DEFAULT_TEXT, TASKS_DIR  # noqa: E402


def evaluate(model_args: dict, metadata: dict | None = None) -> dict:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="duollm", model_args=model_args, tasks=["duollm_ppl"], batch_size=16,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                                                           metadata=metadata or {}))
    return out["results"]["duollm_ppl"]


def whole_windows_text(run, seq_len: int) -> str:
    """A prefix of the shipped text whose tokens fill whole evaluation windows: n * seq_len + 1 tokens,
    so `duollm eval` (which drops a last partial window) and lm-eval score exactly the same tokens."""
    from duollm.data.cache import load_tokenizer

    tok = load_tokenizer(run)
    ids = tok.encode(DEFAULT_TEXT.read_text())
    for n in range((len(ids) - 1) // seq_len, 0, -1):
        text = tok.decode(ids[: n * seq_len + 1])
        if tok.encode(text) == ids[: n * seq_len + 1]:  # the cut falls where re-encoding gives the same tokens
            return text
    raise AssertionError("no prefix of the shipped text re-encodes to whole windows")


def test_wrapper_perplexity_equals_duollm_eval(tiny_run, tmp_path, capsys):
    from duollm.cli import main
    from duollm.config import load_run_config

    seq_len = load_run_config(tiny_run).train.seq_len
    doc = tmp_path / "doc.txt"
    doc.write_text(whole_windows_text(tiny_run, seq_len))
    assert main(["eval", str(tiny_run), "--pattern", "SB_B", "--data", f"file:{doc}", "--max-tokens", "all", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    res = evaluate({"run": str(tiny_run), "policy": "SB_B"}, {"data_file": str(doc)})
    assert res["token_perplexity,none"] == pytest.approx(ours["ppl"], rel=1e-5)
    text = doc.read_text()
    total_nll = ours["loss"] * ours["tokens"]
    assert res["bits_per_byte,none"] == pytest.approx(total_nll / len(text.encode()) / math.log(2), rel=1e-5)
    assert res["word_perplexity,none"] == pytest.approx(math.exp(total_nll / len(text.split())), rel=1e-4)


def test_shipped_task_on_an_exported_model(tiny_run, tmp_path):
    """The shipped text, the exported folder (pretrained=), its saved policy; the same numbers as the run."""
    import argparse

    from duollm.integrations.hf.export import add_arguments as add_export_arguments
    from duollm.integrations.hf.export import run_command as run_export_command

    p = argparse.ArgumentParser()
    add_export_arguments(p)
    run_export_command(p.parse_args([str(tiny_run), str(tmp_path / "hf"), "--policy", "BS_S"]))
    exported = evaluate({"pretrained": str(tmp_path / "hf")})
    from_run = evaluate({"run": str(tiny_run), "policy": "BS_S"})
    for metric in ("token_perplexity,none", "word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert exported[metric] == pytest.approx(from_run[metric], rel=1e-6), metric
    all_big = evaluate({"run": str(tiny_run)})
    assert all_big["token_perplexity,none"] != from_run["token_perplexity,none"]  # the saved policy was used


def test_loglikelihood_and_generate_until(tiny_run):
    from lm_eval.api.instance import Instance

    from duollm.checkpoint import load_model
    from duollm.data.cache import load_tokenizer
    from duollm.inference.generate import generate_ids

    lm = DuoLM(run=str(tiny_run), policy="SSBB", batch_size=2)
    context, continuation = "The while statement is used for", " repeated execution"
    reqs = [Instance("loglikelihood", {}, (context, continuation), 0),
            Instance("loglikelihood", {}, ("A", " class"), 1)]
    (ll, greedy), _ = lm.loglikelihood(reqs, disable_tqdm=True)
    model, _ = load_model(tiny_run)
    tok = load_tokenizer(tiny_run)
    whole = tok.encode(context + continuation)
    n = len(whole) - len(tok.encode(context))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]]), routes="SSBB").logits[0], -1)
    expected = sum(logp[i - 1, whole[i]].item() for i in range(len(whole) - n, len(whole)))
    assert ll == pytest.approx(expected, rel=1e-5) and isinstance(greedy, bool)

    ids = tok.encode(context)
    eot = tok.backend.token_to_id("<|endoftext|>")
    g = generate_ids(model, ids, "SSBB", max_new_tokens=6, eos_id=eot)
    full = tok.decode([t for t in g.new_ids if t != eot])
    stop = full[len(full) // 2 :][:2] or full
    (text,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 6}), 0)],
                                disable_tqdm=True)
    assert text == full[: full.index(stop)]


def test_plain_lm_eval_hf_model_on_an_export_gives_the_same_perplexity(tiny_run, tmp_path):
    """`lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True`: lm-eval's own model class on
    the export's standalone code scores the shipped task as the duollm wrapper does (same windows, same
    end-of-text prefix, the export's saved routing)."""
    pytest.importorskip("accelerate")
    from lm_eval.tasks import TaskManager

    from duollm.config import load_run_config
    from duollm.integrations.hf.export import export_run

    out = export_run(tiny_run, tmp_path / "hf", routing="SB_B")
    seq_len = load_run_config(tiny_run).train.seq_len
    hf = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(out), "trust_remote_code": True,
                                                         "max_length": seq_len, "device": "cpu"},
                                 tasks=["duollm_ppl"], batch_size=16,
                                 task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    ours = evaluate({"pretrained": str(out), "prefix": "eot", "max_length": seq_len})
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):  # token ppl: ours only
        assert hf["results"]["duollm_ppl"][metric] == pytest.approx(ours[metric], rel=1e-5), metric


def test_the_console_script_is_lm_evals_command_line_with_duollm(tiny_run, tmp_path):
    """`duollm-lm-eval` (an installed console script): lm-eval's own command line, `--model duollm` registered."""
    import shutil
    import subprocess

    exe = shutil.which("duollm-lm-eval")
    assert exe, "pip install -e . installs the duollm-lm-eval console script"
    proc = subprocess.run([exe, "--model", "duollm", "--model_args", f"run={tiny_run},policy=SB_B", "--tasks",
                           "duollm_ppl", "--output_path", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "duollm_ppl" in proc.stdout and "token_perplexity" in proc.stdout


def test_the_multiple_choice_task_scores_each_items_answer_by_log_likelihood(tiny_run):
    """duollm_mc (the offline stand-in for ARC / HellaSwag): its accuracy is the share of items whose answer
    has the highest log-likelihood after the context, as the wrapper scores the pairs one by one."""
    import importlib.util

    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    spec = importlib.util.spec_from_file_location("mc_utils", TASKS_DIR / "duollm_mc" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    items = utils.items(DEFAULT_TEXT.read_text(), window_words=24)
    assert len(items) >= 8 and sorted({it["gold"] for it in items}) == [0, 1, 2, 3]
    answers = sorted(it["choices"][it["gold"]] for it in items)  # every continuation: once an answer, 3x a distractor
    assert sorted(c for it in items for c in it["choices"]) == sorted(answers * 4)
    lm = DuoLM(run=str(tiny_run), policy="SBSB", batch_size=8)
    reqs = [Instance("loglikelihood", {}, (it["context"], " " + c), i) for i, it in enumerate(items) for c in it["choices"]]
    ll = [x for x, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    ours = np.mean([int(np.argmax(ll[4 * i:4 * i + 4]) == it["gold"]) for i, it in enumerate(items)])
    out = lm_eval.simple_evaluate(model="duollm", model_args={"run": str(tiny_run), "policy": "SBSB"},
                                  tasks=["duollm_mc"], batch_size=8,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                                                           metadata={"window_words": 24}))
    res = out["results"]["duollm_mc"]
    assert out["n-samples"]["duollm_mc"]["effective"] == len(items)
    assert res["acc,none"] == pytest.approx(ours)


def test_the_documented_extra_exists_under_its_exact_name_and_the_script_says_what_is_missing():
    """Issue 28, item 7: the README's `pip install -e ".[lm_eval]"` installed nothing with an older pip, since
    the package's metadata names the extra `lm-eval`; and `duollm-lm-eval` without lm-eval ended in a
    traceback. The README's extras are the metadata's, letter for letter; the script says what to install."""
    import importlib.metadata
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = {x for group in re.findall(r'pip install[^`\n]*?-e "\.\[([^\]]+)\]"', readme) for x in group.split(",")}
    extras = set(importlib.metadata.metadata("duollm").get_all("Provides-Extra"))
    assert "lm-eval" in documented and documented <= extras, (documented, extras)
    code = "import sys; sys.modules['lm_eval'] = None; from duollm.integrations.lm_eval import main; main(['--help'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "duollm-lm-eval needs the lm-evaluation-harness: pip install 'duollm[lm-eval]'"]
