"""Hugging Face model: export round trip, KV-cached generate(), routing policies, padding, W&B logging."""

import argparse
import dataclasses
import json
import shutil
import sys
import time
import types

import pytest
import torch

pytest.importorskip("transformers")

from duollm.integrations.hf import DuoConfig, DuoForCausalLM  # registers the Auto classes
from duollm.integrations.hf.export import add_arguments as add_export_arguments
from duollm.integrations.hf.export import run_command as run_export_command
from duollm.model.model import ModelConfig


def export(run, out, *extra):
    p = argparse.ArgumentParser()
    add_export_arguments(p)
    run_export_command(p.parse_args([str(run), str(out), *extra]))


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "tiny-hf"
    export(tiny_run, out)
    return out


def small_model(**kw) -> DuoForCausalLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff_big=64, d_ff_small=8, max_seq_len=48)
    return DuoForCausalLM(DuoConfig(**{**cfg, **kw})).eval()


def greedy_by_full_forwards(model, idx_BT, n, routes=None):
    """Reference decoding: every step re-runs the whole sequence, no cache."""
    for _ in range(n):
        logits = model(idx_BT, routes=routes, use_cache=False).logits
        idx_BT = torch.cat([idx_BT, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return idx_BT


def test_config_mirrors_model_config():
    """DuoConfig carries every ModelConfig field with the same default (no drift between the two)."""
    cfg = DuoConfig()
    for f in dataclasses.fields(ModelConfig):
        assert getattr(cfg, f.name) == f.default, f.name
    assert cfg.num_hidden_layers == cfg.n_layers and cfg.tie_word_embeddings == cfg.tie_embeddings
    with pytest.raises(ValueError, match="n_heads"):
        DuoConfig(d_model=30, n_heads=4)


def test_export_then_auto_classes_give_the_run_logits(tiny_run, exported):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from duollm.checkpoint import load_model
    from duollm.data.cache import eval_tokens, load_tokenizer

    run_model, cfg = load_model(tiny_run)
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert isinstance(hf, DuoForCausalLM) and AutoConfig.from_pretrained(exported).model_type == "duo"
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed.weight" in keys and "model.lm_head.weight" not in keys  # tied: stored once
    assert hf.model.lm_head.weight is hf.model.embed.weight
    idx_ST, _ = eval_tokens(tiny_run, cfg, max_tokens=4 * cfg.train.seq_len)
    with torch.no_grad():
        for pattern in (None, "SB_B"):
            ours = run_model(idx_ST, routes=pattern).logits
            theirs = hf(input_ids=idx_ST, routes=pattern).logits
            torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    text = "The for statement iterates over the items of any sequence."
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok(text)["input_ids"] == load_tokenizer(tiny_run).encode(text)
    assert tok.decode(tok(text)["input_ids"]) == text
    assert hf.config.eos_token_id == tok.eos_token_id is not None
    assert json.loads((exported / "duollm_export.json").read_text())["step"] == cfg.train.steps


def test_export_policy_is_saved_and_bad_input_is_refused(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sbsb"
    export(tiny_run, out, "--policy", "SBSB")
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.routing == "SBSB"
    idx = torch.randint(0, 100, (1, 12))
    assert hf(input_ids=idx).routes[:, 0, 0].tolist() == [1, 2, 1, 2]
    export(tiny_run, out)  # an earlier export is replaced, atomically
    assert AutoModelForCausalLM.from_pretrained(out).config.routing is None
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a Duo export"):
        export(tiny_run, foreign)
    with pytest.raises(ValueError, match="letters but the model has 4 layers"):
        export(tiny_run, tmp_path / "bad", "--policy", "SBS")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "sbsb"]  # nothing half-written


def test_greedy_generate_uses_and_grows_the_cache():
    """generate() hands forward a Cache as `cache`; it grows by one per step and decoding equals full forwards."""
    model = small_model()
    model.set_routing("SB_B")
    seen = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache")
        seen.append((kwargs["input_ids"].shape[1], cache, None if cache is None else cache.get_seq_length()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    handle.remove()
    assert torch.equal(out, greedy_by_full_forwards(model, prompt, 6))
    caches = {id(c) for _, c, _ in seen}
    assert len(caches) == 1 and seen[0][1] is not None  # one Cache object, really passed as `cache`
    assert [(n, length) for n, _, length in seen] == [(7, 0)] + [(1, 7 + i) for i in range(5)]
    assert seen[0][1].get_seq_length() == 7 + 5  # the last token is sampled, never fed back


def test_generate_with_a_router_policy(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from duollm.model.policy import Router
    from duollm.routers.config import RouterConfig
    from duollm.routers.store import save_router

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    torch.manual_seed(3)
    router = Router(4, 32, "SB_")
    for proj in router.proj:  # a router whose decisions depend on the token
        torch.nn.init.normal_(proj.weight, std=1.0)
    save_router(run / "routers" / "mixed", router, RouterConfig())
    out = tmp_path / "hf"
    export(run, out)
    assert (out / "routers" / "mixed" / "router.safetensors").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hf.set_routing("router:mixed")
    prompt = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    generated = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, greedy_by_full_forwards(hf, prompt, 8))
    with torch.no_grad():
        route_LBT = hf(input_ids=generated).routes
        expected = torch.stack([router(layer, x) for layer, x in enumerate(_ffn_inputs(hf, generated))])
    assert torch.equal(route_LBT, expected)  # the routes taken are the router's decisions
    assert len(route_LBT.unique()) == 3  # and they vary: big, small and skip all occur
    assert hf.config.routing == "router:mixed"


def _ffn_inputs(hf, idx_BT):
    """The hidden state entering each FFN (what the router sees), captured with hooks."""
    xs = []
    hooks = [b.ffn_norm.register_forward_hook(lambda m, a, y: xs.append(y)) for b in hf.model.layers]
    hf(input_ids=idx_BT)
    for h in hooks:
        h.remove()
    return xs


def test_random_policy_is_seeded_and_reports_routes():
    model = small_model()
    prompt = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(2))
    runs = []
    for _ in range(2):
        model.set_routing("random:0.5", seed=7)
        runs.append(model(input_ids=prompt).routes)
    assert torch.equal(runs[0], runs[1])
    assert set(runs[0].unique().tolist()) == {1, 2}  # big or small, never skip
    model.set_routing("random:0.5", seed=8)
    assert not torch.equal(model(input_ids=prompt).routes, runs[0])
    with pytest.raises(ValueError, match="random:P"):
        model.set_routing("random:lots")


def test_left_padded_batch_generates_like_single_prompts():
    """attention_mask padding: a batch of prompts of different lengths equals each prompt alone."""
    for kw in ({}, {"pos": "learned", "norm": "layer", "mlp": "gelu_tanh", "bias": True}):  # RoPE and GPT-2 style
        model = small_model(pad_token_id=0, **kw)
        model.set_routing("BS_S")
        g = torch.Generator().manual_seed(4)
        a, b = torch.randint(1, 97, (1, 9), generator=g), torch.randint(1, 97, (1, 5), generator=g)
        batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
        mask = torch.ones_like(batch)
        mask[1, :4] = 0
        out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
        alone_a = model.generate(a, max_new_tokens=5, do_sample=False)
        alone_b = model.generate(b, max_new_tokens=5, do_sample=False)
        assert torch.equal(out[0], alone_a[0]) and torch.equal(out[1, 4:], alone_b[0]), kw


def test_labels_give_the_models_next_token_loss():
    model = small_model()
    idx = torch.randint(0, 97, (2, 12))
    loss = model(input_ids=idx, labels=idx).loss
    ref = model.model(idx[:, :-1], idx[:, 1:]).loss
    torch.testing.assert_close(loss, ref)
    assert model(input_ids=idx, use_cache=False).cache is None


def test_save_pretrained_round_trip_untied(tmp_path):
    from transformers import AutoModelForCausalLM

    model = small_model(tie_embeddings=False, routing="S_BB")
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.model.lm_head.weight is not loaded.model.embed.weight
    idx = torch.randint(0, 97, (1, 16))
    torch.testing.assert_close(loaded(input_ids=idx).logits, model(input_ids=idx).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- Weights & Biases


def test_metrics_log_sends_metrics_to_wandb_offline(tmp_path, monkeypatch):
    """train.wandb=true: wandb.init in offline mode in the run folder, every metric logged at its step."""
    from duollm.config import TrainConfig
    from duollm.train.loop import MetricsLog

    calls = []
    fake = types.ModuleType("wandb")

    class FakeRun:
        def log(self, metrics, step):
            calls.append(("log", dict(metrics), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        import os

        calls.append(("init", kw, os.environ.get("WANDB_MODE")))
        return FakeRun()

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = MetricsLog(tmp_path, TrainConfig(wandb=True), 0, True, {"model": {"n_layers": 4}})
    log.write(5, {"train/loss": 3.5})
    log.close()
    assert calls[0][0] == "init" and calls[0][2] == "offline"
    assert calls[0][1]["dir"] == str(tmp_path) and calls[0][1]["config"] == {"model": {"n_layers": 4}}
    assert calls[1:] == [("log", {"train/loss": 3.5}, 5), ("finish",)]


def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    """The real wandb package, offline: the run file under RUN/wandb holds the logged metric."""
    pytest.importorskip("wandb")
    from duollm.config import TrainConfig
    from duollm.train.loop import MetricsLog

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path, TrainConfig(wandb=True), 0, True, {"preset": "tiny"})
    log.write(1, {"train/loss": 4.25, "lr": 0.001})
    log.close()
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    for _ in range(100):  # wandb-core, a separate process, may still be flushing after finish() returns
        if b"train/loss" in files[0].read_bytes():
            break
        time.sleep(0.1)
    assert b"train/loss" in files[0].read_bytes()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["train/loss"] == 4.25


def test_commands_say_how_to_install_transformers(monkeypatch, tmp_path):
    """Without the hf extra, export and convert fail with one line naming the extra (no traceback)."""
    from duollm.integrations.hf.convert import add_arguments as add_convert_arguments
    from duollm.integrations.hf.convert import run_command as run_convert_command

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ValueError, match=r"duollm export needs transformers: pip install 'duollm\[hf\]'"):
        export(tmp_path / "run", tmp_path / "out")
    p = argparse.ArgumentParser()
    add_convert_arguments(p)
    with pytest.raises(ValueError, match=r"duollm convert needs transformers"):
        run_convert_command(p.parse_args(["gpt2", str(tmp_path / "out")]))


def test_exported_and_saved_files_are_readable_by_others(tiny_run, tmp_path):
    """Issue 28, item 11: an export's weights were written 0600 (safetensors' own mode) while the run folder's
    are 0644: others on a shared file system could not read them. Every saved file follows the umask."""
    import os
    import stat

    from duollm.integrations.hf.export import export_run

    old = os.umask(0o022)
    try:
        out = export_run(tiny_run, tmp_path / "hf")
        DuoForCausalLM.from_pretrained(out).save_pretrained(tmp_path / "again")
    finally:
        os.umask(old)
    for folder in (out, tmp_path / "again"):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
        assert all(m == 0o644 for m in modes.values()), modes


def test_a_tokenizer_loads_from_an_export_without_remote_code(exported, tiny_run):
    """Issue 28, item 10: `AutoTokenizer.from_pretrained(EXPORT)` asks the remote-code question (transformers 5
    reads the config of a model type it does not know first). The README gives the call that needs no remote
    code; here it runs where duollm is not imported, with no question and no warning, and encodes as the run."""
    import subprocess
    import sys
    from pathlib import Path

    from duollm.data.cache import load_tokenizer

    code = ("from transformers import PreTrainedTokenizerFast; import sys; "
            f"print(PreTrainedTokenizerFast.from_pretrained({str(exported)!r})('The for statement')['input_ids'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120)
    assert proc.returncode == 0 and "[y/N]" not in proc.stdout + proc.stderr and "model of type" not in proc.stderr
    assert proc.stdout.strip() == str(load_tokenizer(tiny_run).encode("The for statement"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "PreTrainedTokenizerFast.from_pretrained(folder)" in readme
