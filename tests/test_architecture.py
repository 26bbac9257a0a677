"""The import graph of ``src/lymph`` flows one way: no cycle, and no arrow from a lower layer
to a higher one (docs/architecture.md). Every import counts, the lazy ones inside functions
too, since they are dependencies all the same. Run alone: ``pytest tests/test_architecture.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import modules of its own layer or of a lower one. A name
# covers its submodules ("lymph.data" covers lymph.data.cache), except "lymph" itself (the
# package's __init__ only), so that every new top-level module has to be placed here.
LAYERS: list[tuple[str, ...]] = [
    ("lymph", "lymph.errors", "lymph.atomic", "lymph.console", "lymph.checks", "lymph.finite",
     "lymph.signals", "lymph.outputs", "lymph.splits", "lymph.figures", "lymph.configdict",
     "lymph.intervals"),
    ("lymph.data",),
    ("lymph.store", "lymph.store_ops", "lymph.store_import"),
    ("lymph.encoder",),
    ("lymph.head", "lymph.insample"),
    ("lymph.baselines",),
    ("lymph.report", "lymph.compare", "lymph.compare_models", "lymph.nested"),
    ("lymph.pipeline", "lymph.bench"),
    ("lymph.cli",),
]


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if name == "lymph" and module != "lymph":
                continue
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return rank


def module_files() -> dict[str, Path]:
    mods = {}
    for path in sorted((SRC / "lymph").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = module_files()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def test_every_module_is_in_a_layer() -> None:
    for module in module_files():
        layer_of(module)


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    upward = [f"{a} -> {b}" for a, bs in import_graph().items() for b in sorted(bs)
              if layer_of(b) > layer_of(a)]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_a_module_outside_the_layers_is_reported() -> None:
    import pytest

    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("lymph.newthing")
    assert layer_of("lymph.encoder.methods.ae") == layer_of("lymph.encoder")


def test_the_check_sees_a_planted_violation(tmp_path: Path, monkeypatch) -> None:
    """The checker itself can fail: a store module importing the head is reported."""
    fake = tmp_path / "lymph"
    (fake / "head").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "store.py").write_text("from lymph.head import x\n")
    (fake / "head" / "__init__.py").write_text("x = 1\nimport lymph.store\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    graph = import_graph()
    assert graph["lymph.store"] == {"lymph.head"}
    assert layer_of("lymph.head") > layer_of("lymph.store")
    assert "lymph.store" in graph["lymph.head"]
