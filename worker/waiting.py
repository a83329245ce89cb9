"""Waiting for batches: `wait_for_batches(ids, timeout=...) -> WaitResult`.

A producer that published batches (with `publish_batch` or `snowpipe-worker publish`) can wait
until Snowflake committed them, or until they became dead letters. Each batch id is in one of
four states:

    committed      its rows are committed in Snowflake (rows Snowflake rejected one by one
                   excepted: `WaitResult.rows_rejected` names those batches)
    dead_lettered  it is a dead letter (`snowpipe-worker dead-letters list`); `reasons` says why
    pending        logged in a channel log, not yet committed
    unknown        not (or no longer) known to the state store: still in the queue, never
                   published, in RabbitMQ's own dead-letter queue, or older than the dedup
                   horizon (SNOWPIPE_DEDUP_TTL_SECONDS)

What it reads, all on the state Redis (prefix `snowpipe:`):

    batch:{id}         the batch's dedup record, `chan TAB first TAB last` while logged, with
                       `TAB D TAB <letter id>` appended once it was dead-lettered from its log
    committed:{chan}   the channel's committed offset as a pump last confirmed it (decimal)
    the dead letters   through `DeadLetters.entries()`: a batch the task dead-lettered was never
                       logged and has no record; kind `row_errors` marks a committed batch whose
                       rejected rows are dead letters

A logged batch is committed when `committed:{chan}` >= its last offset and its record has no `D`.
One poll costs two round trips: the records (one MGET per 1,000 open ids, pipelined), then their
channels' committed offsets; the
dead letters are read only when a batch has no record (or a `D`) and the number of dead letters
changed (and at least every RESCAN_POLLS polls), and once more at the end for `rows_rejected`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import redis

from worker.deadletter import DeadLetters
from worker.delivery.channels import KEY_PREFIX, batch_key
from worker.settings import Settings

__all__ = [
    "BatchState",
    "BatchWatcher",
    "WaitResult",
    "committed_key",
    "wait_for_batches",
]

BatchState = Literal["committed", "dead_lettered", "pending", "unknown"]
STATES: tuple[BatchState, ...] = get_args(BatchState)

DEFAULT_TIMEOUT_SECONDS = 600.0
POLL_SECONDS = 0.5
# Keys per pipelined round trip.
CHUNK = 1000
# Read the dead letters at least this often (in polls) while a batch has no record, even when
# their number did not change (one added and one removed in between).
RESCAN_POLLS = 20
# The dead-letter kind of a committed batch's rejected rows.
ROW_ERRORS = "row_errors"


def committed_key(chan: str) -> str:
    """The key of a channel's committed offset (`chan` = `database|schema|pipe|channel`)."""
    return f"{KEY_PREFIX}committed:{chan}"


