"""The Duo-LLM study end to end: ``duollm run`` (DESIGN 2, 4.4, 5, 6; issue 5).

``run_study(config, data, out)`` runs every stage of the paper on one model and writes the
report. Each stage calls the library, as a user's script would: ``train.loop.pretrain``,
``oracle.folder.oracle_of_run`` with an ``OracleSpec`` (``Study.oracle_spec``), ``routers.command.train_router``
with a ``RouterConfig`` (``Study.router_config``); the study's own choices (its tokens, float32 oracles, the
routers' steps and batch) are the settings of ``RunConfig.study`` (``settings.py``), passed explicitly.

    train                 stage 1, random-routing pretraining (reused when finished, resumed when not)
    oracle <context>      stage 2, every budget k = 0..L over big/small, per context policy
                          (``shared``; ``frozen`` with all-big context tokens on request); the same pass
                          gives fixed@k, best of 100 random, random@k and the position-varying budgets
    sequential oracle     the position-varying budgets where they are not a convexity identity: each
                          token chooses given its predecessors' own choices (oracle/sequential.py)
    null control          RUN/null: the model at initialisation, its oracle and the paper's router at
                          k = L/2: the null of the findings on what routers learn (DESIGN 4.4a; the
                          oracle findings have nulls of their own: analysis/findings.py)
    skip study            big-or-skip with s = L/2 skipped layers (the paper: 6 of 12)
    router <method> k     stage 3, one router per method and budget (the paper: 4, 6, 8 of 12)
    stage 1               ``study.stage1``: the paper's Fig. 8, Duo vs FLOP-matched dense models and the
                          big-first ablation, RUN/stage1/ (stage1.py)
    seed <s>              ``study.seeds`` > 1: the whole study again with training seed s in
                          RUN/seeds/seed-<s>/ (no null of its own: the findings use RUN/null)
    scale <d>x<m>         ``study.widths`` / ``study.train_tokens``: the whole study again at width d and m x
                          the training steps in RUN/scale/d<d>-x<m>/, with its own null control (scale.py)
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

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import rundir
from ..analysis.findings import FINDINGS
from ..analysis.report import headline, smoke_banner, write_report
from ..checkpoint import latest_checkpoint, load_model, trained_step
from ..config import RunConfig, load_config, parse_list, resume_conflict
from ..data.cache import eval_tokens
from ..io import atomic_write_json, read_json
from ..oracle.context import CONTEXTS
from ..oracle.folder import oracle_of_run
from ..oracle.plan import OracleSpec, build_spec
from ..oracle.reductions import default_schedules
from ..routers.command import label_source, train_router
from ..routers.config import RouterConfig, resolve_router_config
from ..routers.evaluate import evaluate_router
from ..routers.labels import load_oracle_table
from ..routers.methods import METHODS
from ..routers.store import load_router_folder
from ..rundir import ROUTER_EVAL
from ..runtime import threads
from ..runtime.distributed import resolve_device
from ..runtime.watchdog import watchdog
from ..train.loop import check_run_folder, pretrain
from ..train.tracking import publish_results
from . import scale, stage1
from .eta import costs, eta_seconds, fmt_duration
from .folders import make_null_run
from .settings import router_budgets, router_methods, router_mixtures, skip_count, validate_study


def resolve_config(config: str | None, data: str | None, out: Path, overrides=()) -> RunConfig:
    """The config of the study in ``out``: a new run's from the preset or file and the overrides;
    for a folder that already holds a run, the run's own config with the overrides.

    Rerunning the same command continues the run. For an existing run, ``config`` contributes
    its ``study`` section; anything a resume may not change (``config.resume_conflict``) is
    refused (more ``train.steps`` continue the training)."""
    overrides = list(overrides) + ([f"data.spec={data}"] if data else [])
    saved = rundir.config_path(out)
    if not saved.is_file():
        cfg = load_config(config, overrides)
        validate_study(cfg)
        return cfg
    trained = load_config(str(saved), saved=True)
    cfg = load_config(str(saved), overrides, saved=True)
    want = load_config(config, overrides) if config is not None else None
    for other in (cfg, want):
        conflict = None if other is None else resume_conflict(trained, other)
        if conflict:
            raise ValueError(f"{out} already holds another run: {conflict}; choose another --out, "
                             f"or drop --config/--data to continue it")
    if want is not None:
        cfg.study = want.study
    validate_study(cfg)
    return cfg


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
        return trained_step(self.out)

    def tokens(self) -> int:
        """Evaluation tokens every oracle and router scores (whole sequences, capped)."""
        if self._tokens is None:
            idx_ST, _ = eval_tokens(self.out, self.cfg, max_tokens=self.requested_tokens())
            self._tokens = int(idx_ST.numel())
        return self._tokens

    def requested_tokens(self) -> int:
        return self.cfg.study.tokens or self.cfg.eval.max_tokens

    def oracle_spec(self, context: str, options: str = "SB", skips: int | None = None, budgets: str = "all",
                    schedules_only: bool = False) -> OracleSpec:
        """The spec of one of the study's oracles; the engine options are the study's settings (``study.dtype``
        is float32 by default: a verdict must not depend on the CPU it ran on, config.StudyConfig). The tree
        engine's sweeps keep their [patterns, tokens] loss matrix (``rundir.LOSS_MATRIX``): any later null or
        out-of-sample baseline is then a read of it, not another pass (float32: 4096 x 2048 x 4 bytes = 32 MiB for
        the cpu preset's sweep, 7 MiB for its skip study); the sequential engine has no such matrix."""
        return build_spec(self.L, budgets=budgets, options=options, skips=skips, context=context,
                          reference=self.cfg.study.reference if CONTEXTS[context].reference else None,
                          dtype=self.cfg.study.dtype, batch_tokens=self.cfg.study.batch_tokens,
                          schedules_only=schedules_only, keep_matrix=CONTEXTS[context].engine != "sequential")

    def oracle_name(self, context: str, options: str = "SB", skips: int | None = None) -> str:
        return self.oracle_spec(context, options, skips).name()

    def sequential_budgets(self) -> str:
        """The budgets of the paper's schedules (falling, rising, constant: 2..6 of 12)."""
        ks = [k for _, a, b in default_schedules(self.L) for k in (a, b)]
        return f"{min(ks)}-{max(ks)}"

    def seeds(self) -> list[int]:
        """The training seeds of the extra language models (``study.seeds`` - 1 of them)."""
        return [self.cfg.train.seed + i for i in range(1, self.cfg.study.seeds)]

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
            ref = f" (context tokens {self.cfg.study.reference})" if CONTEXTS[ctx].reference else ""
            out.append(self.oracle_stage(f"oracle over every budget, {ctx} context{ref}", c["oracle"],
                                         context=ctx))
        seq = self.cfg.study.sequential
        if seq:
            out.append(self.oracle_stage(f"sequential oracle: budgets {self.sequential_budgets()} and the position "
                                         f"schedules", c["sequential"], context="sequential"))
        if self.skips:
            out.append(self.oracle_stage(f"skip study: big or skip, {self.skips} of {self.L} layers skipped", c["skip"],
                                         context=self.primary_context, options="B_", skips=self.skips))
        if any(METHODS[m].data == "labels" for m in self.methods) and self.router_ks:
            # imitation's labels come from training tokens (issue 13, item 2)
            out.append(self.train_labels_stage(c["oracle"] * len(self.router_ks) / (self.L + 1)))
        for k in self.router_ks:
            for method in self.methods:
                out.append(self.router_stage(method, k / self.L, c["router"]))
        for target, options, skip in router_mixtures(self.cfg):  # the paper's mixtures, skip included (figs. 7, 9)
            out.append(self.router_stage("budget", target, c["router"], options=options, skip_target=skip))
        # the null control (DESIGN 4.4a) where the untrained model is a finding's null: what routers learn. The
        # paper's router (section 3.3) at the middle budget on the model at initialisation, evaluated against that
        # model's oracle on the same tokens; no other null stage (the oracle findings have nulls of their own)
        uses_null = any(f.uses_null for f in FINDINGS.values())
        if self.cfg.study.null and uses_null and "budget" in self.methods and self.router_ks:
            null = rundir.null_dir(self.out)
            out.append(Stage("null", "null control: the model at initialisation (step 0, the training seed)", 0.0,
                             "null", lambda: {"seed": self.cfg.train.seed}, lambda: trained_step(null) == 0
                             and rundir.has_run(null) and latest_checkpoint(null) is not None,
                             lambda stale: make_null_run(self.out)))
            out.append(self.oracle_stage(f"null control: oracle over every budget, {self.primary_context} context "
                                         "(the null router's reference)", c["oracle"], context=self.primary_context, run=null))
            k = self.router_ks[len(self.router_ks) // 2]
            out.append(self.router_stage("budget", k / self.L, c["router"], run=null))
        if self.cfg.study.stage1:  # the paper's Fig. 8: Duo vs FLOP-matched dense models (stage1.py)
            out += self.stage1_stages(c["train"] / self.cfg.train.steps)
        for seed in self.seeds():
            out.append(self.seed_stage(seed, sum(c.values())))
        own = scale.own_size(self.cfg)
        for size in scale.sizes(self.cfg):
            if size != own:  # FLOPs grow about as width squared times steps
                out.append(self.scale_stage(size, sum(c.values()) * (size.d_model / own.d_model) ** 2 * size.steps_multiple))
        out.append(Stage("report", "difficulty, figures, findings, report", 0.0, "report", lambda: {}, lambda: False,
                         lambda stale: self.report()))
        return out

    def train(self) -> None:
        pretrain(self.cfg, self.out, resume=rundir.has_run(self.out), log=self.log)

    def oracle_stage(self, title: str, cost: float, *, context: str, options: str = "SB", skips: int | None = None,
                     run: Path | None = None) -> Stage:
        """An oracle sweep of the run's model (or of the run folder ``run``: the null control)."""
        run = run or self.out
        name = self.oracle_name(context, options, skips)
        folder = rundir.oracle_dir(run, name)

        def complete() -> bool:
            return rundir.is_complete_oracle(folder) and rundir.oracle_summary(folder).get("tokens") == self.tokens()

        # the null control's sequential oracle needs the position schedules only
        sequential = CONTEXTS[context].engine == "sequential"
        spec = self.oracle_spec(context, options, skips, budgets=self.sequential_budgets() if sequential else "all",
                                schedules_only=sequential and run != self.out)

        def go(stale: bool) -> None:
            oracle_of_run(run, spec, name=name, max_tokens=self.requested_tokens())

        prefix = "" if run == self.out else f"{run.name}-"
        return Stage(f"{prefix}oracle-{name}", title, cost, "oracle",
                     lambda: {"step": trained_step(run), "tokens": self.tokens(), "name": name}, complete, go)

    def train_labels_stage(self, cost: float) -> Stage:
        """The oracle on as many *training* tokens at the routers' budgets: imitation learns from it
        (``duollm oracle --split train``), so every validation token it is evaluated on stays unseen."""
        budgets = ",".join(map(str, self.router_ks))
        name = self.oracle_name(self.primary_context) + "-train"
        folder = rundir.oracle_dir(self.out, name)

        def complete() -> bool:
            return rundir.is_complete_oracle(folder) and rundir.oracle_summary(folder).get("tokens") == self.tokens()

        def go(stale: bool) -> None:
            if stale:
                shutil.rmtree(folder, ignore_errors=True)
            oracle_of_run(self.out, self.oracle_spec(self.primary_context, budgets=budgets), name=name,
                          max_tokens=self.requested_tokens(), split="train")

        return Stage(f"oracle-{name}", f"oracle on training tokens at k = {budgets}: the imitation routers' labels", cost,
                     "oracle", lambda: {"step": self.trained_step(), "tokens": self.tokens(), "budgets": budgets},
                     complete, go)

    def router_stage(self, method: str, target: float, cost: float, run: Path | None = None, options: str = "SB",
                     skip_target: float = 0.0) -> Stage:
        """A router of the run's model (or of the run folder ``run``: the null control), evaluated on the
        study's tokens with the per-sequence evidence the findings resample. ``target``: the big fraction
        (k / L for the budgets the oracle is compared at); a router that may skip has no oracle of its options
        in the study, so it is evaluated on the study's tokens without one."""
        run_dir = run or self.out
        k = round(target * self.L)
        compared = options == "SB"
        cfg = self.router_config(method, target, options, skip_target, compared)
        name = cfg.name
        folder = rundir.router_dir(run_dir, name)
        study_eval = rundir.study_router_eval(run_dir, name)

        def usable(path: Path) -> bool:  # on the oracle's tokens, with the per-sequence evidence
            if not path.is_file():
                return False
            res = read_json(path)
            return res.get("tokens") == self.tokens() and (not compared or bool((res.get("oracle") or {}).get("per_sequence")))

        def complete() -> bool:  # evaluated by the router command or by the study
            if usable(folder / ROUTER_EVAL):
                return not study_eval.exists()
            return (folder / ROUTER_EVAL).is_file() and usable(study_eval)

        def go(stale: bool) -> None:
            if stale:  # trained by an earlier study on another model or tokens: start over
                shutil.rmtree(folder, ignore_errors=True)
            if not (folder / ROUTER_EVAL).is_file():
                train_router(run_dir, cfg, resume=latest_checkpoint(folder) is not None, log=self.log)
            if not usable(folder / ROUTER_EVAL):
                self.evaluate_router_on_study_tokens(run_dir, name, k if compared else None)
            elif study_eval.is_file():
                study_eval.unlink()
                rundir.study_router_tokens(run_dir, name).unlink(missing_ok=True)

        key = lambda: {"step": trained_step(run_dir), "tokens": self.tokens(),
                       "steps": self.cfg.study.router_steps, "batch": self.cfg.study.router_batch,
                       "oracle": self.oracle_name(self.primary_context)}
        prefix, title = ("", "") if run_dir == self.out else (f"{run_dir.name}-", "null control: ")
        what = f"k={k} of {self.L} (target {target:.2f})" if compared else f"big {target:.2f}, skip {skip_target:.2f}"
        return Stage(f"{prefix}router-{name}", f"{title}router {method} at {what}", cost, "router", key, complete, go)

    def sub_study(self, folder: Path, cfg: RunConfig) -> None:
        """The whole study with ``cfg`` in ``folder`` (a seed or a size), resumed where it stopped."""
        if rundir.config_path(folder).is_file():
            conflict = resume_conflict(load_config(str(rundir.config_path(folder)), saved=True), cfg)
            if conflict:
                raise ValueError(f"{folder} holds another run: {conflict}")
        check_run_folder(cfg, folder, resume=rundir.has_run(folder))
        with rundir.writing(folder, create=True):
            Study(cfg, folder, self.log).run()

    def seed_stage(self, seed: int, cost: float) -> Stage:
        """The whole study once more with training seed ``seed`` (``study.seeds``), in its own folder."""
        folder = rundir.seed_dir(self.out, seed)

        def go(stale: bool) -> None:
            cfg = copy.deepcopy(self.cfg)
            cfg.train.seed, cfg.study.seeds, cfg.study.null = seed, 1, False
            cfg.study.widths, cfg.study.train_tokens = "", ""
            self.sub_study(folder, cfg)

        return Stage(f"seed-{seed}", f"the study with training seed {seed} ({folder})", cost, "seed",
                     lambda: {"seed": seed}, lambda: False, go)

    def scale_stage(self, size: scale.Size, cost: float) -> Stage:
        """The whole study at another model size (``study.widths``, ``study.train_tokens``; study/scale.py)."""
        folder = rundir.scale_dir(self.out, size.name)
        cfg = scale.size_config(self.cfg, size)
        m = cfg.model
        return Stage(f"scale-{size.name}", f"the study at width {m.d_model} ({m.n_heads} heads, FFN {m.d_ff_big} / "
                     f"{m.d_ff_small}), {cfg.train.steps} steps ({folder})", cost, "seed",
                     lambda: {"size": size.name}, lambda: False, lambda stale: self.sub_study(folder, cfg))

    def stage1_stages(self, cost_per_step: float) -> list[Stage]:
        """The Stage-1 study (``stage1.py``): its models in training order, then their evaluation. A model
        trained for another ``study.stage1_steps`` is trained again from scratch."""
        out = []
        steps = stage1.stage1_steps(self.cfg)
        for m in stage1.plan(self.cfg, self.out):
            if not m.trained_here:  # the run's own model
                continue

            def go(stale: bool, m=m) -> None:
                if stale:
                    shutil.rmtree(m.folder, ignore_errors=True)
                stage1.train_model(self.out, m, self.log)

            out.append(Stage(f"stage1-{m.name}", f"stage 1: {m.title}", cost_per_step * m.cfg.train.steps, "stage1",
                             lambda m=m: {"steps": m.cfg.train.steps, "d_ff_big": m.cfg.model.d_ff_big, "stage1_steps": steps},
                             lambda m=m: trained_step(m.folder) >= m.cfg.train.steps, go))
        oracle = rundir.oracle_dir(self.out, self.oracle_name(self.primary_context))
        out.append(Stage("stage1-evaluation", "stage 1: every model scored, trained and at initialisation", 0.0, "report",
                         lambda: {"step": self.trained_step(), "stage1_steps": steps, "tokens": self.cfg.eval.max_tokens,
                                  "fixed": rundir.is_complete_oracle(oracle), "seeds": self.cfg.study.stage1_seeds},
                         lambda: rundir.stage1_evaluation(self.out).is_file(),
                         lambda stale: stage1.evaluate(self.cfg, self.out, oracle, self.log)))
        return out

    def router_config(self, method: str, target: float, options: str, skip_target: float, compared: bool) -> RouterConfig:
        """The study's router: the method's own defaults, the study's steps and batch, budget calibration measured
        on as many training tokens as the study evaluates (which keeps its cost at the study's scale). A value
        router trains on cached targets, not through the LM: its own steps and batch."""
        through_lm = METHODS[method].data != "values"
        flags = {"method": method, "target": target, "options": options,
                 "oracle": self.oracle_name(self.primary_context) if compared else None}
        if options == "SB_":
            flags["skip_target"] = skip_target
        if through_lm:
            flags["train.steps"] = self.cfg.study.router_steps
        sets = [f"calibration_tokens={self.requested_tokens()}"]
        if through_lm:
            sets.append(f"train.batch_size={self.cfg.study.router_batch}")
        return resolve_router_config(self.cfg, {k: v for k, v in flags.items() if v is not None}, sets)

    def evaluate_router_on_study_tokens(self, run: Path, name: str, k: int | None) -> None:
        """The router's evaluation (routers.evaluate_router) on the oracle's tokens (against the oracle at k)."""
        device = resolve_device(self.cfg.train.device)
        model, cfg = load_model(run, device)
        router, rcfg = load_router_folder(rundir.router_dir(run, name), device)
        idx_ST, tgt_ST = eval_tokens(run, cfg, max_tokens=self.requested_tokens())
        oracle = None if k is None else load_oracle_table(run, self.oracle_name(self.primary_context), k, idx_ST, tgt_ST,
                                                          rcfg.options)
        labels = label_source(run, rcfg, rcfg.budget_k(self.L))
        result = evaluate_router(model, router, idx_ST, tgt_ST, rcfg, oracle, labels,
                                 tokens_path=rundir.study_router_tokens(run, name))
        atomic_write_json(rundir.study_router_eval(run, name), result)

    def report(self) -> None:
        write_report(self.out)
        publish_results(self.out, self.cfg, self.trained_step())  # TensorBoard / W&B, when the run logs there

    # -- running ------------------------------------------------------------------------
    def marker(self, stage: Stage) -> Path:
        return rundir.stage_marker(self.out, stage.id)

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
            eta = f", ETA {fmt_duration(eta)}" if eta is not None else ""
            prefix = f"[{i}/{n}]"
            marker = self.marker(stage)
            recorded = read_json(marker) if marker.is_file() else None
            key = stage.key()
            # training is never "stale": more steps continue it, and a finished run is what the other stages use
            stale = stage.kind != "train" and recorded is not None and recorded.get("key") != key
            if stage.complete() and not stale:
                self.log(f"{prefix} {stage.title}: already done, skipped (elapsed {fmt_duration(elapsed)})")
                if recorded is None:
                    atomic_write_json(marker, {"key": key, "seconds": None, "adopted": True})
                done.append({"id": stage.id, "skipped": True, "seconds": 0.0})
                continue
            self.log(f"{prefix} {stage.title}{' (outputs from other inputs: redone)' if stale else ''} "
                     f"(elapsed {fmt_duration(elapsed)}{eta})")
            start = time.time()
            with watchdog(self.log, stage.title):
                stage.run(stale)
            seconds = time.time() - start
            atomic_write_json(marker, {"key": stage.key(), "seconds": round(seconds, 3)})
            rates.setdefault(stage.kind, [0.0, 0.0])
            rates[stage.kind][0] += seconds
            rates[stage.kind][1] += stage.cost
            done.append({"id": stage.id, "skipped": False, "seconds": seconds})
            self.log(f"{' ' * len(prefix)} done in {fmt_duration(seconds)}")
        return done


# ----------------------------------------------------------------------------- the summary printed at the end


def results_table(out: Path) -> str:
    """A short text table of the report's numbers (from ``RUN/report/results.json``)."""
    res = read_json(rundir.report_results(out))
    f = lambda x, nd=2: "—" if x is None else f"{x:.{nd}f}"
    lines = []
    sweeps = res["oracle"]  # the primary context first
    if sweeps:
        first = sweeps[0]
        head = (f"{'k':>3} " + " ".join(f"{'oracle ' + o['context']:>15}" for o in sweeps)
                + f" {'fixed':>9} {'best100':>9} {'random':>9}")
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
        e = x["effect"] or {}
        ctx = f" [{x['context']}]" if x["context"] else ""
        against = (f"within ±{e['margin']:g}" if e.get("margin") is not None else
                   f"{'>' if e.get('direction') == 1 else '<'} {e.get('threshold', 0):g}")
        eff = (f"{e['value']:+.3f} [{f(e.get('lo'), 3)}, {f(e.get('hi'), 3)}] vs {against}, "
               f"p(Holm) {f(x.get('p_adjusted'), 3)}, MDE {f(x.get('mde'), 3)}") if e else x["why"]
        lines.append(f"  {(x['verdict'] or 'not tested'):<13} {x['claim']}{ctx}  {eff}")
    lines.append(headline(res))
    banner = smoke_banner(res)
    if banner:
        lines.append(banner)
    return "\n".join(lines)


def run_study(config: str | None, data: str | None, out: Path, overrides=(), log: Callable[[str], None] = print) -> Path:
    """``duollm run``: the whole study into ``out``; returns the report's ``index.html``.

    ``config``: a preset or YAML file (default ``cpu``; for an existing run folder, its own
    config); ``data``: a data spec; ``overrides``: ``key=value`` strings (``study.*`` included).
    Rerunning after an interruption continues where it stopped."""
    out = Path(out)
    cfg = resolve_config(config, data, out, overrides)
    resolve_device(cfg.train.device)
    threads.configure(cfg.threads)  # unless --threads was given
    check_run_folder(cfg, out, resume=rundir.has_run(out))
    study = Study(cfg, out, log)
    t0 = time.time()
    with rundir.writing(out, create=True):  # one writer for the whole study; its stages take the same lock again
        study.run()
    log(results_table(out))
    log(f"study finished in {fmt_duration(time.time() - t0)}; report: {rundir.report_html(out)}")
    return rundir.report_html(out)
