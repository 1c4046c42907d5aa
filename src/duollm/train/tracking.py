"""Experiment trackers (TensorBoard, Weights & Biases) beyond the training curves: one W&B run per run folder
across resumes, and the study's results in the same run as its training.

A W&B run is identified by an id; ``wandb.init(resume="allow")`` without one started a second run on every
resume (issue 28, item 6). ``wandb_run_id`` keeps the id in the folder (``RUN/wandb_run.json``), so training,
its resumes and the study's results all land in one run.

``publish_results`` logs what the study found where the training curves are: the headline numbers of
``RUN/report/results.json`` (oracle@k and fixed@k perplexity, each router's perplexity and share of the
oracle's gain, every finding's effect and the verdict counts) as TensorBoard scalars and W&B summary values,
and the report's figures as images, at the run's trained step.
"""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path

from .. import rundir
from ..config import RunConfig, parse_list
from ..io import atomic_write_json, read_json


def wandb_run_id(folder: Path) -> str:
    """The W&B run id of ``folder``: kept in ``wandb_run.json``, made (and kept) on first use."""
    path = rundir.wandb_run_path(folder)
    if path.is_file():
        return str(read_json(path)["id"])
    run_id = secrets.token_hex(4)  # W&B's own ids are 8 lowercase letters and digits
    atomic_write_json(path, {"id": run_id})
    return run_id


def wandb_dir(t, out: Path) -> Path:
    """``train.wandb_dir``, else ``WANDB_DIR`` (wandb.init's ``dir`` would override it), else the run folder."""
    return Path(t.wandb_dir or os.environ.get("WANDB_DIR") or out).expanduser()


def init_wandb(t, out: Path, run_config: dict):
    """``wandb.init`` for the folder ``out``: offline unless WANDB_MODE says otherwise, its own run id."""
    try:
        import wandb
    except ImportError:
        raise ValueError("train.wandb=true needs wandb: pip install 'duollm[wandb]'") from None
    os.environ.setdefault("WANDB_MODE", "offline")
    folder = wandb_dir(t, out)
    try:
        folder.mkdir(parents=True, exist_ok=True)  # wandb falls back to a temporary folder otherwise
    except OSError as e:
        raise ValueError(f"cannot create the W&B folder {folder} (train.wandb_dir or WANDB_DIR): {e.strerror}") from None
    return wandb.init(dir=str(folder), project=t.wandb_project or None, tags=parse_list(t.wandb_tags) or None,
                      config=run_config, name=Path(out).name, id=wandb_run_id(out), resume="allow")


def headline(results: dict) -> dict[str, float]:
    """The numbers of ``results.json`` a tracker shows: flat names, finite values only."""
    out: dict[str, float] = {}
    for sweep in results.get("oracle") or []:
        ctx = sweep.get("context", "shared")
        for b in sweep.get("budgets", []):
            for key, name in (("oracle_ppl", "oracle"), ("fixed_ppl", "fixed"), ("best_of_100_ppl", "best_of_100")):
                if b.get(key) is not None:
                    out[f"study/{name}_ppl/{ctx}/k{b['k']}"] = b[key]
    for r in results.get("routers") or []:
        if r.get("ppl") is not None:
            out[f"study/router_ppl/{r['name']}"] = r["ppl"]
    for row in results.get("gap") or []:  # shares against the out-of-sample fixed@k (analysis/gap.py)
        for r in row.get("routers") or []:
            recovered = (r.get("recovered") or {}).get("value")
            if recovered is not None:
                out[f"study/router_recovered/{r['name']}"] = recovered
    for f in results.get("findings") or []:
        if (f.get("effect") or {}).get("value") is not None:
            out[f"study/finding/{f['id']}" + (f"/{f['context']}" if f.get("context") else "")] = f["effect"]["value"]
    for verdict, n in (results.get("verdicts") or {}).items():
        out[f"study/verdicts/{verdict}"] = n
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and v == v}


def publish_results(run: Path, cfg: RunConfig, step: int) -> None:
    """The study's headline numbers and figures into the run's TensorBoard and W&B runs (module docstring);
    nothing when neither tracker is enabled or the report is missing."""
    t = cfg.train
    results_path = rundir.report_results(run)
    if not (t.tensorboard or t.wandb) or not results_path.is_file():
        return
    numbers = headline(read_json(results_path))
    figures = {p.stem: p.read_bytes() for p in sorted((rundir.report_dir(run) / rundir.REPORT_FIGURES).glob("*.png"))}
    if t.tensorboard:
        import matplotlib.pyplot as plt
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(rundir.tensorboard_dir(run))) as tb:
            for name, value in numbers.items():
                tb.add_scalar(name, value, step)
            for name, png in figures.items():
                tb.add_image(f"report/{name}", plt.imread(io.BytesIO(png), format="png")[..., :3], step,
                             dataformats="HWC")
    if t.wandb:
        import wandb
        from PIL import Image

        run_ = init_wandb(t, run, {})
        run_.summary.update(numbers)
        run_.log({f"report/{name}": wandb.Image(Image.open(io.BytesIO(png))) for name, png in figures.items()}, step=step)
        run_.finish()
