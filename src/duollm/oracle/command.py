"""``duollm oracle RUN ...``: the command-line entry to the oracle engine (DESIGN section 5).

Like every command module: ``add_arguments(parser)`` adds the flags, ``run_command(args)`` runs
it and returns the line the CLI prints last (here the output name). ``run_oracle_command`` is the
same as a library call.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np

from .. import rundir
from ..checkpoint import load_model
from ..config import load_run_config
from ..data.cache import eval_tokens
from ..data.corpus import parse_max_tokens
from ..io import atomic_write_json
from ..model.routing import CandidateSpace, parse_budgets, parse_routing
from ..routers.store import routing_policy
from ..runtime.distributed import resolve_device
from .plan import OracleSpec
from .runner import DTYPES, engine_model, run_oracle
from .sequential import run_sequential

# flag dest -> keyword of run_oracle_command (kept in one place so the two cannot drift)
KEYWORDS = (
    "budgets", "options", "skips", "skips_mode", "budget_mode", "context", "reference", "max_tokens", "data",
    "search", "beam_width", "name", "batch_tokens", "dtype", "split", "patterns", "seed", "save_matrix", "device", "compile",
    "schedules_only",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``duollm oracle RUN``."""
    a = parser.add_argument
    a("run")
    a("--budgets", default="all", help="budgets k (big layers per token): all (default), a range 0-12, or a list 4,6,8")
    a("--options", default="SB", help="per-layer routes to search: SB (default), B_ (big or skip), SB_")
    a("--skips", type=int, default=None, help="number of skipped layers (the paper's skip study: --options B_ --skips 6)")
    a("--skips-mode", dest="skips_mode", choices=("exact", "max"), default="exact",
      help="--skips counts exactly (default) or at most")
    a("--budget-mode", dest="budget_mode", choices=("exact", "max"), default="exact",
      help="budget k means exactly k big layers (default, the paper) or at most k")
    a("--context", default="shared", help="shared (the pattern routes the whole sequence; default), frozen "
      "(context tokens keep --reference, only the scored token's routes vary) or sequential (left to right, "
      "each token chooses given the earlier tokens' own choices; one pass per budget, plus falling/rising)")
    a("--reference", default=None, help="frozen context routing: B (all big, default), S (all small), a pattern, "
      "or router:NAME (a trained router of the run)")
    a("--max-tokens", dest="max_tokens", default=None, help="cap on evaluation tokens: N >= 1, or all "
      "(default eval.max_tokens)")
    a("--data", default=None, help="data spec to score instead of the run's validation split")
    a("--split", default="validation", choices=("validation", "train"),
      help="the run's split to score (train: oracle tables imitation routers learn from, named <name>-train; "
           "reports and findings use validation oracles only)")
    a("--search", default="exhaustive", help="exhaustive (default), beam, or greedy (beam of width 1)")
    a("--beam-width", dest="beam_width", type=int, default=4, help="prefixes kept per budget cell (default 4)")
    a("--name", default=None, help="output folder name under RUN/oracle/ (default from the options, e.g. SB-shared)")
    a("--batch-tokens", dest="batch_tokens", type=int, default=4096,
      help="tokens per chunk: the matrix-product size, the memory bound and the resume granularity")
    a("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
      help="auto (default: bfloat16 layers where the device has bf16 matrix units, else float32), float32 (exact) "
           "or bfloat16 (the layers' products in bf16; stream, head and reductions float32)")
    a("--patterns", default=None, help="explicit candidate patterns, comma-separated (replaces --options/--budgets)")
    a("--seed", type=int, default=0, help="seed of the 100 random patterns per budget")
    a("--save-matrix", dest="save_matrix", action="store_true",
      help="also write loss_matrix.npy [patterns, tokens] (large; off by default)")
    a("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    a("--schedules-only", dest="schedules_only", action="store_true",
      help="sequential context: only the paper's constant, falling and rising schedules (no per-budget prediction)")
    a("--compile", default="auto", choices=("auto", "on", "off"),
      help="fuse elementwise work with torch.compile (auto: for large runs)")


