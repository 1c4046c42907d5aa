"""The paper's Stage-1 study (section 3.4, Fig. 8): is a Duo model as good as a dense model of the
same compute per token, and does training the big modules first do as well as random routing?

``duollm run --set study.stage1=true`` adds these stages to the study; every model is trained by
the same training loop (``train.pretrain``) on the run's tokens for ``study.stage1_steps`` steps:

    RUN/stage1/duo/            the Duo model (random routing, the run's own config) at stage1_steps; absent
                               when stage1_steps == train.steps: the run's own model is the Duo model
    RUN/stage1/dense-p<p>/     the dense baselines: the same DuoModel, all-big routing, ``d_ff_big`` at the
                               width whose FFN costs what P(big) = p costs the Duo model (``matched_width``)
    RUN/stage1/bigfirst-a/     Fig. 8c, phase 1: all-big routing for 2/3 of the steps
    RUN/stage1/bigfirst/       phase 2: phase 1's weights with everything but the small FFNs frozen, random
                               routing for the remaining 1/3 (batches drawn with seed + 1: no replay of phase 1's)
    RUN/stage1/evaluation.json every model's per-sequence numbers on the stage's tokens, trained and at
                               initialisation (the null control), read by ``analysis/stage1.py``

Quality is measured offline, next to perplexity (ARC / HellaSwag need the Hub; the lm-eval task
``duollm_mc`` and ``duollm-lm-eval`` run those where it is reachable): next-token top-1 accuracy and a
4-way multiple choice built from held-out text (``mc_items``: the true continuation of a window
against the continuations of three others, scored by log-likelihood). Random routing is averaged
over ``DRAWS`` seeded draws per token.

Tensor name legend (``docs/NOTATION.md``): S sequences (one multiple-choice item each), T positions, L layers, A answer choices.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import rundir
from ..checkpoint import latest_checkpoint, load_model, load_weights, trained_step
from ..config import RunConfig
from ..data.cache import eval_tokens
from ..io import atomic_write_json
from ..model.model import DuoModel, ModelConfig
from ..model.routing import BIG, SMALL, FlopModel
from ..runtime.distributed import resolve_device
from ..train import loop as train
from ..train.evaluate import random_routes
from .folders import make_sub_run

P_BIG = (0.0, 0.25, 0.5, 0.75, 1.0)  # the paper's Fig. 8 grid
DRAWS = 4  # seeded random-routing draws averaged per token
CHOICES = 4  # multiple choice: the true continuation and three distractors


def stage1_steps(cfg: RunConfig) -> int:
    return cfg.study.stage1_steps or cfg.train.steps


def matched_width(cfg: ModelConfig, p: float, multiple: int = 8) -> int:
    """The dense FFN width whose FLOPs per token equal the Duo FFN's at P(big) = p (the cost model of
    ``routing.FlopModel``: p * big + (1 - p) * small), rounded to a multiple of 8; exactly the small
    and the big width at p = 0 and 1. The paper's 1.4B model: 640 / 3040 / 5440 / 7840 / 10240."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"P(big) must be in [0, 1]; got {p}")
    if p in (0.0, 1.0):
        return cfg.d_ff_big if p == 1.0 else cfg.d_ff_small
    fm = FlopModel.from_config(cfg)
    per_unit = fm.ffn[BIG] / cfg.d_ff_big  # FFN FLOPs are linear in the width
    target = p * fm.ffn[BIG] + (1 - p) * fm.ffn[SMALL]
    return max(multiple, int(round(target / per_unit / multiple)) * multiple)


def _sub_config(cfg: RunConfig, steps: int, *, p_big: float | None = None, d_ff_big: int | None = None,
                seed_offset: int = 0) -> RunConfig:
    """A model of the stage: the run's config with its own steps, routing (``p_big`` None: the run's
    random routing; 1: all-big) and big width; the study section switched off (it is not a study)."""
    sub = copy.deepcopy(cfg)
    sub.train.steps = steps
    sub.train.seed = cfg.train.seed + seed_offset
    if p_big is not None:
        sub.routing.p_big, sub.routing.p_small, sub.routing.p_skip = p_big, 1.0 - p_big, 0.0
    if d_ff_big is not None:
        sub.model.d_ff_big = d_ff_big
    sub.study.stage1, sub.study.null, sub.study.seeds = False, False, 1
    return sub


