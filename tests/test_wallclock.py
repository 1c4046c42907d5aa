"""Issue 14: the static KV cache, host-known routes, batched generation and `duollm bench`."""

import json

import pytest
import torch
from conftest import copy_trained, duollm, snapshot

from duollm.inference.bench import WeightBytes, default_policies, format_table, measure
from duollm.inference.generate import generate_batch, generate_ids
from duollm.model.kvcache import KVCache, StaticKVCache
from duollm.model.model import DuoModel, ModelConfig
from duollm.model.policy import Router
from duollm.model.routing import BIG, SMALL


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DuoModel(ModelConfig(vocab_size=64, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff_big=64,
                                d_ff_small=8, max_seq_len=32)).eval()


def mixed_router(model, seed=1, budget_k=None):
    """A hard router with random projections: mixed routes in every layer."""
    torch.manual_seed(seed)
    router = Router(model.cfg.n_layers, model.cfg.d_model, "SB", mode="hard", budget_k=budget_k)
    with torch.no_grad():
        for p in router.proj:
            p.weight.normal_(0, 1.0)
    return router


def test_static_cache_equals_the_growing_cache_step_by_step(model):
    idx_BT = torch.randint(0, 64, (3, 20))
    router = mixed_router(model)
    static, grow = StaticKVCache(4, 20), KVCache(4)
    with torch.no_grad():
        a = [model(idx_BT[:, :7], routes=router, cache=static).logits]
        b = [model(idx_BT[:, :7], routes=router, cache=grow).logits]
        for t in range(7, 20):
            a.append(model(idx_BT[:, t : t + 1], routes=router, cache=static).logits)
            b.append(model(idx_BT[:, t : t + 1], routes=router, cache=grow).logits)
        full = model(idx_BT, routes=router).logits
    assert static.length == grow.length == 20
    torch.testing.assert_close(torch.cat(a, 1), torch.cat(b, 1), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(a, 1), full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="holds 20 positions"):
        model(idx_BT[:, :1], cache=static)


@pytest.mark.parametrize("routes", ["BS_B", "router", "budget-router"])
def test_static_generation_gives_the_tokens_of_the_growing_cache(model, routes):
    """Greedy decoding, left-padded batch: same tokens, routes and compute with either cache."""
    policy = {"BS_B": "BS_B", "router": mixed_router(model), "budget-router": mixed_router(model, 2, budget_k=2)}[routes]
    prompts = [[5, 9, 2, 33, 7], [1, 2], [40, 41, 42]]
    a = generate_batch(model, prompts, policy, max_new_tokens=9, static=True)
    b = generate_batch(model, prompts, policy, max_new_tokens=9, static=False)
    for x, y in zip(a, b):
        assert x.new_ids == y.new_ids and torch.equal(x.route_LN, y.route_LN) and torch.equal(x.flops_N, y.flops_N)


@pytest.mark.parametrize("routes", ["SB_B", "router"])
def test_left_padded_batch_equals_each_prompt_alone(model, routes):
    """Padding changes nothing: every sequence of a left-padded batch decodes as it does alone."""
    policy = mixed_router(model) if routes == "router" else routes
    prompts = [[5, 9, 2, 33, 7, 8], [1, 2], [40, 41, 42]]
    batch = generate_batch(model, prompts, policy, max_new_tokens=8)
    for prompt, g in zip(prompts, batch):
        alone = generate_ids(model, prompt, policy, max_new_tokens=8)
        assert g.new_ids == alone.new_ids and torch.equal(g.route_LN, alone.route_LN)


def test_batched_generation_stops_per_sequence_at_eos_and_all_at_the_context(model):
    prompts = [[3, 4, 5], [6, 7]]
    free = generate_batch(model, prompts, None, max_new_tokens=6)
    eos = free[0].new_ids[2]
    gens = generate_batch(model, prompts, None, max_new_tokens=6, eos_id=eos)
    for f, g in zip(free, gens):
        n = f.new_ids.index(eos) + 1 if eos in f.new_ids else len(f.new_ids)
        assert g.new_ids == f.new_ids[:n] and g.stopped == ("eos" if eos in f.new_ids else "max_new_tokens")
    long = generate_batch(model, [list(range(30)), [1]], None, max_new_tokens=10)
    assert [len(g.new_ids) for g in long] == [3, 3] and {g.stopped for g in long} == {"context"}


def test_a_pattern_is_decided_on_the_host(model):
    """A pattern reaches each block as an int: the module runs directly (no gather, no host sync), with
    the logits, routes and compute of the same routes given per token."""
    idx_BT = torch.randint(0, 64, (2, 12))
    seen = []
    blocks = model.layers
    originals = [b.ffn.routed for b in blocks]
    try:
        for b in blocks:
            b.ffn.routed = lambda x, r, f=b.ffn.routed: seen.append(1) or f(x, r)
        with torch.no_grad():
            fast = model(idx_BT, routes="SB_B")
        assert not seen  # the gather path never ran
        route_LBT = torch.tensor([SMALL, BIG, 0, BIG]).view(4, 1, 1).expand(4, 2, 12).clone()
        with torch.no_grad():
            per_token = model(idx_BT, routes=route_LBT)
        assert len(seen) == 4
    finally:
        for b, f in zip(blocks, originals):
            b.ffn.routed = f
    assert torch.equal(fast.logits, per_token.logits) and torch.equal(fast.route_LBT, per_token.route_LBT)
    assert torch.equal(fast.flops_BT, per_token.flops_BT)
    masked = model(idx_BT, routes="SB_B", path="masked")
    torch.testing.assert_close(masked.logits, fast.logits, rtol=1e-5, atol=1e-6)


