"""The scale axis of the study (issue 29, item 1): the same study at other model sizes.

``study.widths`` lists model widths d_model and ``study.train_tokens`` multiples of ``train.steps``; every
pair (width, multiple) other than the run's own is one more model, trained and studied like the run's own
(oracle, routers, its own null control, its report) in ``RUN/scale/d<d>-x<m>/`` (``rundir.scale_dir``). A
size is the run's config with:

    d_model          the width asked for; L (``n_layers``), the vocabulary and the context kept
    n_heads          d_model / the run's head dimension (heads keep their width, as in GPT-2's and Llama's
                     families; the head dimension must divide every width)
    d_ff_big/small   scaled with d_model (the big:small ratio kept: the paper's 16:1 stays 16:1)
    train.steps      x the multiple (the batch and the learning-rate schedule's shape kept)

The data spec, tokenizer size and ``study.tokens`` are the run's, so every size trains the same tokenizer on
the same text and scores the same evaluation tokens (the tokenizer and split are deterministic). The report
reads the sizes back (``analysis/scale.py``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .. import rundir
from ..config import RunConfig, parse_list


@dataclass(frozen=True, order=True)
class Size:
    d_model: int
    steps_multiple: int

    @property
    def name(self) -> str:
        return rundir.scale_name(self.d_model, self.steps_multiple)


def _positive_ints(text: str, key: str) -> list[int]:
    out = []
    for item in parse_list(text):
        try:
            n = int(item)
        except ValueError:
            raise ValueError(f"study.{key}: {item!r} is not a whole number") from None
        if n <= 0:
            raise ValueError(f"study.{key}: {n} must be positive")
        if n not in out:
            out.append(n)
    return out


def sizes(cfg: RunConfig) -> list[Size]:
    """Every size of the scale axis, the run's own included (width d_model, multiple 1), smallest first;
    one size (the run's) when the axis is off. One-line ValueErrors for a width the heads cannot divide."""
    m = cfg.model
    widths = _positive_ints(cfg.study.widths, "widths") or [m.d_model]
    multiples = _positive_ints(cfg.study.train_tokens, "train_tokens") or [1]
    head_dim = m.d_model // m.n_heads
    for d in widths:
        if d % head_dim or (d // head_dim) % max(1, m.n_heads // m.kv_heads):
            raise ValueError(f"study.widths: {d} is not a multiple of the head dimension {head_dim} "
                             f"(d_model {m.d_model} / n_heads {m.n_heads}; heads keep their width)")
    out = sorted({Size(d, x) for d in widths for x in multiples} | {Size(m.d_model, 1)})
    return out


def own_size(cfg: RunConfig) -> Size:
    return Size(cfg.model.d_model, 1)


def size_config(cfg: RunConfig, size: Size) -> RunConfig:
    """The run's config at ``size``: a study of its own, without a scale axis, seeds or Stage 1 (its null
    control stays: the router findings' null is the untrained model of the same size)."""
    out = copy.deepcopy(cfg)
    m, ratio = out.model, size.d_model / cfg.model.d_model
    head_dim = cfg.model.d_model // cfg.model.n_heads
    kv_groups = cfg.model.n_heads // cfg.model.kv_heads
    m.d_model, m.n_heads = size.d_model, size.d_model // head_dim
    m.n_kv_heads = 0 if cfg.model.n_kv_heads == 0 else m.n_heads // kv_groups
    m.d_ff_big = max(1, round(cfg.model.d_ff_big * ratio))
    m.d_ff_small = max(1, round(cfg.model.d_ff_small * ratio))
    out.model = type(m)(**vars(m))  # re-run the model config's checks
    out.train.steps = cfg.train.steps * size.steps_multiple
    out.study.widths, out.study.train_tokens, out.study.seeds, out.study.stage1 = "", "", 1, False
    return out
