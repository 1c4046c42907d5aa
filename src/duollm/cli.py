"""The ``duollm`` command (DESIGN section 5). User mistakes exit 2 with one line, environment failures 1.

One adapter style: every command module exposes ``add_arguments(parser)`` and ``run_command(args)``,
which returns the line printed last (or None); ``COMMANDS`` lists them. ``export`` and ``convert``
import transformers, so their modules load only when one of them is the command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from . import __version__, rundir
from .analysis.report import write_report
from .analysis.rundata import inventory
from .checkpoint import load_model
from .config import PRESETS, load_config, load_run_config, to_dict
from .data.cache import eval_tokens
from .data.corpus import SPEC_HELP, parse_max_tokens
from .io import atomic_path
from .model.model import DuoModel, param_counts
from .model.routing import parse_pattern
from .routers.store import routing_policy
from .runtime import threads
from .study.run import run_study
from .study.settings import validate_study
from .train import memory
from .train.evaluate import per_token_loss, random_routes, summarize
from .train.loop import pretrain


def _fmt_int(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


# ----------------------------------------------------------------------------- train


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--config", help=f"preset ({', '.join(PRESETS)}) or YAML file")
    t.add_argument("--data", help=SPEC_HELP)
    t.add_argument("--out", help="run folder (default runs/<preset or config file name>)")
    t.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.steps=100 (--set may repeat)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def default_out(config: str | None) -> Path:
    """``runs/<preset>`` or ``runs/<stem of the YAML file>`` (train and run agree)."""
    return Path("runs") / (Path(config).stem if config else "cpu")


def cmd_train(args) -> str:
    out = Path(args.out) if args.out else default_out(args.config)
    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.spec={args.data}")  # string keys take the text literally (no YAML)
    if args.resume and not args.config and rundir.has_run(out):
        cfg = load_config(str(rundir.config_path(out)), overrides, saved=True)  # the run's own config, plus overrides
    else:
        cfg = load_config(args.config, overrides)  # with --resume: checked against the run's config
    validate_study(cfg)  # saved with the run: a bad study section is refused now, not when the study starts
    pretrain(cfg, out, resume=args.resume)
    return str(out)


# ----------------------------------------------------------------------------- eval


def add_eval_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("run")
    e.add_argument("--pattern", help="one route per layer over B, S, _ (e.g. SSSSBBBBSSSS)")
    e.add_argument("--random-big", type=float, help="random routing, big with this probability (else small)")
    e.add_argument("--router", help="route with a trained router of the run (hard decisions), by name")
    e.add_argument("--data", help="evaluate on this data spec instead of the run's validation split")
    e.add_argument("--max-tokens", help="cap on evaluation tokens: N >= 1, or all (default eval.max_tokens)")
    e.add_argument("--per-token", help="write float32 per-token losses (canonical order) to this .npy")
    e.add_argument("--json", action="store_true", help="print one JSON object")


def _routing_from_args(args, n_layers: int, n_seq: int, seq_len: int):
    """(name, routes) pairs to evaluate, from --pattern / --random-big (default: the standard table)."""
    chosen = [flag for flag, v in (("--pattern", args.pattern), ("--random-big", args.random_big),
                                   ("--router", getattr(args, "router", None))) if v is not None]
    if len(chosen) > 1:
        raise ValueError(f"give one of --pattern, --random-big, --router; got {' and '.join(chosen)}")
    if getattr(args, "router", None) is not None:  # an empty value is refused, not taken as "none given"
        return [routing_policy(f"router:{args.router}", n_layers, root=Path(args.run))]
    if args.pattern is not None:
        parse_pattern(args.pattern, n_layers)
        return [(args.pattern, args.pattern)]
    if args.random_big is not None:
        if not 0.0 <= args.random_big <= 1.0:
            raise ValueError(f"--random-big must be in [0, 1]; got {args.random_big}")
        return [(f"random-big-{args.random_big:g}", random_routes(n_layers, n_seq, seq_len, args.random_big))]
    return [
        ("all-big", "B" * n_layers),
        ("all-small", "S" * n_layers),
        ("random-big-0.5", random_routes(n_layers, n_seq, seq_len, 0.5)),
    ]


def evaluation_table(run: Path, args) -> list[dict]:
    """Rows of loss, ppl, realised budget and compute for the routings the flags ask for."""
    max_tokens = parse_max_tokens(args.max_tokens)
    if args.per_token and Path(args.per_token).is_dir():
        raise ValueError(f"--per-token {args.per_token} is a folder; give a file name such as losses.npy")
    model, cfg = load_model(run)
    idx_ST, tgt_ST = eval_tokens(run, cfg, args.data, max_tokens)
    rows = []
    for name, routes in _routing_from_args(args, cfg.model.n_layers, *idx_ST.shape):
        res = per_token_loss(model, idx_ST, tgt_ST, routes, progress=True, desc=name)
        rows.append({"routing": name, **summarize(res, model.flop_model.all_big()), "_loss_ST": res["loss_ST"]})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'routing':<22} {'loss':>8} {'ppl':>9} {'95% interval':>19} {'big':>6} {'compute':>8} {'tokens':>8}")
    for r in rows:
        ci = f"[{r['ppl_lo']:.2f}, {r['ppl_hi']:.2f}]"
        print(f"{r['routing']:<22} {r['loss']:8.4f} {r['ppl']:9.2f} {ci:>19} {r['big_fraction']:6.2f} "
              f"{r['compute']:8.2f} {r['tokens']:8d}")


def cmd_eval(args) -> None:
    rows = evaluation_table(Path(args.run), args)
    if args.per_token:
        with atomic_path(args.per_token) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, rows[0]["_loss_ST"].numpy().astype(np.float32).reshape(-1))
    for r in rows:
        r.pop("_loss_ST")
    if args.json:
        out = dict(rows[0])
        if len(rows) > 1:
            out["table"] = rows
        print(json.dumps(out))
    else:
        print_table(rows)


# ----------------------------------------------------------------------------- config


def add_config_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--config", help=f"preset ({', '.join(PRESETS)}; default cpu), YAML file, or a run folder (its "
                                    f"saved config)")
    c.add_argument("--data", help=SPEC_HELP)
    c.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE",
                   help="config overrides (--set may repeat)")


def cmd_config(args) -> None:
    """The resolved config as YAML: defaults < preset < YAML file < --set, exactly what `train` or `run` would
    save as RUN/config.yaml (checked as they check it)."""
    overrides = list(args.set or []) + ([f"data.spec={args.data}"] if args.data else [])
    if args.config and Path(args.config).is_dir():
        load_run_config(Path(args.config))  # one line if the folder holds no run
        cfg = load_config(str(rundir.config_path(args.config)), overrides, saved=True)
    else:
        cfg = load_config(args.config, overrides)
    validate_study(cfg)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


# ----------------------------------------------------------------------------- info


def add_info_arguments(i: argparse.ArgumentParser) -> None:
    i.add_argument("run", nargs="?")
    i.add_argument("--config", help=f"preset ({', '.join(PRESETS)}) or YAML file")
    i.add_argument("--json", action="store_true")
    i.add_argument("--memory", action="store_true", help="the memory plan: bytes per device while training")
    i.add_argument("--gpus", type=int, default=1, help="devices the plan spreads training over (--memory)")
    i.add_argument("--parallel", choices=("ddp", "fsdp"), default=None, help="default: the config's train.parallel")
    i.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype of the plan (default: train.dtype; auto: bfloat16 unless train.device=cpu)")


def model_info(cfg) -> dict:
    with torch.device("meta"):  # counts without allocating weights (the paper preset is 1.4B)
        model = DuoModel(cfg.model)
    fm = model.flop_model
    return {
        "preset": cfg.preset,
        "model": vars(cfg.model),
        "params": param_counts(model),
        "flops_per_token": {
            "per_layer": fm.per_route(),
            "lm_head": fm.head,
            "all_big": fm.all_big(),
            "all_small": fm.pattern([1] * cfg.model.n_layers),
            "all_skip": fm.pattern([0] * cfg.model.n_layers),
            "context": cfg.model.max_seq_len,
        },
    }


def cmd_info(args) -> None:
    if args.run and args.config:
        raise ValueError("give either a run folder or --config, not both")
    if args.run:
        if not Path(args.run).is_dir():
            raise ValueError(f"run folder {args.run} does not exist")
        cfg = load_run_config(Path(args.run))
    else:
        cfg = load_config(args.config)
    info = model_info(cfg)
    if args.run:
        info["run"] = inventory(Path(args.run))
    if args.memory:
        info["memory"] = memory.plan(cfg, args.gpus, args.parallel or cfg.train.parallel, args.dtype)
    if args.json:
        print(json.dumps(info))
        return
    m = cfg.model
    print(f"preset {cfg.preset}: {m.n_layers} layers, width {m.d_model}, {m.n_heads} heads "
          f"({m.kv_heads} kv), FFN big {m.d_ff_big} / small {m.d_ff_small}, vocab {m.vocab_size}, "
          f"context {m.max_seq_len}, tied embeddings {m.tie_embeddings}")
    print("parameters:")
    for k, v in info["params"].items():
        print(f"  {k:<11} {v:>14,}  ({_fmt_int(v)})")
    f = info["flops_per_token"]
    print(f"forward FLOPs per token (attention at mean causal context of {f['context']} / 2):")
    for route, v in f["per_layer"].items():
        print(f"  one layer, {route:<5} {_fmt_int(v):>8}  ({v / f['per_layer']['big']:.2f} of big)")
    print(f"  LM head          {_fmt_int(f['lm_head']):>8}")
    for k in ("all_big", "all_small", "all_skip"):
        print(f"  whole model, {k.replace('all_', 'all-'):<9} {_fmt_int(f[k]):>8}  ({f[k] / f['all_big']:.2f} of all-big)")
    if args.run:
        print_inventory(info["run"])
    if args.memory:
        print(memory.format_plan(info["memory"]))


def print_inventory(inv: dict) -> None:
    """The run folder's contents (``analysis.rundata.inventory``) as lines."""
    val = "  ".join(f"{k[4:]} {v:.4f}" for k, v in inv["validation"].items())
    print(f"trained {inv['trained_steps']} of {inv['train_steps']} steps; last validation loss: {val or 'none yet'}")
    print(f"oracles ({len(inv['oracles'])}):")
    for o in inv["oracles"]:
        state = "" if o["complete"] else ", incomplete"
        print(f"  {o['name']:<24} {o['context']}, {o['options']}, {o['split']} split, {o['tokens']} tokens, "
              f"budgets {','.join(map(str, o['budgets']))}{state}")
    print(f"routers ({len(inv['routers'])}):")
    for r in inv["routers"]:
        rec = "" if r["recovered"] is None else f", recovered {100 * r['recovered']:.1f}% of the oracle's gain"
        ppl = "" if r["ppl"] is None else f"ppl {r['ppl']:.2f} on {r['tokens']} tokens, "
        big = "" if r["big_fraction"] is None else f"big {r['big_fraction']:.3f}"
        print(f"  {r['name']:<24} {ppl}{big}{rec}")
    extra = [x for x in (("null control" if inv["null"] else ""), ", ".join(inv["seeds"])) if x]
    print(f"report: {inv['report']}" + (f"; also {'; '.join(extra)}" if extra else ""))


