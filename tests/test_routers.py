"""Stage 3 routers (paper section 3.3) on a tiny model: budgets, soft == hard, frozen LM, imitation, save/load."""

import argparse
import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import copy_trained

from duollm.analysis.report import router_rows
from duollm.analysis.rundata import RunData
from duollm.checkpoint import load_model
from duollm.config import load_config
from duollm.data.cache import eval_tokens, load_tokens
from duollm.model.policy import Router
from duollm.model.routing import BIG, SMALL, format_pattern
from duollm.routers.calibrate import calibrate_budget
from duollm.routers.command import add_arguments, run_router_command
from duollm.routers.config import resolve_router_config
from duollm.routers.evaluate import evaluate_router
from duollm.routers.objectives import RouterTrainer, beta_at, router_objective
from duollm.routers.store import load_router
from duollm.train.evaluate import per_token_loss
from duollm.train.loop import train_loop

QUIET = ["train.eval_every=1000", "train.save_every=1000", "train.log_every=1000", "train.batch_size=8"]



@pytest.fixture(scope="session")
def router_run(tiny_run, tmp_path_factory):
    """A copy of the trained tiny run: router tests write RUN/routers and RUN/oracle into it."""
    return copy_trained(tiny_run, tmp_path_factory.mktemp("router_runs") / "tiny")


def read_eval(run, name):
    return json.loads((run / "routers" / name / "eval.json").read_text())


@pytest.mark.parametrize("target", [0.25, 0.75])
def test_budget_loss_reaches_target(router_run, target):
    # The router starts token-independent at the target probabilities, whose hard argmax is
    # all small (0.25) or all big (0.75): only the budget term can bring the realised fraction in.
    name = run_router_command(router_run, target=target, method="budget", steps=30, set=QUIET, log=lambda *a: None)
    assert name == f"budget-{target:.2f}"
    ev = read_eval(router_run, name)
    assert abs(ev["big_fraction"] - target) <= 0.05
    assert ev["skip_fraction"] == 0.0 and ev["method"] == "budget" and ev["target"] == target
    assert ev["tokens"] == 1024 and np.isfinite(ev["ppl"])
    assert len(ev["per_layer_big"]) == 4 and np.array(ev["per_position_big"]).shape == (4, 32)
    assert abs(np.mean(ev["per_layer_big"]) - ev["big_fraction"]) <= 5e-5  # per-layer shares are rounded to 4 places
    assert (router_run / "routers" / name / "latest").is_symlink()  # trained by the shared loop
    assert (router_run / "routers" / name / "metrics.jsonl").is_file()


def test_straight_through_and_skip_budgets(router_run):
    # constant beta: whole layers flip for a while (policy.py); 150 steps settle on the tiny model
    name = run_router_command(router_run, target=0.25, method="straight-through", steps=150, set=QUIET, log=lambda *a: None)
    assert abs(read_eval(router_run, name)["big_fraction"] - 0.25) <= 0.05
    assert yaml.safe_load((router_run / "routers" / name / "router.yaml").read_text())["config"]["beta_schedule"] == "constant"
    name = run_router_command(router_run, target=0.5, options="SB_", skip_target=0.25, steps=80, set=QUIET,
                              log=lambda *a: None)
    assert name == "budget-0.50-skip0.25"
    ev = read_eval(router_run, name)
    assert abs(ev["big_fraction"] - 0.5) <= 0.05 and abs(ev["skip_fraction"] - 0.25) <= 0.05


