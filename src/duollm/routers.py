"""Stage 3: trained routers, measured against the oracle (paper section 3.3, DESIGN 4.3).

A ``Router`` holds one linear map per layer from the hidden state entering the FFN (the
``x_BTD`` a ``RoutingPolicy`` receives) to one logit per allowed route. It *is* a routing
policy: ``DuoModel.forward(idx, tgt, routes=router)``, ``per_token_loss``, the oracle's
frozen context and generation all call ``router(layer, x_BTD)``. Its ``mode`` says what it
returns:

    "hard"              route_BT = argmax of the logits (evaluation, inference; the default)
    "soft"              prob_BTR = softmax(beta * logits): the layer output is the
                        probability-weighted mix of the routes (the paper's training)
    "straight-through"  prob_BTR = one_hot(argmax) + p - p.detach(): hard routes forward,
                        gradients of the softmax backward

Three training methods share that module, one training loop (``train.train_loop``, so
checkpoints, resume, DDP and metrics come from there) and one evaluation:

    budget            the paper's router (3.3): soft mix, beta annealed upward, language-model
                      cross-entropy + alpha * mean_B (mean_{L,T} P(big) - target)^2, LM frozen
    straight-through  the same loss, but the forward pass takes the hard routes the router will
                      take at evaluation; the budget term sees the realised (hard) fractions
    imitation         supervised: cross-entropy of each layer's logits against the oracle's
                      per-token best pattern at the matching budget k = round(target * L)

Imitation uses teacher forcing: the model is run with every token routed by its own oracle
pattern, and the router at layer l sees the hidden state that routing produces. Those are
exactly the states a perfect imitator meets at inference (each token follows its own
pattern; a token's state at layer l depends only on the routes of layers < l), so a
router that fits its labels reproduces the oracle's routes when run on its own.

Imitation has no budget term, and the oracle's labels are minority-big at most layers when
k < L/2, so its argmax alone misses the budget; one offset on the big logit, found by
bisection on training-split tokens (``calibrate_budget``, on by default for imitation),
brings the realised big fraction to the target.

The oracle's per-token table covers the evaluation tokens only, so imitation trains on
part of them: every ``holdout_every``-th sequence of the table is held out, and every
router's ``eval.json`` carries a ``heldout`` section (router, oracle@k and fixed@k on
those sequences) where the comparison is free of that leak.

Files: ``RUN/routers/<name>/`` holds ``router.safetensors``, ``router.yaml`` (the resolved
``RouterConfig`` and the router's shape), ``eval.json`` and, from the training loop,
``metrics.jsonl`` and the checkpoint ``step-*/`` + ``latest``.

Tensor name legend (the suffix carries the shape):
    B  batch of sequences     T  positions          D  model width
    L  layers                 R  routes (skip=0, small=1, big=2)
    O  the router's options (allowed routes, in route-code order)
    S  evaluation sequences   N  flattened tokens
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from .config import RunConfig, TrainConfig, apply_overrides, from_dict, to_dict, validate_train
from .io import atomic_write_json, atomic_write_text
from .rundir import writing
from .routing import BIG, ROUTE_OF_LETTER, SKIP, parse_options, parse_pattern

METHODS = ("budget", "imitation", "straight-through")
MODES = ("hard", "soft", "straight-through")


# ----------------------------------------------------------------------------- config


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
    ``straight-through`` defaults to a constant beta = 1 instead (``METHOD_DEFAULTS``): its
    forward pass is hard already, and a sharpened softmax only starves its gradient (on the
    tiny model an annealed straight-through router oscillates between whole-layer flips).
    """

    method: str = "budget"  # budget | imitation | straight-through
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
    eval_batch: int = 16  # sequences per evaluation forward
    train: TrainConfig = field(default_factory=router_train_defaults)

    def __post_init__(self):
        validate_router_config(self)

    @property
    def name(self) -> str:
        """Folder name under ``RUN/routers``: method and target, e.g. ``budget-0.50``."""
        name = f"{self.method}-{self.target:.2f}"
        if self.options == "SB_":
            name += f"-skip{self.skip_target:.2f}"
        elif self.options == "B_":
            name += "-B_"
        return name

    def probs_R(self) -> list[float]:
        """Target probability of skip, small, big (for the bias initialisation)."""
        skip = 1.0 - self.target if self.options == "B_" else self.skip_target
        return [skip, 1.0 - self.target - skip, self.target]


def canonical_options(options: str) -> str:
    canon = parse_options(options)
    if canon not in ("SB", "B_", "SB_"):
        raise ValueError(f"router options must be SB, B_ or SB_ (big must be allowed); got {options!r}")
    return canon


def validate_router_config(c: RouterConfig) -> None:
    if c.method not in METHODS:
        raise ValueError(f"unknown router method {c.method!r} (known: {', '.join(METHODS)})")
    c.options = canonical_options(c.options)
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
    if c.eval_batch <= 0:
        raise ValueError(f"router eval_batch must be positive; got {c.eval_batch}")
    for name in ("alpha", "beta_start", "beta_end"):
        if not math.isfinite(getattr(c, name)):
            raise ValueError(f"router {name} must be finite; got {getattr(c, name)}")
    validate_train(c.train, "router train.")


