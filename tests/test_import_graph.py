"""The package's modules form layers: no import circle (imports inside functions and under ``TYPE_CHECKING`` count),
and the algorithm (defenses, triggers, models, data, metrics) never imports the command line, the bench, run
loading or the dashboard. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_backdoor"
#: the layers that consume results: the command line, the bench, loading runs, W&B
CONSUMERS = ("lightning_backdoor.cli", "lightning_backdoor.backdoor_cli", "lightning_backdoor.bench",
             "lightning_backdoor.runs", "lightning_backdoor.dashboard")
#: the algorithm and what it is built from
ALGORITHM = ("lightning_backdoor.defenses", "lightning_backdoor.triggers", "lightning_backdoor.models",
             "lightning_backdoor.data", "lightning_backdoor.metrics")


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    """``name`` is one of the ``prefixes`` modules or inside one of those packages."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file: ``from a.b import c`` counts as importing
    the module ``a.b.c`` when there is one, else ``a.b``; relative imports are resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = modules()
    return {name: imports(name, path, set(paths)) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None (depth-first search, colouring modules)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return stack[stack.index(imported):] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_graph_is_read():
    """The walk sees what is known to be there (guards against a test that passes on an empty graph)."""
    graph = import_graph()
    assert "lightning_backdoor.runs" in graph["lightning_backdoor.bench"]
    assert "lightning_backdoor.backdoor_cli" in graph["lightning_backdoor.runs"]
    assert "lightning_backdoor.bench" in graph["lightning_backdoor.cli"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_nothing_imports_the_command_line_entry_point():
    """``cli`` is the top: the dispatcher that knows every command; the CLI class and run loading live below it."""
    importers = [name for name, imported in import_graph().items() if "lightning_backdoor.cli" in imported]
    assert importers == []


def test_the_algorithm_imports_no_consumer():
    upward = sorted((name, imported) for name, targets in import_graph().items()
                    if within(name, ALGORITHM) for imported in targets if within(imported, CONSUMERS))
    assert upward == []
