"""The Duo-LLM study end to end: ``duollm run`` (DESIGN 2, 4.4, 5, 6; issue 5).

``run_study(config, data, out)`` runs every stage of the paper on one model and writes the
report:

    train                 stage 1, random-routing pretraining (reused when finished, resumed when not)
    oracle <context>      stage 2, every budget k = 0..L over big/small, per context policy
                          (``shared``, and ``frozen`` with all-big context tokens); the same pass gives
                          fixed@k, best of 100 random, random@k and the position-varying budgets
    skip study            big-or-skip with s = L/2 skipped layers (the paper: 6 of 12)
    router <method> k     stage 3, one router per method and budget (the paper: 4, 6, 8 of 12)
    report                token difficulty, figures, findings: RUN/report/ (analysis/)

Resuming: a stage is complete when its outputs are (an oracle's ``run.json``, written after its
summary, with no partial chunks left; a router's evaluation), and it then skips itself. After
each stage a marker ``RUN/study/stages/<stage>.json`` records the inputs the outputs came from
(checkpoint step, tokens, method, ...): outputs made from other inputs are recomputed, outputs
made outside the study (``duollm oracle`` by hand) with matching tokens are adopted. An
interrupted oracle or router continues from its own last chunk or checkpoint.

Which tokens: the oracle's cost grows with 2^(L+1) layer evaluations per token, so the study
scores ``study.tokens`` validation tokens (0: ``eval.max_tokens``). Routers are evaluated on
the same tokens as the oracle (``RUN/study/routers/<name>.json`` when ``eval.max_tokens``
differs), so every number in the report compares like with like.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

from .config import RunConfig, load_config, resume_conflict
from .io import atomic_write_json

CONTEXTS = ("shared", "frozen")


# ----------------------------------------------------------------------------- the study's settings


def parse_list(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def router_budgets(cfg: RunConfig) -> list[int]:
    """Budgets k of the routers: each target fraction of L rounded (1/3, 1/2, 2/3 of 12 -> 4, 6, 8)."""
    L = cfg.model.n_layers
    ks = []
    for item in parse_list(cfg.study.router_targets):
        try:
            f = Fraction(item)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"study.router_targets: {item!r} is not a fraction (e.g. 1/3 or 0.5)") from None
        if not 0 < f <= 1:
            raise ValueError(f"study.router_targets: {item} must be a fraction of the layers in (0, 1]")
        k = max(1, round(f * L))
        if k not in ks:
            ks.append(k)
    return sorted(ks)


def router_methods(cfg: RunConfig) -> list[str]:
    methods = parse_list(cfg.study.router_methods)
    try:
        from .routers import METHODS
    except ImportError:  # routers not installed: the study runs without them
        return []
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"study.router_methods: unknown method {bad[0]!r} (known: {', '.join(METHODS)})")
    return methods


def skip_count(cfg: RunConfig) -> int:
    """Skipped layers in the skip study: round(skip_fraction * L), the paper's 6 of 12 (0: no skip study)."""
    return round(cfg.study.skip_fraction * cfg.model.n_layers)


def validate_study(cfg: RunConfig) -> None:
    """One-line ValueErrors for a bad ``study`` section (called by ``config.validate``)."""
    st, L = cfg.study, cfg.model.n_layers
    contexts = parse_list(st.contexts)
    if not contexts or any(c not in CONTEXTS for c in contexts) or len(set(contexts)) != len(contexts):
        raise ValueError(f"study.contexts must list shared and/or frozen, comma-separated; got {st.contexts!r}")
    if "frozen" in contexts:
        from .oracle.plan import normalize_reference

        normalize_reference(st.reference, L)
    if not 0.0 <= st.skip_fraction < 1.0:
        raise ValueError(f"study.skip_fraction must be in [0, 1); got {st.skip_fraction}")
    if st.skip_fraction and not 0 < skip_count(cfg) < L:
        raise ValueError(f"study.skip_fraction={st.skip_fraction} gives {skip_count(cfg)} of {L} layers skipped")
    for name in ("router_steps", "batch_tokens"):
        if getattr(st, name) <= 0:
            raise ValueError(f"study.{name} must be positive; got {getattr(st, name)}")
    if st.tokens < 0:
        raise ValueError(f"study.tokens must be >= 0 (0: eval.max_tokens); got {st.tokens}")
    router_budgets(cfg)
    router_methods(cfg)