@dataclass
class Model:
    """One model of the stage: its folder, its config and how it is trained (None: the run's own model)."""

    name: str
    folder: Path
    cfg: RunConfig
    title: str
    prepare: Callable[[DuoModel], None] | None = None
    trained_here: bool = True


SEED_STRIDE = 100  # arm i trains with train.seed + 100 i (+ 1 for the big-first phase 2's batches)


def plan(cfg: RunConfig, run: Path) -> list[Model]:
    """The stage's models in training order (the Duo model, the dense baselines, the Fig. 8c pair), once per
    seed of ``study.stage1_seeds``: the first with the run's seed, the others with train.seed + 100 i."""
    run = Path(run)
    steps = stage1_steps(cfg)
    models = []
    for i in range(cfg.study.stage1_seeds):
        name_of, off = (lambda arm, i=i: rundir.stage1_model_name(arm, i)), SEED_STRIDE * i
        seeded = f", seed {cfg.train.seed + off}" if i else ""
        own = steps == cfg.train.steps and i == 0  # the run's own model is the first Duo model
        models.append(Model(name_of("duo"), run if own else rundir.stage1_model_dir(run, name_of("duo")),
                            cfg if own else _sub_config(cfg, steps, seed_offset=off),
                            f"Duo model, random routing, {steps} steps{seeded}", trained_here=not own))
        for p in P_BIG:
            w = matched_width(cfg.model, p)
            name = name_of(f"dense-p{p:.2f}")
            models.append(Model(name, rundir.stage1_model_dir(run, name),
                                _sub_config(cfg, steps, p_big=1.0, d_ff_big=w, seed_offset=off),
                                f"dense baseline at P(big) = {p:g}: FFN width {w}, {steps} steps{seeded}"))
        steps_b = steps // 3
        phase_a = rundir.stage1_model_dir(run, name_of("bigfirst-a"))
        models.append(Model(name_of("bigfirst-a"), phase_a, _sub_config(cfg, steps - steps_b, p_big=1.0, seed_offset=off),
                            f"Fig. 8c phase 1: big modules first, all-big routing, {steps - steps_b} steps{seeded}"))

        def from_phase_a(model: DuoModel, phase_a=phase_a) -> None:
            load_weights(model, latest_checkpoint(phase_a))
            for name, param in model.named_parameters():
                param.requires_grad_(".ffn.small." in name)  # everything trained in phase 1 stays frozen

        models.append(Model(name_of("bigfirst"), rundir.stage1_model_dir(run, name_of("bigfirst")),
                            _sub_config(cfg, steps_b, seed_offset=off + 1),
                            f"Fig. 8c phase 2: big modules frozen, small modules trained with random routing, "
                            f"{steps_b} steps{seeded}", prepare=from_phase_a))
    return models


def train_model(run: Path, m: Model, log=print) -> None:
    """Train (or continue) one model of the stage in its own run folder."""
    if not rundir.has_run(m.folder):
        make_sub_run(run, m.folder, m.cfg)
    train.pretrain(m.cfg, m.folder, resume=True, log=log, prepare=m.prepare)


# ----------------------------------------------------------------------------- evaluation


