"""Shared fixtures: a running emulator per test (`emulator`) or per module (`shared_emulator`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.emulator import RunningEmulator, start_emulator

# Short enough that a test waiting for a commit stays fast, long enough to observe "pending".
TEST_COMMIT_DELAY = "0.2"


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
