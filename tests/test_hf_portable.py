"""Issue 15: exports that load without duollm, save_pretrained round trips, activation checkpointing, Trainer."""

import ast
import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")

from duollm.integrations.hf import DuoConfig, DuoForCausalLM  # registers the Auto classes
from duollm.integrations.hf.export import export_run
from duollm.integrations.hf.standalone import SOURCES, modeling_source

# a plain torch + transformers environment: every import of duollm fails (CI also runs this in a fresh venv)
PLAIN = textwrap.dedent("""
    import json, sys
    sys.modules["duollm"] = None
    import torch
    from transformers import AutoModelForCausalLM
    src, dst, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    m = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True).eval()
    idx = torch.tensor([ids])
    with torch.no_grad():
        out = m(idx)
    m.save_pretrained(dst)
    again = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True).eval()
    with torch.no_grad():
        same = torch.equal(again(idx).logits, out.logits)
    gen = again.generate(idx, max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
    print(json.dumps({"module": type(m).__module__, "logits": out.logits.flatten().tolist(),
                      "routes": out.routes[:, 0].tolist(), "routing": again.config.routing, "same": same,
                      "generated": gen, "routers": sorted(p.name for p in __import__("pathlib").Path(dst, "routers").iterdir())}))
""")


def run_plain(src, dst, ids) -> dict:
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(src), str(dst), json.dumps(ids)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def routed_run(tiny_run, tmp_path_factory):
    """The tiny run with a trained router (a copy: other tests add to tiny_run)."""
    from conftest import copy_trained, duollm

    run = copy_trained(tiny_run, tmp_path_factory.mktemp("portable") / "run")
    duollm("router", run, "--target", "0.5", "--steps", "5")
    return run


def test_the_standalone_module_defines_each_name_once():
    """The concatenated sources must not shadow one another's top-level names."""
    seen = {}
    for node in ast.parse(modeling_source()).body:
        names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                 [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)])
        for n in names:
            seen[n] = seen.get(n, 0) + 1
    assert {n: c for n, c in seen.items() if c > 1} == {}
    assert len(SOURCES) == 5 and "DuoForCausalLM" in seen and "Router" in seen


def test_an_export_loads_and_round_trips_without_duollm(routed_run, tmp_path):
    """trust_remote_code in a process where duollm cannot be imported: the run's logits and routes under the
    exported router policy, save_pretrained -> from_pretrained equal, the routers carried along."""
    from duollm.checkpoint import load_model
    from duollm.routers.store import routing_policy

    out = export_run(routed_run, tmp_path / "hf", routing="router:budget-0.50")
    assert (out / "modeling_duo.py").is_file() and not (out / "configuration_duo.py").exists()
    ids = list(range(3, 19))
    res = run_plain(out, tmp_path / "again", ids)
    assert res["module"].startswith("transformers_modules.") and res["same"] and res["routing"] == "router:budget-0.50"
    assert res["routers"] == ["budget-0.50"] and len(res["generated"]) == 4
    model, cfg = load_model(routed_run)
    _, router = routing_policy("router:budget-0.50", cfg.model.n_layers, root=routed_run)
    with torch.no_grad():
        ref = model(torch.tensor([ids]), routes=router)
    assert torch.equal(torch.tensor(res["logits"]), ref.logits.flatten())
    assert res["routes"] == ref.route_LBT[:, 0].tolist() and len({tuple(r) for r in res["routes"]}) > 1


def test_save_pretrained_of_a_registered_model_writes_the_code_too(routed_run, tmp_path):
    """A model loaded through `import duollm.integrations.hf` saves the standalone code and auto_map, so the saved folder
    loads with trust_remote_code where duollm is absent."""
    from transformers import AutoModelForCausalLM

    out = export_run(routed_run, tmp_path / "hf", routing="SB_B")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, DuoForCausalLM)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_duo.DuoForCausalLM"
    res = run_plain(tmp_path / "saved", tmp_path / "again", [5, 6, 7])
    assert res["routing"] == "SB_B" and res["routes"] == [[1] * 3, [2] * 3, [0] * 3, [2] * 3]


def small_model(**kw) -> DuoForCausalLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff_big=64, d_ff_small=8, max_seq_len=48)
    return DuoForCausalLM(DuoConfig(**{**cfg, **kw}))


@pytest.mark.parametrize("policy", ["SB_B", "random:0.5", "budget-router"])
def test_activation_checkpointing_gives_the_same_gradients(policy):
    """Checkpointed blocks recompute in the backward with the routes the forward took (a random or budgeted
    policy would otherwise decide anew): loss and every gradient equal the plain backward's."""
    from duollm.model.policy import Router

    idx = torch.randint(0, 97, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = small_model().train()
        if policy == "budget-router":
            torch.manual_seed(1)
            router = Router(4, 32, "SB", budget_k=2)
            with torch.no_grad():
                for p in router.proj:
                    p.weight.normal_()
            model.set_routing(router)
        else:
            model.set_routing(policy, seed=3)
        if ckpt:
            model.activation_checkpointing_enable()
            assert model.model.gradient_checkpointing
        loss = model(input_ids=idx, labels=idx).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_trainer_step_fine_tunes_an_export(routed_run, tmp_path):
    """transformers.Trainer (accelerate, the hf extra) takes a few steps on an export under its routing policy,
    with activation checkpointing, and the saved result reloads."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    out = export_run(routed_run, tmp_path / "hf", routing="router:budget-0.50")
    model = AutoModelForCausalLM.from_pretrained(out)
    before = model.model.layers[0].ffn.big.up_proj.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(0, 512, (32,), generator=g)), "labels": ids} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                             activation_checkpointing=True, logging_steps=1, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.model.layers[0].ffn.big.up_proj.weight, before)
    model.save_pretrained(tmp_path / "tuned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    assert again.config.routing == "router:budget-0.50" and (tmp_path / "tuned" / "routers" / "budget-0.50").is_dir()


def test_trainer_gradient_accumulation_equals_one_big_batch(routed_run, tmp_path):
    """Issue 28, item 1: with gradient_accumulation_steps=4 and 4 rows per step, Trainer logged a loss ~4x that
    of 16 rows in one step (and 4x the gradient norm): the model takes **kwargs, so Trainer leaves the
    normalisation to it. The same global batch now gives the same loss and gradient norm."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    out = export_run(routed_run, tmp_path / "hf", routing="S" * 2 + "B" * 2)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(0, 512, (32,), generator=g)), "labels": ids} for _ in range(16)]
    logged = {}
    for accumulate in (1, 4):
        args = TrainingArguments(output_dir=str(tmp_path / f"t{accumulate}"), per_device_train_batch_size=16 // accumulate,
                                 gradient_accumulation_steps=accumulate, max_steps=1, learning_rate=1e-3, report_to=[],
                                 save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0)
        trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(out), args=args, train_dataset=rows)
        trainer.train()
        logged[accumulate] = next(h for h in trainer.state.log_history if "loss" in h)
    assert logged[4]["loss"] == pytest.approx(logged[1]["loss"], rel=1e-4)
    assert logged[4]["grad_norm"] == pytest.approx(logged[1]["grad_norm"], rel=1e-3)
    assert 4 < logged[1]["loss"] < 8  # a next-token loss of a 512-token vocabulary, not 4x one