def random_router(L, D, options="SB", scale=3.0, seed=0):
    router = Router(L, D, options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    return router


def test_large_beta_soft_mix_equals_hard_route(router_run):
    model, cfg = load_model(router_run)
    idx_ST, tgt_ST = eval_tokens(router_run, cfg)
    idx, tgt = idx_ST[:4], tgt_ST[:4]
    router = random_router(cfg.model.n_layers, cfg.model.d_model, "SB_")
    hard = model(idx, tgt, router, path="masked")
    router.mode, router.beta = "soft", 1e4
    soft = model(idx, tgt, router, path="masked")
    assert torch.equal(soft.route_LBT, hard.route_LBT)
    assert len(hard.route_LBT.unique()) == 3  # the comparison covers skip, small and big
    torch.testing.assert_close(soft.logits, hard.logits, rtol=0, atol=1e-6)
    router.mode = "hard"
    routed = model(idx, tgt, router)  # the fast routed path agrees to float tolerance
    torch.testing.assert_close(routed.logits, hard.logits, rtol=1e-5, atol=1e-5)
    router.mode, router.beta = "soft", 1.0  # a soft mix at beta 1 is a different model
    assert not torch.allclose(model(idx, tgt, router).logits, hard.logits, atol=1e-3)
    router.mode = "straight-through"  # hard values forward, whatever beta
    torch.testing.assert_close(model(idx, tgt, router, path="masked").logits, hard.logits, rtol=0, atol=1e-6)


def test_beta_schedule_anneals_upward():
    c = resolve_router_config(load_config("tiny"), {"target": 0.5}, ["train.steps=11", "beta_end=1000"])
    betas = [beta_at(s, c) for s in range(11)]
    assert betas[0] == pytest.approx(1.0) and betas[-1] == pytest.approx(1000.0)
    assert betas[5] == pytest.approx(np.sqrt(1000.0))  # geometric
    assert all(a < b for a, b in zip(betas, betas[1:]))


def test_language_model_stays_frozen(router_run, tmp_path):
    model, run_cfg = load_model(router_run)
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = resolve_router_config(run_cfg, {"target": 0.5}, ["train.steps=8", *QUIET])
    router = Router(run_cfg.model.n_layers, run_cfg.model.d_model)
    router.init_bias(cfg.probs_R())
    router_before = {k: v.clone() for k, v in router.state_dict().items()}
    idx_ST, tgt_ST = eval_tokens(router_run, run_cfg)
    trainer = RouterTrainer(router, model, cfg)
    objective = router_objective(trainer, cfg, idx_ST[:2], tgt_ST[:2])
    train_loop(objective, cfg.train, load_tokens(router_run, "train"), tmp_path, device=torch.device("cpu"))
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, router_before[k]) for k, v in router.state_dict().items())
    assert int(trainer.steps_done) == 8  # the beta schedule's step counter is checkpointed with the router
    assert not any(k.startswith("_lm") or "embed" in k for k in trainer.state_dict())


def write_oracle(run, name, pattern_of_token, k, options="SB", belief_of_token=None):
    """An oracle folder in the format of ``duollm oracle``: per-token best patterns at budget k (and, with
    ``belief_of_token``, the belief oracle's patterns)."""
    model, cfg = load_model(run)
    idx_ST, tgt_ST = eval_tokens(run, cfg)
    S, T = idx_ST.shape
    seq, pos = np.divmod(np.arange(S * T), T)
    patterns = [pattern_of_token(int(t)) for t in idx_ST.flatten()]
    folder = run / "oracle" / name
    folder.mkdir(parents=True, exist_ok=True)
    fixed = pattern_of_token(0)
    loss_ST = per_token_loss(model, idx_ST, tgt_ST, fixed)["loss_ST"]
    belief = {} if belief_of_token is None else {
        f"belief_pattern_k{k}": pa.array([belief_of_token(int(t)) for t in idx_ST.flatten()]).dictionary_encode()}
    pq.write_table(pa.table({"sequence": seq, "position": pos, "token": idx_ST.flatten().numpy(),
                             "target": tgt_ST.flatten().numpy(), f"oracle_loss_k{k}": loss_ST.flatten().numpy(),
                             f"best_pattern_k{k}": pa.array(patterns).dictionary_encode(), **belief}),
                   folder / "per_token.parquet")
    ppl = math.exp(loss_ST.double().mean().item())
    (folder / "summary.json").write_text(json.dumps({
        "budgets": [{"k": k, "candidates": 6, "oracle_ppl": ppl, "fixed_ppl": ppl, "fixed_pattern": fixed,
                     "random_mean_ppl": ppl, "best_of_100_ppl": ppl}],
        "all_big_ppl": ppl, "all_small_ppl": ppl, "tokens": S * T, "context": "shared", "options": options,
        "n_layers": cfg.model.n_layers}))
    return folder