def beta_at(step: int, c: RouterConfig) -> float:
    """Softmax sharpness at ``step`` (0-based), annealed upward from beta_start to beta_end (3.3).

    The paper's formula is misprinted (DESIGN 2); softmax(beta * logits) with beta rising
    moves the mix from soft towards the hard argmax used at evaluation.
    """
    frac = min(1.0, step / max(1, c.train.steps - 1))
    if c.beta_schedule == "constant":
        return c.beta_start
    if c.beta_schedule == "geometric":
        return c.beta_start * (c.beta_end / c.beta_start) ** frac
    return c.beta_start + (c.beta_end - c.beta_start) * frac


# Defaults that depend on the method, applied after the flags and before ``--set`` overrides.
METHOD_DEFAULTS: dict[str, dict] = {
    "straight-through": {"beta_schedule": "constant"},
    # The oracle's labels are minority-big at most layers when k < L/2 (20-44% big per layer at k=4
    # on the cpu preset), so the argmax of a well-fitted probe picks small almost everywhere and the
    # realised budget collapses (0.19 for a 0.33 target). Imitation is trained without any budget
    # term, so its budget is met afterwards by one offset on the big logit (``calibrate_budget``).
    "imitation": {"calibrate": True},
}


def resolve_router_config(run_cfg: RunConfig, overrides: dict | None = None, sets: list[str] | tuple = ()) -> RouterConfig:
    """Defaults (sequence length from the run) < ``overrides`` (CLI flags) < method defaults < ``key=value``."""
    data = _default_dict(run_cfg)
    for k, v in (overrides or {}).items():
        _set(data, k, v)
    for k, v in METHOD_DEFAULTS.get(data["method"], {}).items():
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


# ----------------------------------------------------------------------------- the router


class Router(nn.Module):
    """One linear router per layer on the hidden state entering the FFN (paper section 3.3).

    A ``RoutingPolicy``: ``router(layer, x_BTD)`` returns ``route_BT`` in ``"hard"`` mode and
    ``prob_BTR`` in ``"soft"`` / ``"straight-through"`` mode (``beta`` sharpens the softmax).
    """

    def __init__(self, n_layers: int, d_model: int, options: str = "SB", *, mode: str = "hard", beta: float = 1.0):
        super().__init__()
        self.options = canonical_options(options)
        self.n_layers, self.d_model = n_layers, d_model
        route_O = sorted(ROUTE_OF_LETTER[c] for c in self.options)  # ties in argmax go to the cheaper route
        self.register_buffer("route_O", torch.tensor(route_O, dtype=torch.long), persistent=False)
        self.register_buffer("onehot_OR", F.one_hot(self.route_O, 3).float(), persistent=False)
        option_of_route = torch.full((3,), -1, dtype=torch.long)
        option_of_route[self.route_O] = torch.arange(len(route_O))
        self.register_buffer("option_of_R", option_of_route, persistent=False)
        self.proj = nn.ModuleList(nn.Linear(d_model, len(route_O)) for _ in range(n_layers))
        # a constant added to the logits, set by budget calibration (``calibrate_budget``), not trained
        self.register_buffer("offset_O", torch.zeros(len(route_O)))
        for p in self.proj:  # start from the token-independent router; training adds the dependence
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)
        self.mode, self.beta = mode, beta
        self.name = "router"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"router mode must be one of {', '.join(MODES)}; got {mode!r}")
        self._mode = mode

    def init_bias(self, probs_R) -> None:
        """Biases so that softmax(logits) starts at the target route probabilities."""
        p_O = torch.tensor(probs_R, dtype=torch.float64)[self.route_O.cpu()].clamp_min(1e-3)
        with torch.no_grad():
            for p in self.proj:
                p.bias.copy_(p_O.log().float())

    def logits(self, layer: int, x_BTD: torch.Tensor) -> torch.Tensor:
        """``logits_BTO`` in float32 (the softmax and its annealing are done in full precision)."""
        proj = self.proj[layer]
        return proj(x_BTD.to(proj.weight.dtype)).float() + self.offset_O

    def weights(self, logits_BTO: torch.Tensor, mode: str, beta: float = 1.0) -> torch.Tensor:
        """``route_BT`` (hard) or ``prob_BTR`` (soft, straight-through) from the logits."""
        if mode == "hard":
            return self.route_O[logits_BTO.argmax(-1)]
        p_BTO = torch.softmax(beta * logits_BTO, dim=-1)
        if mode == "straight-through":  # value: the hard one-hot; gradient: the softmax's
            hard_BTO = F.one_hot(logits_BTO.argmax(-1), p_BTO.shape[-1]).type_as(p_BTO)
            p_BTO = hard_BTO + p_BTO - p_BTO.detach()
        return p_BTO @ self.onehot_OR

    def forward(self, layer: int, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.weights(self.logits(layer, x_BTD), self.mode, self.beta)


# ----------------------------------------------------------------------------- oracle tables


@dataclass
class OracleTable:
    """The oracle's per-token best patterns at one budget, placed on the evaluation grid [S, T]."""

    name: str
    k: int
    summary: dict  # summary.json
    budget: dict  # the summary's entry for k
    route_LST: torch.Tensor  # best pattern per token (int64); meaningful where covered_ST
    covered_ST: torch.Tensor  # bool: tokens the oracle scored
    loss_ST: torch.Tensor | None  # oracle loss per token at k (from oracle_loss.npy), where covered

    @property
    def sequences(self) -> torch.Tensor:
        """Indices of the evaluation sequences the oracle covered completely."""
        return self.covered_ST.all(1).nonzero().squeeze(1)


def oracle_names(run: Path) -> list[str]:
    root = Path(run) / "oracle"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "summary.json").is_file() and (p / "per_token.parquet").is_file())


