"""The lower layers import one way (docs/architecture.md#layers-and-the-direction-of-imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import worker

ROOT = Path(worker.__file__).parent

# Each module of the lower layers, and the worker modules (prefixes) it may import.
BOTTOM = ("worker.errors", "worker.identifiers", "worker.redisurl", "worker.tls")
ALLOWED = {
    "worker.errors": (),
    "worker.identifiers": ("worker.errors",),
    "worker.redisurl": (),
    "worker.tls": (),
    "worker.settings": BOTTOM,
    "worker.observability": BOTTOM,
    "worker.messages": BOTTOM,
    "worker.auth": (*BOTTOM, "worker.settings", "worker.observability", "worker.auth"),
    "worker.retry": (*BOTTOM, "worker.settings", "worker.observability"),
    "worker.snowpipe": (
        *BOTTOM,
        "worker.settings",
        "worker.observability",
        "worker.auth",
        "worker.retry",
        "worker.snowpipe",
    ),
}
# The delivery core and the state-store modules it is built from: everything below them, each
# other, and nothing of the Celery layer (runtime, tasks, celery_*, metrics, health, broker,
# bootsteps) or the commands; each is handed what it needs instead (docs/architecture.md).
CORE = (
    *BOTTOM,
    "worker.settings",
    "worker.observability",
    "worker.messages",
    "worker.auth",
    "worker.retry",
    "worker.snowpipe",
    "worker.delivery",
    "worker.deadletter",
    "worker.statestore",
    "worker.tokenstore",
    "worker.rejections",
)
ALLOWED |= {
    "worker.delivery": CORE,
    "worker.deadletter": CORE,
    "worker.statestore": CORE,
    "worker.tokenstore": CORE,
    "worker.rejections": CORE,
}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "worker" or name.startswith("worker.")}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_lower_layer_imports_only_what_is_below_it(layer: str) -> None:
    allowed = ALLOWED[layer]
    paths = [p for p in ROOT.rglob("*.py") if f"{_module(p)}.".startswith(f"{layer}.")]
    assert paths
    for path in paths:
        for name in _imports(path):
            assert any(name == a or name.startswith(a + ".") for a in allowed), (
                f"{_module(path)} imports {name}"
            )


def test_the_error_tree_imports_nothing_but_the_standard_library() -> None:
    tree = ast.parse((ROOT / "errors.py").read_text())
    modules = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert modules <= {"__future__", "re", "typing"}


def test_no_two_modules_import_each_other_even_lazily() -> None:
    # `from worker import x` counts as importing worker.x (the package's lazy public names are
    # not an edge: nothing in worker/ imports them through the package).
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        name = _module(path)
        if name == "worker":
            continue
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "worker":
                edges.update(f"worker.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                edges.add(node.module)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[name] = edges
    graph = {m: {e for e in edges if e in graph and e != m} for m, edges in graph.items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for nxt in sorted(graph[module]):
            assert seen.get(nxt) != 1, " -> ".join([*path, module, nxt])
            if nxt not in seen:
                visit(nxt, [*path, module])
        seen[module] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [])
