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
