"""The architecture the README's Layout promises: imports point downward (no cycle, counting imports
inside functions too), no module over 500 lines, and the run folder's file names in one module."""

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted((SRC / "duollm").rglob("*.py"))}


def imports_of(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in MODULES and t != name}
    return out


def test_no_import_cycle():
    graph = {m: imports_of(m, p) for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(stack[stack.index(n):] + [n])
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_module_over_500_lines():
    long = {m: n for m, p in MODULES.items() if (n := p.read_text().count("\n")) > 500}
    assert not long, long


def test_only_rundir_names_the_run_folder_files():
    names = ["config.yaml", "metrics.jsonl", "summary.json", "per_token.parquet", "oracle_loss.npy", "eval.json",
             "router.yaml", "router.safetensors", "tokenizer.json"]
    alternatives = "|".join(map(re.escape, names))
    pattern = re.compile(rf"""["']({alternatives})["']""")
    found = {m: sorted(set(pattern.findall(p.read_text()))) for m, p in MODULES.items() if m != "duollm.rundir"}
    assert not {m: f for m, f in found.items() if f}, found