def run_command(args: argparse.Namespace) -> str:
    """``duollm oracle``: a table of the budgets (oracle, fixed, best of 100, with intervals where the
    summary has them), then the output name as the last line (DESIGN 5)."""
    name = run_oracle_command(Path(args.run), **{k: getattr(args, k) for k in KEYWORDS if hasattr(args, k)})
    summary = rundir.oracle_summary(rundir.oracle_dir(Path(args.run), name))
    print(f"{summary.get('tokens')} tokens, context {summary.get('context')}, options {summary.get('options')}; "
          f"all-big {_ppl(summary, 'all_big_ppl')}, all-small {_ppl(summary, 'all_small_ppl')}")
    for b in summary.get("budgets", []):
        line = f"  k={b['k']:<3} oracle {_ppl(b, 'oracle_ppl')}"
        if b.get("fixed_ppl") is not None:
            line += f"  fixed {_ppl(b, 'fixed_ppl')} ({b.get('fixed_pattern')})"
        if b.get("best_of_100_ppl") is not None:
            line += f"  best of 100 {_ppl(b, 'best_of_100_ppl')}"
        print(line)
    return name


def _ppl(d: dict, key: str) -> str:
    """``12.34 [12.0, 12.7]`` from a summary entry, its interval where it has one; ``—`` when absent."""
    if d.get(key) is None:
        return "—"
    lo, hi = d.get(f"{key}_lo"), d.get(f"{key}_hi")
    return f"{d[key]:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")


def build_spec(
    n_layers: int,
    *,
    budgets="all",
    options: str = "SB",
    skips: int | None = None,
    skips_mode: str = "exact",
    budget_mode: str = "exact",
    context: str = "shared",
    reference=None,
    search: str = "exhaustive",
    beam_width: int = 4,
    patterns=None,
    seed: int = 0,
) -> OracleSpec:
    """Validate the user's choices into an ``OracleSpec`` (one-line ValueErrors)."""
    if isinstance(patterns, str):
        patterns = tuple(p.strip() for p in patterns.split(",") if p.strip())
    if patterns is not None:
        changed = [flag for flag, value, default in (
            ("--budgets", budgets, "all"), ("--options", options, "SB"), ("--skips", skips, None),
            ("--budget-mode", budget_mode, "exact")) if value != default]
        if changed:
            raise ValueError(f"--patterns lists the candidates itself; drop {', '.join(changed)}")
        space = CandidateSpace(n_layers, options="SB_")
    else:
        space = CandidateSpace(
            n_layers, options=options, budgets=parse_budgets(budgets, n_layers), budget_mode=budget_mode,
            skips=skips, skips_mode=skips_mode,
        )
    return OracleSpec(space, context=context, reference=reference, search=search, beam_width=beam_width,
                      seed=seed, patterns=patterns)


def beam_gap(run_dir: Path, spec: OracleSpec, out_dir: Path) -> None:
    """Beam/greedy vs exhaustive on the same tokens (DESIGN 4.2): if the exhaustive oracle of the same
    candidates and context exists in ``RUN/oracle/``, add the gap per budget to the beam's summary."""
    exhaustive = dataclasses.replace(spec, search="exhaustive", beam_width=4).name()
    ex_dir = rundir.oracle_dir(run_dir, exhaustive)
    if not (ex_dir / rundir.SUMMARY).is_file():
        return
    ex, beam = rundir.oracle_summary(ex_dir), rundir.oracle_summary(out_dir)
    if ex.get("tokens") != beam.get("tokens") or ex.get("data") != beam.get("data"):
        return
    ex_rows = {b["k"]: j for j, b in enumerate(ex["budgets"])}
    ex_JN, beam_JN = np.load(ex_dir / rundir.ORACLE_LOSS), np.load(out_dir / rundir.ORACLE_LOSS)
    for j, entry in enumerate(beam["budgets"]):
        if entry["k"] not in ex_rows:
            continue
        e = ex["budgets"][ex_rows[entry["k"]]]
        gap_N = beam_JN[j].astype(np.float64) - ex_JN[ex_rows[entry["k"]]]
        entry["exhaustive_oracle_ppl"] = e["oracle_ppl"]
        entry["gap_ppl"] = entry["oracle_ppl"] - e["oracle_ppl"]
        entry["gap_mean_loss"] = float(gap_N.mean())
        if "search_only_ppl" in entry:
            entry["search_only_gap_ppl"] = entry["search_only_ppl"] - e["oracle_ppl"]
        entry["share_tokens_at_optimum"] = float((gap_N <= 1e-5).mean())
        if e.get("fixed_ppl") is not None:
            entry["fixed_ppl"], entry["fixed_pattern"] = e["fixed_ppl"], e["fixed_pattern"]
            entry["fixed_from"] = exhaustive
    beam["exhaustive_reference"] = exhaustive
    atomic_write_json(out_dir / rundir.SUMMARY, beam)