def resolve_config(config: str | None, data: str | None, out: Path, overrides=()) -> RunConfig:
    """The config of the study in ``out``: a new run's from the preset or file and the overrides;
    for a folder that already holds a run, the run's own config with the overrides.

    Rerunning the same command continues the run. For an existing run, ``config`` contributes
    its ``study`` section; anything a resume may not change (``config.resume_conflict``) is
    refused (more ``train.steps`` continue the training)."""
    overrides = list(overrides) + ([f"data.spec={data}"] if data else [])
    saved = Path(out) / "config.yaml"
    if not saved.is_file():
        return load_config(config, overrides)
    trained = load_config(str(saved))
    cfg = load_config(str(saved), overrides)
    want = load_config(config, overrides) if config is not None else None
    for other in (cfg, want):
        conflict = None if other is None else resume_conflict(trained, other)
        if conflict:
            raise ValueError(f"{out} already holds another run: {conflict}; choose another --out, "
                             f"or drop --config/--data to continue it")
    if want is not None:
        cfg.study = want.study
    return cfg


# ----------------------------------------------------------------------------- cost model (for the ETA)


def _prefixes(L: int, skips: int | None) -> list[int]:
    """Distinct pattern prefixes at each depth 1..L of the oracle's tree: 2^d over big/small; with
    big-or-skip and exactly s skips, the prefixes that can still end with s skips."""
    if skips is None:
        return [2**d for d in range(1, L + 1)]
    return [sum(math.comb(d, j) for j in range(max(0, d - (L - skips)), min(d, skips) + 1)) for d in range(1, L + 1)]


def costs(cfg: RunConfig, tokens: int) -> dict[str, float]:
    """Forward-equivalent FLOPs of each kind of stage (backward = 2 forwards), for the ETA only."""
    from .routing import FlopModel

    fm = FlopModel.from_config(cfg.model, cfg.train.seq_len)
    L = cfg.model.n_layers
    big, small = fm.all_big(), fm.pattern([1] * L)
    layer = fm.attention + (fm.ffn[1] + fm.ffn[2]) / 2
    t = cfg.train
    s = skip_count(cfg)
    return {
        "train": 3 * t.steps * t.batch_size * t.seq_len * (big + small) / 2,
        "oracle": tokens * (sum(_prefixes(L, None)) * layer + 2**L * fm.head),
        "skip": tokens * (sum(_prefixes(L, s)) * (fm.attention + fm.ffn[2] / 2) + math.comb(L, s) * fm.head) if s else 0.0,
        # the soft mix runs both FFNs; batch size and length from routers.router_train_defaults
        "router": 3 * cfg.study.router_steps * 16 * t.seq_len * (big + small - L * fm.attention) + 4 * tokens * big,
    }


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def eta_seconds(remaining: list, rates: dict[str, list[float]]) -> float | None:
    """Seconds left: each remaining stage's FLOPs at the rate measured on its kind in this call,
    or at the pooled rate of the kinds measured so far (None before any stage was computed)."""
    pooled = [sum(v[0] for v in rates.values()), sum(v[1] for v in rates.values())]
    if pooled[1] <= 0:
        return None
    total = 0.0
    for stage in remaining:
        sec, flops = rates.get(stage.kind, pooled)
        total += stage.cost * (sec / flops if flops > 0 else pooled[0] / pooled[1])
    return total


# ----------------------------------------------------------------------------- stages


@dataclass
class Stage:
    id: str  # file-name-safe, also the marker's name
    title: str
    cost: float  # FLOPs, for the ETA
    kind: str  # train | oracle | router | report: stages of one kind share a measured FLOP rate
    key: Callable[[], dict]  # the inputs the outputs depend on (evaluated when the stage is reached)
    complete: Callable[[], bool]  # outputs present and whole
    run: Callable[[bool], None]  # argument: the outputs present came from other inputs (clean up first)


