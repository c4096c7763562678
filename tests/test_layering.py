"""The package's shape: no import cycle, and no import from a lower layer to a higher one.

Every `import` counts, also those inside functions (a lazy import is still a dependency).
`from megapatch.pkg import name` depends on the submodule `name` when there is one, else on
the package's `__init__`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megapatch"

# Lower layers never import higher ones; a layer may import its own modules and any below.
LAYERS = {
    "errors": 0,
    "logging_utils": 0,
    "faults": 0,
    "flops": 0,
    "config": 1,
    "data": 1,
    "distributed": 1,
    "ops": 1,
    "parallel": 2,
    "model": 3,
    "checkpoint": 4,
    "training": 5,
    "report": 6,
    "commands": 6,
    "cli": 7,
    "__main__": 8,
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module not in modules:
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else max(LAYERS.values())  # megapatch/__init__


def test_every_module_has_a_layer():
    unknown = {m.split(".")[1] for m in _graph() if "." in m and m.split(".")[1] not in LAYERS}
    assert not unknown, f"give these a layer in LAYERS: {sorted(unknown)}"


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    wrong = [
        f"{module} imports {dep}"
        for module, deps in _graph().items()
        for dep in deps
        if _layer(dep) > _layer(module)
    ]
    assert not wrong, "; ".join(sorted(wrong))


def test_the_rules_named_in_the_design():
    graph = _graph()

    def imports_from(prefix: str, other: str) -> list[str]:
        return [
            f"{m} -> {d}"
            for m, deps in graph.items()
            if m.startswith(prefix)
            for d in deps
            if d.startswith(other)
        ]

    assert not imports_from("megapatch.model", "megapatch.training")
    assert not imports_from("megapatch.model", "megapatch.checkpoint")
    assert not imports_from("megapatch.data", "megapatch.config")
    assert not imports_from("megapatch.checkpoint", "megapatch.training")
    assert graph["megapatch.config.sections"] <= {"megapatch.config.yamlio"}  # a leaf
    top_level = [p for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(top_level) <= 8, sorted(p.name for p in top_level)
