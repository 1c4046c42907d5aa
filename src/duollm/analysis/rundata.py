"""Reading a run folder for analysis: which oracle is which, router evaluations, tokens.

Everything in ``duollm.analysis`` is a pure function of the run folder, read through ``rundir``
(where things are). This module tells the study's outputs apart by their contents, never by name:

    an oracle's summary.json (DESIGN 5)  options SB, no skip constraint  -> budget sweep, per context
                                         options B_, an exact skip count -> the skip study
    a router's evaluation                ``rundir.router_eval``: the study's re-evaluation on the
                                         oracle's tokens when present, else its eval.json

Array name legend: J budgets, R routes (skip, small, big), L layers, T positions, N tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .. import rundir
from ..checkpoint import trained_step
from ..config import RunConfig, load_run_config
from ..data.cache import load_tokenizer
from ..io import read_json, read_table


@dataclass(frozen=True)
class Oracle:
    """One finished oracle run: ``RUN/oracle/<name>``."""

    folder: Path
    summary: dict

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def context(self) -> str:
        return self.summary.get("context", "shared")

    @property
    def label(self) -> str:
        """How figures and tables name it: the context, with the frozen reference."""
        ref = self.summary.get("reference")
        return f"{self.context} (context {ref})" if self.context == "frozen" and ref else self.context

    @property
    def budgets(self) -> list[dict]:
        return self.summary.get("budgets", [])

    @property
    def ks(self) -> list[int]:
        return [int(b["k"]) for b in self.budgets]

    def budget(self, k: int) -> dict | None:
        return next((b for b in self.budgets if int(b["k"]) == k), None)

    def usage_JRLT(self) -> np.ndarray | None:
        path = self.folder / rundir.USAGE
        return np.load(path) if path.is_file() else None

    def per_token(self):
        """The per-token table (pyarrow Table) or None."""
        path = self.folder / rundir.PER_TOKEN
        return read_table(path) if path.is_file() else None

    def pattern_token_losses(self, pattern: str) -> np.ndarray | None:
        """One pattern's per-token losses, in ``per_token.parquet``'s row order, from the kept loss matrix
        (``loss_matrix.npy``; its rows follow ``patterns.parquet``); None without the matrix or the pattern."""
        matrix, patterns = self.folder / rundir.LOSS_MATRIX, self.folder / rundir.PATTERNS
        if not matrix.is_file() or not patterns.is_file():
            return None
        names = read_table(patterns, columns=["pattern"]).column("pattern").to_pylist()
        if pattern not in names:
            return None
        return np.array(np.load(matrix, mmap_mode="r")[names.index(pattern)], dtype=np.float64)

    def pattern_losses(self, candidates_only: bool = False) -> dict[str, float]:
        """Mean loss of every evaluated pattern (``patterns.parquet``). ``candidates_only``: the oracle's own
        candidates, without the baselines it evaluates besides them (all-big and all-small in a skip study)."""
        path = self.folder / rundir.PATTERNS
        if not path.is_file():
            return {}
        t = read_table(path, columns=["pattern", "mean_loss", "candidate"]).to_pydict()
        return {p: m for p, m, c in zip(t["pattern"], t["mean_loss"], t["candidate"]) if c or not candidates_only}


class RunData:
    """Lazy, read-only view of a run folder's study outputs."""

    def __init__(self, run: Path):
        self.run = Path(run)
        if not self.run.is_dir():
            raise ValueError(f"run folder {self.run} does not exist")

    @cached_property
    def config(self) -> RunConfig:
        return load_run_config(self.run)

    @property
    def n_layers(self) -> int:
        return self.config.model.n_layers

    @cached_property
    def oracles(self) -> list[Oracle]:
        return [Oracle(p, rundir.oracle_summary(p)) for p in rundir.oracle_folders(self.run)]

    def _plain(self, o: Oracle) -> bool:
        s = o.summary
        return (s.get("search", "exhaustive") == "exhaustive" and s.get("patterns") is None
                and s.get("budget_mode", "exact") == "exact" and s.get("split", "validation") == "validation")

    @cached_property
    def sweeps(self) -> dict[str, Oracle]:
        """Budget sweeps (options SB, every budget) by context policy, shared first. Where a context
        has several, the one ``duollm run`` writes wins (all budgets; frozen: all-big context tokens),
        then the first by name."""
        by_context: dict[str, list[Oracle]] = {}
        for o in self.oracles:
            s = o.summary
            if (self._plain(o) and s.get("options") == "SB" and s.get("skips") in (None, 0) and len(o.budgets) >= 2
                    and o.context != "sequential"):
                by_context.setdefault(o.context, []).append(o)
        return {ctx: min(found, key=lambda o: (o.summary.get("reference") not in (None, "B"), -len(o.budgets), o.name))
                for ctx, found in sorted(by_context.items(), key=lambda kv: (kv[0] != "shared", kv[0]))}

    @property
    def primary(self) -> Oracle | None:
        """The sweep the token analysis and the routers use: shared if present (our reading of the paper)."""
        return next(iter(self.sweeps.values()), None)

    @cached_property
    def sequential(self) -> Oracle | None:
        """The sequential oracle (options SB) with the position-varying schedules, if run."""
        found = [o for o in self.oracles if o.context == "sequential" and o.summary.get("options") == "SB"
                 and o.summary.get("position_budgets")]
        return min(found, key=lambda o: (o.name != "SB-sequential", o.name)) if found else None

    @cached_property
    def skip_study(self) -> Oracle | None:
        """Big-or-skip with an exact skip count (paper section 4.3); the shared context preferred."""
        found = [o for o in self.oracles if self._plain(o) and o.summary.get("options") == "B_"
                 and o.summary.get("skips") and o.summary.get("skips_mode", "exact") == "exact"]
        found.sort(key=lambda o: (o.context != "shared", o.name))
        return found[0] if found else None

    @cached_property
    def routers(self) -> list[dict]:
        """Router evaluations (with ``name``), sorted by target then method; the study's
        re-evaluation on the oracle's tokens is preferred over ``eval.json``."""
        out = [{"name": name, **rundir.router_eval(self.run, name)} for name in rundir.router_names(self.run)]
        return sorted(out, key=lambda r: (float(r.get("target", 0)), str(r.get("method")), r["name"]))

    @cached_property
    def null(self) -> RunData | None:
        """The null control's outputs (``RUN/null``: the model at initialisation, the same tokens), if run."""
        folder = rundir.null_dir(self.run)
        return RunData(folder) if rundir.has_run(folder) else None

    @cached_property
    def data_meta(self) -> dict:
        path = rundir.data_meta(self.run)
        return read_json(path) if path.is_file() else {}

    @cached_property
    def final_metrics(self) -> dict:
        """The last value of every metric in ``metrics.jsonl`` (training loss, validation losses)."""
        path = rundir.metrics_path(self.run)
        out: dict = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    out.update(rec)
        return out

    @cached_property
    def bench(self) -> dict | None:
        """``duollm bench``'s wall-clock table, where it has been run on this run."""
        path = rundir.bench_path(self.run)
        return read_json(path) if path.is_file() else None

    @cached_property
    def tokenizer(self):
        try:
            return load_tokenizer(self.run)
        except ValueError:
            return None

    def token_text(self, ids) -> list[str]:
        """Readable text of each token id (``<id>`` when the run has no tokenizer)."""
        ids = [int(i) for i in ids]
        tok = self.tokenizer
        if tok is None:
            return [f"<{i}>" for i in ids]
        return tok.token_strings(ids)