def find_oracle(run: Path, options: str, k: int, name: str = "") -> str | None:
    """The oracle to compare with: ``name`` if given, else one with these options and budget k,
    preferring the paper's ``shared`` context, then the newest."""
    run = Path(run)
    if name:
        if name not in oracle_names(run):
            raise ValueError(f"no oracle {name!r} in {run / 'oracle'} (found: {', '.join(oracle_names(run)) or 'none'})")
        return name
    matches = []
    for n in oracle_names(run):
        summary = json.loads((run / "oracle" / n / "summary.json").read_text())
        if canonical_options(str(summary.get("options", "SB"))) == options and any(
            b.get("k") == k for b in summary.get("budgets", [])
        ):
            mtime = (run / "oracle" / n / "summary.json").stat().st_mtime
            matches.append((summary.get("context") == "shared", mtime, n))
    return max(matches)[2] if matches else None


def load_oracle_table(run: Path, name: str, k: int, idx_ST: torch.Tensor, tgt_ST: torch.Tensor,
                      options: str | None = None) -> OracleTable:
    """Read ``RUN/oracle/<name>`` at budget ``k`` onto the evaluation grid of ``idx_ST``.

    The table's rows carry ``sequence`` and ``position`` in the canonical evaluation order
    (DESIGN 5) and ``token``; the tokens are checked against ``idx_ST`` (or ``tgt_ST``) so an
    oracle computed on other text is refused rather than silently compared.
    """
    import pyarrow.parquet as pq

    folder = Path(run) / "oracle" / name
    summary = json.loads((folder / "summary.json").read_text())
    L = int(summary.get("n_layers", 0)) or None
    if options is not None and canonical_options(str(summary.get("options", "SB"))) != options:
        raise ValueError(f"oracle {name} has options {summary.get('options')}; the router uses {options}")
    ks = [b.get("k") for b in summary.get("budgets", [])]
    if k not in ks:
        raise ValueError(f"oracle {name} has no budget k={k} (has {', '.join(map(str, ks))})")
    column = f"best_pattern_k{k}"
    table = pq.read_table(folder / "per_token.parquet")
    if column not in table.column_names:
        raise ValueError(f"oracle {name}: per_token.parquet has no column {column}")
    seq_N = torch.from_numpy(table.column("sequence").to_numpy().astype(np.int64))
    pos_N = torch.from_numpy(table.column("position").to_numpy().astype(np.int64))
    S, T = idx_ST.shape
    if len(seq_N) and (seq_N.max() >= S or pos_N.max() >= T or seq_N.min() < 0 or pos_N.min() < 0):
        raise ValueError(f"oracle {name} covers positions outside the evaluation tokens ({S} x {T}); "
                         f"was it computed with another sequence length or data?")
    if "token" in table.column_names:
        tok_N = torch.from_numpy(table.column("token").to_numpy().astype(np.int64))
        if not (torch.equal(tok_N, idx_ST[seq_N, pos_N]) or torch.equal(tok_N, tgt_ST[seq_N, pos_N])):
            raise ValueError(f"oracle {name} was computed on other tokens than this run's evaluation tokens")
    patterns = np.asarray(table.column(column).to_pylist(), dtype=object)
    uniq, inverse = np.unique(patterns.astype(str), return_inverse=True)
    L = L or len(uniq[0])
    route_PL = torch.tensor([parse_pattern(p, L) for p in uniq], dtype=torch.long).view(len(uniq), L)
    route_LN = route_PL[torch.from_numpy(inverse.reshape(-1)).long()].T
    route_LST = torch.zeros(L, S, T, dtype=torch.long)
    covered_ST = torch.zeros(S, T, dtype=torch.bool)
    route_LST[:, seq_N, pos_N] = route_LN
    covered_ST[seq_N, pos_N] = True
    loss_ST = None
    npy = folder / "oracle_loss.npy"
    if f"oracle_loss_k{k}" in table.column_names:
        loss_ST = torch.full((S, T), float("nan"))
        loss_ST[seq_N, pos_N] = torch.from_numpy(table.column(f"oracle_loss_k{k}").to_numpy().astype(np.float32))
    elif npy.is_file():  # rows in the order of budgets, columns in canonical token order (DESIGN 5)
        losses = np.load(npy, mmap_mode="r")
        row = np.array(losses[ks.index(k)], dtype=np.float32)  # a copy: the memmap is read-only
        if row.size <= S * T:
            loss_ST = torch.full((S * T,), float("nan"))
            loss_ST[: row.size] = torch.from_numpy(row)
            loss_ST = loss_ST.view(S, T)
    return OracleTable(name=name, k=k, summary=summary, budget=summary["budgets"][ks.index(k)],
                       route_LST=route_LST, covered_ST=covered_ST, loss_ST=loss_ST)


