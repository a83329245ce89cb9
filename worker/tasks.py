"""The Celery tasks: `ingest_batch` (log one row batch) and `refresh_tokens` (beat).

`ingest_batch` is where a batch is acknowledged: it writes the batch into the log of one channel
of its pipe (`ChannelLog.append`: the batch gets its offsets there, once; a batch id seen before
is found and not written again) and returns, and Celery acknowledges the message. It takes
milliseconds: appending to Snowflake and confirming the commit is the node's pumps' work
(worker/delivery/). It never lets an exception escape on purpose (on Redis a raised exception is
acknowledged and a rejection deletes the message); every ending is explicit:

- logged (or found already logged): return, Celery acknowledges;
- the channel's log is over its cap (backpressure): wait up to `backpressure_wait_seconds`,
  then put the batch back in the queue (same batch id) and return;
- the state Redis failed: wait the RetryPolicy's countdown, put the batch back in the queue and
  return; if that publish fails too, `Reject(requeue=True)` keeps the message in the broker;
- rows that can never be sent (not JSON, a row over the request cap, no rows): dead letter, then
  `DeadLettered` is raised so that Flower and `celery events` show the task as FAILURE; the
  task's request class (`IngestRequest`) acknowledges that message instead of rejecting it (on
  RabbitMQ a rejection would also put it in the broker's dead-letter queue: a second copy);
- the soft time limit (prefork), wherever it strikes: `Reject(requeue=True)` keeps the message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.utils.serialization import get_pickled_exception
from celery.worker.request import Request

from worker import runtime
from worker.celery_app import INGEST_TASK, REFRESH_TASK, app
from worker.deadletter import DeadLetter
from worker.delivery.log import AlreadyLogged, LogFull, Piece
from worker.observability import get_logger, record_dead_letter, record_ingest

# Never sleep longer than this before re-publishing (the message is unacked meanwhile).
MAX_COUNTDOWN_SECONDS = 30.0
# How often a task waiting on a full log looks again.
BACKPRESSURE_POLL_SECONDS = 0.25
# The token refresh lock outlives a slow refresh, but not a crashed refresher by much.
REFRESH_LOCK_EXTRA_SECONDS = 10.0

_log = get_logger("worker.tasks")


class EmptyBatchError(ValueError):
    """A batch without rows (published by something other than publish_batch)."""


class StateNotReplicatedError(redis.RedisError):
    """The state Redis did not get the log write to enough replicas in time."""


class DeadLettered(Exception):
    """The batch was stored as a dead letter (`snowpipe-worker dead-letters list` shows it)."""


class IngestRequest(Request):  # type: ignore[misc]
    """ingest_batch's request: a `DeadLettered` failure is acknowledged (the batch is stored in
    the dead letters) and announced as task-failed; every other failure as Celery decides."""

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
    rows: list[dict[str, Any]],
    attempt: int = 0,
) -> dict[str, Any]:
    """Log `rows` for `database.schema.pipe` once (see the module docstring); a small summary."""
    batch = Batch(batch_id, database, schema, pipe, rows, attempt)
    label = f"{database}.{schema}.{pipe}"
    try:
        result = _ingest(self, batch)
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
    outcome = "backpressure" if result.get("reason") == "backpressure" else str(result["outcome"])
    record_ingest(label, outcome, len(rows) if outcome == "logged" else 0)
    return result


def _ingest(self: Task, batch: Batch) -> dict[str, Any]:
    from worker.snowpipe.encoding import encode_pieces
    from worker.snowpipe.errors import PermanentError

    batch_id, database, schema, pipe, rows, attempt = (
        batch.batch_id,
        batch.database,
        batch.schema,
        batch.pipe,
        batch.rows,
        batch.attempt,
    )
    rt = runtime.current()
    s = rt.settings
    try:
        if not rows:
            raise EmptyBatchError("the batch has no rows: publish at least one row per batch")
        pieces = [
            Piece(n, data)
            for n, data in encode_pieces(
                rows, compression=s.compression, max_request_bytes=s.max_request_bytes
            )
        ]
    except (PermanentError, EmptyBatchError) as exc:
        _dead_letter(rt, self, batch, str(exc))
        raise DeadLettered(f"batch {batch_id} dead-lettered: {exc}") from None
    ref = rt.channel(batch_id, database, schema, pipe)
    waited_until = time.monotonic() + s.backpressure_wait_seconds
    try:
        while True:
            result = rt.log.append(ref, batch_id, pieces, cap_bytes=s.log_max_bytes)
            if not isinstance(result, LogFull) or time.monotonic() >= waited_until:
                break
            time.sleep(BACKPRESSURE_POLL_SECONDS)
        if s.state_min_replicas and not isinstance(result, LogFull):
            acked = rt.log.wait_for_replicas(s.state_min_replicas, s.state_replica_timeout_ms)
            if acked < s.state_min_replicas:
                raise StateNotReplicatedError(
                    f"the log write reached {acked} of {s.state_min_replicas} replicas in "
                    f"{s.state_replica_timeout_ms} ms (SNOWPIPE_STATE_MIN_REPLICAS)"
                )
    except redis.RedisError as exc:
        _log.warning("ingest.state_failed", batch_id=batch_id, error=type(exc).__name__,
                     detail=str(exc))
        return _retry_later(self, batch, exc, next_attempt=attempt + 1)
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
        return {**_retry_later(self, batch, None, next_attempt=attempt), "reason": "backpressure"}
    # (The append script counted logged / already_logged itself.)
    if isinstance(result, AlreadyLogged):
        return {"batch_id": batch_id, "outcome": "already_logged"}
    return {"batch_id": batch_id, "outcome": "logged", "first": result.first, "last": result.last}


@dataclass(frozen=True)
class Batch:
    """The arguments of one ingest_batch message."""

    batch_id: str
    database: str
    schema: str
    pipe: str
    rows: list[dict[str, Any]]
    attempt: int


def _dead_letter(rt: runtime.Runtime, task: Task, batch: Batch, reason: str) -> None:
    _log.error("ingest.dead_letter", batch_id=batch.batch_id, pipe=batch.pipe, reason=reason)
    try:
        rt.count("dead_letter")
        rt.dead_letters.add(
            DeadLetter(
                batch.batch_id,
                batch.database,
                batch.schema,
                batch.pipe,
                reason,
                batch.rows,
                attempts=batch.attempt,
                task_id=task.request.id,
            )
        )
        record_dead_letter("failed")
    except Exception as exc:
        # Could not keep it: leave the message in the broker rather than lose the batch.
        raise Reject(f"dead letter not stored: {exc}", requeue=True) from exc


def _retry_later(
    task: Task, batch: Batch, exc: BaseException | None, *, next_attempt: int
) -> dict[str, Any]:
    """Put the batch back in the queue (after the policy's countdown if something failed)."""
    from worker.retry import RetryPolicy

    rt = runtime.current()
    if exc is not None:
        policy = RetryPolicy.from_settings(rt.settings)
        countdown = min(MAX_COUNTDOWN_SECONDS, policy.countdown(next_attempt, exc))
        rt.count("retry_later")
        # Wait here rather than with an ETA: ETA messages sit unacked in worker memory and
        # count against the visibility timeout; quorum queues would need delayed delivery.
        time.sleep(countdown)
    try:
        ingest_batch.apply_async(
            kwargs={
                "batch_id": batch.batch_id,
                "database": batch.database,
                "schema": batch.schema,
                "pipe": batch.pipe,
                "rows": batch.rows,
                "attempt": next_attempt,
            },
            task_id=f"{batch.batch_id}:{next_attempt}",
        )
    except Exception as publish_error:
        raise Reject(f"re-publish failed: {publish_error}", requeue=True) from publish_error
    return {"batch_id": batch.batch_id, "outcome": "retry_later", "attempt": next_attempt}


@app.task(name=REFRESH_TASK, bind=True, ignore_result=True)  # type: ignore[untyped-decorator]
def refresh_tokens(self: Task) -> dict[str, Any]:
    """Refresh the shared scoped token if it is inside the advisory window (beat calls this).

    Advisory window: remaining <= margin(L) + 1.5 x beat interval, so beat refreshes before any
    process's guard reaches its own soft window (margin(L) before expiry) and every guard adopts
    the shared token instead of refreshing on the request path.
    """
    rt = runtime.current()
    s = rt.settings
    store = rt.token_store

    def advisory(lifetime: float) -> float:
        margin = min(s.refresh_max_margin_seconds, s.refresh_margin_fraction * lifetime)
        return margin + 1.5 * s.beat_refresh_seconds

    shared = store.load()
    if shared is not None and shared.remaining() > advisory(shared.lifetime):
        return {"outcome": "fresh", "remaining": round(shared.remaining(), 1)}
    owner = store.acquire(s.refresh_wait_timeout_seconds + REFRESH_LOCK_EXTRA_SECONDS)
    if owner is None:
        return {"outcome": "locked"}
    try:
        shared = store.load()
        if shared is not None and shared.remaining() > advisory(shared.lifetime):
            return {"outcome": "fresh", "remaining": round(shared.remaining(), 1)}
        with runtime.beat_refresh():
            token = rt.client.tokens.refresh("beat")
        _log.info("token.beat.refreshed", lifetime=token.lifetime)
        return {"outcome": "refreshed", "lifetime": token.lifetime}
    except Exception as exc:  # noqa: BLE001 (beat is an optimisation: never fail loudly)
        # Workers still refresh on their own; say so and let the next tick try again.
        _log.warning("token.beat.failed", error=type(exc).__name__, detail=str(exc))
        return {"outcome": "failed", "error": type(exc).__name__}
    finally:
        store.release(owner)