class Study:
    """The stages of one run folder; see the module docstring."""

    def __init__(self, cfg: RunConfig, out: Path, log: Callable[[str], None] = print):
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.L = cfg.model.n_layers
        self.contexts = parse_list(cfg.study.contexts)
        self.skips = skip_count(cfg)
        self.router_ks = router_budgets(cfg)
        self.methods = router_methods(cfg)
        self._tokens = None

    # -- shared facts -------------------------------------------------------------------
    def trained_step(self) -> int:
        from .checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(self.out)
        if ckpt is None or not (self.out / "config.yaml").is_file():
            return 0
        return int(ckpt.name.split("-")[-1])  # checkpoint folders are step-0000600 (checkpoint.py)

    def tokens(self) -> int:
        """Evaluation tokens every oracle and router scores (whole sequences, capped)."""
        if self._tokens is None:
            from .data import eval_tokens

            idx_ST, _ = eval_tokens(self.out, self.cfg, max_tokens=self.requested_tokens())
            self._tokens = int(idx_ST.numel())
        return self._tokens

    def requested_tokens(self) -> int:
        return self.cfg.study.tokens or self.cfg.eval.max_tokens

    def oracle_name(self, context: str, options: str = "SB", skips: int | None = None) -> str:
        from .oracle.command import build_spec

        return build_spec(self.L, budgets="all", options=options, skips=skips, context=context,
                          reference=self.cfg.study.reference if context == "frozen" else None).name()

    @property
    def primary_context(self) -> str:
        return self.contexts[0]

    # -- the stages ---------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        c = costs(self.cfg, self.requested_tokens())
        out = [Stage("train", f"training the {self.cfg.preset} preset on {self.cfg.data.spec}", c["train"], "train",
                     lambda: {"steps": self.cfg.train.steps}, lambda: self.trained_step() >= self.cfg.train.steps,
                     lambda stale: self.train())]
        for ctx in self.contexts:
            ref = f" (context tokens {self.cfg.study.reference})" if ctx == "frozen" else ""
            out.append(self.oracle_stage(f"oracle over every budget, {ctx} context{ref}", c["oracle"],
                                         context=ctx))
        if self.skips:
            out.append(self.oracle_stage(f"skip study: big or skip, {self.skips} of {self.L} layers skipped", c["skip"],
                                         context=self.primary_context, options="B_", skips=self.skips))
        for k in self.router_ks:
            for method in self.methods:
                out.append(self.router_stage(method, k, c["router"]))
        out.append(Stage("report", "difficulty, figures, findings, report", 0.0, "report", lambda: {}, lambda: False,
                         lambda stale: self.report()))
        return out

    def train(self) -> None:
        from .train import pretrain

        pretrain(self.cfg, self.out, resume=(self.out / "config.yaml").is_file(), log=self.log)

    def oracle_stage(self, title: str, cost: float, *, context: str, options: str = "SB", skips: int | None = None) -> Stage:
        from .analysis.rundata import is_complete_oracle

        name = self.oracle_name(context, options, skips)
        folder = self.out / "oracle" / name

        def complete() -> bool:
            if not is_complete_oracle(folder):
                return False
            return json.loads((folder / "summary.json").read_text()).get("tokens") == self.tokens()

        def run(stale: bool) -> None:
            from .oracle.command import run_oracle_command

            run_oracle_command(self.out, budgets="all", options=options, skips=skips, context=context,
                               reference=self.cfg.study.reference if context == "frozen" else None,
                               max_tokens=self.requested_tokens(), name=name, batch_tokens=self.cfg.study.batch_tokens)

        return Stage(f"oracle-{name}", title, cost, "oracle",
                     lambda: {"step": self.trained_step(), "tokens": self.tokens(), "name": name}, complete, run)

    def router_stage(self, method: str, k: int, cost: float) -> Stage:
        target = k / self.L
        name = f"{method}-{target:.2f}"  # routers.RouterConfig.name for options SB
        folder = self.out / "routers" / name
        study_eval = self.out / "study" / "routers" / f"{name}.json"

        def eval_tokens_of(path: Path):
            return json.loads(path.read_text()).get("tokens") if path.is_file() else None

        def complete() -> bool:  # evaluated on the oracle's tokens, by the router command or by the study
            if eval_tokens_of(folder / "eval.json") == self.tokens():
                return not study_eval.exists()
            return (folder / "eval.json").is_file() and eval_tokens_of(study_eval) == self.tokens()

        def run(stale: bool) -> None:
            from .checkpoint import latest_checkpoint
            from .routers import run_router_command

            if stale:  # trained by an earlier study on another model or tokens: start over
                shutil.rmtree(folder, ignore_errors=True)
            if not (folder / "eval.json").is_file():
                run_router_command(self.out, target=target, method=method, steps=self.cfg.study.router_steps,
                                   oracle=self.oracle_name(self.primary_context), log=self.log,
                                   resume=latest_checkpoint(folder) is not None, set=self.router_sets())
            if eval_tokens_of(folder / "eval.json") != self.tokens():
                self.evaluate_router_on_study_tokens(name, k)
            elif study_eval.is_file():
                study_eval.unlink()

        key = lambda: {"step": self.trained_step(), "tokens": self.tokens(), "steps": self.cfg.study.router_steps,  # noqa: E731
                       "oracle": self.oracle_name(self.primary_context)}
        return Stage(f"router-{name}", f"router {method} at k={k} of {self.L} (target {target:.2f})", cost, "router", key,
                     complete, run)

    def router_sets(self) -> list[str]:
        """Router config overrides: budget calibration (where the router module has it) measures on as
        many training tokens as the study evaluates, which keeps its cost at the study's scale."""
        from dataclasses import fields

        from .routers import RouterConfig

        have = {f.name for f in fields(RouterConfig)}
        return [f"calibration_tokens={self.requested_tokens()}"] if "calibration_tokens" in have else []

    def evaluate_router_on_study_tokens(self, name: str, k: int) -> None:
        """The router's evaluation (routers.evaluate_router) on the oracle's tokens."""
        from .checkpoint import load_model
        from .data import eval_tokens
        from .routers import evaluate_router, load_oracle_table, load_router_folder
        from .train import resolve_device

        device = resolve_device(self.cfg.train.device)
        model, cfg = load_model(self.out, device)
        router, rcfg = load_router_folder(self.out / "routers" / name, device)
        idx_ST, tgt_ST = eval_tokens(self.out, cfg, max_tokens=self.requested_tokens())
        oracle = load_oracle_table(self.out, self.oracle_name(self.primary_context), k, idx_ST, tgt_ST, rcfg.options)
        result = evaluate_router(model, router, idx_ST, tgt_ST, rcfg, oracle)
        atomic_write_json(self.out / "study" / "routers" / f"{name}.json", result)

    def report(self) -> None:
        from .analysis.report import write_report

        write_report(self.out)

    # -- running ------------------------------------------------------------------------
    def marker(self, stage: Stage) -> Path:
        return self.out / "study" / "stages" / f"{stage.id}.json"

    def run(self) -> list[dict]:
        """Run every stage not yet complete; returns what each stage did (id, seconds, skipped)."""
        stages = self.stages()
        n = len(stages)
        t0 = time.time()
        rates: dict[str, list[float]] = {}  # kind -> [seconds, FLOPs] of the stages computed in this call
        done = []
        for i, stage in enumerate(stages, 1):
            elapsed = time.time() - t0
            eta = eta_seconds(stages[i - 1:], rates)
            eta = f", ETA {_fmt_s(eta)}" if eta is not None else ""
            prefix = f"[{i}/{n}]"
            marker = self.marker(stage)
            recorded = json.loads(marker.read_text()) if marker.is_file() else None
            key = stage.key()
            # training is never "stale": more steps continue it, and a finished run is what the other stages use
            stale = stage.kind != "train" and recorded is not None and recorded.get("key") != key
            if stage.complete() and not stale:
                self.log(f"{prefix} {stage.title}: already done, skipped (elapsed {_fmt_s(elapsed)})")
                if recorded is None:
                    atomic_write_json(marker, {"key": key, "seconds": None, "adopted": True})
                done.append({"id": stage.id, "skipped": True, "seconds": 0.0})
                continue
            self.log(f"{prefix} {stage.title}{' (outputs from other inputs: redone)' if stale else ''} "
                     f"(elapsed {_fmt_s(elapsed)}{eta})")
            start = time.time()
            stage.run(stale)
            seconds = time.time() - start
            atomic_write_json(marker, {"key": stage.key(), "seconds": round(seconds, 3)})
            rates.setdefault(stage.kind, [0.0, 0.0])
            rates[stage.kind][0] += seconds
            rates[stage.kind][1] += stage.cost
            done.append({"id": stage.id, "skipped": False, "seconds": seconds})
            self.log(f"{' ' * len(prefix)} done in {_fmt_s(seconds)}")
        return done


