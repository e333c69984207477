"""The shape of the package: no import circles, the rooms' boundaries (docs/architecture.md), one error type."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import pipeline
from pipeline.errors import CimError

PACKAGE = Path(pipeline.__file__).parent


def imports_of(path: Path) -> set[str]:
    """The pipeline modules a file imports, at module level or inside functions alike."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pipeline":
                found.update(f"pipeline.{alias.name}" for alias in node.names)
            elif node.module.startswith("pipeline."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pipeline."))
    return found


GRAPH = {f"pipeline.{p.stem}": imports_of(p) for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def test_no_import_circle() -> None:
    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = " → ".join([*path[path.index(module) :], module])
            raise AssertionError(f"import circle: {cycle}")
        for dep in sorted(GRAPH.get(module, ())):
            visit(dep, [*path, module])

    for module in GRAPH:
        visit(module, [])


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("pipeline.errors", set(GRAPH) - {"pipeline.errors"}),
        ("pipeline.log", set(GRAPH) - {"pipeline.log"}),
        ("pipeline.contract", set(GRAPH) - {"pipeline.contract", "pipeline.errors"}),  # a leaf: the image contract
        ("pipeline.domain", {"pipeline.process", "pipeline.nix", "pipeline.qemu", "pipeline.tasks"}),
        ("pipeline.install", {"pipeline.tasks"}),
        ("pipeline.boot", {"pipeline.tasks"}),
        ("pipeline.context", {"pipeline.tasks", "pipeline.uptodate", "pipeline.boot", "pipeline.install"}),
        # the up-to-date checks compare saved facts: they run nothing
        ("pipeline.uptodate", {"pipeline.tasks", "pipeline.process", "pipeline.nix", "pipeline.qemu", "pipeline.boot"}),
    ],
)
def test_rooms_keep_their_boundaries(module: str, forbidden: set[str]) -> None:
    assert not (GRAPH[module] & forbidden), f"{module} imports {sorted(GRAPH[module] & forbidden)}"


def test_only_the_graph_rooms_and_dodo_know_doit() -> None:
    users = {p.stem for p in PACKAGE.glob("*.py") if "doit" in {n.split(".")[0] for n in _top_imports(p)}}
    # tasks, context (the reporter), uptodate (doit's checks); hashing: doit's file checker; status: reads doit's DB
    # with doit's own up-to-date check (`cim status`)
    assert users <= {"tasks", "context", "uptodate", "hashing", "status"}, f"doit imported by {sorted(users)}"


def _top_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_every_library_error_derives_from_the_base_error() -> None:
    for module in (importlib.import_module(name) for name in GRAPH):
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Exception) and cls.__module__ == module.__name__:
                assert issubclass(cls, CimError), f"{module.__name__}.{name} does not derive from CimError"


def test_entry_points_catch_the_base_error_alone() -> None:
    for path in [PACKAGE / "tasks.py", PACKAGE / "cli.py", PACKAGE.parent / "dodo.py"]:
        tree = ast.parse(path.read_text())
        caught = [ast.unparse(h.type) for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.type]
        assert "CimError" in caught, f"{path.name} does not catch CimError"
        assert not any(c.startswith("(") for c in caught), f"{path.name} catches a tuple: {caught}"
