"""The package graph: no package of telegram_platform imports another in a circle, and the programs
never load the development stack.

Every import counts, wherever it is written: at module level, inside a function (an import there is
still a dependency, only a hidden one) and under `if TYPE_CHECKING:` (a type-only import is a
dependency of the code's meaning, and the next refactor can turn it into a runtime one). Nodes are
the sub-packages (`telegram_platform.api`, `.worker`, ...) and the top-level modules
(`telegram_platform.settings`, ...); imports within one package are not edges.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import telegram_platform

ROOT = Path(telegram_platform.__file__).resolve().parent
PACKAGE = "telegram_platform"
# The programs' entry points (console scripts in setup.cfg) and the supervisord event listener.
ENTRY_POINTS = ("telegram_platform.cli.api", "telegram_platform.cli.worker", "telegram_platform.cli.tp",
                "telegram_platform.ops.listener")


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imported(module: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import of a telegram_platform module in `path`."""
    is_package = path.name == "__init__.py"
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # `from package import module` imports the module; `from module import name` the module.
            names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                     for alias in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                yield name, node.lineno


def _node(module: str) -> str:
    """The graph node a module belongs to: its sub-package, or itself when it is a top-level module."""
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, dict[str, list[str]]]:
    """{package: {imported package: ["module:line", ...]}} over every import in the source."""
    modules = _modules()
    graph: dict[str, dict[str, list[str]]] = {}
    for module, path in sorted(modules.items()):
        for target, line in _imported(module, path, modules):
            source_node, target_node = _node(module), _node(target)
            if source_node != target_node:
                graph.setdefault(source_node, {}).setdefault(target_node, []).append(f"{module}:{line}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with the current path on a stack)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        for target in sorted(graph.get(node, {})):
            cycle = visit(target, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_the_walk_sees_imports_inside_functions_and_type_checking_blocks() -> None:
    """The walk is not blind: a function-level and a TYPE_CHECKING import both become edges."""
    graph = package_graph()
    assert "telegram_platform.metrics" in graph["telegram_platform.queue"]  # TYPE_CHECKING in queue/consumer.py
    assert "telegram_platform.api" in graph["telegram_platform.cli"]  # cli/tp.py imports inside functions
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]


def test_no_package_imports_another_in_a_circle() -> None:
    """The package graph has no cycle; a failure names the cycle and the imports that make it."""
    graph = package_graph()
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} -> {b} ({', '.join(graph[a][b][:3])})" for a, b in itertools.pairwise(cycle)]
        pytest.fail("import cycle: " + "; ".join(steps))


def test_metric_definitions_are_a_leaf() -> None:
    """metrics/ imports none of the packages that record metrics, so any of them may import it."""
    imported = set(package_graph().get("telegram_platform.metrics", {}))
    assert not imported & {f"telegram_platform.{name}" for name in ("api", "worker", "queue", "storage", "telegram")}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_programs_do_not_load_the_development_stack(entry_point: str) -> None:
    """Importing a program's entry point loads no module of telegram_platform.devstack."""
    probe = (f"import sys, {entry_point}; "
             "print(' '.join(m for m in sys.modules if m.startswith('telegram_platform.devstack')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == ""
