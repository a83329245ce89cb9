"""ChannelWriter and CommitTracker: sequential appends per channel, acknowledgement on commit.

One `ChannelWriter` per channel per process (the process owns the channel: its name is stable
across restarts). Appends on a channel are sequential: a lock is held across "allocate offsets in
the ledger" and "append", so offsets reach Snowflake in increasing order. Waiting for the commit
happens outside that lock, so many tasks wait at once while later appends proceed (pipelining).

Every open of the channel is a fence (see worker/ledger.py): offsets allocated above the committed
offset Snowflake reports are recorded as lost, the writer generation is bumped, and the batches this
process still holds above the committed offset are appended again under new offsets (a
compare-and-set on each batch's ledger entry; if another process took a batch over, it is left to
that process).

`CommitTracker` confirms commits with bulk channel status: one poll per pipe for every channel
that has a waiter, at most every `commit_poll_seconds`, done by whichever waiter is due (no
background thread, so nothing to restart after a fork).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from worker.ledger import Allocated, ChannelRef, ChunkRecord, Conflict, Ledger, LedgerEntry
from worker.observability import get_logger
from worker.snowpipe.client import ChannelStatus, OpenChannelResult
from worker.snowpipe.encoding import EncodedRows
from worker.snowpipe.errors import ChannelReopenRequired, RetryableError

SUCCESS = "SUCCESS"
# A reopen whose replay is itself invalidated this many times in a row gives up (retry later).
MAX_REOPENS = 5
# Consecutive "someone fenced us" answers from the ledger before giving up (retry later).
MAX_FENCED = 5
# How often a waiter checks the ledger for a fence by another process.
FENCE_CHECK_SECONDS = 2.0

_log = get_logger("worker.snowpipe.channel")


class StreamingClient(Protocol):
    """The parts of `SnowpipeClient` the writer uses."""

    def open_channel(
        self,
        database: str,
        schema: str,
        pipe: str,
        channel: str,
        *,
        offset_token: str | None = None,
        fail_on_uncommitted_rows: bool = False,
    ) -> OpenChannelResult: ...

    def append_rows(
        self,
        database: str,
        schema: str,
        pipe: str,
        channel: str,
        *,
        continuation_token: str,
        payload: EncodedRows,
        start_offset_token: str | None,
        end_offset_token: str,
    ) -> str: ...

    def bulk_channel_status(
        self, database: str, schema: str, pipe: str, channel_names: Sequence[str]
    ) -> dict[str, ChannelStatus]: ...


class CommitTimeout(RetryableError):
    """The batch was not committed within the task's budget; the task retries it later."""

    hint = "Snowflake has not committed the rows yet; the batch is retried (the ledger dedups it)"


class ChannelUnstable(RetryableError):
    """The channel kept being reopened or fenced; the batch is retried later."""

    hint = "another writer keeps reopening this channel (two workers with one node name?)"


class BatchMoved(Exception):
    """Another process took the batch over (its ledger entry changed); re-read the ledger."""


class BatchDropped(RetryableError):
    """An append of the batch failed in another task's replay; the batch is retried later."""

    hint = "an append failed while the channel was replayed; retried (the ledger dedups it)"


def committed_offset(status: ChannelStatus | None) -> int:
    """The channel's committed offset as an integer (0 when nothing was committed)."""
    if status is None or status.last_committed_offset_token is None:
        return 0
    try:
        return int(status.last_committed_offset_token)
    except ValueError:
        # Not one of ours (another client wrote this channel): nothing of ours is committed.
        return 0


class PendingBatch:
    """A batch this process is appending: its chunks and its current ledger entry."""

    def __init__(
        self, batch_id: str, chunks: Sequence[EncodedRows], entry: LedgerEntry | None
    ) -> None:
        self.batch_id = batch_id
        self.chunks = list(chunks)
        self.entry = entry
        self.moved = False  # another process took it over (its ledger entry changed)
        self.dropped = False  # an append failed: the writer no longer holds it
        self.committed: ChannelStatus | None = None
        self.done = False

    def offsets_on(self, ref: ChannelRef) -> list[int]:
        """Offsets of this batch's chunks on `ref`."""
        if self.entry is None:
            return []
        return [c.offset for c in self.entry.chunks if c.ref == ref]


