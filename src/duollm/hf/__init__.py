"""Hugging Face integration: the transformers model, export of a run, conversion of pretrained decoders.

Importing this package registers ``DuoConfig`` (model type ``"duo"``) and ``DuoForCausalLM``
with ``AutoConfig`` and ``AutoModelForCausalLM``, so after ``import duollm.hf`` an exported
folder loads with ``AutoModelForCausalLM.from_pretrained(folder)`` (no remote code). Exported
folders also carry an ``auto_map`` to two small modules that import this package, so
``trust_remote_code=True`` loads them in tools that never import duollm themselves.
"""

try:
    from transformers import AutoConfig, AutoModelForCausalLM
except ImportError:  # an optional extra: say how to get it
    raise ImportError("duollm.hf needs transformers: pip install 'duollm[hf]'") from None

from .modeling import DuoCausalLMOutput, DuoConfig, DuoForCausalLM

AutoConfig.register("duo", DuoConfig, exist_ok=True)
AutoModelForCausalLM.register(DuoConfig, DuoForCausalLM, exist_ok=True)

__all__ = ["DuoCausalLMOutput", "DuoConfig", "DuoForCausalLM"]
