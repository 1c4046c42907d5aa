"""The router's configuration: ``RouterConfig``, strict like ``duollm.config``, saved as ``router.yaml``.

Resolution order: defaults (the run's sequence length, seed, device) < command-line flags <
method defaults < ``key=value`` overrides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import RESUMABLE_KEYS, RunConfig, TrainConfig, apply_overrides, from_dict, to_dict, validate_train
from ..model.routing import canonical_options
from .methods import METHODS, get


def router_train_defaults() -> TrainConfig:
    """Training defaults of a router (the LM's schedule would be far too long and too hot).

    A router has 12 x (D + 1) x |options| parameters; a few hundred AdamW steps suffice.
    Weight decay is off: it would pull the logits towards zero against the beta annealing.
    """
    return TrainConfig(steps=300, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=10, weight_decay=0.0,
                       eval_every=100, eval_tokens=4096, save_every=100, log_every=10)


@dataclass
class RouterConfig:
    """What router to train and how. Strict like ``config.py``; saved as ``router.yaml``.

    The paper leaves alpha and the beta schedule unspecified (DESIGN 2); these defaults are
    ours: alpha = 10 keeps the realised budget within a few hundredths of the target on the
    ``cpu`` preset, beta grows geometrically 1 -> 100 so the final soft mix is nearly hard.
    A method may change these defaults (``methods.RouterMethod.defaults``: straight-through keeps
    beta constant, imitation calibrates, the value methods enforce the budget).
    """

    label: str = ""  # the router's folder name under RUN/routers ("": method and target, e.g. budget-0.50)
    method: str = "budget"  # a name of routers.methods.METHODS
    target: float = 0.5  # fraction of (token, layer) decisions that go big
    options: str = "SB"  # allowed routes per layer: SB, B_ or SB_
    skip_target: float = 0.0  # fraction skipped (options SB_; with B_ it is 1 - target)
    alpha: float = 10.0  # weight of the budget term (budget, straight-through)
    beta_start: float = 1.0  # softmax(beta * logits): sharpness at the first step ...
    beta_end: float = 100.0  # ... and at the last step
    beta_schedule: str = "geometric"  # geometric | linear | constant (beta_start throughout)
    init: str = "target"  # "target": biases start at the target route probabilities; "zero"
    calibrate: bool = False  # after training, shift the big logit so the hard big fraction meets the target
    calibration_tokens: int = 8192  # training-split tokens the calibration measures the big fraction on
    oracle: str = ""  # oracle whose per-token table gives imitation labels and agreement ("": auto)
    holdout_every: int = 2  # every n-th sequence of the oracle table is held out of imitation (0: none)
    enforce: bool = False  # see the bigs used so far and spend exactly round(target * L) per token (hard routing)
    dagger_rounds: int = 3  # value, expected-cost: at most this many rounds of on-policy targets (routers/value.py)
    value_tokens: int = 2048  # value, expected-cost: training-split tokens the targets are computed on per round
    eval_batch: int = 16  # sequences per evaluation forward
    train: TrainConfig = field(default_factory=router_train_defaults)

    def __post_init__(self):
        validate_router_config(self)

    @property
    def name(self) -> str:
        """Folder name under ``RUN/routers``: the label, else method and target, e.g. ``budget-0.50``."""
        return self.label or router_name(self.method, self.target, self.options, self.skip_target)

    def budget_k(self, n_layers: int) -> int:
        """The budget k (big layers per token) the target fraction stands for: the oracle's table to compare with."""
        return round(self.target * n_layers)

    def probs_R(self) -> list[float]:
        """Target probability of skip, small, big (for the bias initialisation)."""
        skip = 1.0 - self.target if self.options == "B_" else self.skip_target
        return [skip, 1.0 - self.target - skip, self.target]


# What `duollm router --resume` may change: how long (steps, DAgger rounds) and how often, where it runs, what is logged, which
# oracle the evaluation compares with; everything else describes the router and stays as trained.
ROUTER_RESUMABLE = tuple(k for k in RESUMABLE_KEYS if k.startswith("train.")) + ("dagger_rounds", "eval_batch", "oracle")


def router_name(method: str, target: float, options: str = "SB", skip_target: float = 0.0) -> str:
    """The folder name of a router under ``RUN/routers`` (the one place it is built)."""
    name = f"{method}-{target:.2f}"
    if options == "SB_":
        name += f"-skip{skip_target:.2f}"
    elif options == "B_":
        name += "-B_"
    return name


def validate_router_config(c: RouterConfig) -> None:
    method = get(c.method)
    c.options = canonical_options(c.options)
    if c.label and (c.label.startswith(".") or not all(ch.isalnum() or ch in "-_." for ch in c.label)):
        raise ValueError(f"router name must be letters, digits, '-', '_' or '.' (not leading); got {c.label!r}")
    if not 0.0 <= c.target <= 1.0 or math.isnan(c.target):
        raise ValueError(f"router target must be a fraction in [0, 1]; got {c.target}")
    if not 0.0 <= c.skip_target <= 1.0 or math.isnan(c.skip_target):
        raise ValueError(f"router skip_target must be a fraction in [0, 1]; got {c.skip_target}")
    if c.options == "SB" and c.skip_target:
        raise ValueError("a skip target needs skip among the options (--options SB_)")
    if c.options == "B_" and c.skip_target and abs(c.skip_target - (1.0 - c.target)) > 1e-9:
        raise ValueError(f"with options B_ every route is big or skip: skip_target must be 1 - target = {1 - c.target:g}")
    if c.options == "SB_" and c.target + c.skip_target > 1.0 + 1e-9:
        raise ValueError(f"target {c.target} + skip_target {c.skip_target} exceed 1")
    if c.alpha < 0:
        raise ValueError(f"router alpha must be >= 0; got {c.alpha}")
    if not 0 < c.beta_start <= c.beta_end:
        raise ValueError(f"router beta needs 0 < beta_start <= beta_end; got {c.beta_start}, {c.beta_end}")
    if c.beta_schedule not in ("geometric", "linear", "constant"):
        raise ValueError(f"router beta_schedule must be geometric, linear or constant; got {c.beta_schedule!r}")
    if c.init not in ("target", "zero"):
        raise ValueError(f"router init must be target or zero; got {c.init!r}")
    if c.holdout_every < 0 or c.holdout_every == 1:
        raise ValueError(f"router holdout_every must be 0 (none) or >= 2; got {c.holdout_every}")
    if c.calibration_tokens <= 0:
        raise ValueError(f"router calibration_tokens must be positive; got {c.calibration_tokens}")
    if c.enforce and c.options != "SB":
        raise ValueError(f"router enforce=true needs options SB (the budget counts big against small); got {c.options}")
    for key, value in method.requires.items():
        if getattr(c, key) != value:
            shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as a --set would write it
            why = f" ({method.requires_why})" if method.requires_why else ""
            raise ValueError(f"router method {c.method} needs {key}={shown}{why}")
    if c.dagger_rounds < 1 or c.value_tokens < 1:
        raise ValueError(f"router dagger_rounds and value_tokens must be >= 1; got {c.dagger_rounds}, {c.value_tokens}")
    if c.eval_batch <= 0:
        raise ValueError(f"router eval_batch must be positive; got {c.eval_batch}")
    for name in ("alpha", "beta_start", "beta_end"):
        if not math.isfinite(getattr(c, name)):
            raise ValueError(f"router {name} must be finite; got {getattr(c, name)}")
    validate_train(c.train, "router train.")


def resolve_router_config(run_cfg: RunConfig, overrides: dict | None = None, sets: list[str] | tuple = ()) -> RouterConfig:
    """Defaults (sequence length from the run) < ``overrides`` (CLI flags) < method defaults < ``key=value``."""
    data = _default_dict(run_cfg)
    for k, v in (overrides or {}).items():
        _set(data, k, v)
    for k, v in (METHODS[data["method"]].defaults if data["method"] in METHODS else {}).items():
        _set(data, k, v)
    apply_overrides(data, sets or (), what="router config")
    cfg = from_dict(RouterConfig, data)
    if cfg.train.seq_len > run_cfg.model.max_seq_len:
        raise ValueError(f"router train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={run_cfg.model.max_seq_len}")
    return cfg


def _set(data: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for part in path:
        data = data[part]
    data[last] = value


def _default_dict(run_cfg: RunConfig) -> dict:
    train = router_train_defaults()
    train.seq_len = run_cfg.train.seq_len  # the context the LM was trained (and is evaluated) at
    train.seed = run_cfg.train.seed
    train.device = run_cfg.train.device
    return to_dict(RouterConfig(train=train))


