"""The Duo model (paper section 2): routes and patterns, the KV caches, the model, the router as a policy.

These four modules are exactly the source an export carries (``integrations/hf/standalone.py``
concatenates ``routing``, ``kvcache``, ``model``, ``policy`` and then ``integrations/hf/modeling.py``
into ``modeling_duo.py``), so they import only torch, numpy and each other, in that order:
``routing`` <- ``kvcache`` <- ``model`` <- ``policy``. ``tests/test_architecture.py`` checks the rule.
"""

from .model import DuoFFN, DuoModel, DuoOutput, ModelConfig

__all__ = ["DuoFFN", "DuoModel", "DuoOutput", "ModelConfig"]
