"""Dependencies: minimums above every release with a known vulnerability, and constraints.txt
pinning exactly what this virtualenv (the tested one) has, for the image."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.constraints import closure

ROOT = Path(__file__).resolve().parents[2]

# The last vulnerable release of each (docs/development.md#dependencies).
VULNERABLE = {
    "cryptography": "46.0.4",  # CVE-2024-12797 (bundled OpenSSL, < 44.0.1), CVE-2026-26007
    "pyjwt": "2.12.1",  # CVE-2024-53861 (2.10.0), CVE-2026-32597 (< 2.12.0), CVE-2026-48524
    "starlette": "1.0.0",  # CVE-2024-47874, CVE-2025-62727 (< 0.49.1), CVE-2026-48710
}


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    found = {}
    for line in lines:
        requirement = Requirement(line)
        found[canonicalize_name(requirement.name)] = requirement
    return found


@pytest.mark.parametrize(("name", "vulnerable"), sorted(VULNERABLE.items()))
def test_no_minimum_admits_a_release_with_a_known_vulnerability(name: str, vulnerable: str) -> None:
    specifier = _requirements()[name].specifier
    assert not specifier.contains(vulnerable), f"{name}{specifier} admits {vulnerable}"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_exactly_what_the_tested_virtualenv_installed() -> None:
    # Fails after a dependency changed without `make constraints`.
    assert _pins() == closure()


def test_every_pin_meets_the_projects_own_minimums() -> None:
    pins = _pins()
    for name, requirement in _requirements().items():
        if name in pins:
            assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]}"
    assert canonicalize_name("snowpipe-worker") not in pins
    assert metadata.version("cryptography") == pins["cryptography"]