def holdout_split(seq_S: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) sequence indices: every ``every``-th sequence is held out (0: none)."""
    if every == 0:
        return seq_S, seq_S[:0]
    held = (torch.arange(len(seq_S)) % every) == every - 1
    return seq_S[~held], seq_S[held]


# ----------------------------------------------------------------------------- objectives


class RouterTrainer(nn.Module):
    """What ``train_loop`` trains and checkpoints: the router plus a step counter.

    The frozen LM is held outside the module tree (a tuple, not a submodule) so it is not
    checkpointed with every router, not handed to the optimizer and not synchronised by DDP.
    ``steps_done`` is a buffer, hence checkpointed: the beta schedule continues exactly on resume.
    """

    def __init__(self, router: Router, model: nn.Module, cfg: RouterConfig):
        super().__init__()
        self.router = router
        self._lm = (model,)
        self.cfg = cfg
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @property
    def lm(self) -> nn.Module:
        return self._lm[0]

    def forward(self, mb: dict) -> torch.Tensor:
        if self.cfg.method == "imitation":
            return self.imitation_loss(mb)
        return self.budget_loss(mb)

    def budget_loss(self, mb: dict) -> torch.Tensor:
        """CE + alpha * mean_B (mean_{L,T} P(big) - target)^2 (paper section 3.3), per sequence.

        ``budget`` mixes the routes softly; ``straight-through`` routes hard, so its budget term
        measures the realised fractions (value) while its gradient is the softmax's.
        """
        c = self.cfg
        mode = "soft" if c.method == "budget" else "straight-through"
        beta = float(mb["beta_B"][0])
        w_L = []

        def policy(layer, x_BTD):
            prob_BTR = self.router.weights(self.router.logits(layer, x_BTD), mode, beta)
            w_L.append(prob_BTR)
            return prob_BTR

        out = self.lm(mb["idx_BT"], mb["tgt_BT"], policy, return_logits=False)
        prob_LBTR = torch.stack(w_L)
        big_B = prob_LBTR[..., BIG].mean(dim=(0, 2))
        penalty = ((big_B - c.target) ** 2).mean()
        if c.options == "SB_":
            skip_B = prob_LBTR[..., SKIP].mean(dim=(0, 2))
            penalty = penalty + ((skip_B - c.skip_target) ** 2).mean()
        return out.loss + c.alpha * penalty

    def imitation_loss(self, mb: dict) -> torch.Tensor:
        """Cross-entropy of each layer's router logits against the oracle's route (teacher forcing).

        The model is routed by the oracle's patterns; the LM's weights are frozen and its
        input needs no gradient, so no graph is built through it: only the router learns.
        """
        route_LBT = mb["route_BLT"].transpose(0, 1)
        logits_L = []

        def policy(layer, x_BTD):
            logits_L.append(self.router.logits(layer, x_BTD))
            return route_LBT[layer]

        self.lm(mb["idx_BT"], None, policy, return_logits=False)
        logits_LBTO = torch.stack(logits_L)
        label_LBT = self.router.option_of_R[route_LBT]
        return F.cross_entropy(logits_LBTO.flatten(0, 2), label_LBT.flatten())


def router_objective(trainer: RouterTrainer, cfg: RouterConfig, val_idx_ST, val_tgt_ST,
                     imitation_data: tuple | None = None):
    """An ``Objective`` for ``train.train_loop``.

    ``make_batch`` is called by the loop exactly once per optimizer step on every process;
    it advances the checkpointed step counter and passes that step's beta with the batch.
    For imitation it replaces the loop's random windows by whole oracle-labelled sequences
    (``imitation_data`` = idx_ST, tgt_ST, route_LST), drawn with the loop's per-step generator
    so a resumed run sees the same batches.
    """
    from .train import Objective

    def make_batch(idx_BT, tgt_BT, gen):
        step = int(trainer.steps_done)
        trainer.steps_done += 1
        B = idx_BT.shape[0]
        batch = {"beta_B": torch.full((B,), beta_at(step, cfg))}
        if imitation_data is not None:
            idx_ST, tgt_ST, route_LST = imitation_data
            rows = torch.randint(0, idx_ST.shape[0], (B,), generator=gen)
            batch.update(idx_BT=idx_ST[rows], tgt_BT=tgt_ST[rows], route_BLT=route_LST[:, rows].transpose(0, 1))
        return batch

    def loss(module, mb):
        return module(mb)

    def evaluate(module):
        router, model = module.router, module.lm
        res = run_router(model, router, val_idx_ST, val_tgt_ST, cfg.eval_batch)
        return {"val/loss": res["loss_ST"].double().mean().item(),
                "val/big_fraction": (res["route_LST"] == BIG).float().mean().item(),
                "val/skip_fraction": (res["route_LST"] == SKIP).float().mean().item(),
                "beta": beta_at(max(0, int(module.steps_done) - 1), cfg)}

    return Objective(module=trainer, loss=loss, make_batch=make_batch, evaluate=evaluate)


# ----------------------------------------------------------------------------- budget calibration


@torch.no_grad()
def calibrate_budget(model, router: Router, idx_ST, tgt_ST, target: float, *, batch_size: int = 16,
                     iters: int = 20, span: float = 20.0) -> tuple[float, float]:
    """Find the offset on every layer's big logit that makes the hard big fraction meet ``target``.

    Bisection over the offset: the fraction of (token, layer) routes that go big grows with it
    (not strictly: routes change the later layers' inputs, so the closest value seen is kept).
    Sets ``router.offset_O`` and returns (offset, realised fraction on these tokens).
    """
    big = int(router.option_of_R[BIG])
    base = router.offset_O.clone()

    def fraction(delta: float) -> float:
        router.offset_O.copy_(base)
        router.offset_O[big] += delta
        return (run_router(model, router, idx_ST, tgt_ST, batch_size)["route_LST"] == BIG).float().mean().item()

    lo, hi = -span, span
    best = (abs(fraction(0.0) - target), 0.0, 0.0)  # (miss, |offset|, offset): prefer the smallest shift
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        f = fraction(mid)
        best = min(best, (abs(f - target), abs(mid), mid))
        if f < target:
            lo = mid
        else:
            hi = mid
    delta = best[2]
    return delta, fraction(delta)


# ----------------------------------------------------------------------------- evaluation


def run_router(model, router: Router, idx_ST, tgt_ST, batch_size: int = 16) -> dict:
    """Per-token loss and routes at hard routing (the router's mode is restored afterwards)."""
    from .evaluate import per_token_loss

    mode, training = router.mode, router.training
    router.mode = "hard"
    router.eval()
    try:
        return per_token_loss(model, idx_ST, tgt_ST, router, batch_size=batch_size)
    finally:
        router.mode = mode
        router.train(training)


def _r(x, nd: int = 5):
    """Round floats (and nested lists of them) for compact JSON."""
    if isinstance(x, list):
        return [_r(v, nd) for v in x]
    return round(float(x), nd)


def usage(route_LST: torch.Tensor) -> dict:
    """Per-layer and per-position usage of big and skip, and a one-line layer profile."""
    big_LST = (route_LST == BIG).float()
    skip_LST = (route_LST == SKIP).float()
    per_layer_big = big_LST.mean(dim=(1, 2))
    return {
        "per_layer_big": _r(per_layer_big.tolist(), 4),
        "per_layer_skip": _r(skip_LST.mean(dim=(1, 2)).tolist(), 4),
        "per_position_big": _r(big_LST.mean(1).tolist(), 4),  # [L][T]
        "per_position_skip": _r(skip_LST.mean(1).tolist(), 4),
        "big_by_position": _r(big_LST.mean(dim=(0, 1)).tolist(), 4),  # [T], mean over layers
        "layer_profile": layer_profile(per_layer_big.tolist()),
    }


def layer_profile(per_layer_big: list[float]) -> str:
    """One line: the big fraction of each layer as a digit 0-9 (``9`` = at least 95% big), first layer first."""
    return "".join(str(min(9, int(round(10 * f)))) if f < 0.95 else "9" for f in per_layer_big)


def agreement(route_LST: torch.Tensor, oracle_LST: torch.Tensor, mask_ST: torch.Tensor) -> dict:
    """Share of (token, layer) routes equal to the oracle's, and of whole patterns equal."""
    if not mask_ST.any():
        return {"agreement": float("nan"), "pattern_match": float("nan")}
    eq_LST = route_LST == oracle_LST
    return {
        "agreement": eq_LST[:, mask_ST].float().mean().item(),
        "pattern_match": eq_LST.all(0)[mask_ST].float().mean().item(),
    }


def evaluate_router(model, router: Router, idx_ST, tgt_ST, cfg: RouterConfig, oracle: OracleTable | None = None) -> dict:
    """The router's ``eval.json``: hard routing on the evaluation tokens (DESIGN 4.3, 5)."""
    from .evaluate import summarize

    L = model.cfg.n_layers
    res = run_router(model, router, idx_ST, tgt_ST, cfg.eval_batch)
    summary = summarize(res, model.flop_model.all_big())
    out = {
        "method": cfg.method,
        "target": cfg.target,
        "target_k": round(cfg.target * L),
        "options": cfg.options,
        "skip_target": cfg.skip_target if cfg.options != "B_" else 1.0 - cfg.target,
        **summary,
        "n_layers": L,
        "seq_len": int(idx_ST.shape[1]),
        "train_steps": cfg.train.steps,
        **usage(res["route_LST"]),
    }
    if oracle is not None:
        out["oracle"] = oracle_comparison(model, res, idx_ST, tgt_ST, cfg, oracle)
    return out


def oracle_comparison(model, res: dict, idx_ST, tgt_ST, cfg: RouterConfig, oracle: OracleTable) -> dict:
    """Agreement with the oracle at the same budget, on all covered tokens and on the held-out sequences."""
    from .evaluate import per_token_loss

    b = oracle.budget
    comp = {
        "name": oracle.name,
        "k": oracle.k,
        "context": oracle.summary.get("context"),
        "tokens": int(oracle.covered_ST.sum()),
        # the router's perplexity on the oracle's tokens (the oracle may cover fewer than eval does)
        "ppl": math.exp(res["loss_ST"][oracle.covered_ST].double().mean().item()),
        **agreement(res["route_LST"], oracle.route_LST, oracle.covered_ST),
        **{key: b.get(key) for key in ("oracle_ppl", "fixed_ppl", "fixed_pattern", "random_mean_ppl", "best_of_100_ppl")},
        "all_big_ppl": oracle.summary.get("all_big_ppl"),
        "all_small_ppl": oracle.summary.get("all_small_ppl"),
        "oracle_usage": usage(oracle.route_LST[:, oracle.sequences]),
    }
    _, held = holdout_split(oracle.sequences, cfg.holdout_every)
    if len(held):
        mask_ST = torch.zeros_like(oracle.covered_ST)
        mask_ST[held] = True
        h = {"sequences": int(len(held)), "tokens": int(mask_ST.sum()),
             "ppl": math.exp(res["loss_ST"][held].double().mean().item()),
             **agreement(res["route_LST"], oracle.route_LST, mask_ST)}
        if oracle.loss_ST is not None and not torch.isnan(oracle.loss_ST[held]).any():
            h["oracle_ppl"] = math.exp(oracle.loss_ST[held].double().mean().item())
        if b.get("fixed_pattern"):
            fixed = per_token_loss(model, idx_ST[held], tgt_ST[held], b["fixed_pattern"], batch_size=cfg.eval_batch)
            h["fixed_ppl"] = math.exp(fixed["loss_ST"].double().mean().item())
        comp["heldout"] = h
    return comp


# ----------------------------------------------------------------------------- save / load


def router_dir(run: Path, name: str) -> Path:
    return Path(run) / "routers" / name


def save_router(folder: Path, router: Router, cfg: RouterConfig) -> None:
    """``router.safetensors`` and ``router.yaml`` (config + shape), both written atomically."""
    from .checkpoint import module_tensors, save_tensors

    save_tensors(Path(folder) / "router.safetensors", module_tensors(router), {"options": router.options})
    write_router_yaml(folder, router, cfg)


def write_router_yaml(folder: Path, router: Router, cfg: RouterConfig) -> None:
    meta = {"n_layers": router.n_layers, "d_model": router.d_model, "options": router.options,
            "config": to_dict(cfg)}
    atomic_write_text(Path(folder) / "router.yaml", yaml.safe_dump(meta, sort_keys=False))


def load_router_folder(folder: Path, device="cpu") -> tuple[Router, RouterConfig]:
    from .checkpoint import load_weights

    folder = Path(folder)
    if not (folder / "router.yaml").is_file() or not (folder / "router.safetensors").is_file():
        raise ValueError(f"{folder} holds no trained router (router.yaml and router.safetensors)")
    try:
        meta = yaml.safe_load((folder / "router.yaml").read_text())
        cfg = from_dict(RouterConfig, meta["config"])
        router = Router(int(meta["n_layers"]), int(meta["d_model"]), meta["options"])
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / 'router.yaml'} is corrupt: {type(e).__name__}") from None
    # routers saved before calibration existed lack the offset
    load_weights(router, folder / "router.safetensors", what="router weights", optional=("offset_O",))
    return router.to(device).eval(), cfg


def load_router(run: Path, name: str, device="cpu") -> Router:
    """The trained router ``RUN/routers/<name>`` in hard mode, ready to pass as ``routes=``."""
    folder = router_dir(run, name)
    if not folder.is_dir():
        root = Path(run) / "routers"
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ValueError(f"no router {name!r} in {root} (found: {', '.join(have) or 'none'})")
    router = load_router_folder(folder, device)[0]
    router.name = f"router:{name}"  # how the oracle names a frozen-context reference that is a policy
    return router


def list_routers(run: Path) -> list[str]:
    """Names of the routers of a run that finished (have an ``eval.json``)."""
    root = Path(run) / "routers"
    return sorted(p.name for p in root.iterdir() if (p / "eval.json").is_file()) if root.is_dir() else []


def comparison_rows(run: Path) -> list[dict]:
    """One row per finished router, next to the oracle's numbers at its budget (for reports and notes)."""
    rows = []
    for name in list_routers(run):
        ev = json.loads((router_dir(run, name) / "eval.json").read_text())
        o = ev.get("oracle", {})
        h = o.get("heldout", {})
        rows.append({
            "name": name, "method": ev["method"], "target": ev["target"], "k": ev["target_k"],
            "big_fraction": ev["big_fraction"], "skip_fraction": ev["skip_fraction"], "ppl": ev["ppl"],
            "ppl_on_oracle_tokens": o.get("ppl"),
            "layer_profile": ev["layer_profile"],
            **{key: o.get(key) for key in ("oracle_ppl", "fixed_ppl", "best_of_100_ppl", "random_mean_ppl",
                                           "agreement", "pattern_match")},
            "heldout_ppl": h.get("ppl"), "heldout_oracle_ppl": h.get("oracle_ppl"), "heldout_fixed_ppl": h.get("fixed_ppl"),
        })
    return sorted(rows, key=lambda r: (r["target"], r["method"]))


# ----------------------------------------------------------------------------- end to end


def train_router(run: Path, cfg: RouterConfig, *, resume: bool = False, log=print) -> str:
    """Train, save and evaluate one router on the frozen model of ``run``; returns its name."""
    from .checkpoint import latest_checkpoint, load_model
    from .data import eval_tokens, load_tokens
    from .train import resolve_device

    run = Path(run)
    device = resolve_device(cfg.train.device)
    model, run_cfg = load_model(run, device)
    model.requires_grad_(False)  # the LM stays frozen (paper section 3.3)
    L = run_cfg.model.n_layers
    idx_ST, tgt_ST = eval_tokens(run, run_cfg)
    k = round(cfg.target * L)
    oracle_name = find_oracle(run, cfg.options, k, cfg.oracle)
    oracle = load_oracle_table(run, oracle_name, k, idx_ST, tgt_ST, cfg.options) if oracle_name else None
    imitation_data = None
    if cfg.method == "imitation":
        if oracle is None:
            raise ValueError(f"imitation needs an oracle with options {cfg.options} and budget k={k} in {run / 'oracle'}; "
                             f"run `duollm oracle` first")
        if cfg.train.seq_len != idx_ST.shape[1]:
            raise ValueError(f"imitation trains on whole oracle sequences of {idx_ST.shape[1]} tokens; "
                             f"train.seq_len={cfg.train.seq_len} differs")
        train_seq, _ = holdout_split(oracle.sequences, cfg.holdout_every)
        if len(train_seq) == 0:
            raise ValueError(f"oracle {oracle.name} covers too few sequences to train on after the holdout")
        used = set(oracle.route_LST[:, train_seq].unique().tolist())
        if not used <= {ROUTE_OF_LETTER[c] for c in cfg.options}:
            raise ValueError(f"oracle {oracle.name} uses routes outside the router's options {cfg.options}")
        imitation_data = (idx_ST[train_seq], tgt_ST[train_seq], oracle.route_LST[:, train_seq])
        train_tokens = torch.cat([idx_ST[train_seq].flatten(), tgt_ST[train_seq][-1, -1:]]).numpy()
        log(f"imitation: {len(train_seq)} oracle sequences ({oracle.name}, k={k}) to train on, "
            f"{len(oracle.sequences) - len(train_seq)} held out")
    else:
        train_tokens = load_tokens(run, "train")
    out = router_dir(run, cfg.name)
    if latest_checkpoint(out) is not None and not resume:
        raise ValueError(f"router {cfg.name} already exists in {out}; pass --resume to continue it or remove the folder")
    with writing(run):
        return _train_router(run, out, cfg, model, idx_ST, tgt_ST, train_tokens, oracle, imitation_data,
                             device=device, resume=resume, log=log)


def _train_router(run: Path, out: Path, cfg: RouterConfig, model, idx_ST, tgt_ST, train_tokens, oracle,
                  imitation_data, *, device, resume: bool, log) -> str:
    from .data import load_tokens, sequences
    from .train import train_loop

    L, D = model.cfg.n_layers, model.cfg.d_model
    torch.manual_seed(cfg.train.seed)
    router = Router(L, D, cfg.options)
    if cfg.init == "target":
        router.init_bias(cfg.probs_R())
    trainer = RouterTrainer(router, model, cfg)
    n_val = max(1, min(idx_ST.shape[0], cfg.train.eval_tokens // idx_ST.shape[1]))
    objective = router_objective(trainer, cfg, idx_ST[:n_val], tgt_ST[:n_val], imitation_data)
    write_router_yaml(out, router, cfg)  # the config of a router in training is on disk from the start
    train_loop(objective, cfg.train, train_tokens, out, device=device, resume=resume,
               desc=f"router {cfg.name}", run_config=to_dict(cfg))
    if cfg.calibrate:  # on training-split tokens: the evaluation tokens stay unseen
        cal_idx, cal_tgt = sequences(load_tokens(run, "train"), idx_ST.shape[1], cfg.calibration_tokens)
        delta, got = calibrate_budget(model, router, cal_idx, cal_tgt, cfg.target, batch_size=cfg.eval_batch)
        log(f"calibration: big logit offset {delta:+.3f} gives a big fraction of {got:.3f} (target {cfg.target:.3f})")
    save_router(out, router, cfg)
    write_eval(out, model, router, idx_ST, tgt_ST, cfg, oracle, log)
    return cfg.name


def write_eval(out: Path, model, router: Router, idx_ST, tgt_ST, cfg: RouterConfig, oracle, log=print) -> dict:
    """Evaluate at hard routing, write ``eval.json`` atomically and log a one-line summary."""
    result = evaluate_router(model, router, idx_ST, tgt_ST, cfg, oracle)
    atomic_write_json(Path(out) / "eval.json", result)
    line = (f"router {cfg.name}: ppl {result['ppl']:.3f}, big {result['big_fraction']:.3f} (target {cfg.target:.3f}), "
            f"skip {result['skip_fraction']:.3f}, layers {result['layer_profile']}")
    if oracle is not None:
        o = result["oracle"]
        line += (f"; on the oracle's {o['tokens']} tokens ppl {o['ppl']:.3f} vs oracle@{o['k']} {o['oracle_ppl']:.3f}, "
                 f"agreement {o['agreement']:.3f}")
    log(line)
    return result


def reevaluate_router(run: Path, name: str, *, oracle: str = "", log=print) -> str:
    """Rewrite ``eval.json`` of a trained router (same tokens; the oracle found now, or ``oracle``)."""
    from .checkpoint import load_model
    from .data import eval_tokens

    run = Path(run)
    folder = router_dir(run, name)
    if not (folder / "router.safetensors").is_file():
        raise ValueError(f"no trained router {name!r} in {run / 'routers'} (train it first)")
    router, cfg = load_router_folder(folder)
    if oracle:
        cfg.oracle = oracle
    model, run_cfg = load_model(run)
    idx_ST, tgt_ST = eval_tokens(run, run_cfg)
    k = round(cfg.target * run_cfg.model.n_layers)
    oracle_name = find_oracle(run, cfg.options, k, cfg.oracle)
    table = load_oracle_table(run, oracle_name, k, idx_ST, tgt_ST, cfg.options) if oracle_name else None
    with writing(run):
        write_eval(folder, model, router, idx_ST, tgt_ST, cfg, table, log)
    return name


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``duollm router RUN`` (the positional RUN is added by the caller)."""
    parser.add_argument("--target", required=True, help="fraction of routes that go big, in [0, 1] (0.5 or 6/12)")
    parser.add_argument("--method", default="budget", help=f"{' | '.join(METHODS)} (default budget)")
    parser.add_argument("--options", default="SB", help="routes a layer may take: SB (default), B_ or SB_")
    parser.add_argument("--skip-target", default=None, help="fraction of routes that skip (options SB_; 0.25 or 3/12)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    parser.add_argument("--oracle", default=None, help="oracle name for imitation labels and agreement (default: one with the router's options and "
                        "budget, shared context first, then the newest)")
    parser.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                        help="router config overrides, e.g. alpha=5 beta_end=200 train.lr=0.01")
    parser.add_argument("--resume", action="store_true", help="continue a router's training from its last checkpoint")
    parser.add_argument("--eval-only", dest="eval_only", action="store_true",
                        help="re-evaluate the trained router of that name (e.g. against an oracle run since)")


_CLI_PLUMBING = {"command", "func", "run"}


def parse_fraction(value, flag: str = "--target") -> float:
    """``0.5``, ``"0.5"`` or ``"6/12"`` -> 0.5; ValueError naming the flag otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{flag} must be a number or a ratio like 6/12; got {value!r}") from None


def run_router_command(run_dir: Path, **kwargs) -> str:
    """``duollm router``: resolve the config from the flags, train, save, evaluate; returns the name."""
    from .config import load_run_config

    log = kwargs.pop("log", print)
    sets = kwargs.pop("set", None) or []
    resume = bool(kwargs.pop("resume", False))
    eval_only = bool(kwargs.pop("eval_only", False))
    flags = {}
    for key, cfg_key in (("target", "target"), ("method", "method"), ("options", "options"),
                         ("skip_target", "skip_target"), ("steps", "train.steps"), ("oracle", "oracle")):
        value = kwargs.pop(key, None)
        if value is not None:
            flags[cfg_key] = value
    for key in ("target", "skip_target"):
        if key in flags:
            flags[key] = parse_fraction(flags[key], "--" + key.replace("_", "-"))
    unknown = set(kwargs) - _CLI_PLUMBING
    if unknown:
        raise TypeError(f"run_router_command got unexpected arguments {sorted(unknown)}")
    if "target" not in flags:
        raise ValueError("--target is required (fraction of routes that go big, in [0, 1])")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    cfg = resolve_router_config(load_run_config(run_dir), flags, sets)
    if eval_only:
        return reevaluate_router(run_dir, cfg.name, oracle=cfg.oracle, log=log)
    return train_router(run_dir, cfg, resume=resume, log=log)
