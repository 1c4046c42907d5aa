"""CI: an export loads, round-trips and generates where duollm is NOT installed (issue 15).

    python .ci/plain_export.py make  DIR   # in duollm's venv: train tiny, a router, export, expected logits
    python .ci/plain_export.py check DIR   # in a fresh venv with torch and transformers only
"""

import json
import sys
from pathlib import Path

mode, root = sys.argv[1], Path(sys.argv[2])
IDS = list(range(3, 19))

if mode == "make":
    import subprocess

    import torch

    from duollm.checkpoint import load_model
    from duollm.routers.store import routing_policy

    run = root / "run"
    for args in (["train", "--config", "tiny", "--out", run], ["router", run, "--target", "0.5", "--steps", "5"],
                 ["export", run, root / "hf", "--policy", "router:budget-0.50"]):
        subprocess.run([sys.executable, "-m", "duollm.cli", *map(str, args)], check=True, capture_output=True)
    model, cfg = load_model(run)
    _, router = routing_policy("router:budget-0.50", cfg.model.n_layers, root=run)
    with torch.no_grad():
        out = model(torch.tensor([IDS]), routes=router)
    (root / "expected.json").write_text(json.dumps({"logits": out.logits.flatten().tolist(),
                                                    "routes": out.route_LBT[:, 0].tolist()}))
else:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert importlib.util.find_spec("duollm") is None, "this check must run where duollm is not installed"
    expected = json.loads((root / "expected.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(root / "hf", trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(root / "hf", trust_remote_code=True)
    with torch.no_grad():
        out = model(torch.tensor([IDS]))
    assert out.logits.flatten().tolist() == expected["logits"], "logits differ from duollm's"
    assert out.routes[:, 0].tolist() == expected["routes"], "routes differ from duollm's"
    model.save_pretrained(root / "again")
    again = AutoModelForCausalLM.from_pretrained(root / "again", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(again(torch.tensor([IDS])).logits, out.logits), "save_pretrained round trip changed the logits"
    assert again.config.routing == "router:budget-0.50" and (root / "again" / "routers" / "budget-0.50").is_dir()
    text = tok.decode(again.generate(**tok("The for statement", return_tensors="pt"), max_new_tokens=8, do_sample=False)[0])
    print(f"plain torch + transformers: the export loads, equals duollm, round-trips; generated {text!r}")
