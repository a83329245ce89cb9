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


# `make test` runs pytest with two xdist workers (`-n 2 --dist loadgroup`). The tests that start
# Celery workers, brokers' queues and benchmarks-like loads (integration, reliability) run one at
# a time on one of them: some read node-wide state (a broadcast `celery inspect` on RabbitMQ
# answers from every worker on the vhost), and their timing margins assume a machine not shared
# with another such test. The unit, contract and model tests fill the other worker meanwhile.
SERIAL_DIRS = ("integration", "reliability")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.parent.name in SERIAL_DIRS:
            item.add_marker(pytest.mark.xdist_group("serial"))
