"""Equivalences of the Duo model against independent references (transformers' Llama)."""

import pytest
import torch

from duollm.config import load_config
from duollm.model.model import DuoModel, param_counts

transformers = pytest.importorskip("transformers")


def llama_twin(model: DuoModel, ffn: str = "big"):
    """A transformers LlamaForCausalLM holding the Duo model's attention and one FFN (or none)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    d_ff = c.d_ff_big if ffn == "big" else c.d_ff_small
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
        attention_bias=False, mlp_bias=False,
    )).eval()
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, blk in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = blk.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = blk.ffn_norm.weight
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = getattr(blk.attn, n).weight
        if ffn != "none":
            mod = getattr(blk.ffn, ffn)
            for n in ("gate_proj", "up_proj", "down_proj"):
                sd[p + f"mlp.{n}.weight"] = getattr(mod, n).weight
    missing = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    if ffn == "none":
        for layer in hf.model.layers:  # an attention-only model: the MLP adds nothing to the residual
            layer.mlp = ZeroMLP()
    else:
        assert not missing.missing_keys, missing.missing_keys
    return hf


class ZeroMLP(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


@pytest.fixture
def model_and_tokens():
    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.n_kv_heads=1", "model.tie_embeddings=false"]).model
    model = DuoModel(cfg).eval()
    idx_BT = torch.randint(0, cfg.vocab_size, (2, 24))
    return model, idx_BT


@pytest.mark.parametrize("route,ffn", [("B", "big"), ("S", "small"), ("_", "none")])
def test_uniform_routing_equals_dense_llama(model_and_tokens, route, ffn):
    """all-big == dense big-FFN Llama; all-small == dense small-FFN Llama; all-skip == attention only."""
    model, idx_BT = model_and_tokens
    ref = llama_twin(model, ffn)(idx_BT).logits
    for path in ("routed", "masked"):
        ours = model(idx_BT, routes=route * model.cfg.n_layers, path=path).logits
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_default_routing_is_all_big(model_and_tokens):
    model, idx_BT = model_and_tokens
    torch.testing.assert_close(model(idx_BT).logits, model(idx_BT, routes="B" * model.cfg.n_layers).logits)


def test_paper_preset_parameter_count():
    """DESIGN section 2: 1.399B parameters; big FFNs 944M, small 59M, attention 314M."""
    with torch.device("meta"):
        model = DuoModel(load_config("paper").model)
    counts = param_counts(model)
    assert round(counts["total"] / 1e9, 3) == 1.399
    assert round(counts["big_ffn"] / 1e6) == 944
    assert round(counts["small_ffn"] / 1e6) == 59
    assert round(counts["attention"] / 1e6) == 315  # 314.6M: the paper rounds it down to 314M
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_outputs_report_routes_and_compute(model_and_tokens):
    model, idx_BT = model_and_tokens
    L = model.cfg.n_layers
    out = model(idx_BT, idx_BT, routes="S" * (L - 1) + "B")
    assert out.route_LBT.shape == (L, *idx_BT.shape)
    assert (out.route_LBT[-1] == 2).all() and (out.route_LBT[:-1] == 1).all()
    fm = model.flop_model
    assert torch.allclose(out.flops_BT, torch.full(idx_BT.shape, fm.pattern([1] * (L - 1) + [2]), dtype=torch.float64))
    assert fm.pattern([0] * L) < fm.pattern([1] * L) < fm.all_big()


def test_policy_is_consulted_layer_by_layer(model_and_tokens):
    """A policy object sees the hidden state entering each FFN and decides that layer's routes."""
    model, idx_BT = model_and_tokens
    seen = []

    def policy(layer, x_BTD):
        seen.append((layer, tuple(x_BTD.shape)))
        return torch.full(x_BTD.shape[:2], 2 if layer % 2 else 1, dtype=torch.long)

    out = model(idx_BT, routes=policy)
    L = model.cfg.n_layers
    assert [s[0] for s in seen] == list(range(L))
    pattern = "".join("B" if i % 2 else "S" for i in range(L))
    torch.testing.assert_close(out.logits, model(idx_BT, routes=pattern).logits)


def test_soft_one_hot_mix_equals_hard_route(model_and_tokens):
    model, idx_BT = model_and_tokens
    L = model.cfg.n_layers
    route_LBT = torch.randint(0, 3, (L, *idx_BT.shape))
    one_hot = torch.nn.functional.one_hot(route_LBT, 3).float()
    soft = model(idx_BT, routes=lambda layer, x: one_hot[layer]).logits
    torch.testing.assert_close(soft, model(idx_BT, routes=route_LBT).logits)


def test_kv_cache_decoding_matches_full_forward(model_and_tokens):
    from duollm.model.model import KVCache

    model, idx_BT = model_and_tokens
    pattern = "SB" * (model.cfg.n_layers // 2)
    full = model(idx_BT, routes=pattern).logits
    cache = KVCache(model.cfg.n_layers)
    steps = [model(idx_BT[:, :10], routes=pattern, cache=cache).logits]
    for t in range(10, idx_BT.shape[1]):
        steps.append(model(idx_BT[:, t : t + 1], routes=pattern, cache=cache).logits)
    assert cache.length == idx_BT.shape[1]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_block_skip_mode_drops_attention_of_skipped_tokens():
    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.skip_mode=block"]).model
    model = DuoModel(cfg).eval()
    idx_BT = torch.randint(0, cfg.vocab_size, (1, 8))
    out = model(idx_BT, routes="_" * cfg.n_layers).logits
    # every block skipped entirely: the logits are those of the embeddings alone
    ref = model.lm_head(model.norm(model.embed(idx_BT)))
    torch.testing.assert_close(out, ref)
