"""duollm: adaptive computation in language models, after Duo-LLM (arXiv 2410.10846)."""

import torch as _torch

# A denormal float costs x86 cores many times a normal one, and a model at initialisation makes them: the
# null control's skip-study oracle took 24.5 s with them, 17.4 s flushed to zero, with bit-identical results
# (docs/LOG.md 2026-12-02). The mode is per thread and torch's worker threads copy it when they start, so
# it is set here, on import, before any parallel op has started the pool.
_torch.set_flush_denormal(True)

from .model.model import DuoModel, DuoOutput, ModelConfig  # noqa: E402 (after the mode is set)
from .model.routing import BIG, SKIP, SMALL, FlopModel, RouteProbs, format_pattern, parse_pattern  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BIG", "SKIP", "SMALL", "DuoModel", "DuoOutput", "FlopModel", "ModelConfig", "RouteProbs",
    "format_pattern", "parse_pattern",
]
