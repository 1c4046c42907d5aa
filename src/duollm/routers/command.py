"""``duollm router RUN``: train, save and evaluate a router on the frozen model of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import rundir
from ..checkpoint import latest_checkpoint, load_model
from ..config import first_difference, load_run_config, to_dict
from ..data.cache import eval_tokens, load_tokens
from ..data.corpus import sequences
from ..model.policy import Router, peek_big_fraction, peek_shape
from ..model.routing import ROUTE_OF_LETTER
from ..runtime.distributed import resolve_device
from ..train.loop import train_loop
from .calibrate import calibrate_budget
from .config import ROUTER_RESUMABLE, RouterConfig, resolve_router_config
from .evaluate import write_eval
from .labels import expected_benefit, find_oracle, holdout_split, load_oracle_table
from .methods import METHODS
from .objectives import RouterTrainer, router_objective
from .store import load_router_config, load_router_folder, save_router, write_router_yaml
from .value import collect_targets, dagger, rollout_targets


def train_router(run: Path, cfg: RouterConfig, *, resume: bool = False, log=print) -> str:
    """Train, save and evaluate one router on the frozen model of ``run``; returns its name."""
    run = Path(run)
    device = resolve_device(cfg.train.device)
    model, run_cfg = load_model(run, device)
    model.requires_grad_(False)  # the LM stays frozen (paper section 3.3)
    L = run_cfg.model.n_layers
    idx_ST, tgt_ST = eval_tokens(run, run_cfg)
    k = cfg.budget_k(L)
    oracle_name = find_oracle(run, cfg.options, k, cfg.oracle)
    oracle = load_oracle_table(run, oracle_name, k, idx_ST, tgt_ST, cfg.options) if oracle_name else None
    imitation_data, train_tokens = None, load_tokens(run, "train")
    if METHODS[cfg.method].data == "labels":
        imitation_data, train_tokens = _imitation_data(run, run_cfg, cfg, k, idx_ST, tgt_ST, oracle, log)
    out = rundir.router_dir(run, cfg.name)
    if latest_checkpoint(out) is not None and not resume:
        raise ValueError(f"router {cfg.name} already exists in {out}; pass --resume to continue it or remove the folder")
    if resume and (out / rundir.ROUTER_YAML).is_file():  # continue the router as it was trained, or refuse
        saved = load_router_config(out)
        diff = first_difference(saved, cfg, ROUTER_RESUMABLE)
        if diff is not None:
            key, was, asked = diff
            raise ValueError(f"router {cfg.name} was trained with {key}={was!r}, not {asked!r}: --resume continues it "
                             f"as it was (drop that option, or train another --name)")
    with rundir.writing(run):
        return _train_router(run, out, cfg, model, idx_ST, tgt_ST, train_tokens, oracle, imitation_data,
                             device=device, resume=resume, log=log)


def label_source(run: Path, cfg: RouterConfig, k: int) -> str | None:
    """Where an imitation router's labels come from: ``train`` (a training-split oracle table) or
    ``validation`` (part of the evaluation tokens: only its held-out numbers are free of the leak)."""
    if METHODS[cfg.method].data != "labels":
        return None
    return "train" if find_oracle(run, cfg.options, k, split="train") is not None else "validation"


def _imitation_data(run: Path, run_cfg, cfg: RouterConfig, k: int, idx_ST, tgt_ST, oracle, log):
    """``((idx_ST, tgt_ST, route_LST, benefit_LST), train_tokens)``: the labelled sequences imitation learns from
    (and, for a method with the "benefit" target, each layer's expected benefit of big: labels.py). A
    training-split oracle at budget k (``duollm oracle --split train``) keeps every validation sequence
    unseen; without one, every other sequence of the validation table (``holdout_every``)."""
    method = METHODS[cfg.method]
    labels = find_oracle(run, cfg.options, k, split="train")
    if labels is not None:
        n = rundir.oracle_summary(rundir.oracle_dir(run, labels))["tokens"]
        idx_ST, tgt_ST = eval_tokens(run, run_cfg, max_tokens=n, split="train")
        table = load_oracle_table(run, labels, k, idx_ST, tgt_ST, cfg.options, pattern=method.labels)
        train_seq = table.sequences
    elif oracle is None:
        raise ValueError(f"imitation needs an oracle with options {cfg.options} and budget k={k} in {run / rundir.ORACLE}; "
                         f"run `duollm oracle` first")
    else:
        table = oracle if method.labels == "best" else load_oracle_table(run, oracle.name, k, idx_ST, tgt_ST, cfg.options,
                                                                         pattern=method.labels)
        train_seq, _ = holdout_split(oracle.sequences, cfg.holdout_every)
    if cfg.train.seq_len != idx_ST.shape[1]:
        raise ValueError(f"imitation trains on whole oracle sequences of {idx_ST.shape[1]} tokens; "
                         f"train.seq_len={cfg.train.seq_len} differs")
    if len(train_seq) == 0:
        raise ValueError(f"oracle {table.name} covers too few sequences to train on after the holdout")
    used = set(table.route_LST[:, train_seq].unique().tolist())
    if not used <= {ROUTE_OF_LETTER[c] for c in cfg.options}:
        raise ValueError(f"oracle {table.name} uses routes outside the router's options {cfg.options}")
    if labels is not None:
        train_tokens = load_tokens(run, "train")
        log(f"imitation: {len(train_seq)} training-split oracle sequences ({labels}, k={k}) to train on; "
            f"evaluated on validation tokens only")
    else:
        train_tokens = torch.cat([idx_ST[train_seq].flatten(), tgt_ST[train_seq][-1, -1:]]).numpy()
        log(f"imitation: {len(train_seq)} oracle sequences ({oracle.name}, k={k}) to train on, "
            f"{len(oracle.sequences) - len(train_seq)} held out")
    benefit_LST = None
    if "benefit" in method.targets:
        benefit_LST = expected_benefit(table)
        if benefit_LST is None:
            raise ValueError(f"{cfg.method} needs oracle {table.name}'s loss matrix at 0 < k={k} < {table.route_LST.shape[0]} "
                             f"(`duollm oracle --save-matrix`; the study's oracles keep it)")
        benefit_LST = benefit_LST[:, train_seq]
    return (idx_ST[train_seq], tgt_ST[train_seq], table.route_LST[:, train_seq], benefit_LST), train_tokens


def _train_router(run: Path, out: Path, cfg: RouterConfig, model, idx_ST, tgt_ST, train_tokens, oracle,
                  imitation_data, *, device, resume: bool, log) -> str:
    L, D = model.cfg.n_layers, model.cfg.d_model
    torch.manual_seed(cfg.train.seed)
    method = METHODS[cfg.method]
    router = Router(L, D, cfg.options, budget_k=cfg.budget_k(L) if cfg.enforce else None,
                    peek=peek_shape(model.cfg) if method.peek else None)
    if method.peek:
        router.copy_peek(model)
    if cfg.init == "target":
        router.init_bias(cfg.probs_R())
    trainer = RouterTrainer(router, model, cfg)
    n_val = max(1, min(idx_ST.shape[0], cfg.train.eval_tokens // idx_ST.shape[1]))
    write_router_yaml(out, router, cfg)  # the config of a router in training is on disk from the start
    if METHODS[cfg.method].data == "values":  # on-policy targets in DAgger rounds, each through train_loop
        dagger(model, trainer, cfg, out, train_tokens, device=device, resume=resume, log=log,
               collect=rollout_targets if METHODS[cfg.method].values == "rollout" else collect_targets,
               make_objective=lambda rows: router_objective(trainer, cfg, idx_ST[:n_val], tgt_ST[:n_val], value_data=rows))
    else:
        objective = router_objective(trainer, cfg, idx_ST[:n_val], tgt_ST[:n_val], imitation_data)
        train_loop(objective, cfg.train, train_tokens, out, device=device, resume=resume,
                   desc=f"router {cfg.name}", run_config=to_dict(cfg))
    if cfg.calibrate:  # on training-split tokens: the evaluation tokens stay unseen
        cal_idx, cal_tgt = sequences(load_tokens(run, "train"), idx_ST.shape[1], cfg.calibration_tokens)
        # a peeking router pays the small FFN everywhere: fewer bigs for the compute of the target
        big = peek_big_fraction(cfg.target, model.flop_model) if method.peek else cfg.target
        delta, got = calibrate_budget(model, router, cal_idx, cal_tgt, big, batch_size=cfg.eval_batch)
        log(f"calibration: big logit offset {delta:+.3f} gives a big fraction of {got:.3f} (target {big:.3f})")
    save_router(out, router, cfg)
    write_eval(out, model, router, idx_ST, tgt_ST, cfg, oracle, log, labels=label_source(run, cfg, cfg.budget_k(L)))
    return cfg.name


def reevaluate_router(run: Path, name: str, *, oracle: str = "", log=print) -> str:
    """Rewrite ``eval.json`` of a trained router (same tokens; the oracle found now, or ``oracle``)."""
    run = Path(run)
    folder = rundir.router_dir(run, name)
    if not (folder / rundir.ROUTER_WEIGHTS).is_file():
        raise ValueError(f"no trained router {name!r} in {run / 'routers'} (train it first)")
    router, cfg = load_router_folder(folder)
    if oracle:
        cfg.oracle = oracle
    model, run_cfg = load_model(run)
    idx_ST, tgt_ST = eval_tokens(run, run_cfg)
    k = cfg.budget_k(run_cfg.model.n_layers)
    oracle_name = find_oracle(run, cfg.options, k, cfg.oracle)
    table = load_oracle_table(run, oracle_name, k, idx_ST, tgt_ST, cfg.options) if oracle_name else None
    with rundir.writing(run):
        write_eval(folder, model, router, idx_ST, tgt_ST, cfg, table, log, labels=label_source(run, cfg, k))
    return name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``duollm router RUN``."""
    parser.add_argument("run")
    parser.add_argument("--target", required=True, help="fraction of routes that go big, in [0, 1] (0.5 or 6/12)")
    parser.add_argument("--method", default="budget", help=f"{' | '.join(METHODS)} (default budget; each below)")
    parser.epilog = "methods: " + "; ".join(f"{name}: {m.summary}" for name, m in METHODS.items() if m.summary)
    parser.add_argument("--options", default="SB", help="routes a layer may take: SB (default), B_ or SB_")
    parser.add_argument("--skip-target", default=None, help="fraction of routes that skip (options SB_; 0.25 or 3/12)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    parser.add_argument("--name", default=None, help="the router's folder name under RUN/routers (default: method and "
                        "target, e.g. budget-0.50), so several routers can share a target")
    parser.add_argument("--oracle", default=None, help="oracle name for imitation labels and agreement (default: one "
                        "with the router's options and budget, shared context first, then the newest)")
    parser.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE",
                        help="router config overrides, e.g. alpha=5 beta_end=200 train.lr=0.01")
    parser.add_argument("--resume", action="store_true", help="continue a router's training from its last checkpoint")
    parser.add_argument("--eval-only", dest="eval_only", action="store_true",
                        help="re-evaluate the trained router of that name (e.g. against an oracle run since)")


_CLI_PLUMBING = {"command", "func", "run", "threads"}  # threads: applied by cli.main


def run_command(args: argparse.Namespace) -> str:
    """``duollm router``: the router's name, printed as the last line."""
    return run_router_command(Path(args.run), **vars(args))


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
    log = kwargs.pop("log", print)
    sets = kwargs.pop("set", None) or []
    resume = bool(kwargs.pop("resume", False))
    eval_only = bool(kwargs.pop("eval_only", False))
    flags = {}
    for key, cfg_key in (("target", "target"), ("method", "method"), ("options", "options"),
                         ("skip_target", "skip_target"), ("steps", "train.steps"), ("oracle", "oracle"),
                         ("name", "label")):
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