@dataclass(frozen=True, slots=True)
class WaitResult:
    """Where each batch stands (see the module docstring), in the order the ids were given."""

    states: dict[str, BatchState]
    # Dead-lettered batch id -> the dead letter's reason.
    reasons: dict[str, str]
    # Committed batch id -> the reason of its `row_errors` dead letter: Snowflake rejected some
    # of its rows, which are dead letters; the others are committed.
    rows_rejected: dict[str, str]
    timed_out: bool
    elapsed_seconds: float

    def ids(self, state: BatchState) -> list[str]:
        """The batch ids in `state`, in the order given."""
        return [batch_id for batch_id, s in self.states.items() if s == state]

    @property
    def counts(self) -> dict[BatchState, int]:
        """How many batches are in each state (every state present, 0 included)."""
        counts = dict.fromkeys(STATES, 0)
        for state in self.states.values():
            counts[state] += 1
        return counts

    @property
    def done(self) -> bool:
        """Every batch is committed or dead-lettered: waiting longer changes nothing."""
        return all(s in ("committed", "dead_lettered") for s in self.states.values())

    @property
    def ok(self) -> bool:
        """Every batch is committed, with no row rejected."""
        return all(s == "committed" for s in self.states.values()) and not self.rows_rejected


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class BatchWatcher:
    """The states of a set of batch ids on one state Redis; `poll()` refreshes them.

    Not thread-safe (one waiter). `ids` may hold duplicates; each id is tracked once.
    """

    def __init__(self, client: redis.Redis, ids: Iterable[str]) -> None:
        self._redis = client
        self._dead = DeadLetters(client)
        self._ids = list(dict.fromkeys(ids))
        for batch_id in self._ids:
            if not isinstance(batch_id, str) or not batch_id:
                raise ValueError(f"a batch id must be a non-empty string, got {batch_id!r}")
        self._states: dict[str, BatchState] = dict.fromkeys(self._ids, "unknown")
        self._reasons: dict[str, str] = {}
        self._rejected: dict[str, str] = {}
        self._dead_count: int | None = None
        self._polls_since_scan = 0
        self._scanned_since_commit = True

    @property
    def done(self) -> bool:
        """Every batch is committed or dead-lettered."""
        return all(s in ("committed", "dead_lettered") for s in self._states.values())

    def poll(self) -> None:
        """Read the state of every batch that is neither committed nor dead-lettered."""
        open_ids = [b for b in self._ids if self._states[b] in ("pending", "unknown")]
        if not open_ids:
            return
        records = self._get([batch_key(b) for b in open_ids])
        logged: dict[str, tuple[str, int]] = {}
        unexplained: list[str] = []  # no record, or a record marked dead-lettered
        for batch_id, raw in zip(open_ids, records, strict=True):
            if raw is None:
                self._states[batch_id] = "unknown"
                unexplained.append(batch_id)
                continue
            fields = _text(raw).split("\t")
            if len(fields) >= 4 and fields[3] == "D":
                self._states[batch_id] = "dead_lettered"
                letter = fields[4] if len(fields) > 4 else "?"
                self._reasons.setdefault(batch_id, f"dead-lettered (letter {letter})")
                unexplained.append(batch_id)
                continue
            try:
                logged[batch_id] = (fields[0], int(fields[2]))
            except (IndexError, ValueError):
                self._states[batch_id] = "unknown"  # not a record this version can read
        chans = sorted({chan for chan, _ in logged.values()})
        committed = dict(zip(chans, self._get([committed_key(c) for c in chans]), strict=True))
        for batch_id, (chan, last) in logged.items():
            value = committed[chan]
            if value is not None and int(_text(value)) >= last:
                self._states[batch_id] = "committed"
                self._scanned_since_commit = False
            else:
                self._states[batch_id] = "pending"
        self._polls_since_scan += 1
        if unexplained and self._scan_due():
            self._scan()

    def finish(self) -> None:
        """Look for `row_errors` dead letters of the committed batches (once, at the end)."""
        if not self._scanned_since_commit:
            self._scan()

    def result(self, *, timed_out: bool, elapsed_seconds: float) -> WaitResult:
        """The states as they stand."""
        reasons = {b: r for b, r in self._reasons.items() if self._states[b] == "dead_lettered"}
        rejected = {b: r for b, r in self._rejected.items() if self._states[b] == "committed"}
        return WaitResult(dict(self._states), reasons, rejected, timed_out, elapsed_seconds)

    # --- Reading ----------------------------------------------------------------------------------

    def _get(self, keys: Sequence[str]) -> list[Any]:
        """The value of each key (None if absent): one MGET per CHUNK keys, pipelined."""
        if not keys:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(keys), CHUNK):
            pipe.mget(keys[start : start + CHUNK])
        values: list[Any] = []
        for chunk in pipe.execute():
            values.extend(chunk)
        return values

    def _scan_due(self) -> bool:
        count = self._dead.count()
        due = count != self._dead_count or self._polls_since_scan >= RESCAN_POLLS
        self._dead_count = count
        return due

    def _scan(self) -> None:
        """One pass over the dead letters: reasons of dead-lettered batches, rejected rows."""
        self._polls_since_scan = 0
        self._scanned_since_commit = True
        wanted = self._states
        found: set[str] = set()
        for stored in self._dead.entries():
            letter = stored.letter
            batch_id = letter.batch_id
            if batch_id not in wanted:
                continue
            reason = _one_line(letter.reason)
            if letter.kind == ROW_ERRORS:
                self._rejected[batch_id] = reason
                continue
            found.add(batch_id)
            if wanted[batch_id] == "unknown":
                # Never logged (the task dead-lettered it), or its record was removed with it.
                self._states[batch_id] = "dead_lettered"
            if wanted[batch_id] == "dead_lettered":
                self._reasons[batch_id] = reason


def wait_on(
    client: redis.Redis,
    batch_ids: Iterable[str],
    *,
    timeout: float,
    poll_seconds: float = POLL_SECONDS,
    on_progress: Callable[[WaitResult], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> WaitResult:
    """`wait_for_batches` on a given state-store client (the clock and sleep are arguments)."""
    if timeout < 0:
        raise ValueError(f"timeout must be 0 or more seconds, got {timeout!r}")
    if poll_seconds <= 0:
        raise ValueError(f"poll_seconds must be positive, got {poll_seconds!r}")
    watcher = BatchWatcher(client, batch_ids)
    started = clock()
    deadline = started + timeout
    while True:
        watcher.poll()
        if watcher.done or clock() >= deadline:
            break
        if on_progress is not None:
            on_progress(watcher.result(timed_out=False, elapsed_seconds=clock() - started))
        sleep(min(poll_seconds, max(0.0, deadline - clock())))
    watcher.finish()
    result = watcher.result(timed_out=not watcher.done, elapsed_seconds=clock() - started)
    if on_progress is not None:
        on_progress(result)
    return result


def wait_for_batches(
    batch_ids: Iterable[str],
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    settings: Settings | None = None,
    poll_seconds: float = POLL_SECONDS,
    on_progress: Callable[[WaitResult], None] | None = None,
) -> WaitResult:
    """Wait until every batch is committed or dead-lettered, or `timeout` seconds passed.

    Returns as soon as no batch is pending or unknown (`result.done`), else at the timeout with
    `result.timed_out` (it never raises for a batch that is late). `timeout=0` reads the states
    once. `settings` defaults to the producer's (SNOWPIPE_STATE_URL, which defaults to
    SNOWPIPE_BROKER_URL for a Redis broker). `on_progress(result)` is called after each poll.
    Raises `worker.connectivity.StateStoreUnavailableError` (a ConnectionError naming
    SNOWPIPE_STATE_URL and the fix) if the state store cannot be read.
    """
    from worker import runtime
    from worker.connectivity import state_client, state_error

    s = settings if settings is not None else runtime.producer_settings()
    client = state_client(s)
    try:
        return wait_on(
            client, batch_ids, timeout=timeout, poll_seconds=poll_seconds, on_progress=on_progress
        )
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise state_error(s, exc) from None
    finally:
        client.close()
