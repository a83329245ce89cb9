"""Model-check figures (states, transitions, seconds, counterexamples) for the terminal summary.

`model_report(line)` prints the line (visible with -s) and attaches it to the test's report
(`user_properties`), which pytest-xdist sends from its workers to the controller; the summary
section itself is written by tests/conftest.py (`pytest_terminal_summary`), which the
controller loads, so the figures show in `make test` (two xdist workers) as in a plain run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

REPORT_PROPERTY = "model_report"

Report = Callable[[str], None]


@pytest.fixture
def model_report(request: pytest.FixtureRequest) -> Report:
    """Call with a line: printed now and repeated in the terminal summary."""

    def report(line: str) -> None:
        print(line)
        request.node.user_properties.append((REPORT_PROPERTY, line))

    return report