def mc_items(idx_ST: torch.Tensor, tgt_ST: torch.Tensor, seed: int = 0):
    """A 4-way multiple choice from held-out windows: item i's context is the first 3/4 of window i,
    its choices the rest of window i (the answer) and of three windows spread over the set (i + S/4,
    i + S/2, i + 3S/4), so every continuation is once an answer and three times a distractor.

    Returns ``(seq_SAT, gold_S, context)``: each choice as a whole window, the answer's index (seeded),
    and the context length (the choice is scored on the targets from position ``context - 1`` on).
    """
    S, T = idx_ST.shape
    if S < CHOICES:
        raise ValueError(f"the multiple choice needs at least {CHOICES} evaluation sequences; got {S}")
    window_ST = torch.cat([idx_ST[:, :1], tgt_ST], 1)  # T + 1 tokens
    context = (3 * T) // 4
    shifts = [0] + [round(j * S / CHOICES) % S for j in range(1, CHOICES)]
    assert len(set(shifts)) == CHOICES, "distinct distractors"
    gen = torch.Generator().manual_seed(seed)
    order_SA = torch.stack([torch.randperm(CHOICES, generator=gen) for _ in range(S)])  # choice j shows shifts[order]
    i_S = torch.arange(S)
    source_SA = (i_S[:, None] + torch.tensor(shifts)[order_SA]) % S
    seq_SAT = torch.cat([window_ST[:, None, :context].expand(S, CHOICES, context),
                         window_ST[source_SA][:, :, context:]], dim=2)
    gold_S = (order_SA == 0).int().argmax(1)
    return seq_SAT, gold_S, context


@torch.no_grad()
def score(model: DuoModel, idx_ST, tgt_ST, mc, routes, *, batch_size: int = 16) -> dict:
    """Per sequence: mean loss and top-1 accuracy; per item: whether the answer is the most likely
    choice; and the mean FLOPs per token. ``routes``: a pattern, or ``(n_seq, seed) -> route_LST``
    (random routing: averaged over ``DRAWS`` draws; the choices of an item share their routes)."""
    device = next(model.parameters()).device

    def run(x_ST, y_ST, r):  # r: a pattern or route_LST covering x_ST
        loss, hit, flops = [], [], []
        for s0 in range(0, x_ST.shape[0], batch_size):
            s1 = min(x_ST.shape[0], s0 + batch_size)
            out = model(x_ST[s0:s1].to(device), y_ST[s0:s1].to(device), r if isinstance(r, str) else r[:, s0:s1].to(device))
            loss.append(out.loss_BT.double().cpu())
            hit.append((out.logits.argmax(-1).cpu() == y_ST[s0:s1]).double())
            flops.append(out.flops_BT.double().cpu())
        return torch.cat(loss), torch.cat(hit), torch.cat(flops)

    seq_SAT, gold_S, context = mc
    n_items, A, n_tok = seq_SAT.shape
    x_NT, y_NT = seq_SAT.reshape(n_items * A, n_tok)[:, :-1], seq_SAT.reshape(n_items * A, n_tok)[:, 1:]
    fixed = isinstance(routes, str)
    n = 1 if fixed else DRAWS
    loss_S = acc_S = mc_S = compute = 0.0
    for d in range(n):
        eval_r = routes if fixed else routes(idx_ST.shape[0], 2 * d)
        mc_r = routes if fixed else routes(n_items, 2 * d + 1).repeat_interleave(A, dim=1)
        loss_ST, hit_ST, flops_ST = run(idx_ST, tgt_ST, eval_r)
        choice_SA = run(x_NT, y_NT, mc_r)[0][:, context - 1:].sum(1).view(n_items, A)  # log-likelihood of each choice
        loss_S = loss_S + loss_ST.mean(1) / n
        acc_S = acc_S + hit_ST.mean(1) / n
        mc_S = mc_S + (choice_SA.argmin(1) == gold_S).double() / n
        compute += flops_ST.mean().item() / n
    return {"loss_S": loss_S.tolist(), "acc_S": acc_S.tolist(), "mc_S": mc_S.tolist(), "flops": compute}


def routings(name: str, L: int, fixed: dict[int, str] | None = None) -> dict[str, str | float]:
    """What each model is scored under, label -> a pattern or a P(big) of random routing: the Duo model
    at every P(big) of the grid (and the study's fixed@k patterns), a dense baseline all-big, the
    big-first model at all-small, P(big) = 0.5 and all-big."""
    def at(p: float) -> str | float:
        return ("B" * L if p == 1.0 else "S" * L) if p in (0.0, 1.0) else p

    name = rundir.stage1_arm(name)
    if name == "duo":
        return {f"p{p:.2f}": at(p) for p in P_BIG} | {f"fixed-k{k}": pattern for k, pattern in (fixed or {}).items()}
    if name == "bigfirst":
        return {f"p{p:.2f}": at(p) for p in (0.0, 0.5, 1.0)}
    return {"p1.00": "B" * L} if name.startswith("dense") else {}


