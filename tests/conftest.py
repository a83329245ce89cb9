"""Fixtures shared by the whole suite.

- `emulator` / `shared_emulator`: an emulator over plain HTTP, per test or per module
  (tests/contract/conftest.py replaces both with ones parametrized over HTTP and HTTPS);
- `db`: a claimed, empty database on the shared Redis, emptied and released afterwards;
- `clock`: the one fake clock (tests/support/clock.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.clock import FakeClock
from tests.support.emulator import TEST_COMMIT_DELAY, RunningEmulator, start_emulator
from tests.support.redis import RedisDB, claimed_db


@pytest.fixture
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    """A fresh emulator (in-memory SQLite, --commit-delay 0.2) for one test."""
    with start_emulator(
        "--commit-delay", TEST_COMMIT_DELAY, workdir=tmp_path_factory.mktemp("emulator")
    ) as emu:
        yield emu


@pytest.fixture(scope="module")
def shared_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    """One emulator (--commit-delay 0.2) shared by the tests of a module: isolate by names."""
    with start_emulator(
        "--commit-delay", TEST_COMMIT_DELAY, workdir=tmp_path_factory.mktemp("emulator")
    ) as emu:
        yield emu


@pytest.fixture
def db() -> Iterator[RedisDB]:
    """A private database on the shared Redis for one test (tests/support/redis.py)."""
    with claimed_db() as claimed:
        yield claimed


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at 0 (wall clock at WALL_EPOCH) that moves only when the test moves it."""
    return FakeClock()


# `make test` runs pytest with two xdist workers (`-n 2 --dist loadgroup`). The reliability tests,
# and the integration tests that read node-wide state (a broadcast `celery inspect` on RabbitMQ
# answers from every worker on the vhost) or hold tight timing margins, run one at a time on one
# worker; everything else shares the other worker (and fills the first one's gaps).
SERIAL_DIRS = ("reliability",)
SERIAL_MODULES = ("test_status", "test_operations", "test_client_token_expiry")


def pytest_itemcollected(item: pytest.Item) -> None:
    # At collection, before xdist's collection hook turns groups into node ids.
    if (
        item.path.parent.name in SERIAL_DIRS
        or item.path.stem in SERIAL_MODULES
        or item.get_closest_marker("rabbitmq") is not None
    ):
        item.add_marker(pytest.mark.xdist_group("serial"))


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """The model check's figures (tests/model/conftest.py's `model_report`) in a section of
    their own: read from the call reports, which xdist's workers send to the controller."""
    lines = [
        (report.nodeid, str(value))
        for reports in terminalreporter.stats.values()
        for report in reports
        if isinstance(report, pytest.TestReport) and report.when == "call"
        for name, value in report.user_properties
        if name == "model_report"
    ]
    if lines:
        terminalreporter.section("delivery model check")
        for _, line in sorted(lines, key=lambda item: item[0]):
            terminalreporter.write_line(line)