def test_imitation_reproduces_a_constant_oracle_pattern(router_run):
    # Zero-initialised, the router's argmax is SSSS; the oracle says BSBS everywhere (k = 2 of 4).
    write_oracle(router_run, "const-SB", lambda tok: "BSBS", k=2)
    try:
        # a regularised probe (weight decay on the weights, not the biases) generalises to the held-out half
        name = run_router_command(router_run, target=0.5, method="imitation", steps=200,
                                  set=[*QUIET, "init=zero", "train.lr=0.1", "train.weight_decay=1.0"], log=lambda *a: None)
        ev = read_eval(router_run, name)
        assert ev["oracle"]["name"] == "const-SB" and ev["oracle"]["k"] == 2
        assert ev["labels"] == "validation"  # no training-split table: its held-out numbers are the clean ones
        assert ev["oracle"]["recovered"] == ev["oracle"]["heldout"].get("recovered")  # the headline is held-out
        assert "recovered_all_sequences" in ev["oracle"]
        assert ev["oracle"]["agreement"] == 1.0 and ev["oracle"]["pattern_match"] == 1.0
        assert ev["per_layer_big"] == [1.0, 0.0, 1.0, 0.0] and ev["big_fraction"] == 0.5
        held = ev["oracle"]["heldout"]
        assert held["sequences"] == 16 and held["pattern_match"] == 1.0
        # routed exactly like the fixed pattern, the router's loss is the (constant) oracle's
        assert held["ppl"] == pytest.approx(held["oracle_ppl"], rel=1e-5)
        assert held["ppl"] == pytest.approx(held["fixed_ppl"], rel=1e-5)
        row = next(r for r in router_rows(RunData(router_run)) if r["name"] == name)
        assert row["agreement"] == 1.0 and row["k"] == 2 and row["heldout_ppl"] == pytest.approx(held["ppl"], abs=1e-4)
    finally:
        shutil.rmtree(router_run / "oracle" / "const-SB")


def test_consistency_imitates_the_belief_oracles_patterns_not_the_oracles(router_run, tmp_path):
    """The consistency router learns the belief oracle's per-token pattern (``belief_pattern_k*``), here SBSB,
    where the oracle's best is BSBS; an oracle table without the belief patterns is refused in one line."""
    run = copy_trained(router_run, tmp_path / "run")
    write_oracle(run, "plain-SB", lambda tok: "BSBS", k=2)
    with pytest.raises(ValueError, match="no column belief_pattern_k2"):
        run_router_command(run, target=0.5, method="consistency", steps=5, set=QUIET, log=lambda *a: None)
    shutil.rmtree(run / "oracle" / "plain-SB")
    write_oracle(run, "belief-SB", lambda tok: "BSBS", k=2, belief_of_token=lambda tok: "SBSB")
    name = run_router_command(run, target=0.5, method="consistency", steps=200,
                              set=[*QUIET, "init=zero", "train.lr=0.1", "train.weight_decay=1.0"], log=lambda *a: None)
    ev = read_eval(run, name)
    assert ev["method"] == "consistency" and ev["per_layer_big"] == [0.0, 1.0, 0.0, 1.0]
    assert ev["oracle"]["agreement"] == 0.0  # measured against the oracle's own patterns, which it did not learn


