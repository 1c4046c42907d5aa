"""duollm: adaptive computation in language models, after Duo-LLM (arXiv 2410.10846)."""

from .model import DuoModel, DuoOutput, ModelConfig
from .routing import BIG, SKIP, SMALL, FlopModel, RouteProbs, format_pattern, parse_pattern

__version__ = "0.1.0"
__all__ = [
    "BIG", "SKIP", "SMALL", "DuoModel", "DuoOutput", "FlopModel", "ModelConfig", "RouteProbs",
    "format_pattern", "parse_pattern",
]
