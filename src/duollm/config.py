"""Nested dataclass configs: preset defaults < YAML file < ``key=value`` overrides.

Strict: an unknown key or a value of the wrong type is a one-line ValueError. The
resolved config is saved as ``config.yaml`` in every run folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import rundir
from .data.corpus import check_data_files
from .io import atomic_write_text
from .model.model import ModelConfig
from .model.routing import RouteProbs
from .runtime.distributed import DEVICE_NAMES
from .runtime.threads import check_threads


@dataclass
class DataConfig:
    spec: str = "builtin:pydoc"  # builtin:pydoc | file:PATH | hf:NAME[:CONFIG] | hf:FOLDER | hf:json|parquet|csv
    data_files: str = ""  # the files of hf:json, hf:parquet, hf:csv: a path or glob, or several comma-separated
    tokenizer: str = "bpe"  # "bpe": byte-level BPE trained on the corpus; otherwise a pretrained name/path
    val_fraction: float = 0.1  # share of the corpus (in chunks) held out for validation
    split_chunk_chars: int = 4000  # the corpus is cut into chunks of this size; every k-th goes to validation
    text_column: str = "text"  # column of a Hugging Face dataset
    max_chars: int = 0  # cap on corpus characters read (0: no cap), for streaming large datasets
    seed: int = 0  # seed of the train/validation assignment


@dataclass
class RoutingConfig:
    """Random routing during pretraining (paper section 3.1: big or small with probability 0.5)."""

    p_skip: float = 0.0
    p_small: float = 0.5
    p_big: float = 0.5
    per: str = "token"  # "token" (each token and layer draws) or "sequence" (one pattern per sequence)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step (global, across processes and accumulation)
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_tokens: int = 16384  # validation tokens per periodic evaluation
    save_every: int = 200
    log_every: int = 10
    seed: int = 1337
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = ""  # "": wandb's default (WANDB_PROJECT)
    wandb_tags: str = ""  # comma-separated
    wandb_dir: str = ""  # "": WANDB_DIR if set, else the run folder
    keep_checkpoints: int = 1  # newest step folders kept; older ones go, except pinned ones (a KEEP file inside)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parallel: str = "ddp"  # under torchrun: ddp (replicas) | fsdp (FSDP2, sharded per block: train/fsdp.py)


@dataclass
class EvalConfig:
    max_tokens: int = 8192  # evaluation tokens for `eval` and `oracle` (canonical order, same cap)


@dataclass
class StudyConfig:
    """What ``duollm run`` does after training (``study/run.py``; lists are comma-separated strings)."""

    tokens: int = 0  # evaluation tokens the oracles and routers score (0: eval.max_tokens)
    contexts: str = "shared,frozen"  # oracle context policies; the first is the one the routers and skip study use
    reference: str = "B"  # routing of the context tokens under the frozen policy (B: all big)
    skip_fraction: float = 0.5  # skip study: big-or-skip with round(fraction * L) skips (paper: 6 of 12); 0: off
    router_targets: str = "1/3,1/2,2/3"  # big-layer fractions, each rounded to a budget k (paper: 4, 6, 8 of 12)
    router_methods: str = "budget,imitation,straight-through"  # "" for no routers
    router_steps: int = 300
    router_batch: int = 16  # sequences per router training step (non-value methods)
    # routers (the paper's budget method) at route mixtures big/small/skip, e.g. 0.5/0.3/0.2, comma-separated;
    # "paper": the three of the paper's figs. 7 and 9 (30% big, 70% small; 50% big, 50% skip; 50/30/20)
    router_mixtures: str = ""
    batch_tokens: int = 4096  # oracle chunk size: matrix size, memory bound and resume granularity
    # oracle engine: float32 | bfloat16 | auto (bfloat16 where the device has bf16 matrix units). float32 by default:
    # bf16 agrees to 0.03% in perplexity but moves ~8% of tokens to equally good patterns, which flipped a
    # borderline verdict (docs/LOG.md), and a study's verdicts must not depend on the CPU it ran on
    dtype: str = "float32"
    null: bool = True  # a null control: the model at initialisation through the same stages, same tokens (DESIGN 4.4a)
    sequential: bool = True  # the sequential oracle at the paper's position-varying budgets (oracle/sequential.py)
    seeds: int = 1  # language models (and their routers) trained with seeds train.seed, +1, ...: RUN/seeds/seed-<s>/
    stage1: bool = False  # the paper's Fig. 8: Duo vs FLOP-matched dense models, big-first ablation (study/stage1.py)
    stage1_steps: int = 0  # training steps of each of the stage's models (0: train.steps, the run's own model)
    # models per arm (training seeds train.seed + 100 i): their spread is the null of a claim between models; the
    # findings need 3 (analysis/findings.py), 1 keeps them inconclusive
    stage1_seeds: int = 1
    # the scale axis (issue 29): the study again at each model width d_model (heads and FFNs scaled with it, L kept)
    # and each multiple of train.steps, every size a run folder RUN/scale/d<d>-x<m>/ scored on the same tokens;
    # comma-separated ("64,128,256"; "1,2"); "": the run's own width / steps only (study/scale.py)
    widths: str = ""
    train_tokens: str = ""


@dataclass
class RunConfig:
    preset: str = "cpu"
    threads: int = 0  # torch threads: 0 follows the cores other processes leave free (runtime/threads.py); N fixes N
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, dict] = {
    # tests: a few seconds on one CPU core
    "tiny": {
        "model": dict(vocab_size=512, n_layers=4, d_model=32, n_heads=2, d_ff_big=64, d_ff_small=4, max_seq_len=64),
        "data": dict(spec="builtin:pydoc-topics", split_chunk_chars=2000),
        "train": dict(steps=30, batch_size=8, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=5,
                      eval_every=15, eval_tokens=1024, save_every=15, log_every=5),
        "eval": dict(max_tokens=1024),
        "study": dict(tokens=512, router_steps=10, router_methods="budget,imitation,value", batch_tokens=256,
                      router_mixtures="0.5/0/0.5"),
    },
    # the default study: 12 layers like the paper, trains in minutes on two CPU cores
    "cpu": {
        "model": dict(vocab_size=2048, n_layers=12, d_model=128, n_heads=4, d_ff_big=512, d_ff_small=32,
                      max_seq_len=128),
        # compiled: 12-16% faster steps than eager on 2 cores, ~37 s of compilation on a cold cache (docs/LOG.md)
        # 512 steps of 32 x 128: 2^21 tokens, ~3.8 epochs of the embedded corpus (600 missed the 15 minutes)
        "train": dict(steps=512, batch_size=32, seq_len=128, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                      eval_every=256, eval_tokens=8192, save_every=128, log_every=16, compile=True),
        "eval": dict(max_tokens=8192),
        # the oracle costs ~2^(L+1) layer evaluations per token (~0.09 CPU-s per token per context), a
        # budget router ~0.4 s per step; the paper's router only (imitation: +~45 s), one context. 100 router
        # steps: at 50 the routers sat 1.4-1.9 ppl above fixed@k and a finding turned inconclusive; batch 16:
        # at 8 (~14 s less per router) they sat 1.1-1.3 ppl above fixed@k and the router finding did too (docs/LOG.md)
        # stage 1 (off by default, study.stage1=true): 7 models of 256 steps, 23.6 minutes measured (docs/LOG.md)
        # 2,048 tokens = 16 sequences: at 8 the t-interval's df was 7 and the findings' MDEs twice the effects of
        # interest (issue 27); the slimmer null control (its router's reference oracle only) pays for part of it
        "study": dict(tokens=2048, contexts="shared", router_steps=100, router_batch=16, router_methods="budget",
                      batch_tokens=1024, stage1_steps=256),
    },
    # the configuration whose verdicts the README quotes (DESIGN 4.4a): the cpu study on 8,192 tokens (64 sequences)
    # and three training seeds (each seed's model, oracles and routers; study.seeds). Its time: docs/LOG.md
    "evidence": {},  # filled below from "cpu"
    # wide enough for routing's wall-clock to matter (issue 14: `duollm bench`, benchmarks/bench_generate.py):
    # 12 x 1024, FFN 4096 / 256 (the paper's 16:1), ~215M parameters. Sized for the question, not for CPU
    # training (a step is tens of seconds on 2 cores) nor for the CPU oracle (~2^13 layer evaluations per token)
    "wide": {
        "model": dict(vocab_size=2048, n_layers=12, d_model=1024, n_heads=16, d_ff_big=4096, d_ff_small=256,
                      max_seq_len=256),
        "train": dict(steps=2000, batch_size=32, seq_len=256, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                      eval_every=500, eval_tokens=8192, save_every=250, log_every=10),
        "eval": dict(max_tokens=4096),
        "study": dict(tokens=512, contexts="shared", router_steps=100, router_batch=8, router_methods="budget",
                      batch_tokens=512),
    },
    # the paper's 1.4B model (section 2 of the brief): 12 x 2560, FFN 10240 / 640, 32k vocab, tied
    "paper": {
        "model": dict(vocab_size=32000, n_layers=12, d_model=2560, n_heads=20, d_ff_big=10240, d_ff_small=640,
                      max_seq_len=1024, tie_embeddings=True),
        "train": dict(steps=100000, batch_size=256, seq_len=1024, lr=3e-4, min_lr=3e-5, warmup_steps=2000,
                      eval_every=1000, eval_tokens=262144, save_every=1000, log_every=50, dtype="auto"),
        "eval": dict(max_tokens=262144),
    },
}


PRESETS["evidence"] = {**PRESETS["cpu"], "study": {**PRESETS["cpu"]["study"], "tokens": 8192, "seeds": 3}}


# ----------------------------------------------------------------------------- strict (de)serialisation


def _check_type(value, tp, key: str):
    """Coerce ``value`` to annotation ``tp`` or raise a one-line ValueError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _check_type(value, arg, key)
            except ValueError:
                pass
        raise ValueError(f"config key {key}: {value!r} is not a valid {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key} expects true/false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"config key {key} expects an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"config key {key} expects a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"config key {key} expects a string; got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, strictly."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix or '<root>'} must be a mapping; got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value = hints[f.name], data[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_dict(tp, value, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _check_type(value, tp, prefix + f.name)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_override(item: str) -> tuple[list[str], str]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
    key, raw = item.split("=", 1)
    return key.strip().split("."), raw


def _override_value(raw: str, current):
    """A string key takes the text literally (paths and specs: ``file:my: notes.txt``, ``a #b``);
    other keys read it as a YAML scalar (numbers, booleans)."""
    if isinstance(current, str):
        return raw
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict, overrides, what: str = "config") -> None:
    """Apply ``key.sub=value`` strings to a nested dict in place; unknown keys are errors."""
    for item in overrides:
        keys, raw = _parse_override(item)
        node = data
        for i, k in enumerate(keys[:-1]):
            if not isinstance(node.get(k), dict):
                raise ValueError(f"unknown {what} key {'.'.join(keys[: i + 1])}")
            node = node[k]
        if keys[-1] not in node or isinstance(node[keys[-1]], dict):
            known = ", ".join(k for k in node if not isinstance(node[k], dict))
            raise ValueError(f"unknown {what} key {'.'.join(keys)} (known here: {known})")
        node[keys[-1]] = _override_value(raw, node[keys[-1]])


