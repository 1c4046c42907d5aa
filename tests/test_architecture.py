"""The architecture docs/ARCHITECTURE.md and the README's Layout promise, checked on the source:

- no import cycle (imports inside functions count too);
- imports point down the stages (``LAYERS``): a module imports only its own layer or those below it;
- no module imports another module's private (``_``-prefixed) name;
- the model's modules, which every export carries as its own code, import only each other;
- the run folder's file names appear in one module, ``rundir``;
- the top level holds the entry points and the cross-cutting pieces only.
"""

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted((SRC / "duollm").rglob("*.py"))}

# Bottom first. A module belongs to the layer of its longest matching prefix (relative to ``duollm.``).
LAYERS = [
    ("io", "stats", "runtime", "model"),  # foundations: no run folder, no config
    ("rundir", "data.corpus"),  # the run folder's names and lock; text to tokens
    ("config",),  # RunConfig, presets, strict YAML
    ("checkpoint", "data.cache"),  # a run's checkpoint and model; its tokenizer and token cache
    ("train",),  # stage 1: the one loop, validation losses, FSDP, the memory plan
    ("routers.methods", "routers.config", "routers.store"),  # what a router is: its methods, config, file; routing specs of a run
    ("oracle",),  # stage 2
    ("routers",),  # stage 3: training and evaluating routers (value targets use the oracle's engine)
    ("inference",),  # generation and wall-clock under a routing
    ("analysis",),  # pure functions of a run folder: findings, figures, the report
    ("integrations",),  # transformers, lm-evaluation-harness
    ("study",),  # `duollm run`: every stage in order
    ("cli", "__main__"),
]
TOP_LEVEL = {"duollm.__main__", "duollm.cli", "duollm.config", "duollm.rundir", "duollm.io", "duollm.stats",
             "duollm.checkpoint"}


def layer_of(module: str) -> int:
    if module == "duollm":  # the package's own file: the version and the model's names, nothing above
        return 0
    name = module.removeprefix("duollm.")
    best = max(((len(p), i) for i, group in enumerate(LAYERS) for p in group
                if name == p or name.startswith(p + ".")), default=None)
    assert best is not None, f"{module} is in no layer of LAYERS: add it where it belongs"
    return best[1]


def import_nodes(name: str, path: Path, module_level: bool = False):
    """``(target module, imported name or None)`` of every duollm import in ``path`` (``module_level``: only
    the statements at the top of the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    for node in (tree.body if module_level else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:
                    yield sub, None
                elif base in MODULES:
                    yield base, a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    yield a.name, None


def imports_of(name: str, path: Path) -> set[str]:
    return {t for t, _ in import_nodes(name, path) if t != name}


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


def test_imports_point_down():
    # a package's __init__ may gather its own modules (``duollm`` re-exports the model)
    up = [f"{m} -> {t}" for m, p in MODULES.items() for t in imports_of(m, p)
          if layer_of(t) > layer_of(m) and not (p.name == "__init__.py" and t.startswith(m + "."))]
    assert not up, up


def test_no_private_name_imported_from_another_module():
    private = [f"{m}: {t}.{n}" for m, p in MODULES.items() for t, n in import_nodes(m, p)
               if n and n.startswith("_") and not n.startswith("__") and t != m]
    assert not private, private


def test_the_exported_model_imports_only_itself():
    """``integrations/hf/standalone.py`` concatenates these sources (in ``SOURCES`` order) into an export's
    ``modeling_duo.py``, which must run where duollm is not installed: their module-level imports of duollm
    (the ones the copy drops) may name only the modules before them. (``hf/modeling.py`` imports the rest of
    duollm inside a guarded ``try`` that the copy skips.)"""
    from duollm.integrations.hf.standalone import SOURCES

    model = [m for m in MODULES if m.startswith("duollm.model.")]
    assert sorted(f"duollm/{s}" for s in SOURCES if s.startswith("model/")) == sorted(
        f"duollm/{m.removeprefix('duollm.').replace('.', '/')}.py" for m in model)
    order = [".".join(["duollm", *s.removesuffix(".py").split("/")]) for s in SOURCES]
    for i, m in enumerate(order):
        outside = {t for t, _ in import_nodes(m, MODULES[m], module_level=True)} - set(order[:i]) - {m}
        assert not outside, f"{m} imports {outside}: an export's code has only the modules before it"


def test_only_rundir_names_the_run_folder_files():
    names = ["config.yaml", "metrics.jsonl", "summary.json", "per_token.parquet", "oracle_loss.npy", "eval.json",
             "router.yaml", "router.safetensors", "tokenizer.json", "meta.json", "results.json", "report.md",
             "index.html", "evaluation.json", "bench.json", "run.json", "usage.npy", "patterns.parquet", "wandb_run.json"]
    alternatives = "|".join(map(re.escape, names))
    pattern = re.compile(rf"""["']({alternatives})["']""")
    found = {m: sorted(set(pattern.findall(p.read_text()))) for m, p in MODULES.items() if m != "duollm.rundir"}
    assert not {m: f for m, f in found.items() if f}, found


def test_the_top_level_holds_the_cross_cutting_pieces_only():
    top = {m for m in MODULES if m.count(".") <= 1 and not (SRC / m.replace(".", "/")).is_dir()}
    assert top == TOP_LEVEL, top ^ TOP_LEVEL


def test_parquet_is_read_and_written_in_one_place():
    """Issue 28, item 5: pyarrow's dataset scanner (behind pq.read_table) hung a study; io.read_table and
    io.write_table are the one reader and writer, so no other module imports pyarrow.parquet."""
    users = [m for m, p in MODULES.items() if m != "duollm.io" and "pyarrow.parquet" in p.read_text()]
    assert not users, users
