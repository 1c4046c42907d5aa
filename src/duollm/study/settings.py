"""The study's settings (``RunConfig.study``, a section of every run's config): what they mean and their
checks, against the registries of the stages they choose from (oracle contexts, router methods).

``config.StudyConfig`` holds the values with their defaults; this module reads them: the routers' budgets
and methods, the paper's route mixtures, the skip study's skip count. ``validate_study`` is called by
``duollm run``, ``train`` and ``config`` before anything is written.
"""

from __future__ import annotations

from fractions import Fraction

from ..config import RunConfig, parse_list
from ..model.routing import parse_routing
from ..oracle.context import CONTEXTS
from ..oracle.plan import DTYPES
from ..routers.methods import METHODS
from . import scale

PAPER_MIXTURES = "0.3/0.7/0,0.5/0/0.5,0.5/0.3/0.2"  # big/small/skip of the paper's figs. 7 and 9


def sweep_contexts() -> list[str]:
    """The context policies a study can sweep every budget with: those of the tree engine."""
    return [name for name, c in CONTEXTS.items() if c.engine == "tree"]


def router_budgets(cfg: RunConfig) -> list[int]:
    """Budgets k of the study's routers: each target fraction of L rounded (1/3, 1/2, 2/3 of 12 -> 4, 6, 8)."""
    L = cfg.model.n_layers
    ks = []
    for item in parse_list(cfg.study.router_targets):
        try:
            f = Fraction(item)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"study.router_targets: {item!r} is not a fraction (e.g. 1/3 or 0.5)") from None
        if not 0 < f <= 1:
            raise ValueError(f"study.router_targets: {item} must be a fraction of the layers in (0, 1]")
        k = max(1, round(f * L))
        if k not in ks:
            ks.append(k)
    return sorted(ks)


def router_methods(cfg: RunConfig) -> list[str]:
    methods = parse_list(cfg.study.router_methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"study.router_methods: unknown method {bad[0]!r} (known: {', '.join(METHODS)})")
    return methods


def router_mixtures(cfg: RunConfig) -> list[tuple[float, str, float]]:
    """``study.router_mixtures`` as (big target, options, skip target) per router: options SB without
    skip, B_ without small, SB_ with all three."""
    text = PAPER_MIXTURES if cfg.study.router_mixtures.strip() == "paper" else cfg.study.router_mixtures
    out = []
    for item in parse_list(text):
        try:
            big, small, skip = (float(x) for x in item.split("/"))
        except ValueError:
            raise ValueError(f"study.router_mixtures: {item!r} is not big/small/skip fractions (e.g. 0.5/0.3/0.2)") from None
        if min(big, small, skip) < 0 or abs(big + small + skip - 1.0) > 1e-6 or big == 0:
            raise ValueError(f"study.router_mixtures: {item} must be fractions >= 0 summing to 1, with some big")
        options = "SB" if skip == 0 else "B_" if small == 0 else "SB_"
        out.append((big, options, 0.0 if options == "SB" else skip))
    return out


def skip_count(cfg: RunConfig) -> int:
    """Skipped layers in the skip study: round(skip_fraction * L), the paper's 6 of 12 (0: no skip study)."""
    return round(cfg.study.skip_fraction * cfg.model.n_layers)


def validate_study(cfg: RunConfig) -> None:
    """One-line ValueErrors for a bad ``study`` section."""
    st, L = cfg.study, cfg.model.n_layers
    contexts, known = parse_list(st.contexts), sweep_contexts()
    if not contexts or any(c not in known for c in contexts) or len(set(contexts)) != len(contexts):
        raise ValueError(f"study.contexts must list {' and/or '.join(known)}, comma-separated; got {st.contexts!r}")
    if any(CONTEXTS[c].reference for c in contexts) and parse_routing(st.reference, L).kind != "pattern":
        raise ValueError(f"study.reference must be B, S or a pattern (the study's routers come later); got {st.reference!r}")
    if not 0.0 <= st.skip_fraction < 1.0:
        raise ValueError(f"study.skip_fraction must be in [0, 1); got {st.skip_fraction}")
    if st.skip_fraction and not 0 < skip_count(cfg) < L:
        raise ValueError(f"study.skip_fraction={st.skip_fraction} gives {skip_count(cfg)} of {L} layers skipped")
    for name in ("router_steps", "router_batch", "batch_tokens", "seeds", "stage1_seeds"):
        if getattr(st, name) <= 0:
            raise ValueError(f"study.{name} must be positive; got {getattr(st, name)}")
    if st.dtype not in DTYPES:  # the oracle engine's
        raise ValueError(f"study.dtype must be auto, float32 or bfloat16; got {st.dtype!r}")
    if st.tokens < 0 or st.stage1_steps < 0:
        raise ValueError(f"study.tokens and study.stage1_steps must be >= 0 (0: the default); got {st.tokens}, "
                         f"{st.stage1_steps}")
    if st.stage1 and (st.stage1_steps or cfg.train.steps) < 3:
        raise ValueError("study.stage1 needs at least 3 steps per model (the big-first ablation trains 2/3 + 1/3)")
    router_budgets(cfg)
    router_methods(cfg)
    router_mixtures(cfg)
    scale.sizes(cfg)