def test_save_load_round_trip_and_cli_plumbing(router_run):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(router_run), "--target", "2/4", "--steps", "20", "--set", *QUIET])
    name = run_router_command(router_run, **vars(args), log=lambda *a: None)
    ev = read_eval(router_run, name)
    router = load_router(router_run, name)
    assert router.mode == "hard" and router.name == f"router:{name}"
    model, run_cfg = load_model(router_run)
    idx_ST, tgt_ST = eval_tokens(router_run, run_cfg)
    cfg = resolve_router_config(run_cfg, {"target": 0.5}, ["train.steps=20", *QUIET])
    again = json.loads(json.dumps(evaluate_router(model, router, idx_ST, tgt_ST, cfg)))
    assert again == ev
    # a second run with the same name refuses to overwrite a trained router without --resume
    with pytest.raises(ValueError, match="already exists"):
        run_router_command(router_run, **vars(args), log=lambda *a: None)
    # ... but one with its own name trains beside it (same target), and a bad name is one line
    other = run_router_command(router_run, **{**vars(args), "name": "budget-half-again"}, log=lambda *a: None)
    assert other == "budget-half-again" and read_eval(router_run, other)["target"] == 0.5
    assert load_router(router_run, other).name == "router:budget-half-again"
    with pytest.raises(ValueError, match="router name"):
        run_router_command(router_run, **{**vars(args), "name": "../escape"}, log=lambda *a: None)
    shutil.rmtree(router_run / "routers" / other)
    # resuming a finished router trains nothing more and evaluates to the same numbers
    run_router_command(router_run, **{**vars(args), "resume": True}, log=lambda *a: None)
    assert read_eval(router_run, name) == ev
    # an oracle run after the router: --eval-only adds the comparison and changes nothing else
    write_oracle(router_run, "late", lambda tok: "SBBS", k=2)
    try:
        run_router_command(router_run, **{**vars(args), "eval_only": True}, log=lambda *a: None)
        late = read_eval(router_run, name)
        assert late["oracle"]["name"] == "late" and {k: late[k] for k in ev} == ev
    finally:
        shutil.rmtree(router_run / "oracle" / "late")


