"""`duollm generate`: KV-cached decoding under a policy, the layer x token route view, bad input."""

import argparse
import shutil

import pytest
import torch

from duollm.inference.generate import add_arguments as add_generate_arguments
from duollm.inference.generate import generate_ids
from duollm.inference.generate import run_command as run_generate_command
from duollm.model.model import DuoModel, KVCache, ModelConfig
from duollm.model.routing import RandomPolicy
from duollm.routers.store import routing_policy as resolve_policy


def generate_cli(capsys, *argv):
    p = argparse.ArgumentParser()
    add_generate_arguments(p)
    run_generate_command(p.parse_args([str(a) for a in argv]))
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DuoModel(ModelConfig(vocab_size=64, n_layers=4, d_model=32, n_heads=2, d_ff_big=64, d_ff_small=8,
                                max_seq_len=24)).eval()


def test_multi_token_step_after_a_cached_prefix_is_causal(model):
    """A forward of several new tokens onto a filled cache (chunked prefill) equals the full forward.

    Every layer must mask with its own cached length: layer 1 sees layer 0's cache already
    holding the new tokens, and reading the length there made the new tokens see each other.
    """
    idx_BT = torch.randint(0, 64, (2, 12))
    cache = KVCache(4)
    with torch.no_grad():
        head = model(idx_BT[:, :5], routes="SB_B", cache=cache).logits
        tail = model(idx_BT[:, 5:], routes="SB_B", cache=cache).logits
        full = model(idx_BT, routes="SB_B").logits
    torch.testing.assert_close(torch.cat([head, tail], 1), full, rtol=1e-5, atol=1e-5)


def test_cached_generation_equals_full_forward_greedy_decoding(model):
    prompt = [5, 9, 2, 33]
    g = generate_ids(model, prompt, "BS_B", max_new_tokens=8)
    idx = torch.tensor([prompt])
    routes = []
    with torch.no_grad():
        for _ in range(8):
            out = model(idx, routes="BS_B")
            routes.append(out.route_LBT[:, 0, -1])
            idx = torch.cat([idx, out.logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert g.new_ids == idx[0, len(prompt):].tolist()
    assert torch.equal(g.route_LN, torch.stack(routes, 1))
    assert g.stopped == "max_new_tokens"


def test_generation_stops_at_the_context_and_at_eos(model):
    g = generate_ids(model, list(range(20)), None, max_new_tokens=50)
    assert len(g.new_ids) == 24 - 20 + 1 and g.stopped == "context"  # positions 0..23, plus the last prediction
    first = generate_ids(model, [1, 2, 3], None, max_new_tokens=1).new_ids[0]
    g = generate_ids(model, [1, 2, 3], None, max_new_tokens=10, eos_id=first)
    assert g.new_ids == [first] and g.stopped == "eos"
    with pytest.raises(ValueError, match="context is 24"):
        generate_ids(model, list(range(30)), None)
    with pytest.raises(ValueError, match="empty"):
        generate_ids(model, [], None)


def test_sampling_is_seeded(model):
    a = generate_ids(model, [1, 2], RandomPolicy(0.5, seed=3), max_new_tokens=10, temperature=1.0, seed=1)
    b = generate_ids(model, [1, 2], RandomPolicy(0.5, seed=3), max_new_tokens=10, temperature=1.0, seed=1)
    c = generate_ids(model, [1, 2], RandomPolicy(0.5, seed=3), max_new_tokens=10, temperature=1.0, seed=2)
    assert a.new_ids == b.new_ids and torch.equal(a.route_LN, b.route_LN)
    assert a.new_ids != c.new_ids


def test_policy_specs():
    assert resolve_policy(None, 4) == ("all-big", "BBBB")
    assert resolve_policy("all-small", 4) == ("all-small", "SSSS")
    assert resolve_policy("S_BB", 4) == ("S_BB", "S_BB")
    name, policy = resolve_policy("random:0.25", 4, seed=1)
    assert name == "random:0.25" and isinstance(policy, RandomPolicy) and policy.p_big == 0.25
    for bad, msg in (("SBS", "has 3 letters"), ("random:2", "needs a number P"), ("fast:1", "unknown routing"),
                     ("router:", "needs a router name")):
        with pytest.raises(ValueError, match=msg):
            resolve_policy(bad, 4)


def test_generate_command_prints_text_and_routes(tiny_run, capsys):
    from duollm.checkpoint import load_model
    from duollm.data.cache import load_tokenizer

    prompt = "The for statement"
    out = generate_cli(capsys, tiny_run, "--prompt", prompt, "--policy", "SB_B", "--max-new-tokens", "12",
                       "--show-routes")
    lines = out.splitlines()
    model, _ = load_model(tiny_run)
    tok = load_tokenizer(tiny_run)
    ids = tok.encode(prompt)
    g = generate_ids(model, ids, "SB_B", max_new_tokens=12, eos_id=tok.backend.token_to_id("<|endoftext|>"))
    text = tok.decode(ids + (g.new_ids[:-1] if g.stopped == "eos" else g.new_ids))
    assert out.startswith(text) and text.startswith(prompt)
    rows = [ln for ln in lines if ln.startswith("L")]
    assert [r.split()[0] for r in rows] == ["L0", "L1", "L2", "L3"]
    assert [r.split()[1] for r in rows] == [c * len(g.new_ids) for c in "SB_B"]  # a pattern: one letter per layer
    assert "policy SB_B" in out and "big 50%  small 25%  skip 25%" in out


def test_generate_command_with_a_router(tiny_run, tmp_path, capsys):
    """router:NAME routes each generated token by the router's decision on its hidden state."""
    from duollm.checkpoint import load_model
    from duollm.data.cache import load_tokenizer
    from duollm.model.policy import Router
    from duollm.routers.config import RouterConfig
    from duollm.routers.store import save_router

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, symlinks=True)
    torch.manual_seed(5)
    router = Router(4, 32, "SB")
    for proj in router.proj:
        torch.nn.init.normal_(proj.weight, std=1.0)
    save_router(run / "routers" / "r1", router, RouterConfig())
    out = generate_cli(capsys, run, "--prompt", "A class", "--policy", "router:r1", "--max-new-tokens", "10",
                       "--show-routes")
    view = [ln.split()[1] for ln in out.splitlines() if ln.startswith("L")]
    model, _ = load_model(run)
    ids = load_tokenizer(run).encode("A class")
    g = generate_ids(model, ids, router, max_new_tokens=10)
    with torch.no_grad():  # the same decisions from one full forward over prompt + generated tokens
        full = model(torch.tensor([ids + g.new_ids[:-1]]), routes=router).route_LBT[:, 0, len(ids) - 1:]
    assert view == ["".join("SB"[int(r) - 1] for r in row) for row in full]
    assert "B" in "".join(view) and "S" in "".join(view)
    with pytest.raises(ValueError, match="no router 'missing'"):
        generate_cli(capsys, run, "--prompt", "x", "--policy", "router:missing")
