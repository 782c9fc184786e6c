"""The import graph of the qflow package, read with ``ast``: cycles, and the library importing the CLI.

Not a test yet (no ``test_`` function: pytest collects nothing here); run it as a script::

    python tests/unit/test_architecture.py

It prints every import cycle among qflow's modules, counting module-level imports only (those that run when
a module is imported: not inside a function, not under ``if TYPE_CHECKING:``; class bodies and ``try``/``if``
blocks at module level count), and every import of ``qflow._cli`` from outside it, wherever it sits (the
CLI imports the library, never the reverse; ``qflow/__main__.py`` is the CLI's second entry point). Exit
status 1 if it found either. Cycles closed only by imports inside functions are listed for information.

A submodule's parent package is not counted as one of its imports (Python imports it first, always), and
``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "qflow"
CLI = "qflow._cli"
CLI_ENTRY_POINTS = frozenset({"qflow.__main__"})

Imports = ast.Import | ast.ImportFrom


def modules(pkg: Path = PKG) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, from its ``__init__.py``)."""
    found = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(body: list[ast.stmt]) -> Iterator[Imports]:
    """The imports that run when the module is imported."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from module_level_imports(node.body)
            yield from module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from module_level_imports(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from module_level_imports(node.body)


def all_imports(tree: ast.Module) -> Iterator[Imports]:
    """Every import statement of the module, wherever it sits."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def targets(node: Imports, importer: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The qflow modules an import statement loads (``from .x import y`` loads ``.x.y`` if it is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = importer.split(".") if is_package else importer.split(".")[:-1]
            anchor = package[: len(package) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    out = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]  # `import qflow._cli.main` loads that module
        if name:
            out.add(name)
    return out


def import_graph(every_import: bool = False, pkg: Path = PKG) -> dict[str, set[str]]:
    """Module -> the qflow modules it imports (module-level only unless ``every_import``)."""
    known = modules(pkg)
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        found = all_imports(tree) if every_import else module_level_imports(tree.body)
        is_package = path.name == "__init__.py"
        graph[name] = set().union(*(targets(node, name, is_package, known) for node in found)) - {name}
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
        for w in sorted(graph.get(v, ())):
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


def cli_imported_by_the_library(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a module outside ``qflow._cli`` imports one inside it."""
    inside = {CLI} | {m for m in graph if m.startswith(CLI + ".")}
    return sorted(
        (m, t)
        for m, ts in graph.items()
        if m not in inside and m not in CLI_ENTRY_POINTS
        for t in ts
        if t in inside
    )


def main() -> int:
    """Print the cycles and the wrong-way imports; 1 if there are any."""
    graph = import_graph()
    edges = sum(len(ts) for ts in graph.values())
    print(f"{len(graph)} modules, {edges} module-level import edges between them")
    found = cycles(graph)
    for component in found:
        print("cycle:", " <-> ".join(component))
    print(f"import cycles: {len(found)}")
    everywhere = import_graph(every_import=True)
    for component in cycles(everywhere):
        print("(for information) cycle through imports inside functions:", " <-> ".join(component))
    wrong = cli_imported_by_the_library(everywhere)
    for importer, imported in wrong:
        print(f"library imports the CLI: {importer} -> {imported}")
    print(f"library modules importing qflow._cli (any import, functions included): {len(wrong)}")
    return 1 if found or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