def reference_budgets(n_layers: int) -> dict[str, int]:
    """The small, middle and large budgets the heatmaps and findings look at — the paper's own,
    L/3, L/2 and 2L/3 (4, 6 and 8 of 12; DESIGN 4.4a)."""
    small = max(1, round(n_layers / 3))
    return {"small": small, "middle": n_layers // 2, "large": max(small, round(2 * n_layers / 3))}


def early_exit_pattern(n_layers: int, skips: int) -> str:
    """What early exit chooses with ``skips`` skipped layers: run the first layers, skip the rest."""
    return "B" * (n_layers - skips) + "_" * skips


def inventory(run: Path) -> dict:
    """What a run folder holds (``duollm info RUN``): training progress and last validation losses,
    its oracles and routers with their headline numbers, and whether the report is current (written
    after every output it reads)."""
    rd = RunData(run)
    cfg, metrics = rd.config, rd.final_metrics
    oracles = [{"name": o.name, "context": o.context, "split": o.summary.get("split", "validation"),
                "options": o.summary.get("options"), "tokens": o.summary.get("tokens"), "budgets": o.ks,
                "complete": rundir.is_complete_oracle(o.folder)} for o in rd.oracles]
    routers = [{"name": r["name"], "method": r.get("method"), "target": r.get("target"), "tokens": r.get("tokens"),
                "ppl": r.get("ppl"), "big_fraction": r.get("big_fraction"),
                "recovered": ((r.get("oracle") or {}).get("recovered") or {}).get("value")} for r in rd.routers]
    results = rundir.report_results(run)
    inputs = [p for p in Path(run).glob("oracle/*/summary.json")] + [p for p in Path(run).glob("routers/*/eval.json")]
    inputs += [p for p in Path(run).glob("study/routers/*.json")] + [rundir.metrics_path(run), rundir.bench_path(run)]
    newest = max((p.stat().st_mtime for p in inputs if p.is_file()), default=0.0)
    report = "none" if not results.is_file() else "current" if results.stat().st_mtime >= newest else "stale"
    return {"trained_steps": trained_step(run), "train_steps": cfg.train.steps,
            "validation": {k: v for k, v in metrics.items() if k.startswith("val/")},
            "oracles": oracles, "routers": routers, "report": report,
            "null": rundir.has_run(rundir.null_dir(run)), "bench": rundir.bench_path(run).is_file(),
            "seeds": sorted(p.name for p in Path(run).glob("seeds/seed-*"))}
