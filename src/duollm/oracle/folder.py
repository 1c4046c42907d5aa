"""The oracle of a run folder: ``oracle_of_run(run, spec)`` scores the run's evaluation tokens with its
model under ``spec`` and writes ``RUN/oracle/<name>/``; returns ``<name>``.

What is computed and how is all in the ``OracleSpec`` (``plan.build_spec`` makes one from the command
line's strings); this module adds only the run folder: which tokens (the validation split, the training
split for imitation labels, or another text), the model's device, the writer lock, and the engine the
spec's context policy runs on (the tree engine, ``runner.run_oracle``, or the sequential one).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from .. import rundir
from ..checkpoint import load_model
from ..data.cache import eval_documents, eval_tokens
from ..data.corpus import parse_max_tokens
from ..io import atomic_write_json
from ..runtime.distributed import resolve_device
from .context import CONTEXTS
from .plan import OracleSpec
from .runner import engine_model, run_oracle
from .sequential import run_sequential


def oracle_of_run(run_dir: Path, spec: OracleSpec, *, name: str | None = None, data: str | None = None,
                  split: str = "validation", max_tokens=None, device: str = "auto", progress: bool = True) -> str:
    """Run the oracle of ``spec`` on a trained run and write ``RUN/oracle/<name>/``; return ``<name>``.

    Scores the same tokens as ``duollm eval`` (the validation split, ``eval.max_tokens``) unless
    ``data``/``split``/``max_tokens`` say otherwise. ``name``: the output folder (default from the spec,
    ``-train`` added for the training split). One-line ValueErrors on bad input, before anything is written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    max_tokens = parse_max_tokens(max_tokens)
    if name is not None and (not name or "/" in name or name.startswith(".")):
        raise ValueError(f"--name must be a plain folder name; got {name!r}")
    sequential = CONTEXTS[spec.context].engine == "sequential"
    if split != "validation" and (data is not None or sequential):
        raise ValueError("--split train scores the run's training split with the shared or frozen context; "
                         "drop --data / --context sequential")
    name = name or spec.name() + ("" if split == "validation" else f"-{split}")
    model, cfg = load_model(run_dir, resolve_device(device))
    idx_ST, tgt_ST = eval_tokens(run_dir, cfg, spec=data, max_tokens=max_tokens, split=split)
    # the document each sequence starts in: the unit intervals resample (windows of one document together)
    documents = eval_documents(run_dir, cfg, spec=data, max_tokens=max_tokens, split=split)
    out_dir = rundir.oracle_dir(run_dir, name)
    with rundir.writing(run_dir):
        if sequential:
            if int(os.environ.get("RANK", "0")) == 0:  # one process: the steps are sequential by nature
                # auto stays float32 here: each step's cache update runs the model's own forward, whose stream
                # a bfloat16 model would keep in bfloat16
                dtype = "float32" if spec.dtype == "auto" else spec.dtype
                run_sequential(engine_model(model, dtype), idx_ST, tgt_ST, spec, out_dir, progress=progress,
                               meta={"name": name, "data": data or "validation split", "dtype": dtype,
                                     "documents": documents},
                               schedules_only=spec.schedules_only)
            return name
        summary = run_oracle(model, idx_ST, tgt_ST, spec, out_dir, progress=progress,
                             meta={"name": name, "data": data or f"{split} split", "split": split, "dtype": spec.dtype,
                                   "documents": documents})
        if summary is not None and spec.search == "beam":
            beam_gap(run_dir, spec, out_dir)
    return name


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