# ----------------------------------------------------------------------------- the summary printed at the end


def results_table(out: Path) -> str:
    """A short text table of the report's numbers (from ``RUN/report/results.json``)."""
    res = json.loads((Path(out) / "report" / "results.json").read_text())
    f = lambda x, nd=2: "—" if x is None else f"{x:.{nd}f}"  # noqa: E731
    lines = []
    sweeps = res["oracle"]  # the primary context first
    if sweeps:
        first = sweeps[0]
        head = f"{'k':>3} " + " ".join(f"{'oracle ' + o['context']:>15}" for o in sweeps) + f" {'fixed':>9} {'best100':>9} {'random':>9}"
        lines.append(head)
        by_ctx = [{b["k"]: b for b in o["budgets"]} for o in sweeps]
        for b in first["budgets"]:
            k = b["k"]
            lines.append(f"{k:>3} " + " ".join(f"{f(d.get(k, {}).get('oracle_ppl')):>15}" for d in by_ctx)
                         + f" {f(b['fixed_ppl']):>9} {f(b['best_of_100_ppl']):>9} {f(b['random_mean_ppl']):>9}")
        lines.append(f"all-big {f(first['all_big_ppl'])}, all-small {f(first['all_small_ppl'])} "
                     f"({first['tokens']:,} tokens; fixed, best of 100 and random: {first['context']} context)")
    for r in res["routers"]:
        lines.append(f"router {r['name']:<24} ppl {f(r['ppl'])}  big {f(r['big_fraction'], 3)}  "
                     f"oracle@{r['k']} {f(r['oracle_ppl'])}  fixed {f(r['fixed_ppl'])}  layers {r['layer_profile']}")
    for x in res["findings"]:
        mark = {True: "yes", False: "no ", None: " - "}[x["reproduced"]]
        ctx = f" [{x['context']}]" if x["context"] else ""
        lines.append(f"  {mark}  {x['claim']}{ctx}")
    n = res["reproduced"]
    lines.append(f"{n['reproduced']} of {n['tested']} tested findings reproduced")
    return "\n".join(lines)


def run_study(config: str | None, data: str | None, out: Path, overrides=(), log: Callable[[str], None] = print) -> Path:
    """``duollm run``: the whole study into ``out``; returns the report's ``index.html``.

    ``config``: a preset or YAML file (default ``cpu``; for an existing run folder, its own
    config); ``data``: a data spec; ``overrides``: ``key=value`` strings (``study.*`` included).
    Rerunning after an interruption continues where it stopped."""
    from .rundir import writing
    from .train import check_run_folder, resolve_device

    out = Path(out)
    cfg = resolve_config(config, data, out, overrides)
    resolve_device(cfg.train.device)
    check_run_folder(cfg, out, resume=(out / "config.yaml").is_file())
    study = Study(cfg, out, log)
    t0 = time.time()
    with writing(out, create=True):  # one writer for the whole study; its stages take the same lock again
        study.run()
    log(results_table(out))
    log(f"study finished in {_fmt_s(time.time() - t0)}; report: {out / 'report' / 'index.html'}")
    return out / "report" / "index.html"
