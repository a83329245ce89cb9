"""Model-check figures (states, transitions, counterexamples) in a terminal summary section, so
they show without `-s`."""

from __future__ import annotations

from collections.abc import Callable

import pytest

_REPORT = pytest.StashKey[list[str]]()

Report = Callable[[str], None]


@pytest.fixture
def model_report(request: pytest.FixtureRequest) -> Report:
    """Call with a line: printed now (visible with -s) and repeated in the terminal summary."""
    lines = request.config.stash.setdefault(_REPORT, [])

    def report(line: str) -> None:
        print(line)
        lines.append(line)

    return report


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    lines = config.stash.get(_REPORT, [])
    if lines:
        terminalreporter.section("delivery model check")
        for line in lines:
            terminalreporter.write_line(line)
