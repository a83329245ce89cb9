"""Channel pumps: each appends one leased channel's log to Snowflake, in order, and trims it.

A `ChannelPump` runs in its own thread in the node's main process while the node holds the
channel's lease. Its loop:

1. open the channel, right after checking the lease is still ours (`LeaseTable.holds`): the open
   discards whatever an older writer left in flight and returns Snowflake's committed offset C;
   make sure the log issued nothing at or below C (`ChannelLog.raise_floor`, with an alarm if it
   had to act), trim the entries at or below C, and resume sending from C;
2. read the log after what was sent and append it in order, consecutive entries coalesced into
   one request (at most `coalesce_max_bytes` of NDJSON and `max_request_bytes` on the wire),
   no faster than `channel_requests_per_second` and `channel_bytes_per_second`;
3. `on_status` (bulk channel status, polled for every channel of a pipe at once by the
   `CommitPoller`): a commit is confirmed when Snowflake's committed offset passes an entry;
   row errors are attributed to the batches of the request that holds
   `last_error_offset_upper_bound` and dead-lettered with Snowflake's message; then the log is
   trimmed up to the committed offset.

Anything that breaks the continuation chain (a stale continuation token, an invalidated or
missing channel, an append whose answer was lost, a channel status that is not SUCCESS, an append
not committed within `commit_timeout_seconds`: discarded without a sign, e.g. by another
writer's open) is met the same way: reopen and replay from the committed offset. Transient
failures after the RetryPolicy gave up do the same after the policy's countdown. A request
Snowflake refuses for good is retried one entry at a time to find the batch it belongs to, and
that batch goes to the dead letters with the reason. A lost lease stops the pump: another node's
pump owns the channel.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from worker.deadletter import DeadLetter, DeadLetters, Kind
from worker.delivery.channels import ChannelRef
from worker.delivery.lease import Lease, LeaseTable
from worker.delivery.log import ChannelLog, Entry, LeaseLost
from worker.errors import SnowpipeWorkerError
from worker.messages import IngestMessage
from worker.observability import PumpMetrics, get_logger, record_dead_letter
from worker.settings import DEFAULT_COMMIT_TIMEOUT_SECONDS
from worker.snowpipe.encoding import Compression, EncodedRows, encode_request
from worker.snowpipe.errors import (
    BadRequestError,
    ChannelReopenRequired,
    PayloadTooLargeError,
    PipeNotFoundError,
    RequestRejectedError,
)

if TYPE_CHECKING:
    from worker.snowpipe.client import ChannelStatus, OpenChannelResult

SUCCESS = "SUCCESS"
# Entries read from the log per call.
READ_COUNT = 256
# How long a pump blocks on the log waiting for entries before it looks at statuses again
# (while commits are awaited), and when its channel is idle.
WAIT_BLOCK_MS = 200
IDLE_BLOCK_MS = 1000
# Refused errors that are the batch's fault (anything else is retried after a reopen).
BATCH_REFUSED = (BadRequestError, PayloadTooLargeError, RequestRejectedError)
# After a pipe-level refusal (unknown pipe) the channel is tried again this much later.
REFUSED_PAUSE_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 30.0
# The longest a pipe waiting for a commit goes without a status poll.
MAX_POLL_SECONDS = 1.0
# The poller waits for the share below of a channel's recent commit latency after its oldest
# append before polling for it (never longer than the cap): a commit takes Snowflake seconds, and
# polling the whole time costs CPU and requests for nothing.
EXPECT_SHARE = 0.7
EXPECT_MAX_SECONDS = 5.0

_log = get_logger("worker.delivery.pump")


class PumpClient(Protocol):
    """The parts of `SnowpipeClient` a pump uses."""

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


class RequestRefused(SnowpipeWorkerError):
    """Snowflake refused an append for good; `entries` are what the request held."""

    def __init__(self, cause: Exception, entries: Sequence[Entry]) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.entries = list(entries)


class Stats(Protocol):
    """Where a pump counts what it did (the `snowpipe:stats` hash)."""

    def count(self, name: str, amount: int = 1) -> None: ...


def committed_offset(status: ChannelStatus | None) -> int:
    """The channel's committed offset as an integer (0 when nothing was committed)."""
    if status is None or status.last_committed_offset_token is None:
        return 0
    try:
        return int(status.last_committed_offset_token)
    except ValueError:
        # Not one of ours (another client wrote this channel): nothing of ours is committed.
        return 0


