"""On-policy value routers (routers/value.py, issue 13 item 3): exact targets, the enforced budget, DAgger."""

import json
import shutil

import pytest
import torch
from conftest import assert_one_line_error, cli, copy_trained

from duollm.config import load_config
from duollm.model.model import DuoModel
from duollm.model.policy import Router
from duollm.model.routing import BIG, SMALL
from duollm.oracle.naive import naive_losses
from duollm.routers.command import run_router_command
from duollm.routers.config import resolve_router_config
from duollm.routers.objectives import RouterTrainer
from duollm.routers.store import load_router
from duollm.routers.value import budget_patterns, collect_targets, prefix_values

QUIET = ["train.eval_every=1000", "train.save_every=1000", "train.log_every=1000", "train.batch_size=4",
         "value_tokens=256"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = load_config("tiny").model
    return DuoModel(cfg).eval()


def test_budget_patterns_and_prefix_values():
    route_PL = budget_patterns(4, 2)
    assert route_PL.shape == (6, 4) and ((route_PL == BIG).sum(1) == 2).all()
    loss_PN = torch.tensor([[3.0], [1.0], [4.0], [1.5], [9.0], [2.0]])
    route_LN = torch.from_numpy(route_PL[3]).view(4, 1)  # the token follows pattern 3
    value_LNO = prefix_values(loss_PN, torch.from_numpy(route_PL), route_LN, torch.tensor([SMALL, BIG]))
    for layer in range(4):  # brute force: patterns agreeing with pattern 3 before the layer
        for o, r in enumerate((SMALL, BIG)):
            ok = [p for p in range(6) if (route_PL[p, :layer] == route_PL[3, :layer]).all() and route_PL[p, layer] == r]
            want = min((loss_PN[p, 0].item() for p in ok), default=float("inf"))
            assert value_LNO[layer, 0, o].item() == want


def test_enforced_router_spends_exactly_k():
    model = tiny_model()
    L, D = model.cfg.n_layers, model.cfg.d_model
    router = Router(L, D, "SB", budget_k=1)
    torch.nn.init.normal_(router.proj[0].weight, std=3.0)  # token-dependent choices
    idx = torch.randint(0, model.cfg.vocab_size, (3, 16))
    out = model(idx, None, router, return_logits=False)
    assert ((out.route_LBT == BIG).sum(0) == 1).all()
    assert len((out.route_LBT == BIG).float().mean((1, 2)).unique()) > 1  # not one fixed pattern
    with pytest.raises(ValueError, match="budget"):
        Router(L, D, "SB", budget_k=L + 1)


def test_targets_equal_the_naive_minimum():
    # V_l(r) from one tree walk == the minimum over one full forward per pattern (naive, frozen context
    # routed by the router), restricted to the patterns that follow the router's own prefix
    model = tiny_model()
    L = model.cfg.n_layers
    router = Router(L, model.cfg.d_model, "SB", budget_k=2)
    torch.nn.init.normal_(router.proj[1].weight, std=2.0)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 8))
    tgt = torch.randint(0, model.cfg.vocab_size, (2, 8))
    data = collect_targets(model, router, idx, tgt, batch_size=1)
    route_PL = budget_patterns(L, 2)
    loss_PN = torch.stack([loss.reshape(-1) for _, loss in naive_losses(model, idx, tgt, route_PL, context="frozen",
                                                                         reference=router)])
    want_LNO = prefix_values(loss_PN, torch.from_numpy(route_PL), data["route_NL"].T, router.route_O)
    assert torch.allclose(data["value_NLO"], want_LNO.transpose(0, 1), atol=1e-5, rtol=0)
    assert torch.allclose(data["pattern_loss_P"].float(), loss_PN.double().sum(1).float(), rtol=1e-5)
    assert ((data["route_NL"] == BIG).sum(1) == 2).all()
    assert (data["used_NL"][:, 0] == 0).all() and data["x_NLD"].shape == (16, L, model.cfg.d_model)
    # the last layer's open values are exact pattern losses: the router's own pattern's loss among them
    own = (data["route_NL"].unsqueeze(-1) == router.route_O).float().argmax(-1)
    assert torch.isfinite(data["value_NLO"].gather(-1, own.unsqueeze(-1))).all()


def test_value_losses_prefer_the_better_route():
    model = tiny_model()
    L, D = model.cfg.n_layers, model.cfg.d_model
    for method in ("value", "expected-cost"):
        cfg = resolve_router_config(load_config("tiny"), {"method": method, "target": 0.5})
        router = Router(L, D, "SB", budget_k=2)
        trainer = RouterTrainer(router, model, cfg)
        x = torch.randn(2, 3, L, D)
        used = torch.zeros(2, 3, L, dtype=torch.long)
        value = torch.zeros(2, 3, L, 2)
        value[..., 1] = 1.0  # small (option 0) is better everywhere
        mb = {"x_BTLD": x, "used_BTL": used, "value_BTLO": value}
        loss = trainer(mb)
        loss.backward()
        # a step along -grad raises small's logit over big's
        g = router.proj[0].bias.grad
        assert g[0] < 0 < g[1], (method, g)


def test_value_router_dagger_rounds_resume_and_eval(tiny_run, tmp_path):
    run = copy_trained(tiny_run, tmp_path / "run")
    logs = []
    name = run_router_command(run, target=0.5, method="value", steps=10, set=QUIET + ["dagger_rounds=2"],
                              log=logs.append)
    assert name == "value-0.50"
    folder = run / "routers" / name
    record = json.loads((folder / "dagger" / "dagger.json").read_text())
    assert 1 <= len(record["rounds"]) <= 2 and record["best_round"] in (-1, 0, 1)
    assert len(record["start"]["pattern"]) == 4 and record["start"]["pattern"].count("B") == 2
    ev = json.loads((folder / "eval.json").read_text())
    assert ev["big_fraction"] == 0.5 and ev["method"] == "value"  # the enforced budget: exactly 2 of 4
    router = load_router(run, name)
    assert router.budget_k == 2
    # a resumed run continues from its record and ends with the same router
    again = tmp_path / "again"
    shutil.copytree(run, again, symlinks=True)
    shutil.rmtree(again / "routers" / name)
    run_router_command(again, target=0.5, method="value", steps=10, set=QUIET + ["dagger_rounds=1"], log=logs.append)
    run_router_command(again, target=0.5, method="value", steps=10, set=QUIET + ["dagger_rounds=2"], resume=True,
                       log=logs.append)
    a = load_router(run, name).state_dict()
    b = load_router(again, name).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_value_router_rejects_other_options(tiny_run):
    proc = cli("router", tiny_run, "--target", "0.5", "--method", "value", "--options", "SB_",
               "--skip-target", "0.25", check=False)
    assert_one_line_error(proc, "enforce")
    proc = cli("router", tiny_run, "--target", "0.5", "--method", "value", "--set", "enforce=false", check=False)
    assert_one_line_error(proc, "enforce=true")