def test_router_in_generation_with_cache(router_run):
    from duollm.model.model import KVCache

    model, cfg = load_model(router_run)
    idx_ST, _ = eval_tokens(router_run, cfg)
    router = random_router(cfg.model.n_layers, cfg.model.d_model)
    idx = idx_ST[:1, :8]
    full = model(idx, routes=router)
    cache = KVCache(cfg.model.n_layers)
    model(idx[:, :5], routes=router, cache=cache)
    step = model(idx[:, 5:], routes=router, cache=cache)  # routes decided per token from its own state
    torch.testing.assert_close(step.logits, full.logits[:, 5:], rtol=1e-4, atol=1e-4)
    assert torch.equal(step.route_LBT, full.route_LBT[:, :, 5:])
    assert set(full.route_LBT.unique().tolist()) <= {SMALL, BIG}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target=1.5), "target must be a fraction"),
        (dict(target=-0.1), "target must be a fraction"),
        (dict(target="13/12"), "target must be a fraction"),
        (dict(target="half"), "--target must be a number or a ratio"),
        (dict(target="1/0"), "--target must be a number or a ratio"),
        (dict(target=0.5, method="distillation"), "unknown router method"),
        (dict(target=0.5, options="SX"), "not a subset of SB_"),
        (dict(target=0.5, options="S_"), "big must be allowed"),
        (dict(target=0.5, skip_target=0.2), "needs skip among the options"),
        (dict(target=0.8, options="SB_", skip_target=0.5), "exceed 1"),
        (dict(target=0.5, set=["gamma=2"]), "unknown router config key gamma"),
        (dict(target=0.5, set=["alpha=lots"]), "expects a number"),
        (dict(target=0.5, method="imitation"), "imitation needs an oracle"),
        (dict(target=0.5, oracle="nope"), "no oracle 'nope'"),
    ],
)
def test_bad_input_is_a_one_line_value_error(router_run, kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        run_router_command(router_run, **kwargs)
    assert "\n" not in str(e.value)


def test_missing_run_and_router_are_value_errors(router_run, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        run_router_command(tmp_path / "nowhere", target=0.5)
    with pytest.raises(ValueError, match="no router 'budget-0.10'"):
        load_router(router_run, "budget-0.10")


def test_agreement_with_the_real_oracle_engine(router_run):
    """Reads the table ``duollm oracle`` writes; agreement is recomputed here from the raw table."""
    oracle_command = pytest.importorskip("duollm.oracle.command")
    oracle = oracle_command.run_oracle_command(router_run, budgets="1,2", max_tokens=256, progress=False)
    name = run_router_command(router_run, target=0.25, method="imitation", steps=10, oracle=oracle,
                              set=QUIET, log=lambda *a: None)
    ev = read_eval(router_run, name)
    table = pq.read_table(router_run / "oracle" / oracle / "per_token.parquet").to_pandas()
    summary = json.loads((router_run / "oracle" / oracle / "summary.json").read_text())
    router = load_router(router_run, name)
    model, cfg = load_model(router_run)
    idx_ST, tgt_ST = eval_tokens(router_run, cfg)
    route_LST = per_token_loss(model, idx_ST, tgt_ST, router)["route_LST"]
    mine = np.array([format_pattern(route_LST[:, s, t]) for s, t in zip(table.sequence, table.position)])
    theirs = table["best_pattern_k1"].astype(str).to_numpy()
    assert ev["oracle"]["name"] == oracle and ev["oracle"]["k"] == 1 and ev["oracle"]["tokens"] == 256
    assert ev["oracle"]["pattern_match"] == pytest.approx(np.mean(mine == theirs))
    per_layer = np.mean([[a == b for a, b in zip(m, t)] for m, t in zip(mine, theirs)])
    assert ev["oracle"]["agreement"] == pytest.approx(per_layer)
    assert ev["oracle"]["oracle_ppl"] == summary["budgets"][0]["oracle_ppl"]
    held = ev["oracle"]["heldout"]  # 8 sequences of 32 tokens, every second one held out
    assert held["sequences"] == 4
    odd = table.sequence % 2 == 1
    assert held["oracle_ppl"] == pytest.approx(math.exp(table.oracle_loss_k1[odd].astype(float).mean()), rel=1e-6)


def test_interrupted_router_training_resumes_exactly(router_run, tmp_path, monkeypatch):
    """The beta schedule's step counter is checkpointed: resumed == uninterrupted, bit for bit."""
    from safetensors.torch import load_file

    from duollm.routers import objectives as routers

    sets = [*QUIET, "train.save_every=4", "train.seed=7"]
    name = run_router_command(router_run, target=0.6, steps=12, set=sets, log=lambda *a: None)
    shutil.move(router_run / "routers" / name, tmp_path / "uninterrupted")

    real_beta_at = routers.beta_at

    def interrupted(step, cfg):
        if step == 6:
            raise KeyboardInterrupt
        return real_beta_at(step, cfg)

    monkeypatch.setattr(routers, "beta_at", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_router_command(router_run, target=0.6, steps=12, set=sets, log=lambda *a: None)
    assert (router_run / "routers" / name / "latest").resolve().name == "step-0000004"
    monkeypatch.setattr(routers, "beta_at", real_beta_at)
    run_router_command(router_run, target=0.6, steps=12, set=sets, resume=True, log=lambda *a: None)
    a = load_file(str(tmp_path / "uninterrupted" / "router.safetensors"))
    b = load_file(str(router_run / "routers" / name / "router.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_eval(router_run, name) == json.loads((tmp_path / "uninterrupted" / "eval.json").read_text())


def test_router_as_the_frozen_context_reference(router_run):
    """A router whose biases force BSSB is, as the oracle's frozen context, the pattern BSSB."""
    oracle = pytest.importorskip("duollm.oracle")
    model, cfg = load_model(router_run)
    idx_ST, tgt_ST = eval_tokens(router_run, cfg)
    idx, tgt = idx_ST[:2, :16], tgt_ST[:2, :16]
    router = Router(cfg.model.n_layers, cfg.model.d_model)
    with torch.no_grad():
        for layer, letter in enumerate("BSSB"):
            router.proj[layer].bias.copy_(torch.tensor([0.0, 1.0] if letter == "B" else [1.0, 0.0]))
    route_PL = np.array([[1, 1, 1, 1], [2, 1, 2, 1], [2, 2, 2, 2]])
    by_router = oracle.pattern_losses(model, idx, tgt, route_PL, context="frozen", reference=router)
    by_pattern = oracle.pattern_losses(model, idx, tgt, route_PL, context="frozen", reference="BSSB")
    torch.testing.assert_close(by_router, by_pattern, rtol=0, atol=0)
    other = oracle.pattern_losses(model, idx, tgt, route_PL, context="frozen", reference="SSSS")
    assert not torch.allclose(by_router, other)
    router.mode = "soft"  # the oracle refuses a soft reference rather than mixing routes silently
    with pytest.raises(ValueError, match="route hard"):
        oracle.pattern_losses(model, idx, tgt, route_PL, context="frozen", reference=router)


def test_budget_calibration_meets_the_target(router_run):
    model, cfg = load_model(router_run)
    idx_ST, tgt_ST = eval_tokens(router_run, cfg)
    router = random_router(cfg.model.n_layers, cfg.model.d_model, scale=0.5)
    big = lambda: (per_token_loss(model, idx_ST, tgt_ST, router)["route_LST"] == BIG).float().mean().item()
    before = big()
    target = 0.3 if before > 0.4 else 0.7  # a target the uncalibrated router misses by at least 0.1
    assert abs(before - target) > 0.1
    delta, got = calibrate_budget(model, router, idx_ST, tgt_ST, target)
    assert abs(got - target) < 0.02 and got == big() and router.offset_O[1] == delta
    assert router.mode == "hard" and router.offset_O[0] == 0.0


def test_a_router_method_registered_from_outside_runs_through_the_command_and_the_study(router_run, tmp_path,
                                                                                       monkeypatch, capsys):
    """docs/ARCHITECTURE.md's "to add a router method": one registry entry, no other file touched. A method
    that learns the budget term alone (no language-model loss) is registered here, then trained by `duollm
    router` (its default applied, its name on the folder and in eval.json) and by the study."""
    from duollm.cli import main
    from duollm.routers.methods import METHODS, RouterMethod
    from duollm.study.run import run_study

    def budget_term_only(trainer, mb):
        prob_L = []

        def policy(layer, x_BTD):
            prob_L.append(trainer.router.weights(trainer.router.logits(layer, x_BTD), "soft", 1.0))
            return prob_L[-1]

        trainer.lm(mb["idx_BT"], mb["tgt_BT"], policy, return_logits=False)
        return (torch.stack(prob_L)[..., BIG].mean() - trainer.cfg.target) ** 2

    monkeypatch.setitem(METHODS, "budget-term", RouterMethod("budget-term", budget_term_only,
                                                             defaults={"beta_schedule": "constant"}))
    assert main(["router", str(router_run), "--target", "0.5", "--method", "budget-term", "--steps", "4",
                 "--set", *QUIET]) == 0
    assert capsys.readouterr().out.split()[-1] == "budget-term-0.50"
    ev = read_eval(router_run, "budget-term-0.50")
    assert ev["method"] == "budget-term" and np.isfinite(ev["ppl"])
    saved = yaml.safe_load((router_run / "routers" / "budget-term-0.50" / "router.yaml").read_text())["config"]
    assert saved["method"] == "budget-term" and saved["beta_schedule"] == "constant"

    out = copy_trained(router_run, tmp_path / "study")
    run_study("tiny", None, out, ["study.router_methods=budget-term", "study.router_targets=1/2", "study.null=false",
                                  "study.sequential=false", "study.skip_fraction=0", "study.contexts=shared",
                                  "study.router_mixtures=", "study.router_steps=4"], log=lambda *a: None)
    res = json.loads((out / "report" / "results.json").read_text())
    assert [(r["name"], r["method"]) for r in res["routers"]] == [("budget-term-0.50", "budget-term")]


def test_expected_benefit_targets_equal_one_forward_per_pattern(router_run, tmp_path):
    """The target (labels.expected_benefit) from the kept loss matrix equals, token by token, the mean loss of
    the budget's patterns with a layer small minus with it big, each pattern run as a whole forward."""
    from itertools import product

    from duollm.oracle.command import run_oracle_command
    from duollm.oracle.naive import naive_losses
    from duollm.routers.labels import expected_benefit, load_oracle_table

    run = copy_trained(router_run, tmp_path / "run")
    oracle = run_oracle_command(run, budgets="2", max_tokens=256, save_matrix=True, progress=False)
    model, cfg = load_model(run)
    idx_ST, tgt_ST = eval_tokens(run, cfg)
    table = load_oracle_table(run, oracle, 2, idx_ST, tgt_ST, "SB")
    got_LST = expected_benefit(table)
    S = int(table.covered_ST.all(1).sum())
    patterns = ["".join(p) for p in product("SB", repeat=4) if p.count("B") == 2]  # C(4,2) = 6
    route_PL = np.array([[BIG if c == "B" else SMALL for c in p] for p in patterns])
    loss_PST = torch.stack([loss for _, loss in naive_losses(model, idx_ST[:S], tgt_ST[:S], route_PL)]).double()
    big_PL = torch.from_numpy(route_PL == BIG).double()
    want_LST = torch.einsum("pl,pst->lst", 1 - big_PL, loss_PST) / 3 - torch.einsum("pl,pst->lst", big_PL, loss_PST) / 3
    assert torch.allclose(got_LST[:, :S].double(), want_LST, atol=2e-5)
    assert torch.isnan(got_LST[:, S:]).all()  # tokens the oracle did not score


def write_benefit_matrix(run, folder):
    """A synthetic loss matrix at k = 1 of 4 where layer 2 alone gains from big (1 nat less loss)."""
    idx_ST, _ = eval_tokens(run, load_model(run)[1])
    patterns = ["".join(p) for p in ("BSSS", "SBSS", "SSBS", "SSSB")]
    pq.write_table(pa.table({"pattern": patterns, "bigs": pa.array([1] * 4, pa.int16()), "skips": pa.array([0] * 4, pa.int16()),
                             "candidate": [True] * 4, "mean_loss": [5.0, 5.0, 4.0, 5.0]}), folder / "patterns.parquet")
    np.save(folder / "loss_matrix.npy", np.array([[5.0], [5.0], [4.0], [5.0]], np.float32).repeat(idx_ST.numel(), 1))


def test_expected_benefit_router_learns_which_layer_gains_and_meets_its_budget(router_run, tmp_path):
    """On a table where layer 2 alone gains from big (a synthetic loss matrix), the router puts its one big
    layer there; without a loss matrix it is refused in one line."""
    run = copy_trained(router_run, tmp_path / "run")
    folder = write_oracle(run, "benefit-SB", lambda tok: "SSBS", k=1)
    with pytest.raises(ValueError, match="expected-benefit needs oracle benefit-SB's loss matrix"):
        run_router_command(run, target=0.25, method="expected-benefit", steps=5, set=QUIET, log=lambda *a: None)
    write_benefit_matrix(run, folder)
    name = run_router_command(run, target=0.25, method="expected-benefit", steps=150,
                              set=[*QUIET, "init=zero", "train.lr=0.05"], log=lambda *a: None)
    ev = read_eval(run, name)
    assert ev["per_layer_big"][2] > 0.9 and ev["big_fraction"] == pytest.approx(0.25, abs=0.05)


def test_peek_router_sees_the_small_ffn_and_pays_for_it(router_run, tmp_path):
    """A peeking router's logits read the token's state and the small FFN's output on it (its own frozen copy of
    the model's, saved and loaded with it); trained on the synthetic benefit table, it goes big at layer 2, at the
    big fraction where its compute (small FFN everywhere + big where routed) is a plain router's at the target."""
    from duollm.model.policy import compute_big_fraction, peek_big_fraction, peek_shape

    model, cfg = load_model(router_run)
    router = Router(4, cfg.model.d_model, "SB", peek=peek_shape(cfg.model))
    router.copy_peek(model)
    torch.nn.init.normal_(router.proj[1].weight)
    x = torch.randn(2, 3, cfg.model.d_model)
    want = router.proj[1](torch.cat([x, model.layers[1].ffn.small(x)], -1))
    assert torch.allclose(router.logits(1, x), want, atol=1e-6)
    assert not any(p.requires_grad for p in router.peek_ffn.parameters())
    fm = model.flop_model
    f = peek_big_fraction(0.25, fm)
    assert f == pytest.approx(0.25 * (1 - cfg.model.d_ff_small / cfg.model.d_ff_big))
    assert compute_big_fraction(f, fm, True) == pytest.approx(0.25) and compute_big_fraction(f, fm, False) == f

    run = copy_trained(router_run, tmp_path / "run")
    write_benefit_matrix(run, write_oracle(run, "benefit-SB", lambda tok: "SSBS", k=1))
    name = run_router_command(run, target=0.25, method="peek", steps=150,
                              set=[*QUIET, "init=zero", "train.lr=0.05"], log=lambda *a: None)
    ev = read_eval(run, name)
    assert ev["per_layer_big"][2] == max(ev["per_layer_big"]) and ev["big_fraction"] <= 0.25
    assert ev["compute_big_fraction"] == pytest.approx(compute_big_fraction(ev["big_fraction"], fm, True))
    plain = (4 * fm.attention + fm.head + 4 * fm.ffn[1] + ev["big_fraction"] * 4 * (fm.ffn[2] - fm.ffn[1])) / fm.all_big()
    assert ev["compute"] == pytest.approx(plain + 4 * fm.ffn[1] / fm.all_big(), rel=1e-4)
    again = load_router(run, name)  # the copy of the small FFNs travels with the router
    assert again.peek == peek_shape(cfg.model)
    assert torch.equal(again.peek_ffn[3].down_proj.weight, model.layers[3].ffn.small.down_proj.weight)


def test_a_routers_share_splits_into_how_many_big_layers_and_which(tmp_path):
    """count_vs_placement against a direct computation: 'how many' is the share of the per-token fixed pattern
    of the router's own count (out of sample), 'which layers' the rest; the two add up to the router's share."""
    from duollm.routers.evaluate import count_vs_placement
    from duollm.routers.labels import OracleTable

    rng = np.random.default_rng(3)
    L, S, T, k = 2, 6, 5, 1
    seq, pos = np.divmod(np.arange(S * T), T)
    fixed = {j: rng.normal(5.0, 0.1, S * T) + 0.3 for j in range(L + 1)}
    pq.write_table(pa.table({"sequence": seq, "position": pos,
                             **{f"fixed_oos_loss_k{j}": f.astype(np.float32) for j, f in fixed.items()}}),
                   tmp_path / "per_token.parquet")
    oracle_ST = torch.from_numpy(rng.normal(5.0, 0.1, (S, T))).float()
    table = OracleTable("t", k, {}, {}, torch.zeros(L, S, T, dtype=torch.long), torch.ones(S, T, dtype=torch.bool),
                        oracle_ST, folder=tmp_path)
    route_LST = torch.from_numpy(rng.choice([SMALL, BIG], (L, S, T))).long()
    router_ST = torch.from_numpy(rng.normal(5.1, 0.1, (S, T))).float()
    split = count_vs_placement({"route_LST": route_LST}, router_ST, table, torch.arange(S))
    count_N = (route_LST == BIG).sum(0).flatten().numpy()
    fixed_N = np.array([fixed[c][n] for n, c in enumerate(count_N)], np.float32).astype(np.float64)
    f, o, r = fixed[k].astype(np.float32).mean(), oracle_ST.double().mean().item(), router_ST.double().mean().item()
    assert split["how_many"]["value"] == pytest.approx((f - fixed_N.mean()) / (f - o), abs=1e-4)
    assert split["router"]["value"] == pytest.approx((f - r) / (f - o), abs=1e-4)
    assert split["how_many"]["value"] + split["which_layers"]["value"] == pytest.approx(split["router"]["value"], abs=1e-4)
    assert count_vs_placement({"route_LST": torch.full((L, S, T), 0)}, router_ST, table, torch.arange(S)) is None  # skips