@dataclass(frozen=True)
class PumpConfig:
    """The settings a pump runs with (from `Settings`)."""

    compression: Compression
    max_request_bytes: int
    coalesce_max_bytes: int
    requests_per_second: float
    bytes_per_second: float
    countdown: Callable[[int, BaseException | None], float]  # the RetryPolicy's, continued
    # An append still not committed this long after it was sent is taken as discarded.
    commit_timeout_seconds: float = DEFAULT_COMMIT_TIMEOUT_SECONDS
    # How long the first batch of a request may wait for others to join it.
    linger_seconds: float = 0.0


def recent_latency(recent: float, observed: float) -> float:
    """The channel's recent commit latency after one more observation: it falls to a faster
    commit at once and rises by a tenth of the way to a slower one (so polls start early rather
    than late)."""
    return observed if observed < recent else recent + (observed - recent) / 10


@dataclass
class InFlight:
    """An append Snowflake accepted and has not committed yet."""

    first: int
    last: int
    batch_ids: tuple[str, ...]
    rows: int
    oldest_ms: int
    sent_at: float  # on the pump's clock


class ChannelPump:
    """Appends one channel's log while this node holds its lease (see the module docstring)."""

    def __init__(
        self,
        lease: Lease,
        *,
        leases: LeaseTable,
        log: ChannelLog,
        client: PumpClient,
        config: PumpConfig,
        stats: Stats,
        dead_letters: DeadLetters,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease = lease
        self.ref: ChannelRef = lease.ref
        self._leases = leases
        self._log = log
        self._client = client
        self._config = config
        self._stats = stats
        self._dead_letters = dead_letters
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._status_lock = threading.Lock()
        self._status: ChannelStatus | None = None
        self._thread: threading.Thread | None = None
        # Channel state (only the pump's own thread touches it).
        self.opened = False
        self.epoch = 0  # bumped at every open: statuses polled before it are stale
        self._continuation = ""
        self.committed = 0
        self.sent_upto = 0
        self._read_upto = 0
        self._buffer: deque[Entry] = deque()
        self._buffered_bytes = 0
        self._buffered_at = 0.0  # when the buffer last went from empty to not empty
        self._inflight: deque[InFlight] = deque()
        self._errors_seen: int | None = None
        self._isolate_until = 0  # send entries up to this offset one per request
        self._next_send_at = 0.0
        self._failures = 0
        self.lost = False  # the lease was found taken: the thread ended
        self.reopens = 0
        self._latency = 0.0  # recent commit latency: falls at once, rises by a tenth
        self._metrics = PumpMetrics(f"{self.ref.database}.{self.ref.schema}.{self.ref.pipe}")

    # --- Lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the pump in its own thread."""
        self._thread = threading.Thread(target=self.run, name=f"pump {self.ref}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current request; wait up to `timeout` for the thread."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the pump's thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        """Appends accepted and not yet seen committed (a gauge for metrics)."""
        return len(self._inflight)

    def wants_status(self) -> bool:
        """Whether the poller should fetch this channel's status (it waits for commits)."""
        return self.opened and bool(self._inflight)

    def commit_expected_in(self) -> float:
        """Seconds until the oldest append in flight is likely committed (0: any moment now),
        from the latencies seen on this channel; the poller does not poll for it before."""
        inflight = self._inflight
        if not inflight or self._latency <= 0.0:
            return 0.0
        wait = min(EXPECT_MAX_SECONDS, EXPECT_SHARE * self._latency)
        return max(0.0, inflight[0].sent_at + wait - self._clock())

    def on_status(self, status: ChannelStatus, epoch: int) -> None:
        """A status the poller fetched for this channel during open epoch `epoch`."""
        if epoch != self.epoch:
            return  # fetched before the latest open: stale
        with self._status_lock:
            self._status = status
        self._wake.set()

    # --- The loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """The pump's loop (see the module docstring); returns when stopped or the lease is lost."""
        log = _log.bind(channel=self.ref.channel, pipe=self.ref.pipe, lease=self.lease.generation)
        while not self._stop.is_set():
            try:
                if not self.opened:
                    self._open()
                self._take_status()
                self._check_commit_timeout()
                if not self.opened or self._stop.is_set():
                    continue
                if not self._send_some():
                    self._wait_for_work()
                self._failures = 0
            except LeaseLost:
                self.lost = True
                log.info("lease.lost", node=self._leases.node)
                return
            except ChannelReopenRequired as exc:
                log.info("channel.reopen", reason=type(exc).__name__, detail=str(exc))
                self._reopen(type(exc).__name__)
                self._failures += 1
                if self._failures > 2:
                    self._pause(self._backoff(exc))
            except RequestRefused as exc:
                self._refused_request(exc, log)
            except (PipeNotFoundError, *BATCH_REFUSED) as exc:
                self._refused_channel(exc, log)
            except Exception as exc:  # noqa: BLE001 (a pump must outlive any failure)
                self._reopen("error")
                self._failures += 1
                delay = self._backoff(exc)
                log.warning(
                    "pump.failed",
                    error=type(exc).__name__,
                    detail=str(exc),
                    retry_in=round(delay, 2),
                )
                self._pause(delay)

    def _reopen(self, reason: str) -> None:
        """Reopen before the next append (counted when the channel was open)."""
        if self.opened:
            self._metrics.reopen(reason)
        self.opened = False

    def _backoff(self, exc: BaseException) -> float:
        return min(MAX_BACKOFF_SECONDS, self._config.countdown(self._failures, exc))

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)

    # --- Opening --------------------------------------------------------------------------------

    def _open(self) -> None:
        """Open (or reopen) the channel and resume from Snowflake's committed offset."""
        # Check right before the open: a pump that lost its lease must not reopen (it would
        # stale the new owner's continuation token, and the two would reopen each other).
        if not self._leases.holds(self.lease):
            raise LeaseLost(str(self.ref))
        self.opened = False
        self.epoch += 1
        result = self._client.open_channel(*self.ref.target, self.ref.channel)
        status = result.status
        committed = committed_offset(status)
        if self._errors_seen is not None:
            self._row_errors(status)  # errors of requests committed before this open
        floor = self._log.raise_floor(self.ref, self.lease.value, committed)
        if floor.raised:
            # Snowflake counts offsets as committed that this log never issued: the state Redis
            # lost data. Nothing new may sit at those offsets; the log moved what did.
            _log.error(
                "channel.log_forgot",
                channel=self.ref.channel,
                pipe=self.ref.pipe,
                committed=committed,
                moved=floor.moved,
            )
            self._stats.count("log_forgot")
            self._metrics.log_forgot()
        self._log.trim(self.ref, self.lease.value, committed)
        with self._status_lock:
            self._status = None
        self._continuation = result.continuation_token
        self.committed = self.sent_upto = self._read_upto = committed
        self._buffer.clear()
        self._buffered_bytes = 0
        self._inflight.clear()
        if self._errors_seen is None:
            self._errors_seen = status.rows_error_count
        self._errors_seen = max(self._errors_seen, status.rows_error_count)
        self.opened = True
        self.reopens += 1
        self._stats.count("channel_opens")
        self._metrics.opens.inc()
        _log.info(
            "channel.opened",
            channel=self.ref.channel,
            pipe=self.ref.pipe,
            committed=committed,
            lease=self.lease.generation,
        )

    # --- Sending --------------------------------------------------------------------------------

    def _fill(self) -> None:
        """Top the buffer up from the log (an empty buffer is filled by `_wait_for_work`)."""
        if not self._buffer:
            return
        if self._buffered_bytes >= self._config.coalesce_max_bytes:
            return
        self._extend(self._log.read(self.ref, self._read_upto, READ_COUNT))

    def _extend(self, entries: Sequence[Entry]) -> None:
        for entry in entries:
            if entry.offset > self._read_upto:
                if not self._buffer:
                    self._buffered_at = self._clock()
                self._buffer.append(entry)
                self._buffered_bytes += len(entry.data)
                self._read_upto = entry.offset

    def _send_some(self) -> bool:
        """Append the next request if there is one and the rate allows; whether one was sent."""
        self._fill()
        if not self._buffer:
            return False
        now = self._clock()
        if now < self._next_send_at:
            self._wake.clear()
            self._wake.wait(self._next_send_at - now)
            return True
        linger_until = self._buffered_at + self._config.linger_seconds
        if (
            now < linger_until
            and self._buffered_bytes < self._config.coalesce_max_bytes
            and len(self._buffer) < READ_COUNT  # a backlog goes out at once
        ):
            # Let a few more batches join this request (Snowflake commits every few seconds
            # anyway; one request per batch would cost a request's CPU per batch).
            wait_ms = max(1, int((linger_until - now) * 1000))
            self._extend(self._log.wait(self.ref, self._read_upto, READ_COUNT, wait_ms))
            return True
        entries = self._next_request()
        payload = self._encode(entries)
        while payload.wire_bytes > self._config.max_request_bytes and len(entries) > 1:
            keep = max(
                1, int(len(entries) * self._config.max_request_bytes / payload.wire_bytes * 0.9)
            )
            entries = entries[: min(keep, len(entries) - 1)]
            payload = self._encode(entries)
        first, last = entries[0].offset, entries[-1].offset
        try:
            self._continuation = self._client.append_rows(
                *self.ref.target,
                self.ref.channel,
                continuation_token=self._continuation,
                payload=payload,
                start_offset_token=str(first),
                end_offset_token=str(last),
            )
        except (PipeNotFoundError, *BATCH_REFUSED) as exc:
            self._metrics.append_failed("refused")
            raise RequestRefused(exc, entries) from exc
        except ChannelReopenRequired:
            self._metrics.append_failed("reopen_required")
            raise
        except Exception:
            self._metrics.append_failed("failed")
            raise
        for _ in entries:
            self._buffered_bytes -= len(self._buffer.popleft().data)
        self.sent_upto = last
        self._inflight.append(
            InFlight(
                first,
                last,
                tuple(dict.fromkeys(e.batch_id for e in entries)),
                payload.row_count,
                min(e.written_ms for e in entries),
                self._clock(),
            )
        )
        spacing = max(
            1.0 / self._config.requests_per_second,
            payload.uncompressed_length / self._config.bytes_per_second,
        )
        self._next_send_at = self._clock() + spacing
        self._stats.count("appends")
        self._stats.count("append_bytes", payload.wire_bytes)
        self._metrics.accepted.inc()
        self._metrics.append_bytes.observe(payload.wire_bytes)
        return True

    def _next_request(self) -> list[Entry]:
        """The consecutive buffered entries that go in the next request."""
        head = self._buffer[0]
        if head.offset <= self._isolate_until:
            return [head]
        entries: list[Entry] = []
        size = 0
        for entry in self._buffer:
            if entries and (
                size + len(entry.data) > self._config.coalesce_max_bytes
                or entry.offset <= self._isolate_until
            ):
                break
            entries.append(entry)
            size += len(entry.data)
        return entries

    def _encode(self, entries: Sequence[Entry]) -> EncodedRows:
        data = b"".join(e.data for e in entries)
        return encode_request(data, sum(e.rows for e in entries), self._config.compression)

    def _wait_for_work(self) -> None:
        """Block on the log for new entries: briefly while commits are awaited (a status may
        arrive meanwhile), longer when the channel is idle. One Redis call either way."""
        block = WAIT_BLOCK_MS if self._inflight else IDLE_BLOCK_MS
        self._extend(self._log.wait(self.ref, self._read_upto, READ_COUNT, block))

    # --- Commits --------------------------------------------------------------------------------

    def _take_status(self) -> None:
        with self._status_lock:
            status, self._status = self._status, None
        if status is not None:
            self.on_commit(status)

    def on_commit(self, status: ChannelStatus) -> None:
        """Confirm commits from a channel status: the one place a commit is confirmed."""
        if status.channel_status_code != SUCCESS:
            _log.warning(
                "channel.status.error",
                channel=self.ref.channel,
                pipe=self.ref.pipe,
                code=status.channel_status_code,
            )
            self._reopen("status_error")  # reopen and replay from the committed offset
            return
        self._row_errors(status)
        committed = committed_offset(status)
        if committed <= self.committed:
            return
        now_ms = time.time() * 1000
        now = self._clock()
        batches = rows = 0
        metrics = self._metrics
        while self._inflight and self._inflight[0].last <= committed:
            done = self._inflight.popleft()
            batches += len(done.batch_ids)
            rows += done.rows
            latency = max(0.0, now - done.sent_at)
            metrics.commit_latency.observe(latency)
            self._latency = (
                latency
                if latency < self._latency
                else self._latency + (latency - self._latency) / 10
            )
            metrics.delivery_latency.observe(max(0.0, (now_ms - done.oldest_ms) / 1000))
            _log.debug(
                "channel.committed",
                channel=self.ref.channel,
                first=done.first,
                last=done.last,
                batches=len(done.batch_ids),
                lag_s=round((now_ms - done.oldest_ms) / 1000, 3),
            )
        self.committed = committed
        self._log.trim(self.ref, self.lease.value, committed)
        if rows:
            self._stats.count("rows_committed", rows)
            self._stats.count("entries_committed", batches)
            metrics.rows.inc(rows)
            metrics.batches.inc(batches)

    def _check_commit_timeout(self) -> None:
        """Reopen when the oldest append in flight waited too long for its commit.

        Appends in flight can be discarded without a sign in the channel status: an open by
        another writer (a pump whose lease expired while it was paused after its `holds()`
        check, opening after this pump did) or a loss on Snowflake's side leaves the status
        SUCCESS and the committed offset where it was. Only a later append would meet the stale
        continuation token, and on a channel that logs nothing new there is none: its batches
        would wait forever. A reopen replays from the committed offset (exactly once either way).
        """
        if not self.opened or not self._inflight:
            return
        waited = self._clock() - self._inflight[0].sent_at
        if waited < self._config.commit_timeout_seconds:
            return
        _log.warning(
            "channel.commit_timeout",
            channel=self.ref.channel,
            pipe=self.ref.pipe,
            first=self._inflight[0].first,
            committed=self.committed,
            waited_s=round(waited, 1),
        )
        self._stats.count("commit_timeouts")
        self._reopen("commit_timeout")

    def _row_errors(self, status: ChannelStatus) -> None:
        """Dead-letter the batches of the request Snowflake reported row errors in."""
        seen = self._errors_seen
        if seen is None or status.rows_error_count <= seen:
            return
        count = status.rows_error_count - seen
        bound = status.last_error_offset_upper_bound
        try:
            upper = int(bound) if bound is not None else None
        except ValueError:
            upper = None
        entries: list[Entry] = []
        if upper is not None:
            request = next((r for r in self._inflight if r.first <= upper <= r.last), None)
            first, last = (request.first, request.last) if request else (upper, upper)
            entries = self._log.entries_of(self.ref, first, last)
        message = status.last_error_message or "(no message)"
        if not entries:
            _log.error(
                "channel.row_errors.unattributed",
                channel=self.ref.channel,
                count=count,
                upper_bound=bound,
                message=message,
            )
            self._stats.count("row_errors_unattributed", count)
            self._metrics.row_errors.inc(count)
            self._errors_seen = status.rows_error_count
            return
        by_batch = _group(entries)
        for batch_id, parts in by_batch.items():
            reason = (
                f"Snowflake reported {count} row error(s) in the request holding offset {upper} "
                f"on channel {self.ref.channel} ({len(by_batch)} batch(es) in it): {message}; "
                "the batch is committed except the rows in error"
            )
            self._dead_letters.add(self._letter(batch_id, parts, reason, kind="row_errors"))
            record_dead_letter("row_errors")
            _log.warning(
                "channel.row_errors", channel=self.ref.channel, batch_id=batch_id, count=count
            )
        # Only now: if storing a letter failed, the next status (or the reopen) reports again.
        self._errors_seen = status.rows_error_count
        self._stats.count("row_errors", count)
        self._metrics.row_errors.inc(count)

    # --- Refusals -------------------------------------------------------------------------------

    def _refused_channel(self, exc: Exception, log: Any) -> None:
        """The open was refused for good (unknown pipe, ...): dead-letter the channel's log.

        No batch logged on the channel can succeed as addressed; creating the pipe (or fixing
        its grants) and requeueing the dead letters delivers them.
        """
        self._reopen("refused")
        log.error("channel.refused", error=type(exc).__name__, detail=str(exc))
        self._dead_letter_all(str(exc))
        self._pause(REFUSED_PAUSE_SECONDS)

    def _refused_request(self, exc: RequestRefused, log: Any) -> None:
        """An append was refused for good: find the batch at fault and dead-letter it."""
        self._reopen("refused")  # the refused request may have broken the chain
        entries = exc.entries
        if len(entries) > 1:
            # One of several batches is at fault: send them one per request to find it.
            self._isolate_until = max(self._isolate_until, entries[-1].offset)
            log.warning("append.refused.isolating", entries=len(entries), detail=str(exc))
            return
        head = entries[0]
        following = self._log.read(self.ref, head.offset - 1, READ_COUNT)
        parts = list(_same_batch(following, head.batch_id)) or [head]
        letter = self._letter(head.batch_id, parts, f"Snowflake refused the batch: {exc.cause}")
        if self._log.dead_letter(self.ref, self.lease.value, parts, letter.dumps()):
            self._stats.count("dead_letter")
            record_dead_letter("failed")
        log.error("append.refused", batch_id=head.batch_id, detail=str(exc.cause))

    def _dead_letter_all(self, reason: str) -> None:
        after = self.committed
        while True:
            entries = self._log.read(self.ref, after, READ_COUNT)
            if not entries:
                return
            after = entries[-1].offset
            for batch_id, parts in _group(entries).items():
                letter = self._letter(batch_id, parts, f"Snowflake refused the channel: {reason}")
                if self._log.dead_letter(self.ref, self.lease.value, parts, letter.dumps()):
                    self._stats.count("dead_letter")
                    record_dead_letter("failed")

    def _letter(
        self, batch_id: str, parts: Sequence[Entry], reason: str, *, kind: Kind = "failed"
    ) -> DeadLetter:
        rows, unparsed = _rows(parts)
        detail: dict[str, Any] = {"channel": self.ref.channel, "offsets": [e.offset for e in parts]}
        if unparsed:
            detail["unparsed_lines"] = unparsed
        message = IngestMessage(batch_id, *self.ref.target, rows)
        return DeadLetter.of(message, reason, kind=kind, detail=detail)


def _rows(parts: Sequence[Entry]) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON-object rows of `parts`, and (as text) the lines that are not JSON objects.

    A line that is not a JSON object is what Snowflake reports as a row error: a dead letter
    must keep it, not fail on it (the row error report would be lost with it).
    """
    rows: list[dict[str, Any]] = []
    unparsed: list[str] = []
    for entry in parts:
        for line in entry.data.splitlines():
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                unparsed.append(line.decode("utf-8", "replace"))
    return rows, unparsed


def _same_batch(entries: Sequence[Entry], batch_id: str) -> list[Entry]:
    """The leading entries of `entries` that belong to `batch_id` (its consecutive pieces)."""
    out: list[Entry] = []
    for entry in entries:
        if entry.batch_id != batch_id:
            break
        out.append(entry)
    return out


def _group(entries: Sequence[Entry]) -> dict[str, list[Entry]]:
    by_batch: dict[str, list[Entry]] = {}
    for entry in entries:
        by_batch.setdefault(entry.batch_id, []).append(entry)
    return by_batch


class CommitPoller:
    """One bulk-status poll per pipe for every channel of it that awaits a commit.

    A pipe is polled every `poll_seconds` while its commits advance; while they do not (a
    commit takes Snowflake seconds), its interval doubles up to `max_poll_seconds`, so a commit
    is seen at most that late and a pipe waiting for one costs a few polls, not dozens. Nor is a
    pipe polled before the first of its waiting channels expects a commit
    (`ChannelPump.commit_expected_in`: most of the commit latency recently seen there, after its
    oldest append in flight).
    """

    def __init__(
        self,
        client: PumpClient,
        pumps: Callable[[], Sequence[ChannelPump]],
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
        by_pipe: dict[tuple[str, str, str], list[tuple[ChannelPump, int, int]]] = {}
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
            if scheduled and min(pump.commit_expected_in() for pump, _, _ in waiting) > 0.0:
                self._interval[target] = self._poll / 2  # poll briskly once a commit is due
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
                self._poll
                if moved
                else min(self._max_poll, 2 * self._interval.get(target, self._poll / 2))
            )
            self._interval[target] = interval
            self._due[target] = now + interval
