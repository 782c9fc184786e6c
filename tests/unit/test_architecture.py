"""The import graph of the qflow package, read with ``ast``: no cycles, layers as docs/architecture.md says.

The tests here fail when a change adds an import cycle, or an import that climbs the layers
(foundation → broker → producer side → worker → public surface → CLI: a module imports only its own layer
and those below). The same checks print a report when the file is run as a script::

    python tests/unit/test_architecture.py

Two graphs: *module-level* imports (those that run when a module is imported: not inside a function, not under
``if TYPE_CHECKING:``; class bodies and ``try``/``if`` blocks at module level count) and *runtime* imports
(module-level ones plus those inside functions, still without ``TYPE_CHECKING`` blocks, which only name
types). Both must be free of cycles; the layer rules hold on the runtime graph, with the exceptions
``ALLOWED_UPWARD`` names and explains.

A submodule's parent package is not counted as one of its imports (Python imports it first, always), and
``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
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
    """Every import statement that can run: wherever it sits, except under ``if TYPE_CHECKING:``."""

    def walk(nodes: Iterable[ast.AST]) -> Iterator[Imports]:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from walk(node.orelse)
            else:
                yield from walk(ast.iter_child_nodes(node))

    return walk(tree.body)


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


# The layers, lowest first; a module belongs to the first layer whose prefix it matches.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        (
            "qflow.exceptions",
            "qflow._state",
            "qflow._settings",
            "qflow._options",
            "qflow._codec",
            "qflow._embedded",
            "qflow._cron",
            "qflow._timing",
            "qflow._dedup",
        ),
    ),
    ("broker", ("qflow._broker",)),
    (
        "producer side",
        (
            "qflow._app",
            "qflow._queue",
            "qflow._adding",
            "qflow._job",
            "qflow._processor",
            "qflow._inspect",
            "qflow._admin",
            "qflow._fleet",
            "qflow._schedule",
        ),
    ),
    ("worker", ("qflow._worker",)),
    ("public surface", ("qflow.testing",)),
    ("CLI", ("qflow._cli", "qflow.__main__")),
)
# Upward imports that are there on purpose, each inside a function.
ALLOWED_UPWARD = {
    # App.run_worker starts a Worker: a producer that never runs one never imports the worker.
    ("qflow._app", "qflow._worker.worker"),
}


def layer_of(module: str) -> int:
    """Index of ``module``'s layer in ``LAYERS`` (the package itself, ``qflow``, re-exports: the surface)."""
    if module == "qflow":
        return 4
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise LookupError(f"{module} is in no layer: add it to LAYERS and to docs/architecture.md")


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a module imports one of a higher layer, minus ``ALLOWED_UPWARD``."""
    return sorted(
        (m, t)
        for m, ts in graph.items()
        for t in ts
        if layer_of(t) > layer_of(m) and (m, t) not in ALLOWED_UPWARD
    )


def test_no_import_cycle_at_module_level() -> None:
    """No two qflow modules import each other, directly or around a loop, when they are imported."""
    assert cycles(import_graph()) == []


def test_no_import_cycle_even_through_imports_inside_functions() -> None:
    """Imports inside functions close no loop either (those under TYPE_CHECKING only name types)."""
    assert cycles(import_graph(every_import=True)) == []


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower() -> None:
    """Data flows down the tree: no module imports one of a higher layer, but for the listed exceptions."""
    graph = import_graph(every_import=True)
    for module in graph:
        layer_of(module)
    assert upward_imports(graph) == []
    assert cli_imported_by_the_library(graph) == []


def test_the_upward_exceptions_are_still_needed() -> None:
    """Each allowed upward import still exists and only inside a function (else drop it from the list)."""
    runtime = import_graph(every_import=True)
    module_level = import_graph()
    for importer, imported in ALLOWED_UPWARD:
        assert imported in runtime[importer]
        assert imported not in module_level[importer]


def test_the_layering_check_catches_an_upward_import() -> None:
    """A planted import of the worker by the broker is reported (the check is not vacuous)."""
    graph = import_graph(every_import=True)
    graph["qflow._broker.scripts"] = graph["qflow._broker.scripts"] | {"qflow._worker.worker"}
    assert ("qflow._broker.scripts", "qflow._worker.worker") in upward_imports(graph)


def test_no_module_over_500_lines() -> None:
    """One module, one job: a module nearing ~500 lines is asking to be split (STYLE.md)."""
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in sizes.items() if n > 500} == {}


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
        print("cycle through imports inside functions:", " <-> ".join(component))
    wrong = cli_imported_by_the_library(everywhere)
    for importer, imported in wrong:
        print(f"library imports the CLI: {importer} -> {imported}")
    print(f"library modules importing qflow._cli (any import, functions included): {len(wrong)}")
    upward = upward_imports(everywhere)
    for importer, imported in upward:
        print(f"upward import: {importer} ({LAYERS[layer_of(importer)][0]}) -> {imported}")
    print(f"imports that climb the layers (runtime graph, allowed exceptions aside): {len(upward)}")
    return 1 if found or wrong or upward or cycles(everywhere) else 0


if __name__ == "__main__":
    sys.exit(main())
