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
from duollm.routers.value import budget_patterns, collect_targets, prefix_values, rollout_targets

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


def test_rollout_targets_equal_one_forward_per_deviation():
    """Q_l(r) of the rollout method (the router's own continuation after taking r at layer l) equals, token by
    token, the loss of one model forward in which that token alone follows the router up to l, takes r there
    and the router (with its budget) after it, every other token following the router; inf where the budget
    forbids the deviation."""
    model = tiny_model()
    L = model.cfg.n_layers
    torch.manual_seed(1)
    router = Router(L, model.cfg.d_model, "SB", budget_k=2)
    for p in router.proj:
        torch.nn.init.normal_(p.weight, std=2.0)  # choices that depend on the state
    idx = torch.randint(0, model.cfg.vocab_size, (2, 6))
    tgt = torch.randint(0, model.cfg.vocab_size, (2, 6))
    data = rollout_targets(model, router, idx, tgt, batch_size=1)
    own = model(idx, tgt, router, return_logits=False)
    assert torch.equal(data["route_NL"], own.route_LBT.reshape(L, -1).T)
    own_loss_N = own.loss_BT.reshape(-1)
    chosen_NL = (data["route_NL"].unsqueeze(-1) == router.route_O).float().argmax(-1)
    assert torch.allclose(data["value_NLO"].gather(-1, chosen_NL.unsqueeze(-1)).squeeze(-1),
                          own_loss_N.unsqueeze(1).expand(-1, L), atol=1e-5)
    T = idx.shape[1]
    checked = 0
    for n in range(idx.numel()):
        s, t = divmod(n, T)
        for layer in range(L):
            route_L = data["route_NL"][n]
            flip = SMALL if route_L[layer] == BIG else BIG
            q = data["value_NLO"][n, layer, (router.route_O == flip).nonzero().item()].item()
            used = int((route_L[:layer] == BIG).sum())
            if (flip == BIG and used >= 2) or (flip == SMALL and 2 - used >= L - layer):
                assert q == float("inf")
                continue
            spent = [0]

            def policy(lay, x_BTD):  # token t deviates at `layer`, then the router decides for it alone
                route_BT = own.route_LBT[lay, s : s + 1].clone()
                if lay == layer:
                    route_BT[0, t] = flip
                elif lay > layer:
                    logits = router.budget_logits(lay, x_BTD[:, t : t + 1], torch.tensor([[spent[0]]]))
                    route_BT[0, t] = router.route_O[logits.argmax(-1)].item()
                spent[0] += int(route_BT[0, t] == BIG)
                return route_BT

            want = model(idx[s : s + 1], tgt[s : s + 1], policy, return_logits=False).loss_BT[0, t].item()
            assert q == pytest.approx(want, abs=1e-5), (n, layer)
            variant_L = data["route_NML"][n, layer + 1]  # the deviation's routes: the router's before, k bigs in all
            assert variant_L[layer] == flip and torch.equal(variant_L[:layer], route_L[:layer])
            assert int((variant_L == BIG).sum()) == 2
            checked += 1
    assert checked > 20


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


def test_rollout_router_trains_in_dagger_rounds_on_its_own_rollouts(tiny_run, tmp_path):
    run = copy_trained(tiny_run, tmp_path / "run")
    name = run_router_command(run, target=0.5, method="rollout", steps=10, set=QUIET + ["dagger_rounds=2"],
                              log=lambda *a: None)
    folder = run / "routers" / name
    record = json.loads((folder / "dagger" / "dagger.json").read_text())
    from safetensors.torch import load_file
    first = load_file(str(folder / "dagger" / "round-0.safetensors"))
    assert "route_NML" not in first and first["value_NLO"].shape[1:] == (4, 2)
    assert record["rounds"] and json.loads((folder / "eval.json").read_text())["big_fraction"] == 0.5


def test_value_router_rejects_other_options(tiny_run):
    proc = cli("router", tiny_run, "--target", "0.5", "--method", "value", "--options", "SB_",
               "--skip-target", "0.25", check=False)
    assert_one_line_error(proc, "enforce")
    proc = cli("router", tiny_run, "--target", "0.5", "--method", "value", "--set", "enforce=false", check=False)
    assert_one_line_error(proc, "enforce=true")
