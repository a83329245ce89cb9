"""constraints.txt: the exact versions of everything a deployment installs, as tested.

The image (Dockerfile) and `make install` install with `-c constraints.txt`, so an image runs
what the test suite ran on. The file pins every distribution that `snowpipe-worker[local]` pulls
in (the base install, `[emulator]` and `[local]`), at the version installed in this virtualenv,
and nothing of the test tools. Regenerate it after changing a dependency (`make constraints`):

    .venv/bin/python -m tests.support.constraints > constraints.txt
"""

from __future__ import annotations

from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "snowpipe-worker"
EXTRAS = ("emulator", "local")
HEADER = """\
# Exact versions of everything `snowpipe-worker[local]` installs, as tested (Python 3.11).
# Generated from the test virtualenv by `make constraints` (tests/support/constraints.py);
# the Dockerfile and `make install` install with `-c constraints.txt`.
"""


def _wanted(requirement: Requirement, extras: frozenset[str]) -> bool:
    if requirement.marker is None:
        return True
    environment = default_environment()
    return any(
        requirement.marker.evaluate({**environment, "extra": extra})  # type: ignore[dict-item]
        for extra in (extras or {""})
    )


def closure(project: str = PROJECT, extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """name -> installed version of every distribution `project[extras]` needs (not itself)."""
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(project, frozenset(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted_extras = todo.pop()
        if (name, wanted_extras) in seen:
            continue
        seen.add((name, wanted_extras))
        dist = metadata.distribution(name)
        canonical = canonicalize_name(dist.metadata["Name"])
        if canonical != canonicalize_name(project):
            found[canonical] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if _wanted(requirement, wanted_extras):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return dict(sorted(found.items()))


def render() -> str:
    """The text of constraints.txt for this virtualenv."""
    return HEADER + "".join(f"{name}=={version}\n" for name, version in closure().items())


if __name__ == "__main__":
    print(render(), end="")
