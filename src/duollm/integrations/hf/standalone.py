"""The code an exported model carries: ``modeling_duo.py``, needing only torch and transformers (issue 15).

An export (and every ``save_pretrained`` of a ``DuoForCausalLM``) writes one module that defines
``DuoConfig`` and ``DuoForCausalLM`` — the transformers custom-model convention: ``config.json``'s
``auto_map`` points ``AutoConfig`` and ``AutoModelForCausalLM`` at it, so ``trust_remote_code=True``
loads the folder where duollm is not installed. The module is the package's own source, not a copy
kept by hand: the modules the model needs are concatenated in import order (``SOURCES``), their
package-relative imports dropped (the names they import are defined above them), one
``from __future__`` line kept, and the run folder's names (``rundir``) written into a header, where
``hf/modeling.py``'s standalone branch (``standalone_routing_policy``) reads them.
"""

from __future__ import annotations

import ast
from pathlib import Path

from ... import rundir

PACKAGE = Path(__file__).resolve().parents[2]
# each needs only those before it (tests/test_architecture.py); the model/ package is exactly the first four
SOURCES = ("model/routing.py", "model/kvcache.py", "model/model.py", "model/policy.py", "integrations/hf/modeling.py")
MODULE = "modeling_duo"
AUTO_MAP = {"AutoConfig": f"{MODULE}.DuoConfig", "AutoModelForCausalLM": f"{MODULE}.DuoForCausalLM"}
HEADER = '''"""Duo-LLM model for transformers (``trust_remote_code=True``), written by duollm's export from its own source:
{sources}. It needs torch and transformers only (pyyaml and safetensors, which transformers installs, for routers)."""
'''


def _body(path: Path) -> str:
    """``path``'s source without ``from __future__`` and module-level package-relative imports."""
    text = path.read_text()
    drop = set()
    for node in ast.parse(text).body:
        if isinstance(node, ast.ImportFrom) and (node.level or node.module == "__future__"):
            drop |= set(range(node.lineno, node.end_lineno + 1))
    lines = text.splitlines()
    return "\n".join(line for i, line in enumerate(lines, 1) if i not in drop).strip("\n")


def layout() -> dict[str, str]:
    """The run folder's names an export's code needs (routers), from ``rundir``."""
    return {"routers": rundir.ROUTERS, "router_yaml": rundir.ROUTER_YAML, "router_weights": rundir.ROUTER_WEIGHTS,
            "router_eval": rundir.ROUTER_EVAL}


def modeling_source() -> str:
    """The text of ``modeling_duo.py``."""
    parts = [HEADER.format(sources=", ".join(f"duollm/{s}" for s in SOURCES)), "from __future__ import annotations\n",
             f"_LAYOUT = {layout()!r}  # the run folder's names (duollm.rundir)"]
    for src in SOURCES:
        parts.append(f"\n\n# {'-' * 30} duollm/{src}\n\n{_body(PACKAGE / src)}")
    return "\n".join(parts) + "\n"


def write_code(folder: Path) -> None:
    """Write ``modeling_duo.py`` into ``folder`` (``config.json``'s ``auto_map`` names it: ``AUTO_MAP``)."""
    (Path(folder) / f"{MODULE}.py").write_text(modeling_source())
