"""The Celery tasks: `ingest_batch` (log one row batch) and `refresh_tokens` (beat).

`ingest_batch` is where a batch is acknowledged: it writes the batch into the log of one channel
of its pipe (`ChannelLog.append`: the batch gets its offsets there, once; a batch id seen before
is found and not written again) and returns, and Celery acknowledges the message. It takes
milliseconds: appending to Snowflake and confirming the commit is the node's pumps' work
(worker/delivery/). It never lets an exception escape on purpose (on Redis a raised exception is
acknowledged and a rejection deletes the message); every ending is explicit:

- logged (or found already logged): return, Celery acknowledges;
- the channel's log is over its cap (backpressure), or no pump has settled the channel since the
  state store (re)started (a new channel, a restart or failover: docs/delivery.md): wait up to
  `backpressure_wait_seconds`, then put the batch back in the queue (same batch id) and return;
- the batch was dead-lettered from a log and this is not the requeue of its letter (a late copy
  of the original): return, Celery acknowledges;
- Snowflake refuses the batch's channel (an unknown pipe): dead letter, as below;
- the state Redis is unreachable (or did not reach its replicas): ride the outage out with the
  message held (unacknowledged, so it stays the broker's): retry with capped backoff for up to
  `SNOWPIPE_STATE_OUTAGE_SECONDS` (300) from the batch's first failure, but never longer in one
  run than `STATE_HOLD_SHARE` of the soft time limit (the visibility timeout on Redis, the
  soft/hard limits under prefork, RabbitMQ's consumer timeout all stay far away). When the store
  answers, the batch is logged and acknowledged as usual. When the hold runs out, the batch is
  put back in the queue (re-published with the same batch id and the time its outage began,
  then acknowledged; if that publish fails, `Reject(requeue=True)`) and tried again: a batch is
  never dropped or dead-lettered for an outage. Past the outage setting it says so at ERROR
  (`ingest.state_outage_exceeded`);
- a message that is not a valid batch (bad names, wrong types: normally caught before the task,
  worker/intake.py, and checked here again for a direct call): dead letter of kind `malformed`
  with the arguments as its raw body;
- a batch for a pipe outside `SNOWPIPE_PIPES` (when set): dead letter of kind `failed` whose
  reason names the setting (requeue it once the setting lists the pipe);
- a batch in the NDJSON form whose lines are not all non-empty JSON objects within the request
  cap (worker/batchbytes.py): dead letter of kind `malformed` naming the line, as above;
- rows that can never be sent (not JSON, a row over the request cap, no rows): dead letter, then
  `DeadLettered` is raised so that Flower and `celery events` show the task as FAILURE; the
  task's request class (`IngestRequest`) acknowledges that message instead of rejecting it (on
  RabbitMQ a rejection would also put it in the broker's dead-letter queue: a second copy);
- the soft time limit (prefork), wherever it strikes: `Reject(requeue=True)` keeps the message.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import worker_init, worker_shutting_down
from celery.utils.serialization import get_pickled_exception
from celery.worker.request import Request

from worker import runtime
from worker.batchbytes import NdjsonBatchError, ndjson_pieces, parse_rows, rows_pieces
from worker.celery_app import INGEST_TASK, MALFORMED_TASK, REFRESH_TASK, app
from worker.deadletter import DeadLetter
from worker.delivery.log import (
    AlreadyLogged,
    AppendResult,
    ChannelRefused,
    InDeadLetters,
    LogFull,
    Piece,
    Unsettled,
)
from worker.delivery.log import (
    StateNotReplicatedError as StateNotReplicatedError,  # noqa: PLC0414 (re-exported)
)
from worker.errors import DeadLettered as DeadLettered  # noqa: PLC0414 (re-exported)
from worker.errors import EmptyBatchError as EmptyBatchError  # noqa: PLC0414 (re-exported)
from worker.errors import InvalidBatchError, PipeNotServedError
from worker.identifiers import pipe_label
from worker.messages import IngestMessage
from worker.observability import OTHER_PIPE, get_logger, record_dead_letter, record_ingest
from worker.snowpipe.encoding import Compression
from worker.tokenstore import advisory_window, beat_refresh

# Riding out a state-store outage: retries every 0.5 s, doubling to at most this (with jitter).
STATE_RETRY_FIRST_SECONDS = 0.5
STATE_RETRY_CAP_SECONDS = 5.0
# One run holds its message at most this share of the soft time limit (celery_config.py: half
# the visibility timeout), then puts the batch back in the queue and acknowledges the message.
STATE_HOLD_SHARE = 0.8
# How often a task waiting on a full log looks again.
BACKPRESSURE_POLL_SECONDS = 0.25
# How long a requeued batch waits for its refused channel to open (two of the pump's retries).
REQUEUE_REFUSED_WAIT_SECONDS = 12.0
# The token refresh lock outlives a slow refresh, but not a crashed refresher by much.
REFRESH_LOCK_EXTRA_SECONDS = 10.0

_log = get_logger("worker.tasks")
# Set when this process's worker begins a warm shutdown (threads/solo pools share the process):
# a task riding out an outage puts its batch back in the queue at once instead of holding on.
_shutting_down = threading.Event()


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _on_shutting_down(**_: Any) -> None:
    _shutting_down.set()


# Set when this node's pool runs tasks in the consumer's process (threads, solo): a request can
# hand the task the arguments the consumer decoded, whatever their size (IngestRequest).
_pool_in_process = threading.Event()


@worker_init.connect  # type: ignore[untyped-decorator]
def _note_pool(sender: Any = None, **_: Any) -> None:
    from celery import concurrency

    pool = getattr(sender, "pool_cls", None)
    try:  # a name ("threads") or the class itself, at this point of the worker's start
        module = getattr(concurrency.get_implementation(pool), "__module__", "")
    except Exception:  # noqa: BLE001 (unknown: Celery's own way, decoding in the pool)
        module = ""
    if module in ("celery.concurrency.thread", "celery.concurrency.solo"):
        _pool_in_process.set()
    else:
        _pool_in_process.clear()


class IngestRequest(Request):  # type: ignore[misc]
    """ingest_batch's request: a `DeadLettered` failure is acknowledged (the batch is stored in
    the dead letters) and announced as task-failed; every other failure as Celery decides.

    A batch's body is decoded once: the consumer's check (worker/intake.py) decoded it already,
    and Celery would decode it again in the pool. The request carries the decoded arguments
    instead when the pool runs tasks in this process (threads, solo), and under prefork for a
    batch in the NDJSON form, whose arguments are a few strings, as cheap to hand to a child
    process as the body itself. (Under prefork the rows form keeps Celery's way: pickling the
    rows in the node's main process would cost it about what the child saves.)"""

    def __init__(
        self, message: Any, *args: Any, body: Any = None, decoded: bool = False, **kwargs: Any
    ) -> None:
        payload = getattr(message, "_decoded_cache", None)
        if (
            not decoded
            and (body is None or body is getattr(message, "body", None))
            and isinstance(payload, list | tuple)
            and len(payload) == 3
            and isinstance(payload[1], dict)
            and (_pool_in_process.is_set() or "ndjson" in payload[1])
        ):
            body, decoded = tuple(payload), True
        super().__init__(message, *args, body=body, decoded=decoded, **kwargs)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if not isinstance(exc, DeadLettered):
            return super().on_failure(exc_info, send_failed_event, return_ok)
        from celery.worker.state import task_ready

        task_ready(self)
        if send_failed_event:
            self.send_event(
                "task-failed",
                exception=repr(get_pickled_exception(exc_info.exception)),
                traceback=exc_info.traceback,
            )
        self.acknowledge()
        return None


@app.task(  # type: ignore[untyped-decorator]
    name=INGEST_TASK,
    bind=True,
    acks_late=True,
    ignore_result=True,
    Request=IngestRequest,
    throws=(DeadLettered,),  # logged at INFO without a traceback: the dead letter is the record
)
def ingest_batch(
    self: Task,
    *,
    batch_id: str,
    database: str,
    schema: str,
    pipe: str,
    rows: list[dict[str, Any]] | None = None,
    ndjson: str | None = None,
    row_count: int | None = None,
    attempt: int = 0,
    outage_since: float | None = None,
    requeue_of: str | None = None,
) -> dict[str, Any]:
    """Log `rows` (or the lines of `ndjson`) for `database.schema.pipe` once (see the module
    docstring); a small summary.

    `attempt` counts re-publications; `outage_since` (epoch seconds) is when the state store
    first failed this batch, carried across re-publications of an outage; `requeue_of` names the
    dead letter the batch was requeued from. Names are logged in their canonical spelling
    (worker/identifiers.py)."""
    arguments: dict[str, Any] = {
        "batch_id": batch_id, "database": database, "schema": schema, "pipe": pipe,
        "attempt": attempt, "outage_since": outage_since, "requeue_of": requeue_of,
    }  # fmt: skip
    if ndjson is not None:
        arguments["ndjson"] = ndjson
        if row_count is not None:
            arguments["row_count"] = row_count
    if rows is not None or ndjson is None:
        arguments["rows"] = rows
    try:
        batch = IngestMessage.from_kwargs(arguments)
    except InvalidBatchError as exc:
        return _malformed_call(self, arguments, str(exc))
    label = pipe_label(batch.database, batch.schema, batch.pipe)
    try:
        result = _ingest(self, batch)
    except NdjsonBatchError as exc:
        return _malformed_call(self, arguments, str(exc), {"ndjson_line": exc.line})
    except SoftTimeLimitExceeded as exc:
        # Wherever it struck (a retry's countdown, a publish), the batch may not be logged:
        # keep the message. A raised exception would be acknowledged on Redis.
        record_ingest(label, "requeued")
        raise Reject(f"soft time limit while handling batch {batch_id}", requeue=True) from exc
    except Reject:
        record_ingest(label, "requeued")
        raise
    except DeadLettered:
        record_ingest(label, "dead_letter")
        raise
    reason = result.get("reason")
    outcome = str(reason) if reason in ("backpressure", "unsettled") else str(result["outcome"])
    record_ingest(label, outcome, batch.size if outcome == "logged" else 0)
    return result


def batch_pieces(
    batch: IngestMessage, compression: Compression, max_request_bytes: int
) -> list[Piece]:
    """The batch's log pieces: its rows encoded as NDJSON with one orjson call, or its `ndjson`
    lines checked and kept as they are (worker/batchbytes.py). EmptyBatchError, EncodingError /
    RowTooLargeError naming the row (`rows`), NdjsonBatchError naming the line (`ndjson`)."""
    if batch.ndjson is not None:
        parts = ndjson_pieces(
            batch.ndjson, row_count=batch.row_count, compression=compression,
            max_request_bytes=max_request_bytes,
        )  # fmt: skip
    else:
        if not batch.rows:
            raise EmptyBatchError("the batch has no rows: publish at least one row per batch")
        parts = rows_pieces(
            batch.rows, compression=compression, max_request_bytes=max_request_bytes
        )
    return [Piece(n, data) for n, data in parts]


def _ingest(self: Task, batch: IngestMessage) -> dict[str, Any]:
    batch_id, database, schema, pipe = batch.batch_id, batch.database, batch.schema, batch.pipe
    rt = runtime.current()
    s = rt.settings
    # An ndjson batch's lines are checked first: NdjsonBatchError (malformed) goes up to
    # ingest_batch, which dead-letters the message as it came; any letter made below can hold
    # its rows.
    pieces = batch_pieces(batch, s.compression, s.max_request_bytes) if batch.ndjson else []
    try:
        served = s.served_pipes()
        if served is not None and (database, schema, pipe) not in served:
            raise PipeNotServedError(
                f"pipe {pipe_label(database, schema, pipe)} is not one this deployment serves "
                f"(SNOWPIPE_PIPES={s.pipes}): add it to SNOWPIPE_PIPES on every worker node and "
                "requeue the dead letter, or publish to a listed pipe"
            )
        if not pieces:
            pieces = batch_pieces(batch, s.compression, s.max_request_bytes)
    except InvalidBatchError as exc:  # a pipe not served, no rows, a row that cannot be encoded
        requeued = _dead_letter(rt, self, batch, str(exc))
        if requeued is not None:
            return requeued
        raise DeadLettered(f"batch {batch_id} dead-lettered: {exc}") from None
    ref = rt.channel(batch_id, database, schema, pipe)

    # A requeue (the operator says the cause was fixed) also waits out a refused channel for a
    # while: the pump tries to open it again every few seconds, and only then lets it through.
    waits_for = (LogFull, Unsettled, ChannelRefused) if batch.requeue_of else (LogFull, Unsettled)
    wait_seconds = s.backpressure_wait_seconds
    if batch.requeue_of:
        wait_seconds = max(wait_seconds, REQUEUE_REFUSED_WAIT_SECONDS)

    def log_batch() -> AppendResult:
        waited_until = time.monotonic() + wait_seconds
        while True:
            # With replicas, a WAIT on the same connection follows the script: a batch is
            # acknowledged only once the replicas hold it (or its record, when already logged).
            # (StateNotReplicatedError, a RedisError, is ridden out like an outage.)
            result = rt.log.append(
                ref, batch_id, pieces, cap_bytes=s.log_max_bytes, requeue_of=batch.requeue_of,
                replicas=s.state_min_replicas, replica_timeout_ms=s.state_replica_timeout_ms,
            )  # fmt: skip
            if not isinstance(result, waits_for) or time.monotonic() >= waited_until:
                return result
            time.sleep(BACKPRESSURE_POLL_SECONDS)

    try:
        result = log_batch()
    except redis.RedisError as exc:
        ridden = _ride_out(self, batch, exc, log_batch)
        if isinstance(ridden, dict):
            return ridden  # put back in the queue
        result = ridden.value
    return _outcome(rt, self, batch, ref, result)


def _outcome(
    rt: runtime.Runtime, task: Task, batch: IngestMessage, ref: Any, result: AppendResult
) -> dict[str, Any]:
    """The task's summary for what the log said (putting the batch back in the queue, or
    dead-lettering it, where that is the answer)."""
    s = rt.settings
    batch_id = batch.batch_id
    if isinstance(result, LogFull | Unsettled):
        if isinstance(result, LogFull):
            _log.warning(
                "ingest.backpressure",
                batch_id=batch_id,
                channel=str(ref),
                log_bytes=result.used_bytes,
                cap=s.log_max_bytes,
                waited_s=s.backpressure_wait_seconds,
            )
            rt.count("backpressure")
            reason = "backpressure"
        else:
            # No pump settled the channel in time (a new channel, or the state store restarted
            # or failed over and the pumps are settling it): back in the queue.
            _log.info("ingest.unsettled", batch_id=batch_id, channel=str(ref),
                      waited_s=s.backpressure_wait_seconds)  # fmt: skip
            reason = "unsettled"
        return {**_retry_later(batch, next_attempt=batch.attempt), "reason": reason}
    if isinstance(result, ChannelRefused):
        why = f"Snowflake refuses the batch's channel: {result.reason}"
        requeued = _dead_letter(rt, task, batch, why)
        if requeued is not None:
            return requeued
        raise DeadLettered(f"batch {batch_id} dead-lettered: {why}") from None
    # (The append script counted logged / already_logged / already_dead_lettered itself.)
    if isinstance(result, AlreadyLogged):
        return {"batch_id": batch_id, "outcome": "already_logged"}
    if isinstance(result, InDeadLetters):
        return {"batch_id": batch_id, "outcome": "already_dead_lettered",
                "letter_id": result.letter_id}  # fmt: skip
    return {"batch_id": batch_id, "outcome": "logged", "first": result.first, "last": result.last}


def _dead_letter(
    rt: runtime.Runtime, task: Task, batch: IngestMessage, reason: str
) -> dict[str, Any] | None:
    """Store the batch as a dead letter (None), or, while the state store is out, put it back
    in the queue (the summary of `_retry_later`)."""
    _log.error("ingest.dead_letter", batch_id=batch.batch_id, pipe=batch.pipe, reason=reason)
    # A requeue dead-lettered again (its channel's gate still closed) keeps the letter id it
    # requeues: the batch's dedup record still names that letter, so requeuing this one logs
    # it. Under a fresh id its requeue would be answered "already dead-lettered" and dropped.
    letter = DeadLetter.of(
        _with_rows(batch), reason, task_id=task.request.id, letter_id=batch.requeue_of or ""
    )

    def add() -> None:
        _add_letter(rt, letter)

    try:
        add()
    except redis.RedisError as exc:
        # The state store is out: keep the batch (held, then back in the queue), never drop it.
        ridden = _ride_out(task, batch, exc, add)
        if isinstance(ridden, dict):
            return ridden  # back in the queue: its dead letter waits for the state store
    rt.count("dead_letter")
    record_dead_letter("failed")
    return None


def _with_rows(batch: IngestMessage) -> IngestMessage:
    """The batch with its rows as objects (a dead letter keeps rows): an `ndjson` batch's lines
    parsed with exact numbers (integers as int, fractions as Decimal; it was checked first)."""
    if batch.ndjson is None:
        return batch
    try:
        rows = parse_rows(batch.ndjson)
    except ValueError as exc:  # (not after the check; never lose the letter over it)
        _log.error("ingest.letter_rows_unreadable", batch_id=batch.batch_id, error=str(exc))
        rows = []
    return dataclasses.replace(batch, rows=rows, ndjson=None, row_count=None)


def _add_letter(rt: runtime.Runtime, letter: DeadLetter) -> None:
    """Store a letter the task is about to acknowledge its message for. With replicas, only once
    they hold it (a failover would take it back, and the message's only copy with it):
    StateNotReplicatedError, a RedisError, is ridden out like an outage."""
    s = rt.settings
    if not s.state_min_replicas:
        rt.dead_letters.add(letter)
        return
    acked = rt.dead_letters.add_replicated(letter, s.state_min_replicas, s.state_replica_timeout_ms)
    if acked < s.state_min_replicas:
        raise StateNotReplicatedError(
            f"a dead letter reached {acked} of {s.state_min_replicas} replicas in "
            f"{s.state_replica_timeout_ms} ms (SNOWPIPE_STATE_MIN_REPLICAS)"
        )


@dataclass(frozen=True, slots=True)
class _Done:
    """What the retried call returned once the state store answered again."""

    value: Any


def state_hold_seconds(outage_seconds: float, soft_limit_seconds: float, elapsed: float) -> float:
    """How long one run may hold its message while the state store is out.

    `elapsed`: seconds since the batch's outage began (0 for a first failure). Inside the outage
    window: what is left of it, at most `STATE_HOLD_SHARE` of the soft time limit. Past it: one
    more retry interval, then back in the queue (a batch is never dropped for an outage).
    """
    cap = STATE_HOLD_SHARE * soft_limit_seconds
    left = outage_seconds - elapsed
    if left <= 0:
        return min(cap, STATE_RETRY_CAP_SECONDS)
    return min(cap, left)


def state_retry_delay(retry: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds before retry number `retry` (1-based): 0.5 s doubling to 5 s, equal jitter."""
    ceiling = min(STATE_RETRY_CAP_SECONDS, STATE_RETRY_FIRST_SECONDS * 2.0 ** (retry - 1))
    return ceiling / 2 + rng() * ceiling / 2


def _ride_out(
    task: Task, batch: IngestMessage, exc: BaseException, again: Callable[[], Any]
) -> _Done | dict[str, Any]:
    """Retry `again` while the state store fails, holding the message (see the module
    docstring): `_Done(result)` once it answers, else the batch is back in the queue (the
    summary of `_retry_later`)."""
    from worker.celery_config import soft_time_limit

    rt = runtime.current()
    s = rt.settings
    now = time.time()
    since = batch.outage_since if batch.outage_since is not None else now
    hold = state_hold_seconds(s.state_outage_seconds, soft_time_limit(s), now - since)
    started = time.monotonic()
    _log.warning(
        "ingest.state_unavailable",
        batch_id=batch.batch_id,
        error=type(exc).__name__,
        detail=str(exc),
        outage_s=round(now - since, 1),
        holding_s=round(hold, 1),
        note="the batch stays in the queue; nothing is lost (SNOWPIPE_STATE_OUTAGE_SECONDS)",
    )
    retry = 0
    while True:
        left = hold - (time.monotonic() - started)
        if left <= 0 or _shutting_down.is_set():
            break
        retry += 1
        if _shutting_down.wait(min(left, state_retry_delay(retry))):
            break
        try:
            value = again()
        except redis.RedisError as error:
            exc = error
            _log.debug("ingest.state_retry", batch_id=batch.batch_id, retry=retry,
                       error=type(error).__name__)  # fmt: skip
            continue
        _log.info("ingest.state_recovered", batch_id=batch.batch_id, retries=retry,
                  outage_s=round(time.time() - since, 1))  # fmt: skip
        return _Done(value)
    outage = time.time() - since
    rt.count("retry_later")
    fields: dict[str, Any] = {
        "batch_id": batch.batch_id,
        "outage_s": round(outage, 1),
        "error": type(exc).__name__,
        "attempt": batch.attempt + 1,
    }
    if outage >= s.state_outage_seconds:
        _log.error(
            "ingest.state_outage_exceeded",
            **fields,
            limit_s=s.state_outage_seconds,
            note="the state store is still unreachable: the batch goes back in the queue and is "
            "tried again (never dropped); fix SNOWPIPE_STATE_URL's Redis",
        )
    else:
        _log.info("ingest.state_requeued", **fields, held_s=round(hold, 1))
    return _retry_later(batch, next_attempt=batch.attempt + 1, outage_since=since)


def _retry_later(
    batch: IngestMessage, *, next_attempt: int, outage_since: float | None = None
) -> dict[str, Any]:
    """Put the batch back in the queue (a new message, same batch id), then return: Celery
    acknowledges the message in hand. A fresh message starts over with the broker's delivery
    count (RabbitMQ's delivery limit) and visibility timeout (Redis)."""
    kwargs = batch.again(attempt=next_attempt, outage_since=outage_since).kwargs()
    try:
        # No countdown or ETA: on RabbitMQ's quorum queues that would need native delayed
        # delivery (the worker turns that consumer step off: worker/celery_app.py), and an ETA
        # message waits unacknowledged in the worker's memory.
        ingest_batch.apply_async(kwargs=kwargs, task_id=f"{batch.batch_id}:{next_attempt}")
    except Exception as publish_error:
        raise Reject(f"re-publish failed: {publish_error}", requeue=True) from publish_error
    return {"batch_id": batch.batch_id, "outcome": "retry_later", "attempt": next_attempt}


# --- Malformed messages -------------------------------------------------------------------------


@app.task(  # type: ignore[untyped-decorator]
    name=MALFORMED_TASK, bind=True, acks_late=True, ignore_result=True
)
def dead_letter_message(
    self: Task,
    *,
    letter_id: str,
    reason: str,
    raw: str,
    batch_id: str = "",
    database: str = "",
    schema: str = "",
    pipe: str = "",
    task_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Store a message that is not a valid batch as a dead letter of kind "malformed" (the
    consumer hands it here: worker/intake.py); the message is acknowledged once it is stored.
    While the state store is out the message is held, then put back in its queue."""
    letter = DeadLetter(
        batch_id, database, schema, pipe, reason, [], kind="malformed", task_id=task_id,
        detail=dict(detail or {}), letter_id=letter_id, raw=raw,
    )  # fmt: skip
    _store_malformed(letter)
    return {"outcome": "dead_letter", "kind": "malformed", "letter_id": letter_id}


def _malformed_call(
    task: Task, arguments: dict[str, Any], reason: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """ingest_batch called with arguments that are not a valid batch (a direct call: the
    consumer diverts such messages before they reach the task): dead letter, DeadLettered."""
    from kombu.utils import json as kombu_json

    from worker import intake

    body = kombu_json.dumps(arguments, default=repr)  # type: ignore[no-untyped-call]
    raw, note = intake.raw_text(body.encode())
    names = ("batch_id", "database", "schema", "pipe")
    fields = {k: v for k, v in arguments.items() if k in names and isinstance(v, str)}
    letter = DeadLetter(
        fields.get("batch_id", ""), fields.get("database", ""), fields.get("schema", ""),
        fields.get("pipe", ""), reason, [], kind="malformed", task_id=task.request.id,
        detail={"task": INGEST_TASK, **note, **(extra or {})}, letter_id=uuid.uuid4().hex,
        raw=raw,
    )  # fmt: skip
    _store_malformed(letter)
    record_ingest(OTHER_PIPE, "dead_letter")
    raise DeadLettered(f"message dead-lettered as malformed: {reason}")


def _store_malformed(letter: DeadLetter) -> None:
    """Add a malformed message's dead letter; while the state store is out, hold the message
    (one hold, as `_ride_out`), then `Reject(requeue=True)`: it is never acknowledged unstored."""
    rt = runtime.current()
    requeue = f"the state store is unreachable: malformed message {letter.letter_id} goes back to "
    try:
        try:
            _add_letter(rt, letter)
        except redis.RedisError as exc:
            if not _hold(lambda: _add_letter(rt, letter), exc, letter.letter_id):
                raise Reject(requeue + "its queue", requeue=True) from exc
    except SoftTimeLimitExceeded as exc:
        raise Reject(requeue + "its queue (soft time limit)", requeue=True) from exc
    rt.count("dead_letter")
    record_dead_letter("malformed")
    _log.error("ingest.dead_letter", kind="malformed", letter_id=letter.letter_id,
               batch_id=letter.batch_id, reason=letter.reason)  # fmt: skip


def _hold(again: Callable[[], Any], exc: BaseException, what: str) -> bool:
    """Retry `again` while the state store fails, for one hold (`state_hold_seconds` of a first
    failure); True once it answered, False when the hold ran out or the worker shuts down."""
    from worker.celery_config import soft_time_limit

    s = runtime.current().settings
    hold = state_hold_seconds(s.state_outage_seconds, soft_time_limit(s), 0.0)
    _log.warning("ingest.state_unavailable", letter_id=what, error=type(exc).__name__,
                 detail=str(exc), holding_s=round(hold, 1),
                 note="the message stays in the queue; nothing is lost")  # fmt: skip
    started = time.monotonic()
    retry = 0
    while True:
        left = hold - (time.monotonic() - started)
        if left <= 0 or _shutting_down.is_set():
            return False
        retry += 1
        if _shutting_down.wait(min(left, state_retry_delay(retry))):
            return False
        try:
            again()
        except redis.RedisError:
            continue
        return True


@app.task(name=REFRESH_TASK, bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
def refresh_tokens(self: Task) -> dict[str, Any]:
    """Refresh the shared scoped token if it is inside the advisory window (beat calls this).

    Advisory window (`worker.tokenstore.advisory_window`): remaining <= soft_margin(L) + 1.5 x
    beat interval, so beat refreshes before any process's guard reaches its own soft window
    (soft_margin(L) before expiry, the guard's own rule) and every guard adopts the shared token
    instead of refreshing on the request path.
    """
    rt = runtime.current()
    s = rt.settings
    store = rt.token_store

    shared = store.load()
    if shared is not None and shared.remaining() > advisory_window(s, shared.lifetime):
        return {"outcome": "fresh", "remaining": round(shared.remaining(), 1)}
    owner = store.acquire(s.refresh_wait_timeout_seconds + REFRESH_LOCK_EXTRA_SECONDS)
    if owner is None:
        return {"outcome": "locked"}
    try:
        shared = store.load()
        if shared is not None and shared.remaining() > advisory_window(s, shared.lifetime):
            return {"outcome": "fresh", "remaining": round(shared.remaining(), 1)}
        with beat_refresh():
            token = rt.client.tokens.refresh("beat")
        _log.info("token.beat.refreshed", lifetime=token.lifetime)
        return {"outcome": "refreshed", "lifetime": token.lifetime}
    except Exception as exc:  # noqa: BLE001 (beat is an optimisation: never fail loudly)
        # Workers still refresh on their own; say so and let the next tick try again.
        _log.warning("token.beat.failed", error=type(exc).__name__, detail=str(exc))
        return {"outcome": "failed", "error": type(exc).__name__}
    finally:
        store.release(owner)