def load_config(config: str | None = None, overrides: list[str] | tuple = (), *, saved: bool = False) -> RunConfig:
    """Preset name or YAML file, then ``key=value`` overrides; strict about keys and types.

    A relative ``file:`` data spec in a YAML file is relative to that file's folder (so the files in
    ``configs/`` work from any working directory) and is resolved to an absolute path here; one given on
    the command line (``--data``, ``--set``) is relative to the working directory as usual. ``saved``: the
    file is a run's own ``config.yaml``, resolved when the run was made: taken as it is."""
    config = config or "cpu"
    if config in PRESETS:
        data = _merge(to_dict(RunConfig()), {"preset": config, **PRESETS[config]})
    elif config.endswith((".yaml", ".yml")) or os.path.sep in config:
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"config file {config} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {config} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {config} must hold a mapping")
        preset = loaded.get("preset", "cpu")
        if preset not in PRESETS:
            raise ValueError(f"config file {config}: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        data_section = loaded.get("data")
        spec = data_section.get("spec") if isinstance(data_section, dict) else None
        if not saved and isinstance(spec, str) and spec.startswith("file:") and not Path(spec[5:]).expanduser().is_absolute():
            data_section["spec"] = "file:" + str((path.resolve().parent / spec[5:]).resolve())
        data = _merge(_merge(to_dict(RunConfig()), {"preset": preset, **PRESETS[preset]}), loaded)
    else:
        raise ValueError(f"unknown preset {config!r} (known: {', '.join(PRESETS)}; or a .yaml file)")
    apply_overrides(data, overrides)
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def validate_train(t: TrainConfig, prefix: str = "train.") -> None:
    """Ranges of a training config (pretraining and routers share it): one line naming the key."""
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_tokens", "save_every", "log_every"):
        if getattr(t, name) <= 0:
            raise ValueError(f"{prefix}{name} must be positive; got {getattr(t, name)}")
    if t.warmup_steps < 0:
        raise ValueError(f"{prefix}warmup_steps must be >= 0; got {t.warmup_steps}")
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise ValueError(f"{prefix}lr must be a finite positive number; got {t.lr}")
    if not (math.isfinite(t.min_lr) and 0 <= t.min_lr <= t.lr):
        raise ValueError(f"{prefix}min_lr must be in [0, lr={t.lr:g}]; got {t.min_lr}")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        raise ValueError(f"{prefix}weight_decay must be a finite number >= 0; got {t.weight_decay}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(t, name) < 1.0:  # NaN fails too
            raise ValueError(f"{prefix}{name} must be in [0, 1); got {getattr(t, name)}")
    if not (math.isfinite(t.grad_clip) and t.grad_clip >= 0):
        raise ValueError(f"{prefix}grad_clip must be a finite number >= 0 (0: no clipping); got {t.grad_clip}")
    if t.batch_size % t.grad_accum:
        raise ValueError(f"{prefix}batch_size={t.batch_size} is not divisible by {prefix}grad_accum={t.grad_accum}")
    if t.dtype not in ("auto", "float32", "bfloat16") or t.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"{prefix}dtype must be auto, float32 or bfloat16 and {prefix}parallel ddp or fsdp; got "
                         f"{t.dtype!r}, {t.parallel!r}")
    if not DEVICE_NAMES.fullmatch(t.device):
        raise ValueError(f"{prefix}device must be auto, cpu, cuda, cuda:N or mps; got {t.device!r}")
    if t.keep_checkpoints < 1:
        raise ValueError(f"{prefix}keep_checkpoints must be >= 1 (the newest step folders kept); got {t.keep_checkpoints}")
    if any(c in t.wandb_project for c in "/\\#?%:") or len(t.wandb_project) > 128:  # W&B's limits, before training
        raise ValueError(f"{prefix}wandb_project must be at most 128 characters, none of / \\ # ? % :; got {t.wandb_project!r}")
    if any(len(tag) > 64 for tag in parse_list(t.wandb_tags)):
        raise ValueError(f"{prefix}wandb_tags: W&B tags are at most 64 characters; got {t.wandb_tags!r}")


def validate(cfg: RunConfig) -> None:
    check_threads(cfg.threads)
    RouteProbs(cfg.routing.p_skip, cfg.routing.p_small, cfg.routing.p_big)
    if cfg.routing.per not in ("token", "sequence"):
        raise ValueError(f"routing.per must be 'token' or 'sequence'; got {cfg.routing.per!r}")
    t = cfg.train
    validate_train(t)
    if t.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    m = cfg.model
    for name in ("rope_theta", "norm_eps", "init_std"):
        if not (math.isfinite(getattr(m, name)) and getattr(m, name) > 0):
            raise ValueError(f"model.{name} must be a finite positive number; got {getattr(m, name)}")
    d = cfg.data
    check_data_files(d.spec, d.data_files)
    if not 0.0 < d.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1); got {d.val_fraction}")
    if d.split_chunk_chars <= 0:
        raise ValueError(f"data.split_chunk_chars must be positive; got {d.split_chunk_chars}")
    if d.max_chars < 0:
        raise ValueError(f"data.max_chars must be >= 0 (0: no cap); got {d.max_chars}")
    if not d.tokenizer:
        raise ValueError("data.tokenizer must be bpe or a tokenizer name or path")
    if cfg.eval.max_tokens <= 0:
        raise ValueError(f"eval.max_tokens must be positive; got {cfg.eval.max_tokens}")