def run_oracle_command(
    run_dir: Path,
    *,
    budgets: str = "all",
    options: str = "SB",
    skips: int | None = None,
    skips_mode: str = "exact",
    budget_mode: str = "exact",
    context: str = "shared",
    reference: str | None = None,
    max_tokens: int | None = None,
    data: str | None = None,
    split: str = "validation",
    search: str = "exhaustive",
    beam_width: int = 4,
    name: str | None = None,
    batch_tokens: int = 4096,
    dtype: str = "auto",
    patterns: str | None = None,
    seed: int = 0,
    save_matrix: bool = False,
    device: str = "auto",
    compile: str = "auto",
    progress: bool = True,
    schedules_only: bool = False,
) -> str:
    """Run the oracle on a trained run and write ``RUN/oracle/<name>/``; return ``<name>``.

    Scores the same tokens as ``duollm eval`` (the validation split, ``eval.max_tokens``) unless
    ``data``/``max_tokens`` say otherwise. Raises ValueError with a one-line message on bad input:
    budget outside 0..L, options not a subset of SB_, impossible constraints, unknown context or
    search, malformed reference pattern, missing or corrupt run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    cfg = load_run_config(run_dir)
    dev = resolve_device(device)
    if context == "frozen" and isinstance(reference, str) and parse_routing(reference, cfg.model.n_layers).kind == "router":
        # a trained router of this run routes the context (hard decisions)
        reference = routing_policy(reference, cfg.model.n_layers, root=run_dir, device=dev)[1]
    spec = build_spec(
        cfg.model.n_layers, budgets=budgets, options=options, skips=skips, skips_mode=skips_mode,
        budget_mode=budget_mode, context=context, reference=reference, search=search, beam_width=beam_width,
        patterns=patterns, seed=seed,
    )
    if dtype not in (*DTYPES, "auto"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16; got {dtype!r}")
    max_tokens = parse_max_tokens(max_tokens)
    if name is not None and (not name or "/" in name or name.startswith(".")):
        raise ValueError(f"--name must be a plain folder name; got {name!r}")
    if split != "validation" and (data is not None or spec.context == "sequential"):
        raise ValueError("--split train scores the run's training split with the shared or frozen context; "
                         "drop --data / --context sequential")
    name = name or spec.name() + ("" if split == "validation" else f"-{split}")
    if batch_tokens < 1:
        raise ValueError(f"--batch-tokens must be positive; got {batch_tokens}")
    model, cfg = load_model(run_dir, dev)
    idx_ST, tgt_ST = eval_tokens(run_dir, cfg, spec=data, max_tokens=max_tokens, split=split)
    if schedules_only and spec.context != "sequential":
        raise ValueError("--schedules-only applies to the sequential context only (use --context sequential)")
    with rundir.writing(run_dir):
        return _run(run_dir, model, idx_ST, tgt_ST, spec, name, batch_tokens=batch_tokens, dtype=dtype,
                    save_matrix=save_matrix, progress=progress, compile=compile, data=data, schedules_only=schedules_only,
                    split=split)


def _run(run_dir: Path, model, idx_ST, tgt_ST, spec: OracleSpec, name: str, *, batch_tokens, dtype, save_matrix,
         progress, compile, data, schedules_only=False, split="validation") -> str:
    if spec.context == "sequential":
        if int(os.environ.get("RANK", "0")) != 0:  # one process: the steps are sequential by nature
            return name
        # auto stays float32 here: each step's cache update runs the model's own forward, whose stream
        # a bfloat16 model would keep in bfloat16
        dtype = "float32" if dtype == "auto" else dtype
        run_sequential(engine_model(model, dtype), idx_ST, tgt_ST, spec, rundir.oracle_dir(run_dir, name),
                       progress=progress, meta={"name": name, "data": data or "validation split", "dtype": dtype},
                       schedules_only=schedules_only)
        return name
    summary = run_oracle(
        model, idx_ST, tgt_ST, spec, rundir.oracle_dir(run_dir, name), batch_tokens=batch_tokens, dtype=dtype,
        keep_matrix=save_matrix, progress=progress,
        compile={"on": True, "off": False, "auto": "auto", True: True, False: False}.get(compile, compile),
        meta={"name": name, "data": data or f"{split} split", "split": split, "dtype": dtype},
    )
    if summary is not None and spec.search == "beam":
        beam_gap(run_dir, spec, rundir.oracle_dir(run_dir, name))
    return name
