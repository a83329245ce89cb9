"""CommitTracker: many waiters, one bulk-status poll per pipe per interval, errors surface."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from worker.ledger import ChannelRef
from worker.snowpipe.channel import CommitTimeout, CommitTracker
from worker.snowpipe.client import ChannelStatus
from worker.snowpipe.errors import ServerError

POLL = 0.02


def status(channel: str, committed: int | None, code: str = "SUCCESS") -> ChannelStatus:
    return ChannelStatus(
        database_name="DB",
        schema_name="SC",
        pipe_name="P",
        channel_name=channel,
        channel_status_code=code,
        last_committed_offset_token=None if committed is None else str(committed),
        rows_inserted=0,
        rows_parsed=0,
        rows_error_count=0,
        last_error_offset_upper_bound=None,
        last_error_message=None,
    )


class FakeStatusClient:
    """Commits one more offset on every channel at each poll; counts polls per pipe."""

    def __init__(self, *, fail_first: int = 0, code: str = "SUCCESS") -> None:
        self.polls: Counter[str] = Counter()
        self.committed: Counter[tuple[str, str]] = Counter()
        self.fail_first = fail_first
        self.code = code
        self.lock = threading.Lock()

    def bulk_channel_status(
        self, database: str, schema: str, pipe: str, channel_names: Sequence[str]
    ) -> dict[str, ChannelStatus]:
        with self.lock:
            self.polls[pipe] += 1
            if self.fail_first:
                self.fail_first -= 1
                raise ServerError("503 from the status endpoint", op="bulk_channel_status")
            out = {}
            for name in channel_names:
                self.committed[(pipe, name)] += 1
                out[name] = status(name, self.committed[(pipe, name)], self.code)
            return out

    def open_channel(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - unused
        raise AssertionError("not used")

    def append_rows(self, *args: Any, **kwargs: Any) -> str:  # pragma: no cover - unused
        raise AssertionError("not used")


def test_many_waiters_share_one_poll_per_pipe_and_all_see_their_commit() -> None:
    client = FakeStatusClient()
    tracker = CommitTracker(client, poll_seconds=POLL)
    results: list[ChannelStatus] = []
    errors: list[BaseException] = []

    def wait(pipe: str, offset: int) -> None:
        try:
            ref = ChannelRef("DB", "SC", pipe, "ch")
            results.append(tracker.wait(ref, offset, time.monotonic() + 10))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=wait, args=(f"P{i % 4}", 1 + i % 5)) for i in range(200)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert errors == []
    assert len(results) == 200
    # Offsets up to 5 need at most a handful of polls per pipe, however many threads wait.
    assert all(n <= 8 for n in client.polls.values()), client.polls
    assert set(client.polls) == {"P0", "P1", "P2", "P3"}


def test_a_failed_poll_is_retried_by_the_next_waiter() -> None:
    client = FakeStatusClient(fail_first=2)
    tracker = CommitTracker(client, poll_seconds=POLL)
    got = tracker.wait(ChannelRef("DB", "SC", "P", "ch"), 1, time.monotonic() + 5)
    assert got.last_committed_offset_token == "1"
    assert client.polls["P"] == 3


def test_an_error_status_returns_at_once_for_the_writer_to_reopen() -> None:
    client = FakeStatusClient(code="ERR_CHANNEL_MUST_BE_REOPENED")
    tracker = CommitTracker(client, poll_seconds=POLL)
    got = tracker.wait(ChannelRef("DB", "SC", "P", "ch"), 1_000, time.monotonic() + 5)
    assert got.channel_status_code == "ERR_CHANNEL_MUST_BE_REOPENED"


def test_waiting_past_the_deadline_is_a_commit_timeout() -> None:
    client = FakeStatusClient()
    tracker = CommitTracker(client, poll_seconds=POLL)
    with pytest.raises(CommitTimeout):
        tracker.wait(ChannelRef("DB", "SC", "P", "ch"), 10_000, time.monotonic() + 0.2)
