"""Hugging Face transformers model of a Duo run: ``DuoConfig`` and ``DuoForCausalLM``.

``DuoForCausalLM`` wraps ``duollm.model.model.DuoModel`` (one implementation of the model, no
copy): its weights are the run's weights under the prefix ``model.``, the LM head is tied to
the embedding, and ``save_pretrained`` / ``from_pretrained`` use safetensors.

Routing: a policy set on the model (``model.set_routing(...)``, or ``config.routing`` saved in
``config.json``) routes every forward, including each step of ``generate()``; a forward may
also take ``routes=`` (anything ``DuoModel.forward`` accepts). Policies are the specs of
``routers.store.routing_policy``: all-big (default), all-small, a pattern, ``random:P``,
``router:NAME`` (a router saved under ``<model folder>/routers/NAME``), or a policy object.

KV cache: transformers 5.x hands the cache to ``forward`` as ``cache`` (a ``Cache``;
``generate()`` makes a ``DynamicCache``), not as ``past_key_values``: in 5.24
``GenerationMixin.prepare_inputs_for_generation`` sets ``model_inputs["cache"]`` and
``_update_model_kwargs_for_generation`` reads ``outputs["cache"]``. ``_CacheAdapter`` gives
that ``Cache`` the interface ``DuoModel`` expects (``length``, ``seen``, ``update``).

Padding: ``attention_mask`` (0 = padding, covering cached and new tokens) becomes the
model's key mask and ``position_ids`` its positions, so left-padded batches generate like
single prompts (RoPE scores depend only on relative positions).

Tensor name legend: B batch, T new positions, C key positions (cached + new), L layers,
V vocabulary, K kv heads, E head dimension.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ...model.model import DuoModel, ModelConfig
from ...model.policy import Router, policy_without_folder
from ...model.routing import parse_routing

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def standalone_routing_policy(spec, n_layers: int, *, root=None, seed: int = 0, device="cpu"):
    """``routers.store.routing_policy`` for this module's standalone copy (``hf/standalone.py``: an export's own
    code, where duollm is not installed): the same specs; a router is rebuilt from its folder's
    ``router.yaml`` and weights. ``_LAYOUT`` (the run folder's names) is written into that copy."""
    simple = policy_without_folder(spec, n_layers, seed)
    if simple is not None:
        return simple
    r = parse_routing(spec, n_layers)
    import yaml
    from safetensors.torch import load_file

    folder = Path(r.router) if Path(r.router).is_dir() else Path(root or ".") / _LAYOUT["routers"] / r.router
    if not (folder / _LAYOUT["router_yaml"]).is_file():
        raise ValueError(f"no router {r.router!r} in {folder.parent}")
    meta = yaml.safe_load((folder / _LAYOUT["router_yaml"]).read_text())
    cfg, L = meta["config"], int(meta["n_layers"])
    if L != n_layers:
        raise ValueError(f"router {r.router!r} has {L} layers but the model has {n_layers}")
    router = Router(L, int(meta["d_model"]), meta["options"], budget_k=round(cfg["target"] * L) if cfg.get("enforce") else None,
                    peek=meta.get("peek"))
    weights = folder / _LAYOUT["router_weights"]
    missing, unexpected = router.load_state_dict(load_file(str(weights)), strict=False)
    if set(missing) - {"offset_O"} or unexpected:  # routers saved before calibration existed lack the offset
        raise ValueError(f"{weights} does not fit its router.yaml")
    router.check_finite(weights)
    router.mode, router.name = "hard", f"router:{folder.name}"
    return router.name, router.to(device).eval()


try:  # inside duollm: the one resolver of routing specs, the run folder's layout, the standalone code
    if not __name__.startswith("duollm."):  # the standalone copy stays self-contained where duollm is installed too
        raise ImportError(__name__)
    # absolute imports in a try block: transformers neither copies nor requires them for remote code
    from duollm.checkpoint import load_model
    from duollm.integrations.hf import standalone
    from duollm.routers.store import routing_policy as resolve_policy
    _LAYOUT = standalone.layout()
except ImportError:  # the standalone copy (its header defines _LAYOUT); transformers saves its code (an auto class)
    load_model = standalone = None
    resolve_policy = standalone_routing_policy


def _readable_by_all(folder: Path) -> None:
    """The files transformers saved, with the permissions of any file this process creates (umask): safetensors
    writes its weights 0600, which others on a shared file system cannot read (issue 28, item 11)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~mask)


class DuoConfig(PreTrainedConfig):
    """A ``duollm.model.model.ModelConfig`` (same field names and defaults) plus the routing policy."""

    model_type = "duo"
    # the names transformers' generic code (caches, generation, tooling) looks for
    attribute_map = {
        "num_hidden_layers": "n_layers",
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "intermediate_size": "d_ff_big",
        "max_position_embeddings": "max_seq_len",
        "tie_word_embeddings": "tie_embeddings",
        "rms_norm_eps": "norm_eps",
        "initializer_range": "init_std",
    }

    vocab_size: int = 2048
    n_layers: int = 12
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 0
    d_ff_big: int = 512
    d_ff_small: int = 32
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    skip_mode: str = "ffn"
    init_std: float = 0.02
    norm: str = "rms"
    pos: str = "rope"
    mlp: str = "swiglu"
    bias: bool = False
    # default routing of every forward: None (all big), a pattern, "random:P", "router:NAME"
    routing: str | None = None
    routing_seed: int = 0  # seed of random routing
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.model_config()  # validate now, with ModelConfig's one-line messages

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{name: getattr(self, name) for name in MODEL_FIELDS})

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> DuoConfig:
        return cls(**dataclasses.asdict(cfg), **kwargs)


class _CacheAdapter:
    """``DuoModel``'s cache interface over a transformers ``Cache`` (keys/values are [B, K, T, E] in both)."""

    def __init__(self, cache: Cache):
        self.cache = cache

    @property
    def length(self) -> int:
        return self.cache.get_seq_length(0)

    def seen(self, layer: int) -> int:
        return self.cache.get_seq_length(layer)

    def update(self, layer: int, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor):
        return self.cache.update(k_BKTE, v_BKTE, layer)


@dataclass
class DuoCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus what a Duo forward reports: routes taken and compute spent."""

    routes: torch.Tensor | None = None  # route_LBT: 0 skip, 1 small, 2 big
    flops: torch.Tensor | None = None  # flops_BT: forward FLOPs per token


class DuoForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DuoConfig
    config: DuoConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True  # DuoModel checkpoints per block, replaying the routes (routing.replaying)
    _no_split_modules = ["DuoBlock"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}
    # forward takes num_items_in_batch: Trainer leaves the normalisation over accumulated steps to it
    accepts_loss_kwargs = True

    def __init__(self, config: DuoConfig):
        super().__init__(config)
        self.model = DuoModel(config.model_config())
        object.__setattr__(self, "_routes", None)  # resolved from config.routing on first use
        self.post_init()

    # --- construction from a live DuoModel (export, wrapping a run without copying weights)

    @classmethod
    def from_duo_model(cls, duo: DuoModel, **config_kwargs) -> DuoForCausalLM:
        """Wrap ``duo`` (its parameters are shared, not copied)."""
        config = DuoConfig.from_model_config(duo.cfg, **config_kwargs)
        with torch.device("meta"):  # skip a random initialisation that ``duo`` replaces at once
            model = cls(config)
        model.model = duo
        return model

    @classmethod
    def from_run(cls, run, device="cpu", **config_kwargs) -> DuoForCausalLM:
        """The model of a run folder (its ``latest`` checkpoint), in eval mode."""
        duo, _ = load_model(Path(run), device)
        model = cls.from_duo_model(duo, **config_kwargs)
        model.config.name_or_path = str(run)  # where router:NAME policies are looked up
        return model.eval()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, plus what makes the folder load anywhere: the model's code (``modeling_duo.py``,
        torch and transformers only; ``hf/standalone.py``) behind ``auto_map``, and the routers of the folder
        the model came from (``routers/``), so ``router:NAME`` policies survive the round trip."""
        import shutil

        out = Path(save_directory)
        if standalone is not None:  # the standalone copy is saved by transformers itself (its auto class)
            self.config.auto_map = dict(standalone.AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        _readable_by_all(out)
        if standalone is not None:
            standalone.write_code(out)
        source = Path(self.config.name_or_path or "") / _LAYOUT["routers"]
        if not self.config.name_or_path or not source.is_dir() or source.resolve() == (out / _LAYOUT["routers"]).resolve():
            return
        for folder in sorted(p for p in source.iterdir() if (p / _LAYOUT["router_weights"]).is_file()):
            dest = out / _LAYOUT["routers"] / folder.name
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("router_yaml", "router_weights", "router_eval"):
                if (folder / _LAYOUT[name]).is_file():
                    shutil.copy2(folder / _LAYOUT[name], dest / _LAYOUT[name])

    def _init_weights(self, module):
        # DuoModel initialises its own parameters; the only state transformers cannot restore
        # is the non-persistent RoPE tables (from_pretrained builds on the meta device).
        if isinstance(module, DuoModel):
            module.init_rope()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    # --- routing

    def set_routing(self, policy=None, *, seed: int | None = None) -> DuoForCausalLM:
        """Route every later forward (and ``generate()``) with ``policy``; returns the model.

        ``policy``: None / "all-big", "all-small", a pattern over B/S/_, "random:P",
        "router:NAME" (looked up under ``<model folder>/routers/``, or a router folder path),
        or a policy object ``policy(layer, x_BTD) -> route_BT``. String policies are saved
        with the model (``config.routing``).
        """
        if seed is not None:
            self.config.routing_seed = seed
        root = self.config.name_or_path if self.config.name_or_path and Path(self.config.name_or_path).is_dir() else None
        _, routes = resolve_policy(policy, self.config.n_layers, root=root, seed=self.config.routing_seed,
                                          device=self.device)
        object.__setattr__(self, "_routes", routes)  # never a submodule: a router is not part of the LM's weights
        self.config.routing = policy if isinstance(policy, str) and policy.strip().lower() != "all-big" else None
        return self

    @property
    def routing_policy(self):
        """What the next forward is routed by (a pattern string or a policy object)."""
        if self._routes is None:
            self.set_routing(self.config.routing)
        return self._routes

    # --- forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        routes=None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> DuoCausalLMOutput:
        """Causal LM forward. ``routes`` overrides the model's routing policy for this call.

        ``num_items_in_batch``: the labelled tokens of the whole accumulated batch (``transformers.Trainer``
        passes it to a model that takes ``**kwargs``, and then does not divide by the accumulation steps
        itself): the loss is the sum over this micro-batch divided by it, so the accumulated loss and gradients
        equal one step over the whole batch. Without it, the mean over this batch's labelled tokens."""
        if inputs_embeds is not None:
            raise ValueError("DuoForCausalLM takes input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("DuoForCausalLM needs input_ids")
        B, T = input_ids.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        adapter = _CacheAdapter(cache) if cache is not None else None
        past = adapter.length if adapter is not None else 0

        keep_BC = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask must be 2-D [batch, cached + new tokens] = {(B, past + T)}; "
                                 f"got {tuple(attention_mask.shape)}")
            if not bool(attention_mask.all()):
                keep_BC = attention_mask
        pos_BT = None
        if position_ids is not None:
            pos_BT = position_ids.expand(B, T)
            default = past + torch.arange(T, device=pos_BT.device)
            if bool((pos_BT == default).all()):
                pos_BT = None  # the model's own (contiguous) positions: cheaper table slicing

        if routes is None:
            routes = self.routing_policy
        if isinstance(routes, torch.nn.Module):
            routes.to(input_ids.device)
        out = self.model(input_ids, routes=routes, cache=adapter, pos_BT=pos_BT, keep_BC=keep_BC)

        logits_BTV = out.logits
        loss = None
        if labels is not None:  # transformers convention: labels are the inputs; predict the next one
            logits_NV, tgt_N = logits_BTV[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten()
            if num_items_in_batch is None:
                loss = F.cross_entropy(logits_NV, tgt_N, ignore_index=-100)
            else:
                loss = F.cross_entropy(logits_NV, tgt_N, ignore_index=-100, reduction="sum") / num_items_in_batch
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits_BTV = logits_BTV[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            logits_BTV = logits_BTV[:, logits_to_keep]
        return DuoCausalLMOutput(loss=loss, logits=logits_BTV, cache=cache,
                                 routes=out.route_LBT, flops=out.flops_BT)
