"""The routed FFN path equals the masked reference (DESIGN section 4.1): outputs and gradients."""

import dataclasses

import pytest
import torch

from duollm.config import load_config
from duollm.model.model import DuoFFN, DuoModel
from duollm.model.routing import BIG, SKIP, SMALL

TOL = dict(rtol=1e-5, atol=1e-6)


def tiny_cfg(**overrides):
    return dataclasses.replace(load_config("tiny").model, **overrides)


def grads(module: torch.nn.Module, *tensors) -> dict[str, torch.Tensor]:
    """Gradient of every parameter (zero where none flowed: a module no token took) and of the inputs."""
    out = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}
    out.update({f"input{i}": t.grad.clone() for i, t in enumerate(tensors)})
    return out


def run_path(ffn: DuoFFN, path: str, x_BTD: torch.Tensor, route_BT: torch.Tensor, dy_BTD: torch.Tensor):
    ffn.zero_grad(set_to_none=True)
    x = x_BTD.clone().requires_grad_(True)
    y = getattr(ffn, path)(x, route_BT)
    if y.requires_grad:
        y.backward(dy_BTD)
    else:  # all tokens skip: the routed path returns a constant 0 (no graph), so every gradient is 0
        x.grad = torch.zeros_like(x)
    return y.detach(), grads(ffn, x)


def assert_paths_agree(ffn: DuoFFN, route_BT: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = route_BT.shape
    D = ffn.big.down_proj.out_features
    x_BTD = torch.randn(B, T, D, generator=g)
    dy_BTD = torch.randn(B, T, D, generator=g)
    y_ref, g_ref = run_path(ffn, "masked", x_BTD, route_BT, dy_BTD)
    y_fast, g_fast = run_path(ffn, "routed", x_BTD, route_BT, dy_BTD)
    torch.testing.assert_close(y_fast, y_ref, **TOL)
    assert g_fast.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], **TOL, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_routed_equals_masked_random_routes(seed):
    """Random routes using all three routes: same output, same gradient for every parameter and the input."""
    torch.manual_seed(seed)
    ffn = DuoFFN(tiny_cfg())
    g = torch.Generator().manual_seed(100 + seed)
    route_BT = torch.randint(0, 3, (3, 17), generator=g)
    assert set(route_BT.unique().tolist()) == {SKIP, SMALL, BIG}
    assert_paths_agree(ffn, route_BT, seed)


@pytest.mark.parametrize("route", [SKIP, SMALL, BIG])
def test_routed_equals_masked_uniform_routes(route):
    """Every token on one route (the shortcut without gather)."""
    torch.manual_seed(0)
    assert_paths_agree(DuoFFN(tiny_cfg()), torch.full((2, 9), route))


@pytest.mark.parametrize("routes", [(SKIP, SMALL), (SKIP, BIG), (SMALL, BIG)])
def test_routed_equals_masked_with_an_empty_route(routes):
    """Two routes taken, the third empty (a module runs on no token)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    choice = torch.tensor(routes)
    route_BT = choice[torch.randint(0, 2, (2, 11), generator=g)]
    route_BT[0, 0], route_BT[0, 1] = routes  # both really present
    assert_paths_agree(DuoFFN(tiny_cfg()), route_BT)


def test_routed_single_token_and_expanded_routes():
    """One token per route, and routes given as a broadcast (non-contiguous) view."""
    torch.manual_seed(0)
    ffn = DuoFFN(tiny_cfg())
    assert_paths_agree(ffn, torch.tensor([[SKIP, SMALL, BIG]]))
    assert_paths_agree(ffn, torch.tensor([BIG, SKIP, SMALL, SMALL]).expand(3, 4))


@pytest.mark.parametrize("mlp,bias", [("swiglu", True), ("gelu_tanh", True)])
def test_routed_equals_masked_other_ffn_kinds(mlp, bias):
    """Biases (a skipped token must not get the bias) and GPT-2's un-gated FFN."""
    if not hasattr(load_config("tiny").model, "mlp"):
        pytest.skip("this model has no mlp/bias options")
    torch.manual_seed(0)
    ffn = DuoFFN(tiny_cfg(mlp=mlp, bias=bias))
    with torch.no_grad():  # non-zero biases, so a wrongly handled skip would show
        for p in ffn.parameters():
            if p.dim() == 1:
                p.normal_()
    route_BT = torch.randint(0, 3, (2, 13), generator=torch.Generator().manual_seed(0))
    assert_paths_agree(ffn, route_BT)


def test_routed_rejects_unknown_route():
    ffn = DuoFFN(tiny_cfg())
    with pytest.raises(ValueError, match="skip"):
        ffn.routed(torch.randn(1, 3, ffn.big.down_proj.out_features), torch.tensor([[0, 1, 3]]))


def test_model_routed_equals_masked_end_to_end():
    """The whole model: loss and every parameter's gradient agree between the two paths."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = DuoModel(cfg)
    g = torch.Generator().manual_seed(0)
    idx_BT = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    route_LBT = torch.randint(0, 3, (cfg.n_layers, 2, 16), generator=g)
    results = {}
    for path in ("masked", "routed"):
        model.zero_grad(set_to_none=True)
        out = model(idx_BT[:, :-1], idx_BT[:, 1:], routes=route_LBT[:, :, :-1], path=path)
        out.loss.backward()
        results[path] = (out.logits.detach(), grads(model))
    torch.testing.assert_close(results["routed"][0], results["masked"][0], **TOL)
    for name, g_ref in results["masked"][1].items():
        torch.testing.assert_close(results["routed"][1][name], g_ref, **TOL, msg=lambda m: f"{name}: {m}")


def test_routed_under_bf16_autocast():
    """Under CPU autocast the modules compute in bf16; the routed path must not mix dtypes in its scatter."""
    torch.manual_seed(0)
    ffn = DuoFFN(tiny_cfg())
    route_BT = torch.randint(0, 3, (2, 8), generator=torch.Generator().manual_seed(0))
    x_BTD = torch.randn(2, 8, ffn.big.down_proj.out_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast, y_ref = ffn.routed(x_BTD, route_BT), ffn.masked(x_BTD, route_BT)
    torch.testing.assert_close(y_fast.float(), y_ref.float(), rtol=2e-2, atol=2e-3)