def test_one_token_under_a_router_runs_its_module_directly(model):
    """Batch-1 decode under a router: one token per layer takes the module it was sent to, no gather; the
    logits equal the masked reference's and the routes differ from token to token."""
    router = mixed_router(model)
    routes = set()
    for tok in range(12):
        idx_BT = torch.tensor([[tok]])
        with torch.no_grad():
            fast, ref = model(idx_BT, routes=router), model(idx_BT, routes=router, path="masked")
        assert torch.equal(fast.route_LBT, ref.route_LBT)
        torch.testing.assert_close(fast.logits, ref.logits, rtol=1e-5, atol=1e-6)
        routes.add(tuple(fast.route_LBT.flatten().tolist()))
    assert len(routes) > 1


def test_weight_bytes_count_what_a_decode_step_reads(model):
    wb = WeightBytes.of(model)
    head = model.lm_head.weight.numel() * 4  # read by every step, tied to the embedding or not
    params = head + sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith(("embed", "lm_head")))
    L = model.cfg.n_layers
    assert wb.decode_step(torch.full((L, 3), BIG)) == params - L * wb.small
    assert wb.decode_step(torch.full((L, 3), SMALL)) == params - L * wb.big
    mixed = torch.tensor([[BIG, SMALL]] * L)  # a batch whose tokens differ: both modules read in every layer
    assert wb.decode_step(mixed) == params


def test_measure_reports_speedups_next_to_their_ideals(model):
    policies = {"all-big": "BBBB", "all-small": "SSSS", "router": mixed_router(model)}
    prompts = torch.randint(0, 64, (2, 8))
    res = measure(model, policies, prompts, new_tokens=3, batches=(1, 2), rounds=1, log=lambda s: None)
    rows = {(r["policy"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {(p, b) for p in policies for b in (1, 2)}
    for b in (1, 2):
        big, small = rows["all-big", b], rows["all-small", b]
        assert big["prefill_speedup"] == big["decode_speedup"] == 1.0 and big["decode_gain_share"] is None
        assert small["prefill_ideal"] > 1 and small["decode_ideal"] > 1 and small["decode_big"] == 0
        fm = model.flop_model
        assert small["prefill_ideal"] == pytest.approx(fm.all_big() / fm.pattern([SMALL] * 4))
    assert 0 < rows["router", 1]["decode_big"] < 1
    assert "all-small" in format_table(res)
    with pytest.raises(ValueError, match="include all-big"):
        measure(model, {"all-small": "SSSS"}, prompts)


def test_bench_command_writes_its_table_and_nothing_else(tiny_run, tmp_path):
    run = copy_trained(tiny_run, tmp_path / "run")
    before = snapshot(run)
    bad = duollm("bench", run, "--batches", "0", check=False)
    assert bad.returncode == 2 and "--batches" in bad.stderr and snapshot(run) == before
    bad = duollm("bench", run, "--prompt-len", "60", "--new-tokens", "30", check=False)
    assert bad.returncode == 2 and "context" in bad.stderr and snapshot(run) == before
    out = duollm("bench", run, "--batches", "1,2", "--prompt-len", "16", "--new-tokens", "4", "--rounds", "1")
    assert "fixed@2" in out.stdout and "all-small" in out.stdout
    res = json.loads((run / "bench" / "bench.json").read_text())
    assert {r["policy"] for r in res["rows"]} == set(default_policies(run, 4))
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k != "bench" and not k.startswith("bench/")} == before
    # the report gets its wall-clock section, and `duollm info` knows the table is there
    from duollm.analysis.report import write_report
    from duollm.analysis.rundata import inventory

    write_report(run)
    md = (run / "report" / "report.md").read_text()
    assert "## Compute and wall-clock" in md and "fixed@2" in md.split("## Compute and wall-clock")[1]
    rows = json.loads((run / "report" / "results.json").read_text())["wallclock"]["rows"]
    assert len(rows) == len(res["rows"]) and inventory(run)["bench"] is True


def test_an_unmeasurable_decode_says_so_instead_of_an_impossible_figure(model, monkeypatch):
    """Issue 28, item 3: on a busy CPU the median generation can time at or below its own prefill; the decode
    time was clamped to 1 ns and printed 7e9 tokens/s. Now the row is unmeasurable, in the table and the log."""
    import duollm.inference.bench as bench

    def crossed(fns, rounds, warmup, device):  # all-small's generation no slower than its prefill
        return {k: [0.01 if k == "all-small|generate" or k.endswith("|prefill") else 0.02] for k in fns}

    monkeypatch.setattr(bench, "time_interleaved", crossed)
    logged = []
    res = measure(model, {"all-big": "BBBB", "all-small": "SSSS"}, torch.randint(0, 64, (1, 8)), new_tokens=3,
                  batches=(1,), rounds=1, log=logged.append)
    small = next(r for r in res["rows"] if r["policy"] == "all-small")
    assert small["decode_tokens_per_s"] is None and small["decode_speedup"] is None and small["decode_gain_share"] is None
    big = next(r for r in res["rows"] if r["policy"] == "all-big")
    assert big["decode_tokens_per_s"] == pytest.approx(1 / 0.005) and big["decode_speedup"] == 1.0
    table = format_table(res)
    row = next(line for line in table.splitlines() if line.startswith("all-small"))
    assert "unmeasurable" in row and "e+" not in table
    assert any("unmeasurable for all-small" in line for line in logged)
    from duollm.analysis.wallclock import section, tables

    assert "unmeasurable" in tables(section({**res, "prompt_len": 8, "run_step": 1}))[0][2][1]
