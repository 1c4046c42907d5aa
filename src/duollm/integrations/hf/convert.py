"""``duollm convert SOURCE OUT``: a pretrained Hugging Face decoder -> a Duo run folder.

Supported: the Llama family (``model_type`` llama: RMSNorm, RoPE, SwiGLU, grouped KV heads,
tied or untied head) and GPT-2 (LayerNorm with bias, learned absolute positions, GELU MLP with
biases, fused ``c_attn``), both mapped exactly: with every token routed big, the converted model
computes the original model's logits (checked at conversion time, and by tests).

- The original FFN becomes the **big** module of every layer.
- The **small** module (``model.d_ff_small``; default 1/16 of the big width, the paper's ratio)
  is initialised from the big one by keeping its most important neurons, ranked by
    ``weights`` (default): the size of a neuron's weights, ||gate_j|| * ||up_j|| * ||down_:,j||
                (GELU: ||(up_j, b_j)|| * ||down_:,j||) — no data needed;
    ``activations``: its mean |activation| on training text times ||down_:,j|| (the average size of
                its contribution to the layer output), measured all-big on up to 16 sequences;
    ``random``: a random subset (a baseline for the two above).
  A small module that reuses the big one's strongest neurons starts near the big function instead
  of from noise, so random-routing fine-tuning starts from a working model in both routes.
- The run folder is a normal run at step 0 (``config.yaml``, the pretrained tokenizer in
  ``tokenizer/``, the token cache of ``data.spec``, weights + optimizer state in ``latest/``):
  random-routing fine-tuning is ``duollm train --resume --out OUT --set train.steps=N``.

Tensor name legend: F FFN inner width, D model width, N tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ... import rundir
from ...checkpoint import save_checkpoint
from ...config import load_config, save_config, validate
from ...data.cache import load_tokens, write_data
from ...data.corpus import build_data, is_local_path, one_line, sample_batch
from ...io import atomic_folder
from ...model.model import DuoModel, ModelConfig
from ...train.loop import make_optimizer

SMALL_INITS = ("weights", "activations", "random")
SUPPORTED = ("llama", "gpt2")
# fine-tuning from pretrained weights wants a gentler schedule than pretraining from scratch
FINETUNE_DEFAULTS = ["train.lr=3e-4", "train.min_lr=3e-5", "train.warmup_steps=20", "train.steps=200"]


# ----------------------------------------------------------------------------- loading the source


def load_source_config(source: str):
    """The Hugging Face config of a model name or local folder (one-line ValueError if unusable)."""
    from transformers import AutoConfig

    if is_local_path(source) and not Path(source).expanduser().is_dir():
        raise ValueError(f"cannot convert {source}: no such folder")
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as e:  # unknown name, offline hub, not a model folder: one line
        raise ValueError(f"cannot load a Hugging Face config from {source}: {one_line(e)}") from None
    if config.model_type not in SUPPORTED:
        raise ValueError(f"{source} is a {config.model_type!r} model; convert supports {', '.join(SUPPORTED)}")
    return config


def load_source(source: str):
    """``(hf_model, hf_tokenizer)`` of a model name or a local folder, in float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise ValueError(f"cannot load model and tokenizer from {source}: {one_line(e)}") from None
    return model, tokenizer