def fixed_patterns(oracle: Path | None, L: int) -> dict[int, str]:
    """The study's fixed@k patterns (chosen on the study's tokens by the oracle sweep in folder
    ``oracle``) at the budgets nearest the grid's P(big) strictly between 0 and 1."""
    if oracle is None or not rundir.is_complete_oracle(oracle):
        return {}
    by_k = {b["k"]: b.get("fixed_pattern") for b in rundir.oracle_summary(oracle)["budgets"]}
    ks = sorted({round(p * L) for p in P_BIG if 0.0 < p < 1.0})
    return {k: by_k[k] for k in ks if by_k.get(k)}


def evaluate(cfg: RunConfig, run: Path, oracle: Path | None = None, log=print) -> Path:
    """Score every model of the stage, trained and at initialisation, on the stage's tokens
    (``eval.max_tokens`` whole validation windows); writes ``RUN/stage1/evaluation.json``. ``oracle``:
    the study's oracle sweep of the run's model, whose fixed@k patterns (the best single pattern for the
    run's model on the study's tokens) the stage's Duo model is also scored under."""
    device = resolve_device(cfg.train.device)
    idx_ST, tgt_ST = eval_tokens(run, cfg)
    S, T = idx_ST.shape
    mc = mc_items(idx_ST, tgt_ST, seed=cfg.train.seed)
    L = cfg.model.n_layers
    fixed = fixed_patterns(oracle, L)
    reference = FlopModel.from_config(cfg.model).all_big()  # the cost model DuoModel.forward reports
    models = {}
    todo = [(m, r) for m in plan(cfg, run) if (r := routings(m.name, L, fixed=fixed))]  # bigfirst-a: none
    bar = tqdm(total=sum(2 * len(r) for _, r in todo), desc="stage 1: evaluation", unit="eval", leave=False)
    for m, scored_under in todo:
        trained, _ = load_model(m.folder, device)
        torch.manual_seed(m.cfg.train.seed)  # the model at initialisation, as pretraining builds it
        init = DuoModel(m.cfg.model).to(device).eval()
        entry = {"folder": str(m.folder.relative_to(run)) if m.folder != run else ".", "title": m.title,
                 "step": trained_step(m.folder), "d_ff_big": m.cfg.model.d_ff_big,
                 "params": sum(p.numel() for p in trained.parameters()), "trained": {}, "init": {}}
        for label, routes in scored_under.items():
            if isinstance(routes, float):  # random routing: fresh seeded routes per draw
                routes = (lambda p: lambda n, seed: random_routes(L, n, T, p_big=p, seed=seed))(routes)
            for which, model in (("trained", trained), ("init", init)):
                res = score(model, idx_ST, tgt_ST, mc, routes)
                res["compute"] = res.pop("flops") / reference  # FLOPs per token relative to the Duo model all-big
                entry[which][label] = res
                bar.update(1)
        models[m.name] = entry
    bar.close()
    out = rundir.stage1_evaluation(run)
    atomic_write_json(out, {"tokens": S * T, "sequences": S, "seq_len": T, "items": int(mc[1].numel()),
                            "context": mc[2], "steps": stage1_steps(cfg), "draws": DRAWS, "p_big": list(P_BIG),
                            "widths": {f"{p:.2f}": matched_width(cfg.model, p) for p in P_BIG},
                            "fixed": {str(k): v for k, v in fixed.items()}, "models": models,
                            "seeds_per_arm": cfg.study.stage1_seeds})
    log(f"stage 1: {len(models)} models scored on {S * T:,} tokens and {mc[1].numel()} multiple-choice items")
    return out
