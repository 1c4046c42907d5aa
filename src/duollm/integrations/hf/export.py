"""``duollm export RUN OUT``: a run folder -> a Hugging Face model folder.

OUT holds ``config.json`` (model type ``duo``), ``model.safetensors`` (tied embedding stored
once), ``generation_config.json``, the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``,
loadable with ``AutoTokenizer``), the run's trained routers under ``routers/`` (so
``router:NAME`` policies work on the export), ``duollm_run.yaml`` (the run's resolved config,
for provenance and the evaluation window length) and ``modeling_duo.py`` behind ``auto_map``: the
model's code, needing only torch and transformers (``hf/standalone.py``), so ``trust_remote_code=True``
loads the folder where duollm is not installed.

The folder is written to ``OUT.tmp`` and renamed onto OUT only when complete (DESIGN section 7).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ... import rundir
from ...checkpoint import latest_checkpoint, load_model, load_state
from ...data.cache import load_tokenizer
from ...data.corpus import EOS
from ...io import atomic_folder

RUN_CONFIG_FILE = "duollm_run.yaml"

def hf_tokenizer(run: Path, model_max_length: int):
    """The run's tokenizer as a transformers tokenizer (``AutoTokenizer`` can reload what it saves)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = rundir.tokenizer_file(Path(run))
    if path.is_file():
        # the BPE tokenizer trained on the corpus: <|endoftext|> ends (and pads) sequences; no BOS
        return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS, pad_token=EOS,
                                       model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    load_tokenizer(Path(run))  # raises the one-line error naming what is missing
    raise AssertionError("unreachable")


def _is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "duo"
    except (OSError, ValueError):
        return False


def export_run(run, out, *, routing: str | None = None) -> Path:
    """Write the Hugging Face folder of ``run`` to ``out`` (atomically); returns ``out``.

    ``routing`` becomes the exported model's default policy (``config.routing``); None: all big.
    An existing ``out`` is replaced only if it is itself a Duo export.
    """
    from .modeling import DuoForCausalLM  # transformers: only when exporting

    run, out = Path(run), Path(out)
    if out.exists() and not (out.is_dir() and (_is_export(out) or not any(out.iterdir()))):
        raise ValueError(f"{out} exists and is not a Duo export; choose another output folder")
    duo, cfg = load_model(run)
    tok = hf_tokenizer(run, cfg.model.max_seq_len)
    model = DuoForCausalLM.from_duo_model(
        duo, routing=routing, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id
    )
    model.config.name_or_path = str(run)  # router:NAME policies resolve against the run's routers/
    model.set_routing(routing)  # validates the policy against the model now, not at load time

    with atomic_folder(out) as tmp:
        model.save_pretrained(str(tmp))  # weights, config, modeling_duo.py, the run's routers (hf/modeling.py)
        tok.save_pretrained(str(tmp))
        (tmp / RUN_CONFIG_FILE).write_text(rundir.config_path(run).read_text())
        ckpt = latest_checkpoint(run)
        provenance = {"run": str(run.resolve()), "checkpoint": ckpt.name, "step": load_state(ckpt)["step"]}
        (tmp / "duollm_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``duollm export RUN OUT [--policy SPEC]``."""
    parser.add_argument("run", help="run folder")
    parser.add_argument("out", help="output folder (Hugging Face format)")
    parser.add_argument("--policy", default=None,
                        help="default routing of the exported model: a pattern, random:P or router:NAME (default all-big)")


def run_command(args: argparse.Namespace) -> str:
    """``duollm export``: write the folder, then print its path (the last line)."""
    from . import require_transformers

    require_transformers("export")
    return str(export_run(Path(args.run), Path(args.out), routing=args.policy))
