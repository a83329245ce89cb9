"""Channel pumps: each appends one leased channel's log to Snowflake, in order, and trims it.

A `ChannelPump` runs in its own thread in the node's main process while the node holds the
channel's lease. Its loop:

1. open the channel, right after checking the lease is still ours (`LeaseTable.holds`): the open
   discards whatever an older writer left in flight and returns Snowflake's committed offset C
   and error count; settle the channel (`ChannelLog.settle`: the offset counter raised to C,
   the entries at or below C trimmed, the channel marked settled in the state store's current
   incarnation, which lets tasks log on it; refused if the store restarted or failed over since
   the lease check: open again); dead-letter a batch Snowflake refused
   (worker/delivery/refusals.py) and attribute held row errors (worker/delivery/rowerrors.py);
   resume sending after C;
2. read the log after what was sent and append it in order, as `ChannelOffsets` decides
   (worker/delivery/offsets.py: consecutive entries coalesced into one request, or one entry per
   request while finding a refused batch), no faster than the channel's rates; before sending
   past the channel's sent mark, raise it (and with SNOWPIPE_STATE_MIN_REPLICAS wait until that
   many replicas hold it, and so every entry before it);
3. confirm commits from the statuses the `CommitPoller` (worker/delivery/poller.py) fetches:
   `ChannelOffsets.on_commit`, then the trim (which holds the entries of a window in which
   Snowflake's error count rose, for their attribution).

Anything that breaks the continuation chain (a stale continuation token, an invalidated or
missing channel, an append whose answer was lost, a channel status that is not SUCCESS, an append
not committed within `commit_timeout_seconds`, the state store restarted or failed over since
the settle) is met the same way: reopen, settle, replay from the committed offset. Transient
failures after the RetryPolicy gave up do the same after the policy's countdown. A lost lease
stops the pump: another node's pump owns the channel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from worker.deadletter import DeadLetters
from worker.delivery.channels import ChannelRef
from worker.delivery.lease import Lease, LeaseTable
from worker.delivery.log import (
    ChannelLog,
    Entry,
    LeaseLost,
    StateNotReplicatedError,
    StoreChanged,
)
from worker.delivery.offsets import READ_COUNT, ChannelOffsets, recent_latency
from worker.delivery.poller import SUCCESS, CommitPoller, committed_offset
from worker.delivery.refusals import Refusals
from worker.delivery.rowerrors import ExactAttribution, RowErrors
from worker.errors import SnowpipeWorkerError
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

__all__ = [
    "BATCH_REFUSED",
    "READ_COUNT",
    "SUCCESS",
    "ChannelPump",
    "CommitPoller",
    "OpenRefused",
    "PumpClient",
    "PumpConfig",
    "RequestRefused",
    "committed_offset",
    "recent_latency",
]

# How long a pump blocks on the log waiting for entries before it looks at statuses again
# while a commit is due, and when its channel is idle or no commit is expected yet.
WAIT_BLOCK_MS = 200
IDLE_BLOCK_MS = 1000
# Refused errors that are the batch's fault (anything else is retried after a reopen).
BATCH_REFUSED = (BadRequestError, PayloadTooLargeError, RequestRejectedError)
# After an open refused for good the channel is tried again this much later (an open every few
# seconds costs Snowflake nothing, and a requeue after the pipe was created waits no longer).
REFUSED_PAUSE_SECONDS = 5.0
# Of the refusals of one channel in a row, only every this many-th is logged at ERROR.
REFUSED_LOG_EVERY = 12
MAX_BACKOFF_SECONDS = 30.0

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


class OpenRefused(SnowpipeWorkerError):
    """Snowflake refused to open the channel for good (an unknown pipe, say)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Stats(Protocol):
    """Where a pump counts what it did (the `snowpipe:stats` hash)."""

    def count(self, name: str, amount: int = 1) -> None: ...


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
    # SNOWPIPE_STATE_MIN_REPLICAS: nothing is sent that fewer replicas hold.
    replicas: int = 0
    replica_timeout_ms: int = 1000


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
        dead_letters: DeadLetters | None = None,
        exact_row_errors: ExactAttribution | None = None,
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
        self.offsets = ChannelOffsets()
        self.refusals = Refusals(
            log, self.ref, stats=stats, replicas=config.replicas,
            replica_timeout_ms=config.replica_timeout_ms,
        )  # fmt: skip
        self.row_errors = RowErrors(
            log, self.ref, exact=exact_row_errors, clock=clock, on_letters=self._count_row_errors
        )
        # Session state (only the pump's own thread touches it).
        self.opened = False
        self.epoch = 0  # bumped at every open: statuses polled before it are stale
        self.incarnation = ""  # of the state store, when this session settled the channel
        self._continuation = ""
        self._sent_mark = 0  # the channel's sent mark as this session knows it
        self._errors_seen = 0  # Snowflake's error count at this session's last confirmation
        self._held_left = False  # held windows wait for the error table
        self._next_send_at = 0.0
        self._failures = 0
        self._refused_opens = 0
        self._force_reopen = False
        self._unreplicated = False  # a write of this pump missed its replicas: WAIT first
        self.lost = False  # the lease was found taken: the thread ended
        self.reopens = 0
        self._metrics = PumpMetrics(f"{self.ref.database}.{self.ref.schema}.{self.ref.pipe}")

    # --- Views for the node, the poller and the metrics -----------------------------------------

    @property
    def committed(self) -> int:
        """Snowflake's committed offset as this pump last saw it."""
        return self.offsets.committed

    @property
    def sent_upto(self) -> int:
        """The last offset Snowflake accepted in this session."""
        return self.offsets.sent_upto

    @property
    def in_flight(self) -> int:
        """Appends accepted and not yet seen committed (a gauge for metrics)."""
        return len(self.offsets.inflight)

    def wants_status(self) -> bool:
        """Whether the poller should fetch this channel's status (it waits for commits)."""
        return self.opened and self.offsets.waits_for_commit

    def commit_expected_in(self) -> float:
        """Seconds until the oldest append in flight is likely committed (0: any moment now),
        from the latencies seen on this channel; the poller does not poll for it before."""
        return self.offsets.expected_in(self._clock())

    def commit_latency(self) -> float:
        """The commit latency recently seen on this channel (0: none seen yet); the poller
        spaces its polls by it."""
        return self.offsets.latency

    def on_status(self, status: ChannelStatus, epoch: int) -> None:
        """A status the poller fetched for this channel during open epoch `epoch`."""
        if epoch != self.epoch:
            return  # fetched before the latest open: stale
        with self._status_lock:
            self._status = status
        self._wake.set()

    def store_changed(self, incarnation: str) -> None:
        """The state store's incarnation is now `incarnation`: reopen (and settle again) if this
        session settled in another one (a restart or failover the pump's calls did not see)."""
        if self.opened and incarnation != self.incarnation:
            self._force_reopen = True
            self._wake.set()

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

    # --- The loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """The pump's loop (see the module docstring); returns when stopped or the lease is lost."""
        log = _log.bind(channel=self.ref.channel, pipe=self.ref.pipe, lease=self.lease.generation)
        while not self._stop.is_set():
            try:
                self.step()
            except LeaseLost:
                self.lost = True
                log.info("lease.lost", node=self._leases.node)
                return
            except StoreChanged as exc:
                log.info("channel.reopen", reason="store_changed", detail=str(exc))
                self._reopen("store_changed")
            except ChannelReopenRequired as exc:
                log.info("channel.reopen", reason=type(exc).__name__, detail=str(exc))
                self._reopen(type(exc).__name__)
                self._failures += 1
                if self._failures > 2:
                    self._pause(self._backoff(exc))
            except RequestRefused as exc:
                self._refused_request(exc, log)
            except OpenRefused as exc:
                try:
                    self._refused_open(exc.cause, log)
                except LeaseLost:
                    self.lost = True
                    log.info("lease.lost", node=self._leases.node)
                    return
                except Exception as inner:  # noqa: BLE001 (the store failed meanwhile)
                    log.warning("channel.refused.failed", error=type(inner).__name__,
                                detail=str(inner))  # fmt: skip
                    self._pause(self._backoff(inner))
            except StateNotReplicatedError as exc:
                # Nothing goes out until a WAIT succeeds (`_replicated`): what the write covers
                # could be taken back by a failover.
                self._unreplicated = True
                self._failures += 1
                delay = self._backoff(exc)
                log.warning("state.not_replicated", detail=str(exc), retry_in=round(delay, 2))
                self._pause(delay)
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

    def step(self) -> None:
        """One turn of the loop: open if needed, confirm commits, send or wait for work."""
        if self._force_reopen:
            self._force_reopen = False
            self._reopen("store_changed")
        if not self.opened:
            self._open()
        if self._unreplicated:
            self._mark_sent(self._sent_mark)  # a write and a WAIT: the barrier
            self._unreplicated = False
        self._take_status()
        self._check_commit_timeout()
        if self._held_left:
            self._held_left = self.row_errors.attribute(self.lease.value)
        if not self.opened or self._stop.is_set():
            return
        if not self._send_some():
            self._wait_for_work()
        self._failures = 0

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
        """Open (or reopen) the channel, settle it, and resume from Snowflake's committed
        offset."""
        # Check right before the open: a pump that lost its lease must not reopen (it would
        # stale the new owner's continuation token, and the two would reopen each other). The
        # settle is refused if the store changed since (StoreChanged: open again): a store that
        # came back older can hand back a lease this pump lost while it opened, after another
        # pump's later open; its committed offset would be stale.
        checked_in = self._log.incarnation()
        if not self._leases.holds(self.lease):
            raise LeaseLost(str(self.ref))
        self.opened = False
        self.epoch += 1
        try:
            result = self._client.open_channel(*self.ref.target, self.ref.channel)
        except (PipeNotFoundError, *BATCH_REFUSED) as exc:
            raise OpenRefused(exc) from exc
        status = result.status
        committed = committed_offset(status)
        settled = self._log.settle(
            self.ref, self.lease.value, committed, errors=status.rows_error_count,
            upper_bound=status.last_error_offset_upper_bound, message=status.last_error_message,
            checked_in=checked_in,
        )  # fmt: skip
        if settled.raised:
            # Snowflake counts offsets as committed that this log never issued: the state store
            # came back older or empty (or another writer used the channel). Nothing is moved:
            # what the log still holds at or below C was committed and is trimmed; new offsets
            # start above C.
            _log.warning(
                "channel.log_forgot",
                channel=self.ref.channel,
                pipe=self.ref.pipe,
                committed=committed,
                trimmed=settled.trimmed,
            )
            self._stats.count("log_forgot")
            self._metrics.log_forgot()
        self.incarnation = settled.incarnation
        self._sent_mark = settled.sent_mark
        # With replicas, the stored mark may be a write no replica holds yet (the pump that
        # raised it died, or its WAIT timed out), and so may the entries under it: WAIT once
        # (the barrier in `step`) before sending anything under it.
        if self._config.replicas:
            self._unreplicated = True
        self._errors_seen = status.rows_error_count
        with self._status_lock:
            self._status = None
        self._continuation = result.continuation_token
        self.offsets.opened(committed)
        self.opened = True
        self._refused_opens = 0
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
        # Held windows are attributed on a later turn if dead-lettering the refusal raises and
        # leaves the channel open (its WAIT missed the replicas: run() keeps the session).
        self._held_left = True
        refusal = self.offsets.refusal
        if refusal is not None:
            self.refusals.dead_letter_refused(self.lease.value, refusal)
            self.offsets.refusal_settled()
        self._held_left = self.row_errors.attribute(self.lease.value)

    # --- Sending --------------------------------------------------------------------------------

    def _fill(self) -> None:
        """Top the buffer up from the log (an empty buffer is filled by `_wait_for_work`)."""
        offsets = self.offsets
        if not offsets.buffer or offsets.buffered_bytes >= self._config.coalesce_max_bytes:
            return
        self._extend(self._log.read(self.ref, offsets.read_upto, READ_COUNT))

    def _extend(self, entries: Sequence[Entry]) -> None:
        self.offsets.extend(entries, self._clock())

    def _send_some(self) -> bool:
        """Append the next request if there is one and the rate allows; whether one was sent.

        The buffer is topped up from the log only right before a request is built: while the
        rate or the linger holds the request back there is nothing to decide, so a read before
        either would be a round trip for nothing."""
        offsets = self.offsets
        if not offsets.buffer:
            return False
        now = self._clock()
        if now < self._next_send_at:
            self._wake.clear()
            self._wake.wait(self._next_send_at - now)
            return True
        if offsets.should_linger(
            now, self._config.linger_seconds, self._config.coalesce_max_bytes
        ):
            # Let a few more batches join this request (Snowflake commits every few seconds
            # anyway; one request per batch would cost a request's CPU per batch). The pump
            # sleeps out the linger and reads what joined once, when it builds the request: a
            # read per batch that joins would cost a round trip each. A backlog already in the
            # buffer (READ_COUNT entries, or the coalesce cap) never lingers; a status or a stop
            # wakes the pump.
            self._wake.clear()
            self._wake.wait(offsets.buffered_at + self._config.linger_seconds - now)
            return True
        self._fill()
        entries = offsets.next_request(self._config.coalesce_max_bytes)
        payload = self._encode(entries)
        while payload.wire_bytes > self._config.max_request_bytes and len(entries) > 1:
            keep = max(
                1, int(len(entries) * self._config.max_request_bytes / payload.wire_bytes * 0.9)
            )
            entries = entries[: min(keep, len(entries) - 1)]
            payload = self._encode(entries)
        first, last = entries[0].offset, entries[-1].offset
        if last > self._sent_mark:
            self._mark_sent(max(last, offsets.read_upto))
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
        offsets.sent(entries, payload.row_count, self._clock())
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

    def _mark_sent(self, offset: int) -> None:
        """Raise the sent mark before anything above it goes out (see the module docstring)."""
        self._sent_mark = self._log.mark_sent(
            self.ref, self.lease.value, offset,
            replicas=self._config.replicas, timeout_ms=self._config.replica_timeout_ms,
        )  # fmt: skip

    def _encode(self, entries: Sequence[Entry]) -> EncodedRows:
        data = b"".join(e.data for e in entries)
        return encode_request(data, sum(e.rows for e in entries), self._config.compression)

    def _wait_for_work(self) -> None:
        """Block on the log for new entries: briefly while a commit is due (a status may arrive
        meanwhile), longer when the channel is idle or its oldest append in flight is not
        expected to commit yet (at a long commit latency a pump would otherwise wake five times
        a second for nothing). One Redis call either way."""
        block = IDLE_BLOCK_MS
        if self.offsets.waits_for_commit:
            expected_ms = int(self.offsets.expected_in(self._clock()) * 1000)
            block = min(IDLE_BLOCK_MS, max(WAIT_BLOCK_MS, expected_ms))
        self._extend(self._log.wait(self.ref, self.offsets.read_upto, READ_COUNT, block))

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
        committed = committed_offset(status)
        errors = status.rows_error_count
        offsets = self.offsets
        if committed <= offsets.committed and errors <= self._errors_seen:
            return
        if errors > self._errors_seen:
            bound = status.last_error_offset_upper_bound
            request = offsets.request_holding(int(bound)) if bound and bound.isdigit() else None
            self.row_errors.note_request(
                errors, (request.first, request.last) if request is not None else None
            )
        done = offsets.on_commit(committed, self._clock())
        self._log.trim(
            self.ref, self.lease.value, offsets.committed, errors=errors,
            upper_bound=status.last_error_offset_upper_bound, message=status.last_error_message,
        )  # fmt: skip
        if errors > self._errors_seen:
            self._errors_seen = errors
            self._held_left = self.row_errors.attribute(self.lease.value)
        if not done:
            return
        now = self._clock()
        now_ms = time.time() * 1000
        metrics = self._metrics
        batches = rows = 0
        for request in done:
            batches += len(request.batch_ids)
            rows += request.rows
            metrics.commit_latency.observe(max(0.0, now - request.sent_at))
            metrics.delivery_latency.observe(max(0.0, (now_ms - request.oldest_ms) / 1000))
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
        if not self.opened:
            return
        overdue = self.offsets.overdue(self._clock(), self._config.commit_timeout_seconds)
        if overdue is None:
            return
        _log.warning(
            "channel.commit_timeout",
            channel=self.ref.channel,
            pipe=self.ref.pipe,
            first=overdue.first,
            committed=self.offsets.committed,
            waited_s=round(self._clock() - overdue.sent_at, 1),
        )
        self._stats.count("commit_timeouts")
        self._reopen("commit_timeout")

    def _count_row_errors(self, letters: int, errors: int, attributed: bool) -> None:
        self._stats.count("row_errors", errors)
        self._metrics.row_errors.inc(errors)
        if letters:
            self._stats.count("row_error_letters", letters)
        if not attributed:
            self._stats.count("row_errors_unattributed", errors)
        for _ in range(letters):
            record_dead_letter("row_errors")

    # --- Refusals -------------------------------------------------------------------------------

    def _refused_request(self, exc: RequestRefused, log: Any) -> None:
        """An append was refused for good: isolate the batch at fault, or (one entry) reopen and
        dead-letter its batch after the settle."""
        self._reopen("refused")  # the refused request may have broken the chain
        refusal = self.offsets.refused(exc.entries, str(exc.cause))
        if refusal is None:
            log.warning("append.refused.isolating", entries=len(exc.entries), detail=str(exc))

    def _refused_open(self, exc: Exception, log: Any) -> None:
        """The open was refused for good (an unknown pipe, ...): close the channel's gate,
        dead-letter what was never sent, back off and try again."""
        self._reopen("refused")
        taken, kept = self.refusals.refused_open(self.lease.value, str(exc))
        emit = log.error if self._refused_opens % REFUSED_LOG_EVERY == 0 else log.info
        self._refused_opens += 1
        emit("channel.open_refused", error=type(exc).__name__, detail=str(exc),
             dead_lettered=taken, kept=kept, retry_in=REFUSED_PAUSE_SECONDS,
             refusals=self._refused_opens)  # fmt: skip
        self._pause(REFUSED_PAUSE_SECONDS)