# ----------------------------------------------------------------------------- run and report


def add_run_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("--config", help=f"preset ({', '.join(PRESETS)}; default cpu) or YAML file")
    r.add_argument("--data", help=f"{SPEC_HELP} (default builtin:pydoc)")
    r.add_argument("--out", help="run folder (default runs/<preset or config file name>)")
    r.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE",
                   help="config overrides, e.g. study.tokens=4096 (--set may repeat)")


def cmd_run(args) -> str:
    out = Path(args.out) if args.out else default_out(args.config)
    run_study(args.config, args.data, out, args.set or [])
    return str(out)


def add_report_arguments(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("run")


def cmd_report(args) -> str:
    if not Path(args.run).is_dir():
        raise ValueError(f"run folder {args.run} does not exist")
    return str(write_report(Path(args.run)))


# ----------------------------------------------------------------------------- the table of commands

# name -> (module or this one, add_arguments, run_command, help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": (__name__, "add_train_arguments", "cmd_train", "stage 1: random-routing pretraining"),
    "eval": (__name__, "add_eval_arguments", "cmd_eval", "perplexity of a run under a routing"),
    "oracle": ("duollm.oracle.command", "add_arguments", "run_command",
               "stage 2: exhaustive routing search under a budget, with baselines"),
    "router": ("duollm.routers.command", "add_arguments", "run_command",
               "stage 3: train a router on the frozen model, evaluate it against the oracle"),
    "generate": ("duollm.inference.generate", "add_arguments", "run_command",
                 "generate text under a routing policy; --show-routes prints the routes"),
    "bench": ("duollm.inference.bench", "add_arguments", "run_command",
              "wall-clock of prefill and decode under patterns and routers, next to their ideals"),
    "export": ("duollm.integrations.hf.export", "add_arguments", "run_command",
               "export a run to the Hugging Face format (AutoModelForCausalLM)"),
    "convert": ("duollm.integrations.hf.convert", "add_arguments", "run_command",
                "turn a pretrained Llama or GPT-2 model into a Duo run"),
    "info": (__name__, "add_info_arguments", "cmd_info", "parameter counts and FLOPs per token"),
    "config": (__name__, "add_config_arguments", "cmd_config",
               "print the resolved config (preset < YAML < --set) as the run would save it"),
    "run": (__name__, "add_run_arguments", "cmd_run", "the whole study, end to end"),
    "compare": ("duollm.analysis.compare", "add_arguments", "run_command",
                "every router of one or more runs by the share of the oracle's gain it recovers"),
    "report": (__name__, "add_report_arguments", "cmd_report",
               "regenerate RUN/report/ (HTML, Markdown, JSON) from the run folder alone"),
}
LAZY = {"export", "convert"}  # their modules import transformers (seconds): only when one of them is the command


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command`` (the subcommand about to run) lets heavy subcommands load lazily."""
    p = argparse.ArgumentParser(prog="duollm", description="Duo-LLM: adaptive computation in language models")
    p.add_argument("--version", action="version", version=f"duollm {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (module, add, run, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_)
        if name in LAZY and name != command:
            continue
        mod = importlib.import_module(module)
        getattr(mod, add)(sp)
        sp.add_argument("--threads", type=int, metavar="N",
                        help="torch threads (default: the config's `threads`; 0 follows the cores other processes "
                             "leave free, N fixes N)")
        sp.set_defaults(func=getattr(mod, run))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        if args.threads is not None:
            threads.configure(args.threads, explicit=True)
        last = args.func(args)
        if last is not None:
            print(last)
    except ValueError as e:
        print(f"duollm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment: disk full, read-only, permissions, a folder where a file goes
        where = f"{e.filename}: " if e.filename else ""
        print(f"duollm {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"duollm {args.command}: interrupted; completed work is saved, rerun (with --resume for train) to continue",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