# ----------------------------------------------------------------------------- the study's settings

def parse_list(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


# What a resume may change (README "Reliability"): how long and how often, where it runs and what is
# logged; the later stages' sections. Everything else defines the run and must stay as trained.
RESUMABLE_KEYS = ("train.steps", "train.eval_every", "train.eval_tokens", "train.save_every", "train.log_every",
                  "train.tensorboard", "train.wandb", "train.wandb_project", "train.wandb_tags", "train.wandb_dir",
                  "train.keep_checkpoints", "train.device", "train.compile", "train.dtype", "train.parallel", "threads")
RESUMABLE_SECTIONS = ("eval", "study")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def first_difference(saved, new, allowed=()) -> tuple[str, object, object] | None:
    """The first dotted key (sorted) where two configs differ, with both values, skipping the keys and
    sections in ``allowed``; None when they agree."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(new))
    for key in sorted(set(a) | set(b)):
        if key in allowed or key.split(".")[0] in allowed or a.get(key) == b.get(key):
            continue
        return key, a.get(key), b.get(key)
    return None


def resume_conflict(saved: RunConfig, new: RunConfig) -> str | None:
    """A one-line reason why ``new`` cannot continue a run trained as ``saved``, or None."""
    diff = first_difference(saved, new, RESUMABLE_KEYS + RESUMABLE_SECTIONS)
    if diff is None:
        return None
    key, was, asked = diff
    return (f"{key} is {was!r} in the run but {asked!r} was asked; a resume may change only "
            f"{', '.join(RESUMABLE_KEYS)} and the eval and study sections (train another --out for the rest)")


def save_config(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_config_file(path: Path) -> RunConfig:
    """A resolved config as saved in a run folder (strict; no preset merging)."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return from_dict(RunConfig, data)


def load_run_config(run: Path) -> RunConfig:
    """The resolved config saved in a run folder; one line if the folder holds none."""
    path = rundir.config_path(run)
    if not path.is_file():
        raise ValueError(f"{run} is not a run folder (no {rundir.CONFIG})")
    return read_config_file(path)
