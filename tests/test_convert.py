"""`duollm convert`: pretrained Llama / GPT-2 -> Duo run; all-big routing reproduces the source exactly."""

import argparse

import pytest
import torch

pytest.importorskip("transformers")

from duollm.integrations.hf.convert import add_arguments as add_convert_arguments
from duollm.integrations.hf.convert import init_small_from_big
from duollm.integrations.hf.convert import run_command as run_convert_command

LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=64, rope_theta=5000.0, tie_word_embeddings=False,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
GPT2 = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=64, bos_token_id=None, eos_token_id=None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from duollm.integrations.lm_eval.tasks import DEFAULT_TEXT

    path = tmp_path_factory.mktemp("corpus") / "ft.txt"
    path.write_text(DEFAULT_TEXT.read_text() * 2)
    return path


def pretrained(kind: str, folder, tiny_run):
    """A randomly initialised source model with a tokenizer, saved like a Hub checkpoint."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)) if kind == "llama" else GPT2LMHeadModel(GPT2Config(**GPT2))
    for p in model.parameters():  # away from init values (unit norms, zero biases) that hide mapping mistakes
        p.data.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_file=str(tiny_run / "tokenizer.json"), eos_token="<|endoftext|>").save_pretrained(folder)
    return model.eval()


def convert_cli(*argv):
    p = argparse.ArgumentParser()
    add_convert_arguments(p)
    run_convert_command(p.parse_args([str(a) for a in argv]))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_all_big_reproduces_the_source_logits(kind, tiny_run, corpus, tmp_path):
    from duollm.checkpoint import load_model

    source = pretrained(kind, tmp_path / "src", tiny_run)
    run = tmp_path / "run"
    convert_cli(tmp_path / "src", run, "--data", f"file:{corpus}", "--set", "train.seq_len=32", "train.batch_size=4")
    model, cfg = load_model(run)
    if kind == "gpt2":
        assert (cfg.model.norm, cfg.model.pos, cfg.model.mlp, cfg.model.bias) == ("layer", "learned", "gelu_tanh", True)
    else:
        assert cfg.model.kv_heads == 2 and not cfg.model.tie_embeddings and cfg.model.rope_theta == 5000.0
    assert cfg.model.d_ff_small == cfg.model.d_ff_big // 16
    idx_BT = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx_BT, routes="BB").logits
        theirs = source(input_ids=idx_BT).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        # the small route is a different function, not a copy of the big one
        assert (model(idx_BT, routes="SS").logits - theirs).abs().max() > 1e-2
    assert (run / "tokenizer").is_dir() and (run / "data" / "train.bin").is_file()


def test_small_module_keeps_the_most_important_neurons():
    from duollm.model.model import DuoModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layers=2, d_model=16, n_heads=2, d_ff_big=32, d_ff_small=32, max_seq_len=16)
    model = DuoModel(cfg).eval()
    init_small_from_big(model, "weights")  # every neuron kept: the small module is the big one, reordered
    idx = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, routes="SS").logits, model(idx, routes="BB").logits)
    cfg = ModelConfig(**{**cfg.__dict__, "d_ff_small": 4})
    model = DuoModel(cfg).eval()
    big = model.layers[0].ffn.big
    with torch.no_grad():
        for j in (3, 17, 29, 30):  # make four neurons clearly the strongest
            big.down_proj.weight[:, j] *= 10
    init_small_from_big(model, "weights")
    small = model.layers[0].ffn.small
    assert torch.equal(small.down_proj.weight, big.down_proj.weight[:, [3, 17, 29, 30]])
    assert torch.equal(small.gate_proj.weight, big.gate_proj.weight[[3, 17, 29, 30]])
    with torch.no_grad():
        big.up_proj.weight[[3, 17, 29, 30]] = 0  # those neurons never fire: activations pick others
    init_small_from_big(model, "activations", torch.randint(0, 50, (4, 16)))
    kept = [j for j in range(32) if any(torch.equal(big.down_proj.weight[:, j], c) for c in small.down_proj.weight.t())]
    assert len(kept) == 4 and not set(kept) & {3, 17, 29, 30}
    with pytest.raises(ValueError, match="must be one of"):
        init_small_from_big(model, "magic")


def test_converted_folder_continues_with_train_resume(tiny_run, corpus, tmp_path, capsys):
    """The converted folder is a run at step 0: `duollm train --resume` fine-tunes it with random routing."""
    import json

    from duollm.checkpoint import latest_checkpoint, load_state
    from duollm.cli import main

    pretrained("gpt2", tmp_path / "src", tiny_run)
    run = tmp_path / "run"
    convert_cli(tmp_path / "src", run, "--small-init", "activations", "--data", f"file:{corpus}",
                "--set", "train.seq_len=32", "train.batch_size=4", "train.eval_tokens=64", "train.log_every=1")
    assert load_state(latest_checkpoint(run))["step"] == 0
    assert main(["train", "--resume", "--out", str(run), "--set", "train.steps=2", "train.eval_every=2"]) == 0
    assert load_state(latest_checkpoint(run))["step"] == 2
    logged = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2]
    assert {"val/all_big", "val/all_small", "val/random"} <= logged[-1].keys()


def test_unsupported_sources_are_refused(tmp_path, tiny_run):
    from transformers import GPT2Config

    GPT2Config(**GPT2, scale_attn_by_inverse_layer_idx=True).save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match="standard attention scaling"):
        convert_cli(tmp_path / "odd", tmp_path / "run")
    with pytest.raises(ValueError, match="nowhere: no such folder"):
        convert_cli(tmp_path / "nowhere", tmp_path / "run")
    (tmp_path / "empty").mkdir()  # a folder that holds no model
    with pytest.raises(ValueError, match="cannot load a Hugging Face config"):
        convert_cli(tmp_path / "empty", tmp_path / "run")
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        convert_cli(tmp_path / "odd", tmp_path / "run")
