"""The lower layers import one way (docs/architecture.md#layers-and-the-direction-of-imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import worker

ROOT = Path(worker.__file__).parent

# Each module of the lower layers, and the worker modules (prefixes) it may import.
BOTTOM = ("worker.errors", "worker.identifiers", "worker.redisurl")
ALLOWED = {
    "worker.errors": (),
    "worker.identifiers": ("worker.errors",),
    "worker.redisurl": (),
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
