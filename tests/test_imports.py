"""The package's modules import each other without a cycle, counting imports inside functions.

A cycle closed by an import inside a function still couples the modules both ways; moving a function to the
module it belongs in removes it, hiding the import does not. The graph is parsed from the sources, so nothing
is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import depthprune

SRC = Path(depthprune.__file__).parent
PACKAGE = "depthprune"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    base = current.split(".") if is_package else current.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + (module.split(".") if module else []))


def import_graph() -> dict[str, set[str]]:
    """Each module's imports of package modules, at any depth in its code (functions, methods, branches).

    ``from x import y`` counts as an import of ``x.y`` when that is a module, else of ``x``. Importing
    ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``, so a module outside a package that imports one
    of its modules imports the package too (a package's own modules are already inside it).
    """
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module) if node.level else (node.module or "")
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                parts = target.split(".")
                for end in range(2, len(parts) + 1):
                    step = ".".join(parts[:end])
                    inside = name == step or name.startswith(step + ".")
                    if step in modules and step != name and (step == target or not inside):
                        graph[name].add(step)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_counting_imports_inside_functions():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_graph_sees_imports_inside_functions_and_packages():
    graph = import_graph()
    assert "depthprune.models.arch" in graph["depthprune.backend.base"]
    assert "depthprune.models" in graph["depthprune.backend.base"]  # importing models.arch runs models/__init__
    assert "depthprune.backend" not in graph["depthprune.backend.base"]
    assert "depthprune.engine.merged" in graph["depthprune.backend.base"]  # imported inside originals()
