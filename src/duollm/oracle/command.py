"""``duollm oracle RUN ...``: the command-line entry to the oracle engine (DESIGN section 5).

Like every command module: ``add_arguments(parser)`` adds the flags, ``run_command(args)`` runs
it and returns the line the CLI prints last (here the output name). ``run_oracle_command(run, **flags)``
is the same as a function call; a library user builds an ``OracleSpec`` (``plan.build_spec``) and calls
``folder.oracle_of_run`` directly, as the study does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import rundir
from ..config import load_run_config
from ..model.routing import parse_routing
from ..routers.store import routing_policy
from ..runtime.distributed import resolve_device
from .context import CONTEXTS
from .folder import oracle_of_run
from .plan import build_spec

# flag dest -> keyword of run_oracle_command (kept in one place so the two cannot drift)
SPEC_KEYWORDS = (
    "budgets", "options", "skips", "skips_mode", "budget_mode", "context", "reference", "search", "beam_width",
    "patterns", "seed", "batch_tokens", "dtype", "compile", "schedules_only",
)
RUN_KEYWORDS = ("max_tokens", "data", "split", "name", "device")
KEYWORDS = SPEC_KEYWORDS + RUN_KEYWORDS + ("save_matrix",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``duollm oracle RUN``."""
    a = parser.add_argument
    a("run")
    a("--budgets", default=None, help="budgets k (big layers per token): all (default), a range 0-12, or a list 4,6,8")
    a("--options", default=None, help="per-layer routes to search: SB (default), B_ (big or skip), SB_")
    a("--skips", type=int, default=None, help="number of skipped layers (the paper's skip study: --options B_ --skips 6)")
    a("--skips-mode", dest="skips_mode", choices=("exact", "max"), default=None,
      help="--skips counts exactly (default) or at most")
    a("--budget-mode", dest="budget_mode", choices=("exact", "max"), default=None,
      help="budget k means exactly k big layers (default, the paper) or at most k")
    a("--context", default=None, help="shared (the pattern routes the whole sequence; default), frozen "
      "(context tokens keep --reference, only the scored token's routes vary) or sequential (left to right, "
      "each token chooses given the earlier tokens' own choices; one pass per budget, plus falling/rising)")
    a("--reference", default=None, help="frozen context routing: B (all big, default), S (all small), a pattern, "
      "or router:NAME (a trained router of the run)")
    a("--max-tokens", dest="max_tokens", default=None, help="cap on evaluation tokens: N >= 1, or all "
      "(default eval.max_tokens)")
    a("--data", default=None, help="data spec to score instead of the run's validation split")
    a("--split", default=None, choices=("validation", "train"),
      help="the run's split to score (validation, the default; train: oracle tables imitation routers learn from, "
           "named <name>-train; reports and findings use validation oracles only)")
    a("--search", default=None, help="exhaustive (default), beam, or greedy (beam of width 1)")
    a("--beam-width", dest="beam_width", type=int, default=None, help="prefixes kept per budget cell (default 4)")
    a("--name", default=None, help="output folder name under RUN/oracle/ (default from the options, e.g. SB-shared)")
    a("--batch-tokens", dest="batch_tokens", type=int, default=None,
      help="tokens per chunk: the matrix-product size, the memory bound and the resume granularity (default 4096)")
    a("--dtype", default=None, choices=("auto", "float32", "bfloat16"),
      help="float32 (default: exact, the same on every CPU), bfloat16 (the layers' products in bf16; stream, head "
           "and reductions float32) or auto (bfloat16 where the device has bf16 matrix units, else float32)")
    a("--patterns", default=None, help="explicit candidate patterns, comma-separated (replaces --options/--budgets)")
    a("--seed", type=int, default=None, help="seed of the 100 random patterns per budget (default 0)")
    a("--save-matrix", dest="save_matrix", action="store_true", default=None,
      help="also write loss_matrix.npy [patterns, tokens] (large; off by default)")
    a("--device", default=None, help="auto (CUDA when available; the default), cpu, cuda, cuda:N")
    a("--schedules-only", dest="schedules_only", action="store_true", default=None,
      help="sequential context: only the paper's constant, falling and rising schedules (no per-budget prediction)")
    a("--compile", default=None, choices=("auto", "on", "off"),
      help="fuse elementwise work with torch.compile (auto, the default: for large runs)")
    # every flag that is a choice of the OracleSpec defaults to None: the spec holds its one default


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


def run_oracle_command(run_dir: Path, *, progress: bool = True, save_matrix: bool = False, **flags) -> str:
    """``duollm oracle`` as a function: the flags (``KEYWORDS``, as strings or values) -> the output name.

    ``reference`` may name a trained router of the run (``router:NAME``), which routes the context tokens
    with hard decisions. Raises ValueError with a one-line message on bad input: budget outside 0..L,
    options not a subset of SB_, impossible constraints, unknown context or search, malformed reference
    pattern, missing or corrupt run."""
    unknown = set(flags) - set(KEYWORDS)
    if unknown:
        raise TypeError(f"run_oracle_command got unexpected arguments {sorted(unknown)}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    L = load_run_config(run_dir).model.n_layers
    spec_flags = {k: flags[k] for k in SPEC_KEYWORDS if k in flags}
    context, reference = CONTEXTS.get(spec_flags.get("context") or "shared"), spec_flags.get("reference")
    takes_reference = context is not None and context.reference
    if takes_reference and isinstance(reference, str) and parse_routing(reference, L).kind == "router":
        # a trained router of this run routes the context (hard decisions)
        spec_flags["reference"] = routing_policy(reference, L, root=run_dir,
                                                 device=resolve_device(flags.get("device") or "auto"))[1]
    spec = build_spec(L, keep_matrix=save_matrix or None, **spec_flags)
    run = {k: flags[k] for k in RUN_KEYWORDS if flags.get(k) is not None}
    return oracle_of_run(run_dir, spec, progress=progress, **run)
