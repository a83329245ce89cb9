"""The commit poller: one bulk channel status per pipe for every channel that waits for a commit.

It runs in its own thread in the node's main process and hands each status to its pump
(`ChannelPump.on_status`), which confirms the commit in its own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from worker.observability import get_logger

if TYPE_CHECKING:
    from worker.delivery.channels import ChannelRef
    from worker.snowpipe.client import ChannelStatus

SUCCESS = "SUCCESS"
# The longest a pipe waiting for a commit goes without a status poll (unless its commits take
# long enough that a tenth of their latency is longer).
MAX_POLL_SECONDS = 1.0
# A pipe is polled no more often than this share of the commit latency recently seen on it: a
# commit seen a tenth of its latency late costs little, and at a 6 s latency the polls of one
# pipe then confirm the commits of several of its channels at once instead of one each.
LATENCY_POLL_SHARE = 0.1

_log = get_logger("worker.delivery.poller")


class StatusClient(Protocol):
    """The part of `SnowpipeClient` the poller uses."""

    def bulk_channel_status(
        self, database: str, schema: str, pipe: str, channel_names: Sequence[str]
    ) -> dict[str, ChannelStatus]: ...


class Polled(Protocol):
    """What the poller needs of a pump."""

    @property
    def ref(self) -> ChannelRef: ...

    @property
    def epoch(self) -> int: ...

    @property
    def committed(self) -> int: ...

    def wants_status(self) -> bool: ...

    def commit_expected_in(self) -> float: ...

    def commit_latency(self) -> float: ...

    def on_status(self, status: ChannelStatus, epoch: int) -> None: ...


def committed_offset(status: ChannelStatus | None) -> int:
    """The channel's committed offset as an integer (0 when nothing was committed)."""
    if status is None or status.last_committed_offset_token is None:
        return 0
    try:
        return int(status.last_committed_offset_token)
    except ValueError:
        # Not one of ours (another client wrote this channel): nothing of ours is committed.
        return 0


class CommitPoller:
    """One bulk-status poll per pipe for every channel of it that awaits a commit.

    A pipe is polled every `poll_seconds` while its commits advance; while they do not (a
    commit takes Snowflake seconds), its interval doubles up to `max_poll_seconds`, so a commit
    is seen at most that late and a pipe waiting for one costs a few polls, not dozens. Both are
    raised to a tenth of the commit latency recently seen on the pipe (the shortest of its
    waiting channels', `ChannelPump.commit_latency`), so that a pipe whose commits take 6 s is
    not polled more often per commit than one whose commits take 1 s. Nor is a pipe polled
    before the first of its waiting channels expects a commit (`ChannelPump.commit_expected_in`:
    most of the commit latency recently seen there, after its oldest append in flight).
    """

    def __init__(
        self,
        client: StatusClient,
        pumps: Callable[[], Sequence[Polled]],
        *,
        poll_seconds: float,
        max_poll_seconds: float = MAX_POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._pumps = pumps
        self._poll = poll_seconds
        self._max_poll = max(poll_seconds, max_poll_seconds)
        self._clock = clock
        self._interval: dict[tuple[str, str, str], float] = {}
        self._due: dict[tuple[str, str, str], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Poll in a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="commit poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            self.poll_once(scheduled=True)

    def poll_once(self, *, scheduled: bool = False) -> None:
        """Fetch and deliver the statuses of every channel that waits for a commit (`scheduled`:
        only of the pipes whose next poll is due)."""
        by_pipe: dict[tuple[str, str, str], list[tuple[Polled, int, int]]] = {}
        for pump in self._pumps():
            if pump.wants_status():
                by_pipe.setdefault(pump.ref.target, []).append((pump, pump.epoch, pump.committed))
        now = self._clock()
        for target in [t for t in self._due if t not in by_pipe]:
            del self._due[target]
            self._interval.pop(target, None)
        for target, waiting in by_pipe.items():
            if scheduled and now < self._due.get(target, 0.0):
                continue
            latencies = [pump.commit_latency() for pump, _, _ in waiting]
            known = [latency for latency in latencies if latency > 0.0]
            base = max(self._poll, LATENCY_POLL_SHARE * min(known)) if known else self._poll
            if scheduled and min(pump.commit_expected_in() for pump, _, _ in waiting) > 0.0:
                self._interval[target] = base / 2  # poll briskly once a commit is due
                continue
            names = [pump.ref.channel for pump, _, _ in waiting]
            try:
                statuses = self._client.bulk_channel_status(*target, names)
            except Exception as exc:  # noqa: BLE001 (the next poll tries again)
                _log.warning("commit.poll.failed", pipe=target[2], error=str(exc))
                continue
            moved = False
            for pump, epoch, seen in waiting:
                status = statuses.get(pump.ref.channel)
                if status is not None:
                    moved = moved or committed_offset(status) > seen
                    moved = moved or status.channel_status_code != SUCCESS
                    pump.on_status(status, epoch)
            interval = (
                base
                if moved
                else min(max(self._max_poll, base), 2 * self._interval.get(target, base / 2))
            )
            self._interval[target] = interval
            self._due[target] = now + interval
