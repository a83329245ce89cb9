"""Optional parts of the install: which extra brings what, and the one line that says so.

The base install (`pip install snowpipe-worker`) is a production worker. The local tooling sits
behind extras (pyproject.toml, [project.optional-dependencies]):

    [emulator]  starlette, uvicorn        the emulator's server (`snowpipe-emulator`)
    [local]     [emulator] + fakeredis    the local stack of `snowpipe-worker run` / `up`
    [dev]       [local] + test tools      what `make install` installs

A command that needs a missing extra says which one, before it starts anything.
"""

from __future__ import annotations

import importlib.util

DISTRIBUTION = "snowpipe-worker"

# The modules each extra provides (import names; lupa is what fakeredis[lua] adds).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "emulator": ("starlette", "uvicorn"),
    "local": ("starlette", "uvicorn", "fakeredis", "lupa"),
}


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that are not installed (empty: the extra is there)."""
    return [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]


def missing_extra(extra: str, what: str) -> str | None:
    """One line naming the extra `what` needs and how to install it, or None if it is installed."""
    missing = missing_modules(extra)
    if not missing:
        return None
    return (
        f"{what} needs the [{extra}] extra ({', '.join(missing)} not installed): "
        f"pip install '{DISTRIBUTION}[{extra}]'"
    )