def duo_config(hf_config, d_ff_small: int | None = None) -> ModelConfig:
    """The Duo architecture of a Llama or GPT-2 config; ValueError for variants that would not be exact."""
    c = hf_config
    if c.model_type == "llama":
        rope = dict(getattr(c, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"RoPE scaling {rope.get('rope_type')!r} is not supported (plain RoPE only)")
        if c.hidden_act != "silu" or c.attention_bias or c.mlp_bias or (c.pretraining_tp or 1) != 1:
            raise ValueError("only Llama variants with SiLU, no attention/MLP bias and pretraining_tp=1 convert exactly")
        if c.head_dim != c.hidden_size // c.num_attention_heads:
            raise ValueError(f"head_dim={c.head_dim} differs from hidden_size / heads; not supported")
        d_ff = c.intermediate_size
        return ModelConfig(
            vocab_size=c.vocab_size, n_layers=c.num_hidden_layers, d_model=c.hidden_size,
            n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads or 0, d_ff_big=d_ff,
            d_ff_small=d_ff_small or max(1, d_ff // 16), max_seq_len=c.max_position_embeddings,
            rope_theta=float(rope.get("rope_theta", 10000.0)), norm_eps=c.rms_norm_eps,
            tie_embeddings=bool(c.tie_word_embeddings), init_std=c.initializer_range,
        )
    # gpt2
    if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx or c.add_cross_attention:
        raise ValueError("only GPT-2 variants with standard attention scaling and no cross-attention convert exactly")
    act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(c.activation_function)
    if act is None:
        raise ValueError(f"GPT-2 activation {c.activation_function!r} is not supported (gelu_new, gelu)")
    d_ff = c.n_inner or 4 * c.n_embd
    return ModelConfig(
        vocab_size=c.vocab_size, n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_ff_big=d_ff,
        d_ff_small=d_ff_small or max(1, d_ff // 16), max_seq_len=c.n_positions, norm_eps=c.layer_norm_epsilon,
        tie_embeddings=bool(c.tie_word_embeddings), init_std=c.initializer_range,
        norm="layer", pos="learned", mlp=act, bias=True,
    )


# ----------------------------------------------------------------------------- weight mapping


def duo_state_dict(hf_model, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The source weights under DuoModel's names, small modules excluded (they are derived below)."""
    sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
    out = {}
    if hf_model.config.model_type == "llama":
        out["embed.weight"] = sd["model.embed_tokens.weight"]
        out["norm.weight"] = sd["model.norm.weight"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        for i in range(cfg.n_layers):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            out[dst + "attn_norm.weight"] = sd[src + "input_layernorm.weight"]
            out[dst + "ffn_norm.weight"] = sd[src + "post_attention_layernorm.weight"]
            for p in ("q", "k", "v", "o"):
                out[f"{dst}attn.{p}_proj.weight"] = sd[f"{src}self_attn.{p}_proj.weight"]
            for p in ("gate", "up", "down"):
                out[f"{dst}ffn.big.{p}_proj.weight"] = sd[f"{src}mlp.{p}_proj.weight"]
        return out
    # GPT-2: Conv1D stores weights as [in, out]; nn.Linear as [out, in]
    out["embed.weight"] = sd["transformer.wte.weight"]
    out["embed.pos.weight"] = sd["transformer.wpe.weight"]
    out["norm.weight"], out["norm.bias"] = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    D = cfg.d_model
    for i in range(cfg.n_layers):
        src, dst = f"transformer.h.{i}.", f"layers.{i}."
        for a, b in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = sd[f"{src}{a}.weight"], sd[f"{src}{a}.bias"]
        w_qkv, b_qkv = sd[src + "attn.c_attn.weight"].t(), sd[src + "attn.c_attn.bias"]
        for j, p in enumerate(("q", "k", "v")):  # c_attn's output is [q | k | v]
            out[f"{dst}attn.{p}_proj.weight"] = w_qkv[j * D : (j + 1) * D]
            out[f"{dst}attn.{p}_proj.bias"] = b_qkv[j * D : (j + 1) * D]
        out[dst + "attn.o_proj.weight"] = sd[src + "attn.c_proj.weight"].t()
        out[dst + "attn.o_proj.bias"] = sd[src + "attn.c_proj.bias"]
        out[dst + "ffn.big.up_proj.weight"] = sd[src + "mlp.c_fc.weight"].t()
        out[dst + "ffn.big.up_proj.bias"] = sd[src + "mlp.c_fc.bias"]
        out[dst + "ffn.big.down_proj.weight"] = sd[src + "mlp.c_proj.weight"].t()
        out[dst + "ffn.big.down_proj.bias"] = sd[src + "mlp.c_proj.bias"]
    return out


# ----------------------------------------------------------------------------- the small module


def weight_importance(big) -> torch.Tensor:
    """``score_F``: how large each neuron's weights are (its possible contribution to the output)."""
    down_F = big.down_proj.weight.norm(dim=0)
    if hasattr(big, "gate_proj"):  # SwiGLU: the neuron is silu(gate_j . x) * (up_j . x)
        return big.gate_proj.weight.norm(dim=1) * big.up_proj.weight.norm(dim=1) * down_F
    w_up = big.up_proj.weight
    if big.up_proj.bias is not None:
        w_up = torch.cat([w_up, big.up_proj.bias[:, None]], dim=1)
    return w_up.norm(dim=1) * down_F


@torch.no_grad()
def activation_importance(model: DuoModel, idx_BT: torch.Tensor) -> list[torch.Tensor]:
    """Per layer ``score_F``: mean |activation| of each big-FFN neuron (all-big forward) x ||down_:,j||."""
    sums, hooks = [None] * model.cfg.n_layers, []
    for i, block in enumerate(model.layers):
        def hook(module, args, i=i):
            a_NF = args[0].reshape(-1, args[0].shape[-1]).abs().double()
            sums[i] = a_NF.sum(0) if sums[i] is None else sums[i] + a_NF.sum(0)
        hooks.append(block.ffn.big.down_proj.register_forward_pre_hook(hook))
    try:
        model(idx_BT, routes="B" * model.cfg.n_layers, return_logits=False)
    finally:
        for h in hooks:
            h.remove()
    return [(s / idx_BT.numel()).float() * block.ffn.big.down_proj.weight.norm(dim=0)
            for s, block in zip(sums, model.layers)]


@torch.no_grad()
def init_small_from_big(model: DuoModel, method: str = "weights", idx_BT: torch.Tensor | None = None,
                        seed: int = 0) -> None:
    """Copy the ``d_ff_small`` most important neurons of every big FFN into its small FFN."""
    if method not in SMALL_INITS:
        raise ValueError(f"small-module init must be one of {', '.join(SMALL_INITS)}; got {method!r}")
    k = model.cfg.d_ff_small
    if k > model.cfg.d_ff_big:
        raise ValueError(f"model.d_ff_small={k} exceeds the big FFN's width {model.cfg.d_ff_big}")
    if method == "activations":
        if idx_BT is None:
            raise ValueError("small-module init 'activations' needs text")
        scores = activation_importance(model, idx_BT)
    gen = torch.Generator().manual_seed(seed)
    for i, block in enumerate(model.layers):
        big, small = block.ffn.big, block.ffn.small
        if method == "random":
            keep_F = torch.randperm(model.cfg.d_ff_big, generator=gen)[:k]
        else:
            score_F = weight_importance(big) if method == "weights" else scores[i]
            keep_F = score_F.topk(k).indices
        keep_F = keep_F.sort().values.to(big.down_proj.weight.device)
        for name in ("gate_proj", "up_proj"):  # rows are neurons
            if hasattr(big, name):
                getattr(small, name).weight.copy_(getattr(big, name).weight[keep_F])
                if getattr(big, name).bias is not None:
                    getattr(small, name).bias.copy_(getattr(big, name).bias[keep_F])
        small.down_proj.weight.copy_(big.down_proj.weight[:, keep_F])  # columns are neurons
        if big.down_proj.bias is not None:  # the output bias belongs to the layer, not to a neuron
            small.down_proj.bias.copy_(big.down_proj.bias)


# ----------------------------------------------------------------------------- end to end


@torch.no_grad()
def check_all_big(model: DuoModel, hf_model, vocab: int, n: int = 16) -> tuple[float, float]:
    """``(max |logit difference|, max |logit|)`` of all-big Duo vs the source model on random tokens."""
    idx_BT = torch.randint(0, vocab, (2, min(n, model.cfg.max_seq_len)), generator=torch.Generator().manual_seed(0))
    ours = model(idx_BT, routes="B" * model.cfg.n_layers).logits
    theirs = hf_model(input_ids=idx_BT, use_cache=False).logits
    return (ours - theirs).abs().max().item(), theirs.abs().max().item()


def convert(source: str, out, *, d_ff_small: int | None = None, small_init: str = "weights",
            data: str | None = None, sets: list[str] | tuple = (), log=print) -> Path:
    """Convert ``source`` into the Duo run folder ``out`` (written to ``out.tmp``, then renamed)."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new run folder")
    if small_init not in SMALL_INITS:
        raise ValueError(f"--small-init must be one of {', '.join(SMALL_INITS)}; got {small_init!r}")
    model_sets = [s for s in sets if s.startswith("model.")]
    allowed = ("model.d_ff_small=", "model.skip_mode=")
    if any(not s.startswith(allowed) for s in model_sets):
        raise ValueError("convert takes the architecture from the source; only model.d_ff_small and model.skip_mode may be set")
    mcfg = duo_config(load_source_config(source), d_ff_small)  # refuse inexact variants before loading weights
    hf_model, hf_tok = load_source(source)
    if len(hf_tok) > mcfg.vocab_size:
        raise ValueError(f"the tokenizer of {source} has {len(hf_tok)} tokens but the model only {mcfg.vocab_size}")
    source_ref = str(Path(source).resolve()) if Path(source).is_dir() else source
    overrides = [*FINETUNE_DEFAULTS, f"data.tokenizer={source_ref}", *(f"data.spec={data}",) * bool(data), *sets]
    cfg = load_config("cpu", [s for s in overrides if not s.startswith("model.")])
    for s in model_sets:
        key, _, value = s.partition("=")
        mcfg = ModelConfig(**{**mcfg.__dict__, key.split(".", 1)[1]: int(value) if key.endswith("d_ff_small") else value})
    cfg.model = mcfg
    cfg.train.seq_len = min(cfg.train.seq_len, mcfg.max_seq_len)
    validate(cfg)

    model = DuoModel(mcfg)
    missing, unexpected = model.load_state_dict(duo_state_dict(hf_model, mcfg), strict=False)
    derived = {k for k in missing if ".ffn.small." in k} | ({"lm_head.weight"} if mcfg.tie_embeddings else set())
    assert not unexpected and set(missing) <= derived, (missing, unexpected)
    model.eval()
    diff, scale = check_all_big(model, hf_model, len(hf_tok))
    if diff > 1e-4 * max(1.0, scale):  # float32 reordering is ~1e-6; a wrong mapping is O(1)
        raise ValueError(f"conversion check failed: all-big logits differ from {source} by {diff:.3g}")
    log(f"{source}: {hf_model.config.model_type}, {mcfg.n_layers} layers, width {mcfg.d_model}, FFN {mcfg.d_ff_big} "
        f"-> big {mcfg.d_ff_big} / small {mcfg.d_ff_small}; all-big logits match (max |diff| {diff:.2g})")

    with atomic_folder(out) as tmp:
        write_data(build_data(cfg, log=log), tmp)  # the pretrained tokenizer, the token cache
        idx_BT = None
        if small_init == "activations":
            tokens = load_tokens(tmp, "train")
            idx_BT = sample_batch(tokens, 16, cfg.train.seq_len, torch.Generator().manual_seed(cfg.train.seed))[0]
        init_small_from_big(model, small_init, idx_BT, seed=cfg.train.seed)
        save_config(cfg, rundir.config_path(tmp))
        # step 0 with a fresh optimizer: `duollm train --resume` continues from here; pinned (KEEP), so
        # fine-tuning's checkpoint retention never deletes the converted weights
        save_checkpoint(tmp, model, {"step": 0, "optimizer": make_optimizer(model, cfg.train).state_dict(),
                                     "converted_from": source_ref, "small_init": small_init}, pin=True)
    log(f"small modules initialised from the big ones ({small_init}); fine-tune with random routing:")
    log(f"  duollm train --resume --out {out} --set train.steps={cfg.train.steps}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``duollm convert SOURCE OUT [...]``."""
    parser.add_argument("source", help="Hugging Face model name or local folder (Llama family or GPT-2)")
    parser.add_argument("out", help="new run folder")
    parser.add_argument("--small-ffn", type=int, default=None, help="small FFN width (default: big width / 16)")
    parser.add_argument("--small-init", default="weights", choices=SMALL_INITS,
                        help="how the small FFN is taken from the big one (default: weights)")
    parser.add_argument("--data", help="fine-tuning data spec (default builtin:pydoc)")
    parser.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE", default=[],
                        help="config overrides, e.g. train.steps=100 (model.* only d_ff_small, skip_mode)")


def run_command(args: argparse.Namespace) -> str:
    """``duollm convert``: write the run folder; its path is the last line printed."""
    from . import require_transformers

    require_transformers("convert")
    out = convert(args.source, Path(args.out), d_ff_small=args.small_ffn, small_init=args.small_init,
                  data=args.data, sets=list(args.set or []))
    return str(out)