@dataclass(frozen=True)
class Committed:
    """Every chunk of the batch is committed; `status` is the channel's status at that point."""

    status: ChannelStatus | None


class CommitTracker:
    """Per process: waits for committed offsets, polling bulk status once per pipe."""

    def __init__(
        self,
        client: StreamingClient,
        *,
        poll_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._poll = poll_seconds
        self._clock = clock
        # One lock; one condition per pipe, so a poll wakes only the waiters of its own pipe
        # (with hundreds of waiting threads, waking them all on every poll costs real CPU).
        self._lock = threading.Lock()
        self._conds: dict[tuple[str, str, str], threading.Condition] = {}
        self._waiters: Counter[ChannelRef] = Counter()
        self._status: dict[ChannelRef, ChannelStatus] = {}
        self._polling: set[tuple[str, str, str]] = set()
        self._last_poll: dict[tuple[str, str, str], float] = {}

    def forget(self, ref: ChannelRef) -> None:
        """Drop the cached status of `ref` (after a reopen its old error code is stale)."""
        with self._lock:
            self._status.pop(ref, None)

    def wait(self, ref: ChannelRef, offset: int, deadline: float) -> ChannelStatus:
        """The status of `ref` once its committed offset reaches `offset` or it reports an error.

        Raises CommitTimeout at `deadline` (monotonic).
        """
        target = ref.target
        with self._lock:
            self._waiters[ref] += 1
            cond = self._conds.get(target)
            if cond is None:
                cond = self._conds[target] = threading.Condition(self._lock)
        try:
            while True:
                with cond:
                    status = self._status.get(ref)
                    if status is not None and (
                        status.channel_status_code != SUCCESS or committed_offset(status) >= offset
                    ):
                        return status
                    now = self._clock()
                    if now >= deadline:
                        raise CommitTimeout(
                            f"channel {ref.channel}: offset {offset} not committed in time"
                        )
                    due = self._last_poll.get(target, -1e18) + self._poll
                    if target in self._polling or now < due:
                        cond.wait(min(deadline, due if now < due else deadline) - now)
                        continue
                    self._polling.add(target)
                    names = sorted({r.channel for r in self._waiters if r.target == target})
                self._poll_once(target, names, cond)
        finally:
            with self._lock:
                self._waiters[ref] -= 1
                if self._waiters[ref] <= 0:
                    del self._waiters[ref]

    def _poll_once(
        self, target: tuple[str, str, str], names: list[str], cond: threading.Condition
    ) -> None:
        result: dict[str, ChannelStatus] = {}
        try:
            result = self._client.bulk_channel_status(*target, names)
        except RetryableError as exc:
            _log.warning("commit.poll.failed", pipe=target[2], error=str(exc))
        finally:
            # Whatever happened, release the poll so another waiter can take it over.
            with cond:
                for name, status in result.items():
                    self._status[ChannelRef(*target, name)] = status
                self._polling.discard(target)
                self._last_poll[target] = self._clock()
                cond.notify_all()


class ChannelWriter:
    """The one writer of one channel in this process (thread-safe)."""

    def __init__(
        self,
        client: StreamingClient,
        ledger: Ledger,
        tracker: CommitTracker,
        ref: ChannelRef,
    ) -> None:
        self.ref = ref
        self._client = client
        self._ledger = ledger
        self._tracker = tracker
        self._lock = threading.Lock()
        self._gen: int | None = None
        self._continuation = ""
        self.committed_at_open = 0
        self._pending: dict[str, PendingBatch] = {}
        self._errors_seen: int | None = None
        self.reopens = 0

    @property
    def generation(self) -> int | None:
        """The writer generation this process holds (None until opened, or after a failure)."""
        return self._gen

    def find(self, batch_id: str) -> PendingBatch | None:
        """The batch if this writer is appending it now."""
        return self._pending.get(batch_id)

    def forget(self, batch: PendingBatch) -> None:
        """Stop holding `batch` (its task gave up; the redelivery re-reads the ledger)."""
        with self._lock:
            if self._pending.get(batch.batch_id) is batch:
                del self._pending[batch.batch_id]

    # --- Appending ------------------------------------------------------------------------------

    def submit(self, batch: PendingBatch, template: Sequence[ChunkRecord | None]) -> None:
        """Record and append the chunks of `batch` that are None in `template`, in order.

        Raises BatchMoved if another process changed the batch's ledger entry meanwhile.
        """
        with self._lock:
            for _ in range(MAX_FENCED):
                if self._gen is None:
                    self._open_locked()
                assert self._gen is not None
                expected = batch.entry.raw if batch.entry is not None else None
                result = self._ledger.allocate(
                    self.ref, self._gen, batch.batch_id, template, expected
                )
                if isinstance(result, Conflict):
                    batch.moved = True
                    raise BatchMoved(batch.batch_id)
                if not isinstance(result, Allocated):
                    self._gen = None  # fenced by someone else: reopen, then try again
                    continue
                batch.entry = result.entry
                self._pending[batch.batch_id] = batch
                indices = [i for i, chunk in enumerate(template) if chunk is None]
                try:
                    self._append_locked(batch, indices)
                except ChannelReopenRequired:
                    self._open_locked()  # replays every pending batch, this one included
                return
            raise ChannelUnstable(f"channel {self.ref.channel} was fenced {MAX_FENCED} times")

    def _append_locked(self, batch: PendingBatch, indices: Sequence[int]) -> None:
        assert batch.entry is not None
        for i in indices:
            record = batch.entry.chunks[i]
            offset = str(record.offset)
            try:
                self._continuation = self._client.append_rows(
                    *self.ref.target,
                    self.ref.channel,
                    continuation_token=self._continuation,
                    payload=batch.chunks[i],
                    start_offset_token=offset,
                    end_offset_token=offset,
                )
            except ChannelReopenRequired:
                raise
            except BaseException:
                # The offset may or may not have reached Snowflake: no later offset may be
                # appended before a fence settles it (a later commit must not "cover" it).
                self._gen = None
                self._pending.pop(batch.batch_id, None)
                batch.dropped = True
                raise

    def _open_locked(self) -> None:
        """Open (fence) the channel and replay the batches held above its committed offset."""
        for _ in range(MAX_REOPENS):
            self._gen = None
            result = self._client.open_channel(*self.ref.target, self.ref.channel)
            committed = committed_offset(result.status)
            self._gen = self._ledger.fence(self.ref, committed)
            self._continuation = result.continuation_token
            self.committed_at_open = committed
            if self._errors_seen is None:
                self._errors_seen = result.status.rows_error_count
            self._tracker.forget(self.ref)
            self.reopens += 1
            _log.info(
                "channel.opened",
                channel=self.ref.channel,
                pipe=self.ref.pipe,
                committed=committed,
                generation=self._gen,
                pending=len(self._pending),
            )
            try:
                self._replay_locked(committed)
                return
            except ChannelReopenRequired:
                continue
        raise ChannelUnstable(f"channel {self.ref.channel}: {MAX_REOPENS} reopens in a row")

    def _replay_locked(self, committed: int) -> None:
        assert self._gen is not None
        batches = sorted(
            self._pending.values(), key=lambda b: min(b.offsets_on(self.ref), default=0)
        )
        for batch in batches:
            if batch.entry is None:
                continue
            mine = batch.offsets_on(self.ref)
            lost = dict(zip(mine, self._ledger.lost(self.ref, mine), strict=True))
            template = [
                None if (c.ref == self.ref and (c.offset > committed or lost[c.offset])) else c
                for c in batch.entry.chunks
            ]
            if all(c is not None for c in template):
                continue
            result = self._ledger.allocate(
                self.ref, self._gen, batch.batch_id, template, batch.entry.raw
            )
            if isinstance(result, Conflict):
                batch.moved = True
                self._pending.pop(batch.batch_id, None)
                continue
            if not isinstance(result, Allocated):
                raise ChannelReopenRequired(f"channel {self.ref.channel} fenced during replay")
            batch.entry = result.entry
            _log.info("channel.replay", channel=self.ref.channel, batch_id=batch.batch_id)
            self._append_locked(batch, [i for i, c in enumerate(template) if c is None])

    def recover(self, seen_generation: int | None) -> None:
        """Reopen and replay, unless that already happened since `seen_generation`."""
        with self._lock:
            if self._gen is None or self._gen == seen_generation:
                self._open_locked()

    def settle(self) -> int:
        """Make this channel's commit state final (reopen it); its committed offset."""
        with self._lock:
            self._open_locked()
            return self.committed_at_open

    # --- Waiting ----------------------------------------------------------------------------------

    def wait(self, batch: PendingBatch, deadline: float) -> Committed | None:
        """Committed once every chunk of `batch` on this channel is; None if the batch moved.

        Raises CommitTimeout at `deadline` (monotonic).
        """
        status: ChannelStatus | None = None
        while True:
            if batch.done:
                return Committed(batch.committed)
            if batch.moved:
                return None
            if batch.dropped:
                raise BatchDropped(f"batch {batch.batch_id}: append failed during a replay")
            seen_gen = self._gen
            entry = batch.entry
            assert entry is not None
            mine = [c for c in entry.chunks if c.ref == self.ref]
            reached, status = self._await(mine, deadline, seen_gen)
            if not reached:
                if batch.entry is entry and status is not None:
                    self.recover(seen_gen)  # the channel reported an error
                elif batch.entry is entry and self._ledger.generation(self.ref) != seen_gen:
                    self.recover(seen_gen)  # someone else opened (fenced) our channel
                continue
            lost = self._ledger.lost(self.ref, [c.offset for c in mine])
            if not any(lost):
                with self._lock:
                    if self._pending.get(batch.batch_id) is batch:
                        del self._pending[batch.batch_id]
                    batch.committed, batch.done = status, True
                return Committed(status)
            # A fence we did not see (another process opened our channel): reopen and replay.
            if batch.entry is entry:
                self.recover(seen_gen)
            if batch.entry is entry and not batch.moved:
                time.sleep(0.05)  # the replay is another thread's job: do not spin

    def _await(
        self, mine: Sequence[ChunkRecord], deadline: float, seen_gen: int | None
    ) -> tuple[bool, ChannelStatus | None]:
        """(True, status) once the channel passed every offset in `mine`; (False, error status)
        if the channel reports an error; (False, None) after a slice with no answer."""
        status: ChannelStatus | None = None
        try:
            for chunk in mine:
                # In slices: a fence by another process (which discarded our uncommitted rows)
                # shows in the ledger, not in the channel status.
                slice_end = min(deadline, time.monotonic() + FENCE_CHECK_SECONDS)
                status = self._tracker.wait(self.ref, chunk.offset, slice_end)
                if status.channel_status_code != SUCCESS:
                    _log.warning(
                        "channel.status.error",
                        channel=self.ref.channel,
                        code=status.channel_status_code,
                        generation=seen_gen,
                    )
                    return False, status
        except CommitTimeout:
            if time.monotonic() >= deadline:
                raise
            return False, None
        return True, status

    def new_row_errors(self, status: ChannelStatus | None) -> int:
        """How many row errors the channel reported since the last call (0 the first time)."""
        if status is None:
            return 0
        with self._lock:
            seen = self._errors_seen
            self._errors_seen = max(seen or 0, status.rows_error_count)
            if seen is None:
                return 0
            return max(0, status.rows_error_count - seen)
