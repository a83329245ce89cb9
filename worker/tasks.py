"""The Celery tasks: `ingest_batch` (one row batch, exactly once) and `refresh_tokens` (beat).

`ingest_batch` never lets an exception escape on purpose: on Redis a raised exception is
acknowledged (the batch would be lost) and a rejection deletes the message. Every ending is
explicit:

- committed (or found already committed): return, Celery acknowledges;
- transient failure (retries inside the call ran out, commit not seen in time): wait the
  RetryPolicy's countdown, re-publish the batch (same batch id: the ledger dedups) and return;
  if re-publishing fails, `Reject(requeue=True)` keeps the message in the broker;
- permanent failure (unknown pipe, bad request, credentials a refresh did not fix, rows that can
  never be encoded, retries exhausted `MAX_ATTEMPTS` times): dead letter with the reason, return;
- soft time limit (prefork): re-publish like a transient failure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded

from worker import runtime
from worker.celery_app import INGEST_TASK, REFRESH_TASK, app
from worker.deadletter import DeadLetter
from worker.observability import get_logger

# A batch re-published this many times for transient reasons is dead-lettered instead.
MAX_ATTEMPTS = 12
# Never sleep longer than this before re-publishing (the message is unacked meanwhile).
MAX_COUNTDOWN_SECONDS = 30.0
# The token refresh lock outlives a slow refresh, but not a crashed refresher by much.
REFRESH_LOCK_EXTRA_SECONDS = 10.0

_log = get_logger("worker.tasks")


def _budget_seconds() -> float:
    """How long one run of ingest_batch may wait for its commit."""
    s = runtime.settings()
    soft_limit = float(app.conf.task_soft_time_limit or s.visibility_timeout_seconds)
    # Finish (or give up and re-publish) before the soft limit strikes.
    return max(1.0, min(s.commit_timeout_seconds, soft_limit - 1.0))


@app.task(name=INGEST_TASK, bind=True, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
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
    """Append `rows` to `database.schema.pipe` exactly once; returns a small summary."""
    from worker.snowpipe.encoding import encode_rows

    batch = Batch(batch_id, database, schema, pipe, rows, attempt)
    rt = runtime.current()
    if self.request.hostname:
        rt.node = self.request.hostname
    s = rt.settings
    log = _log.bind(batch_id=batch_id, pipe=pipe, attempt=attempt)
    started = time.monotonic()
    try:
        if not rows:
            raise EmptyBatchError("the batch has no rows: publish at least one row per batch")
        chunks = encode_rows(rows, compression=s.compression, max_request_bytes=s.max_request_bytes)
        result = rt.ingestor.ingest(
            batch_id, database, schema, pipe, chunks, deadline=started + _budget_seconds()
        )
    except Exception as exc:  # noqa: BLE001 (nothing may escape: see the module docstring)
        if _permanent(exc):
            _dead_letter(rt, self, batch, str(exc))
            return {"batch_id": batch_id, "outcome": "dead_letter", "reason": str(exc)}
        if not isinstance(exc, SoftTimeLimitExceeded):
            log.warning("ingest.failed", error=type(exc).__name__, detail=str(exc))
        return _retry_later(self, batch, exc, log)
    if result.row_errors:
        reason = (
            f"Snowflake reported {result.row_errors} row error(s) on channel {result.channel} "
            "around this batch; the batch is committed, the rows in error were skipped"
        )
        log.warning("ingest.row_errors", count=result.row_errors, channel=result.channel)
        rt.dead_letters.add(
            DeadLetter(
                batch_id,
                database,
                schema,
                pipe,
                reason,
                rows,
                kind="row_errors",
                attempts=attempt,
                task_id=self.request.id,
                detail={"row_errors": result.row_errors, "channel": result.channel},
            )
        )
    log.info(
        "ingest.committed",
        already=result.already_committed,
        chunks_sent=result.chunks_sent,
        rows=len(rows),
        seconds=round(time.monotonic() - started, 3),
    )
    outcome = "already_committed" if result.already_committed else "committed"
    rt.count(outcome)
    if not result.already_committed:
        rt.count("rows_committed", len(rows))
    return {"batch_id": batch_id, "outcome": outcome}


class EmptyBatchError(ValueError):
    """A batch without rows (published by something other than publish_batch)."""


def _permanent(exc: BaseException) -> bool:
    """Whether `exc` means the batch can never succeed as sent (dead-letter it)."""
    from worker.auth.guard import TokenUnavailableError
    from worker.snowpipe.errors import AuthError, PermanentError

    if isinstance(exc, TokenUnavailableError):
        # No token: a key the service rejects is permanent, an unreachable endpoint is not.
        return isinstance(exc.cause, AuthError | PermanentError)
    return isinstance(exc, AuthError | PermanentError | EmptyBatchError)


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
    except Exception as exc:
        # Could not keep it: leave the message in the broker rather than lose the batch.
        raise Reject(f"dead letter not stored: {exc}", requeue=True) from exc


def _retry_later(task: Task, batch: Batch, exc: BaseException, log: Any) -> dict[str, Any]:
    from worker.retry import RetryPolicy

    rt = runtime.current()
    attempt = batch.attempt
    if attempt + 1 >= MAX_ATTEMPTS:
        reason = f"gave up after {attempt + 1} attempts; last error: {exc}"
        _dead_letter(rt, task, batch, reason)
        return {"batch_id": batch.batch_id, "outcome": "dead_letter", "reason": reason}
    policy = RetryPolicy.from_settings(rt.settings)
    countdown = min(MAX_COUNTDOWN_SECONDS, policy.countdown(attempt + 1, exc))
    log.warning("ingest.retry_later", error=str(exc), countdown=round(countdown, 3))
    rt.count("retry_later")
    # Wait here rather than with an ETA: ETA messages sit unacked in worker memory and count
    # against the visibility timeout; quorum queues would need delayed-delivery exchanges.
    time.sleep(countdown)
    try:
        ingest_batch.apply_async(
            kwargs={
                "batch_id": batch.batch_id,
                "database": batch.database,
                "schema": batch.schema,
                "pipe": batch.pipe,
                "rows": batch.rows,
                "attempt": attempt + 1,
            },
            task_id=f"{batch.batch_id}:{attempt + 1}",
        )
    except Exception as publish_error:
        raise Reject(f"re-publish failed: {publish_error}", requeue=True) from publish_error
    return {"batch_id": batch.batch_id, "outcome": "retry_later", "attempt": attempt + 1}


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
