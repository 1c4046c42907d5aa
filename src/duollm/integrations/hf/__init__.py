"""Hugging Face integration: the transformers model, export of a run, conversion of pretrained decoders.

Importing this package registers ``DuoConfig`` (model type ``"duo"``) and ``DuoForCausalLM``
with ``AutoConfig`` and ``AutoModelForCausalLM``, so after ``import duollm.integrations.hf`` an exported
folder loads with ``AutoModelForCausalLM.from_pretrained(folder)`` (no remote code). Exported
folders also carry an ``auto_map`` to two small modules that import this package, so
``trust_remote_code=True`` loads them in tools that never import duollm themselves.

transformers is an optional extra (``pip install 'duollm[hf]'``): without it the package still
imports (the command line builds its parser from ``export`` and ``convert``), and using the
model or running a command says what to install.
"""

__all__ = ["DuoCausalLMOutput", "DuoConfig", "DuoForCausalLM"]
MISSING = "needs transformers: pip install 'duollm[hf]'"

try:
    from transformers import AutoConfig, AutoModelForCausalLM
except ImportError:

    def __getattr__(name):
        if name in __all__:
            raise ImportError(f"duollm.integrations.hf.{name} {MISSING}")
        raise AttributeError(name)

else:
    from .modeling import DuoCausalLMOutput, DuoConfig, DuoForCausalLM

    AutoConfig.register("duo", DuoConfig, exist_ok=True)
    AutoModelForCausalLM.register(DuoConfig, DuoForCausalLM, exist_ok=True)


def require_transformers(command: str) -> None:
    """One-line ValueError (the command line's user-error channel) when the extra is missing."""
    import importlib

    try:
        importlib.import_module("transformers")
    except ImportError:
        raise ValueError(f"duollm {command} {MISSING}") from None
