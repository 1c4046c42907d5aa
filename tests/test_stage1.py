"""The paper's Stage-1 study (Fig. 8, issue 16): FLOP-matched dense baselines, the big-first ablation,
the offline accuracy measures, the findings against the null, the report section."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from duollm import rundir
from duollm.analysis import stage1 as stage1_report
from duollm.checkpoint import load_model, trained_step
from duollm.config import load_config, load_run_config
from duollm.model.model import DuoModel
from duollm.model.routing import FlopModel
from duollm.study import stage1
from duollm.study.run import run_study

QUIET = lambda *a, **k: None


def test_matched_widths_are_the_papers_and_cost_what_the_duo_model_costs():
    paper = load_config("paper").model
    assert [stage1.matched_width(paper, p) for p in stage1.P_BIG] == [640, 3040, 5440, 7840, 10240]  # section 3.4
    cpu = load_config("cpu").model
    widths = [stage1.matched_width(cpu, p) for p in stage1.P_BIG]
    assert widths == [32, 152, 272, 392, 512]
    fm = FlopModel.from_config(cpu)
    for p, w in zip(stage1.P_BIG, widths):
        duo = p * fm.ffn[2] + (1 - p) * fm.ffn[1]
        dense = FlopModel.from_config(type(cpu)(**{**cpu.__dict__, "d_ff_big": w})).ffn[2]
        assert abs(dense - duo) <= 4 * 2 * 3 * cpu.d_model, p  # within half the rounding multiple of 8
    with pytest.raises(ValueError, match="P\\(big\\) must be in"):
        stage1.matched_width(cpu, 1.5)


def test_the_dense_baseline_at_p1_is_the_duo_models_all_big_architecture(tmp_path):
    cfg = load_config("tiny")
    models = {m.name: m for m in stage1.plan(cfg, tmp_path)}
    assert [m for m in models] == ["duo", "dense-p0.00", "dense-p0.25", "dense-p0.50", "dense-p0.75", "dense-p1.00",
                                   "bigfirst-a", "bigfirst"]
    dense = models["dense-p1.00"].cfg
    assert dense.model == cfg.model and dense.train.seed == cfg.train.seed
    assert (dense.routing.p_big, dense.routing.p_small, dense.routing.p_skip) == (1.0, 0.0, 0.0)
    torch.manual_seed(dense.train.seed)
    a = DuoModel(dense.model)
    torch.manual_seed(cfg.train.seed)
    b = DuoModel(cfg.model)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
    assert torch.equal(a(idx, routes="B" * cfg.model.n_layers).logits, b(idx, routes="B" * cfg.model.n_layers).logits)
    # the other widths change the big FFN only; stage1_steps == train.steps: the run's own model is the Duo model
    assert models["dense-p0.50"].cfg.model.d_ff_big == stage1.matched_width(cfg.model, 0.5)
    assert models["duo"].folder == tmp_path and not models["duo"].trained_here
    steps = [m.cfg.train.steps for m in (models["bigfirst-a"], models["bigfirst"])]
    assert sum(steps) == cfg.train.steps and steps[1] == cfg.train.steps // 3
    cfg.study.stage1_steps = 12
    own = {m.name: m for m in stage1.plan(cfg, tmp_path)}["duo"]
    assert own.trained_here and own.folder == rundir.stage1_dir(tmp_path) / "duo" and own.cfg.train.steps == 12


def test_multiple_choice_items_pair_every_continuation_once_as_the_answer():
    S, T = 8, 16
    w = torch.arange(S * (T + 1)).view(S, T + 1)
    seq_SAT, gold_S, context = stage1.mc_items(w[:, :-1], w[:, 1:], seed=3)
    assert seq_SAT.shape == (S, 4, T + 1) and context == 12
    assert torch.equal(seq_SAT[:, :, :context], w[:, None, :context].expand(S, 4, context))
    answers = seq_SAT[torch.arange(S), gold_S, context:]
    assert torch.equal(answers, w[:, context:])  # the answer is the window's own rest
    rests = seq_SAT[:, :, context].flatten().tolist()  # each continuation's first token names its window
    assert sorted(rests) == sorted(w[:, context].tolist() * 4)
    with pytest.raises(ValueError, match="at least 4"):
        stage1.mc_items(w[:3, :-1], w[:3, 1:])


def synthetic(gains: dict, S: int = 48, seed: int = 0, seeds: int = 1, seed_sd: float = 0.0) -> dict:
    """An evaluation.json whose trained models differ by ``gains`` (nats, per setting) and whose models at
    initialisation are all the same; ``seeds`` models per arm, each model shifted by its own training noise
    (``seed_sd`` nats, the same on every sequence)."""
    rng = np.random.default_rng(seed)
    base_S = 4.0 + 0.3 * rng.standard_normal(S)
    noise = lambda: 0.01 * rng.standard_normal(S) + seed_sd * rng.standard_normal()

    def entry(loss_S):
        return {"loss_S": loss_S.tolist(), "acc_S": np.full(S, 0.3).tolist(), "mc_S": np.full(S, 0.5).tolist(),
                "compute": 1.0}

    models = {}
    init = {lab: entry(np.full(S, 7.6)) for lab in [f"p{p:.2f}" for p in stage1.P_BIG]}
    for i in range(seeds):
        name = lambda arm, i=i: rundir.stage1_model_name(arm, i)
        models[name("duo")] = {"trained": {f"p{p:.2f}": entry(base_S + gains[("duo", p)] + noise()) for p in stage1.P_BIG},
                               "init": init}
        for p in stage1.P_BIG:
            models[name(f"dense-p{p:.2f}")] = {"trained": {"p1.00": entry(base_S + gains[("dense", p)] + noise())},
                                               "init": {"p1.00": entry(np.full(S, 7.6))}}
        models[name("bigfirst")] = {"trained": {f"p{p:.2f}": entry(base_S + gains[("bigfirst", p)] + noise())
                                                for p in (0.0, 0.5, 1.0)},
                                    "init": {f"p{p:.2f}": init[f"p{p:.2f}"] for p in (0.0, 0.5, 1.0)}}
    for m in models.values():
        m.update(title="", step=1, d_ff_big=8, params=1, folder=".")
    return {"tokens": S * 16, "sequences": S, "items": S, "steps": 10, "draws": 4, "p_big": list(stage1.P_BIG),
            "widths": {f"{p:.2f}": 8 for p in stage1.P_BIG}, "fixed": {}, "models": models, "seeds_per_arm": seeds}


def paper_like() -> dict:
    """The paper's picture: loss falls with P(big), dense below Duo with a gap shrinking towards all-big,
    big-first worse at mixed routing."""
    g = {}
    for p in stage1.P_BIG:
        g[("duo", p)] = 0.4 * (1 - p) + 0.10 - 0.06 * p
        g[("dense", p)] = 0.4 * (1 - p)
    g.update({("bigfirst", 0.0): 0.9, ("bigfirst", 0.5): 0.6, ("bigfirst", 1.0): 0.0})
    return g


def test_findings_one_per_p_big_each_inconclusive_without_seeds():
    """One finding per P(big) (no averaging: one outlier decided the mean), each with its effect and interval over
    sequences; one model per arm has no seed-to-seed variance, the null of a between-model claim, so every
    finding stays inconclusive, outside the family, and says why."""
    fs = stage1_report.findings(synthetic(paper_like()))
    assert [(f.id, f.context) for f in fs] == [("stage1_dense_beats_duo", f"P(big)={p:g}") for p in stage1.P_BIG] + \
        [("stage1_big_first_worse", "P(big)=0.5")]
    g = paper_like()
    for f, p in zip(fs, stage1.P_BIG):  # the dense model's gain: 1 - exp(-(duo - dense)) per P(big)
        assert f.effect["value"] == pytest.approx(1 - np.exp(-(g[("duo", p)] - g[("dense", p)])), abs=0.01)
        assert f.effect["lo"] > 0 and f.verdict == "inconclusive" and "seed-to-seed" in f.why and f.p is None
    assert fs[-1].effect["lo"] > 0 and fs[-1].verdict == "inconclusive"


def test_with_three_seeds_per_arm_the_findings_are_decided_against_seed_to_seed_variance():
    fs = stage1_report.findings(synthetic(paper_like(), seeds=3, seed_sd=0.005))
    assert all(f.verdict == "reproduced" and "3 seeds" in f.why for f in fs), [(f.context, f.verdict) for f in fs]
    assert all(len(f.numbers["gain_per_seed"]) == 3 and f.effect["df"] == 2 for f in fs)
    flipped = {k: {"duo": 0.0, "dense": 0.2, "bigfirst": -0.2}[k[0]] for k in paper_like()}
    got = [f.verdict for f in stage1_report.findings(synthetic(flipped, seeds=3, seed_sd=0.005))]
    assert got[:4] == ["contradicted"] * 4 and got[-1] == "contradicted"
    # a gain inside the seeds' own spread: the sequences' interval alone would call it, the seeds do not
    small = {k: (0.02 if k[0] == "duo" else 0.0) for k in paper_like()}
    assert {f.verdict for f in stage1_report.findings(synthetic(small, seeds=3, seed_sd=0.05))} == {"inconclusive"}


def test_the_plan_trains_every_arm_once_per_seed():
    cfg = load_config("tiny", ["study.stage1=true", "study.stage1_seeds=2", "study.stage1_steps=6"])
    models = stage1.plan(cfg, Path("RUN"))
    names = [m.name for m in models]
    assert names[:8] == ["duo", *(f"dense-p{p:.2f}" for p in stage1.P_BIG), "bigfirst-a", "bigfirst"]
    assert names[8:] == [f"{n}-s1" for n in names[:8]]
    seeds = {m.name: m.cfg.train.seed for m in models}
    assert seeds["dense-p0.50-s1"] == seeds["dense-p0.50"] + 100 and seeds["bigfirst-s1"] == seeds["bigfirst"] + 100
    assert stage1.routings("dense-p0.50-s1", 4) == stage1.routings("dense-p0.50", 4) and not stage1.routings("bigfirst-a-s1", 4)


def test_the_stage_trains_every_model_freezes_the_big_first_model_and_reports(tmp_path):
    out = tmp_path / "run"
    sets = ["study.stage1=true", "study.router_methods=", "study.null=false", "study.sequential=false",
            "study.skip_fraction=0", "study.router_mixtures=", "train.steps=12", "eval.max_tokens=512"]
    run_study("tiny", None, out, sets, log=QUIET)
    root = rundir.stage1_dir(out)
    for name in ("dense-p0.00", "dense-p0.25", "dense-p0.50", "dense-p0.75", "dense-p1.00"):
        assert trained_step(root / name) == 12, name
    assert not (root / "duo").exists()  # stage1_steps = train.steps: the run's own model
    assert trained_step(root / "bigfirst-a") == 8 and trained_step(root / "bigfirst") == 4
    assert load_run_config(root / "dense-p0.25").model.d_ff_big == stage1.matched_width(
        load_config("tiny").model, 0.25)

    # Fig. 8c: phase 2 changed the small FFNs only; everything phase 1 trained is bit-identical
    a = load_model(root / "bigfirst-a")[0].state_dict()
    b = load_model(root / "bigfirst")[0].state_dict()
    assert a.keys() == b.keys()
    small = [k for k in a if ".ffn.small." in k]
    assert small and all(not torch.equal(a[k], b[k]) for k in small)
    assert all(torch.equal(a[k], b[k]) for k in a if k not in small)

    ev = json.loads(rundir.stage1_evaluation(out).read_text())
    assert ev["sequences"] * ev["seq_len"] == ev["tokens"] == 512 and ev["items"] == ev["sequences"]
    duo = ev["models"]["duo"]
    assert set(duo["trained"]) == {"p0.00", "p0.25", "p0.50", "p0.75", "p1.00"} | {f"fixed-k{k}" for k in (1, 2, 3)}
    assert duo["trained"]["p1.00"]["compute"] == pytest.approx(1.0)
    assert duo["trained"]["p0.50"]["compute"] == pytest.approx(ev["models"]["dense-p0.50"]["trained"]["p1.00"]["compute"],
                                                               rel=0.05)  # matched compute, realised
    assert duo["trained"]["p1.00"]["loss_S"] != duo["init"]["p1.00"]["loss_S"]

    res = json.loads((rundir.report_dir(out) / "results.json").read_text())
    assert len(res["stage1"]["rows"]) == 5 and len(res["stage1"]["ablation"]) == 3 and res["stage1"]["fixed"]
    ids = [f["id"] for f in res["findings"] if f["id"].startswith("stage1_")]
    assert ids == ["stage1_dense_beats_duo"] * 5 + ["stage1_big_first_worse"]
    assert all(f["verdict"] == "inconclusive" and f["effect"]["lo"] is not None for f in res["findings"] if f["id"] in ids)
    assert "stage1" in res["figures"] and (rundir.report_dir(out) / "figures" / "stage1.png").is_file()
    assert "Stage 1 (paper Fig. 8)" in (rundir.report_dir(out) / "report.md").read_text()

    # rerunning skips every stage; another stage1_steps trains the Duo model of the stage and the rest again
    before = {p: trained_step(p) for p in root.iterdir() if p.is_dir()}
    run_study(None, None, out, [], log=QUIET)
    assert {p: trained_step(p) for p in root.iterdir() if p.is_dir()} == before
    run_study(None, None, out, ["study.stage1_steps=6"], log=QUIET)
    assert trained_step(root / "duo") == 6 and trained_step(root / "dense-p0.50") == 6
    assert trained_step(root / "bigfirst") == 2
    assert json.loads(rundir.stage1_evaluation(out).read_text())["models"]["duo"]["step"] == 6


def test_stage1_config_is_checked():
    from duollm.study.settings import validate_study

    with pytest.raises(ValueError, match="stage1_steps must be >= 0"):
        validate_study(load_config("tiny", ["study.stage1_steps=-1"]))
    with pytest.raises(ValueError, match="at least 3 steps"):
        validate_study(load_config("tiny", ["study.stage1=true", "study.stage1_steps=2"]))
