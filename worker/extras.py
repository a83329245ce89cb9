"""Optional parts of the install: which extra brings what, and the one line that says so.

The base install (`pip install .` in the project) is a production worker. The local tooling sits
behind extras (pyproject.toml, [project.optional-dependencies]):

    [emulator]  starlette, uvicorn        the emulator's server (`snowpipe-emulator`)
    [local]     [emulator] + fakeredis    the local stack of `snowpipe-worker run` / `up`
    [dev]       [local] + test tools      what `make install` installs

A command that needs a missing extra says which one, before it starts anything.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DISTRIBUTION = "snowpipe-worker"
# The directory that holds the `worker` package: a checkout's root, or site-packages.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The modules each extra provides (import names; lupa is what fakeredis[lua] adds).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "emulator": ("starlette", "uvicorn"),
    "local": ("starlette", "uvicorn", "fakeredis", "lupa"),
}


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that are not installed (empty: the extra is there)."""
    return [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]


def install_line(extra: str, root: Path = PROJECT_ROOT) -> str:
    """How to add `extra`. snowpipe-worker is not on PyPI: it is installed from its source tree
    (this checkout, when it is one) or from a wheel built from it."""
    if (root / "pyproject.toml").is_file():
        return f"pip install -e '{root}[{extra}]'"
    return (
        f"pip install '/path/to/snowpipe-worker[{extra}]' (the project's source tree, or "
        f"'/path/to/snowpipe_worker-VERSION-py3-none-any.whl[{extra}]'; it is not on PyPI)"
    )


def missing_extra(extra: str, what: str) -> str | None:
    """One line naming the extra `what` needs and how to install it, or None if it is installed."""
    missing = missing_modules(extra)
    if not missing:
        return None
    return (
        f"{what} needs the [{extra}] extra ({', '.join(missing)} not installed): "
        f"{install_line(extra)}"
    )
