"""The offsets of one channel as its pump sees them: a passive object with no I/O.

`ChannelOffsets` decides what the pump sends next and what a channel status confirms; the pump
(worker/delivery/pump.py) does the talking, and the model check (tests/model/) drives the same
object, so the decisions it checks are the ones that run. Like the Kafka connector's
`PartitionOffsetTracker`: the code that talks to Snowflake asks it what to send and tells it
what was sent and what was committed.

    committed      Snowflake's committed offset as last seen (after an open: the open's)
    sent_upto      the last offset of the last request Snowflake accepted in this session
    read_upto      the last offset read from the log into the buffer
    buffer         entries read and not yet sent, in offset order
    inflight       requests accepted and not yet seen committed, in order
    isolate_until  entries up to this offset go one per request (finding a refused batch)
    refusal        a batch Snowflake refused, to dead-letter after the next settle
    latency        the recent commit latency (the first as seen; falls at once, rises by a tenth)
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from worker.delivery.log import Entry

# While isolating, and for the first batch of a request, nothing more joins it than this many
# entries read ahead (a backlog goes out at once rather than lingering).
READ_COUNT = 256
# The poller waits for this share of a channel's recent commit latency after its oldest append
# before polling for it (never longer than the cap). The latency is learnt from commits seen, so
# it errs long by up to a poll interval and falls at once to a faster commit: 90 % then costs
# about one poll per commit whether commits take 1 s or 6 s (70 % with a 5 s cap cost three or
# four at 6 s, most of them too early).
EXPECT_SHARE = 0.9
EXPECT_MAX_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class InFlight:
    """An append Snowflake accepted and has not committed yet."""

    first: int
    last: int
    batch_ids: tuple[str, ...]
    rows: int
    oldest_ms: int
    sent_at: float  # on the pump's clock


@dataclass(frozen=True, slots=True)
class Refusal:
    """Snowflake refused, for good, a request holding only `entry`: its batch is dead-lettered
    after the next settle (when nothing of it can still commit)."""

    entry: Entry
    reason: str


def recent_latency(recent: float, observed: float) -> float:
    """The channel's recent commit latency after one more observation: the first is taken as
    it is (`recent` 0: none yet), then it falls to a faster commit at once and rises by a tenth
    of the way to a slower one (so polls start early rather than late). Rising from nothing by
    tenths took some twenty commits to learn a 6 s latency, polling early all along."""
    if recent <= 0.0:
        return observed
    return observed if observed < recent else recent + (observed - recent) / 10


class ChannelOffsets:
    """What a channel's pump has read, sent and seen committed (see the module docstring)."""

    def __init__(self) -> None:
        self.committed = 0
        self.sent_upto = 0
        self.read_upto = 0
        self.buffer: deque[Entry] = deque()
        self.buffered_bytes = 0
        self.buffered_at = 0.0  # when the buffer last went from empty to not empty
        self.inflight: deque[InFlight] = deque()
        self.isolate_until = 0
        self.refusal: Refusal | None = None
        self.latency = 0.0

    # --- Sessions -------------------------------------------------------------------------------

    def opened(self, committed: int) -> None:
        """A new session: the open discarded whatever was in flight; resume after `committed`.
        The isolation range and a pending refusal outlive the session (they are about entries,
        not about the session)."""
        self.committed = self.sent_upto = self.read_upto = committed
        self.buffer.clear()
        self.buffered_bytes = 0
        self.inflight.clear()

    # --- Sending --------------------------------------------------------------------------------

    def extend(self, entries: Sequence[Entry], now: float) -> None:
        """Entries read from the log (those already read are ignored)."""
        for entry in entries:
            if entry.offset > self.read_upto:
                if not self.buffer:
                    self.buffered_at = now
                self.buffer.append(entry)
                self.buffered_bytes += len(entry.data)
                self.read_upto = entry.offset

    def should_linger(self, now: float, linger_seconds: float, max_bytes: int) -> bool:
        """Whether the buffered batches should wait for others to join their request."""
        return (
            now < self.buffered_at + linger_seconds
            and self.buffered_bytes < max_bytes
            and len(self.buffer) < READ_COUNT  # a backlog goes out at once
        )

    def next_request(self, max_bytes: int) -> list[Entry]:
        """The consecutive buffered entries that go in the next request: as many as fit in
        `max_bytes` of NDJSON, or one while isolating."""
        if not self.buffer:
            return []
        head = self.buffer[0]
        if head.offset <= self.isolate_until:
            return [head]
        entries: list[Entry] = []
        size = 0
        for entry in self.buffer:
            isolated = entry.offset <= self.isolate_until
            if entries and (size + len(entry.data) > max_bytes or isolated):
                break
            entries.append(entry)
            size += len(entry.data)
        return entries

    def sent(self, entries: Sequence[Entry], rows: int, now: float) -> InFlight:
        """Snowflake accepted a request holding `entries` (the head of the buffer)."""
        for _ in entries:
            self.buffered_bytes -= len(self.buffer.popleft().data)
        request = InFlight(
            entries[0].offset,
            entries[-1].offset,
            tuple(dict.fromkeys(e.batch_id for e in entries)),
            rows,
            min(e.written_ms for e in entries),
            now,
        )
        self.sent_upto = request.last
        self.inflight.append(request)
        return request

    # --- Commits --------------------------------------------------------------------------------

    def on_commit(self, committed: int, now: float) -> list[InFlight]:
        """Snowflake's committed offset moved to `committed`: the requests it confirms."""
        if committed <= self.committed:
            return []
        done: list[InFlight] = []
        while self.inflight and self.inflight[0].last <= committed:
            request = self.inflight.popleft()
            self.latency = recent_latency(self.latency, max(0.0, now - request.sent_at))
            done.append(request)
        self.committed = committed
        return done

    @property
    def waits_for_commit(self) -> bool:
        """Whether appends are in flight."""
        return bool(self.inflight)

    def overdue(self, now: float, timeout: float) -> InFlight | None:
        """The oldest request in flight if it waited `timeout` or more for its commit."""
        if self.inflight and now - self.inflight[0].sent_at >= timeout:
            return self.inflight[0]
        return None

    def expected_in(self, now: float) -> float:
        """Seconds until the oldest request in flight is likely committed (0: any moment)."""
        if not self.inflight or self.latency <= 0.0:
            return 0.0
        wait = min(EXPECT_MAX_SECONDS, EXPECT_SHARE * self.latency)
        return max(0.0, self.inflight[0].sent_at + wait - now)

    def request_holding(self, offset: int) -> InFlight | None:
        """The request in flight whose offsets include `offset` (row-error attribution)."""
        return next((r for r in self.inflight if r.first <= offset <= r.last), None)

    # --- Refusals -------------------------------------------------------------------------------

    def refused(self, entries: Sequence[Entry], reason: str) -> Refusal | None:
        """Snowflake refused a request holding `entries` for good. Several entries: send them one
        per request from now on, to find the batch at fault (None). One: that batch is at fault;
        it is dead-lettered after the next settle (the refusal returned)."""
        if len(entries) > 1:
            self.isolate_until = max(self.isolate_until, entries[-1].offset)
            return None
        self.refusal = Refusal(entries[0], reason)
        return self.refusal

    def refusal_settled(self) -> None:
        """The refused batch was dead-lettered (or is gone)."""
        self.refusal = None

    # --- For the model check --------------------------------------------------------------------

    def copy(self) -> ChannelOffsets:
        """An independent copy (the model check's states never share one)."""
        clone = copy.copy(self)
        clone.buffer = deque(self.buffer)
        clone.inflight = deque(self.inflight)
        return clone

    def key(self) -> Hashable:
        """Everything that decides what happens next, as a hashable value."""
        return (
            self.committed,
            self.sent_upto,
            self.read_upto,
            tuple(self.buffer),
            tuple((r.first, r.last, r.batch_ids) for r in self.inflight),
            self.isolate_until,
            self.refusal,
        )
