"""The ``duollm`` command (DESIGN section 5). User mistakes exit non-zero with one line, no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _fmt_int(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


# ----------------------------------------------------------------------------- train


def cmd_train(args) -> None:
    from .config import load_config
    from .train import pretrain

    out = Path(args.out or f"runs/{args.config or 'cpu'}")
    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.spec={args.data}")  # string keys take the text literally (no YAML)
    if args.resume and not args.config and (out / "config.yaml").is_file():
        cfg = load_config(str(out / "config.yaml"), overrides)  # the run's own config, plus overrides
    else:
        cfg = load_config(args.config, overrides)  # with --resume: checked against the run's config
    pretrain(cfg, out, resume=args.resume)
    print(out)


# ----------------------------------------------------------------------------- eval


def _routing_from_args(args, n_layers: int, n_seq: int, seq_len: int):
    """(name, routes) pairs to evaluate, from --pattern / --random-big (default: the standard table)."""
    from .evaluate import random_routes
    from .routing import parse_pattern

    chosen = [flag for flag, v in (("--pattern", args.pattern), ("--random-big", args.random_big),
                                   ("--router", getattr(args, "router", None))) if v is not None]
    if len(chosen) > 1:
        raise ValueError(f"give one of --pattern, --random-big, --router; got {' and '.join(chosen)}")
    if getattr(args, "router", None):
        from .routers import load_router

        return [(f"router:{args.router}", load_router(Path(args.run), args.router).eval())]
    if args.pattern:
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
    from .checkpoint import load_model
    from .data import eval_tokens, parse_max_tokens
    from .evaluate import per_token_loss, summarize

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
    print(f"{'routing':<22} {'loss':>8} {'ppl':>9} {'big':>6} {'compute':>8} {'tokens':>8}")
    for r in rows:
        print(f"{r['routing']:<22} {r['loss']:8.4f} {r['ppl']:9.2f} {r['big_fraction']:6.2f} "
              f"{r['compute']:8.2f} {r['tokens']:8d}")


def cmd_eval(args) -> None:
    from .io import atomic_path

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


# ----------------------------------------------------------------------------- info


def model_info(cfg) -> dict:
    import torch

    from .model import DuoModel, param_counts

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
    from .config import load_config, load_run_config

    if args.run and args.config:
        raise ValueError("give either a run folder or --config, not both")
    if args.run:
        if not Path(args.run).is_dir():
            raise ValueError(f"run folder {args.run} does not exist")
        cfg = load_run_config(Path(args.run))
    else:
        cfg = load_config(args.config)
    info = model_info(cfg)
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


# ----------------------------------------------------------------------------- oracle


def cmd_oracle(args) -> None:
    from .oracle.command import kwargs_from_args, run_oracle_command

    print(run_oracle_command(Path(args.run), **kwargs_from_args(args)))


# ----------------------------------------------------------------------------- router


def cmd_router(args) -> None:
    from .routers import run_router_command

    print(run_router_command(Path(args.run), **vars(args)))


# ----------------------------------------------------------------------------- run (the whole study)


def cmd_run(args) -> None:
    from .study import run_study

    out = Path(args.out or f"runs/{Path(args.config).stem if args.config else 'cpu'}")
    run_study(args.config, args.data, out, args.set or [])
    print(out)


def cmd_report(args) -> None:
    from .analysis.report import write_report

    if not Path(args.run).is_dir():
        raise ValueError(f"run folder {args.run} does not exist")
    print(write_report(Path(args.run)))


# ----------------------------------------------------------------------------- parser


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command`` (the subcommand about to run) lets heavy subcommands load lazily."""
    p = argparse.ArgumentParser(prog="duollm", description="Duo-LLM: adaptive computation in language models")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="stage 1: random-routing pretraining")
    t.add_argument("--config", help="preset (tiny, cpu, paper) or YAML file")
    t.add_argument("--data", help="builtin:pydoc | file:PATH | hf:NAME[:CONFIG]")
    t.add_argument("--out", help="run folder (default runs/<preset>)")
    t.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="perplexity of a run under a routing")
    e.add_argument("run")
    e.add_argument("--pattern", help="one route per layer over B, S, _ (e.g. SSSSBBBBSSSS)")
    e.add_argument("--random-big", type=float, help="random routing, big with this probability (else small)")
    e.add_argument("--router", help="route with a trained router of the run (hard decisions), by name")
    e.add_argument("--data", help="evaluate on this data spec instead of the run's validation split")
    e.add_argument("--max-tokens", help="cap on evaluation tokens: N >= 1, or all (default eval.max_tokens)")
    e.add_argument("--per-token", help="write float32 per-token losses (canonical order) to this .npy")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    o = sub.add_parser("oracle", help="stage 2: exhaustive routing search under a budget, with baselines")
    o.add_argument("run")
    from .oracle.command import add_arguments as add_oracle_arguments

    add_oracle_arguments(o)
    o.set_defaults(func=cmd_oracle)

    rt = sub.add_parser("router", help="stage 3: train a router on the frozen model, evaluate it against the oracle")
    rt.add_argument("run")
    from .routers import add_arguments as add_router_arguments

    add_router_arguments(rt)
    rt.set_defaults(func=cmd_router)

    from .generate import add_generate_arguments, run_generate_command

    g = sub.add_parser("generate", help="generate text under a routing policy; --show-routes prints the routes")
    add_generate_arguments(g)
    g.set_defaults(func=run_generate_command)
    # export and convert import transformers (seconds): only when one of them is the command
    x = sub.add_parser("export", help="export a run to the Hugging Face format (AutoModelForCausalLM)")
    c = sub.add_parser("convert", help="turn a pretrained Llama or GPT-2 model into a Duo run")
    if command == "export":
        from .hf.export import add_export_arguments, run_export_command

        add_export_arguments(x)
        x.set_defaults(func=run_export_command)
    if command == "convert":
        from .hf.convert import add_convert_arguments, run_convert_command

        add_convert_arguments(c)
        c.set_defaults(func=run_convert_command)

    i = sub.add_parser("info", help="parameter counts and FLOPs per token")
    i.add_argument("run", nargs="?")
    i.add_argument("--config", help="preset or YAML file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    r = sub.add_parser("run", help="the whole study, end to end")
    r.add_argument("--config", help="preset (default cpu) or YAML file")
    r.add_argument("--data", help="data spec (default builtin:pydoc)")
    r.add_argument("--out", help="run folder (default runs/<preset>)")
    r.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. study.tokens=4096")
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("report", help="regenerate RUN/report/ (HTML, Markdown, JSON) from the run folder alone")
    rp.add_argument("run")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        args.func(args)
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
