"""Dead letters: batches that can never succeed as sent, kept in the Redis list `snowpipe:dead`.

A batch is dead-lettered (never silently dropped) when Snowflake refuses it for good (unknown pipe,
bad request, credentials a refresh did not fix, rows that cannot be encoded) or when its retries
ran out. Each entry keeps the rows, so `snowpipe-worker dead-letters requeue` can send it again
after the cause is fixed (a dead-lettered batch's id is forgotten by the channel log, so the
requeued batch is logged again; it was never committed).

Kind "row_errors" records rows Snowflake committed with errors (reported in the channel status):
the batch was committed, so requeueing it would duplicate its good rows; it is kept for inspection.

Kind "malformed" records a message on the queue that was not a valid batch (worker/intake.py):
`raw` keeps its body as received (text, or base64 when `detail["raw_encoding"]` is "base64"),
`rows` is empty, and it is never requeued (there is no batch to send; fix the producer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson
import redis

from worker.delivery.channels import KEY_PREFIX
from worker.messages import IngestMessage

DEAD_KEY = KEY_PREFIX + "dead"

Kind = Literal["failed", "row_errors", "malformed"]


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered batch: what, where to, why, and its rows."""

    batch_id: str
    database: str
    schema: str
    pipe: str
    reason: str
    rows: list[dict[str, Any]]
    kind: Kind = "failed"
    attempts: int = 0
    task_id: str | None = None
    failed_at: float = field(default_factory=time.time)
    detail: dict[str, Any] = field(default_factory=dict)
    letter_id: str = ""  # unique id of the letter
    raw: str | None = None  # "malformed": the message body as received

    @classmethod
    def of(
        cls,
        message: IngestMessage,
        reason: str,
        *,
        kind: Kind = "failed",
        task_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> DeadLetter:
        """The dead letter of `message` (the one way a dead letter is made: task and pump)."""
        return cls(
            message.batch_id,
            message.database,
            message.schema,
            message.pipe,
            reason,
            message.rows,
            kind=kind,
            attempts=message.attempt,
            task_id=task_id,
            detail=detail if detail is not None else {},
        )

    def dumps(self) -> bytes:
        """The entry as stored in Redis (JSON; row values as the worker encodes them)."""
        from worker.snowpipe.encoding import to_json

        return to_json(asdict(self))

    @classmethod
    def loads(cls, raw: bytes | str) -> DeadLetter:
        """The entry stored as `raw`."""
        data = orjson.loads(raw)
        return cls(**data)


@dataclass(frozen=True)
class Stored:
    """A dead letter with its position in the list and the exact stored bytes (for removal)."""

    index: int
    raw: bytes
    letter: DeadLetter


class DeadLetters:
    """The dead-letter list on the state Redis."""

    def __init__(self, client: redis.Redis, *, key: str = DEAD_KEY) -> None:
        self._redis = client
        self.key = key

    def add(self, letter: DeadLetter) -> None:
        """Append a dead letter."""
        self._redis.rpush(self.key, letter.dumps())

    def count(self) -> int:
        """How many dead letters are stored."""
        return int(self._redis.llen(self.key))

    def entries(self, *, batch_id: str | None = None) -> Iterator[Stored]:
        """Every dead letter in order (or only those of `batch_id`)."""
        chunk = 100
        start = 0
        while True:
            raws = self._redis.lrange(self.key, start, start + chunk - 1)
            for offset, raw in enumerate(raws):
                data = raw if isinstance(raw, bytes) else str(raw).encode()
                letter = DeadLetter.loads(data)
                if batch_id is None or letter.batch_id == batch_id:
                    yield Stored(start + offset, data, letter)
            if len(raws) < chunk:
                return
            start += chunk

    def remove(self, stored: Stored) -> bool:
        """Remove one stored entry (by its exact value); False if it was already gone."""
        return int(self._redis.lrem(self.key, 1, stored.raw.decode())) == 1

    def requeue(
        self,
        publish: Callable[[DeadLetter], None],
        *,
        batch_id: str | None = None,
    ) -> tuple[int, int]:
        """Publish the failed dead letters again and remove them; (requeued, skipped): row_errors
        and malformed letters are skipped (kept).

        Publish first, then remove: a crash in between leaves a duplicate dead letter, never a
        lost one (and the channel log dedups a batch that is published twice).
        """
        requeued = skipped = 0
        for stored in list(self.entries(batch_id=batch_id)):
            if stored.letter.kind in ("row_errors", "malformed"):
                skipped += 1
                continue
            publish(stored.letter)
            if self.remove(stored):
                requeued += 1
        return requeued, skipped

    def drop(self, *, batch_id: str | None = None) -> int:
        """Delete dead letters (all, or those of `batch_id`); how many were deleted."""
        if batch_id is None:
            n = self.count()
            self._redis.delete(self.key)
            return n
        return sum(1 for stored in list(self.entries(batch_id=batch_id)) if self.remove(stored))


# --- The broker's dead-letter queue (RabbitMQ) ------------------------------------------------

# Read at most this many messages of the broker's dead-letter queue per command.
BROKER_PEEK_LIMIT = 10_000


@dataclass(frozen=True)
class BrokerDeadLetter:
    """A message RabbitMQ moved to `<queue>.dead` (delivery limit reached, or rejected)."""

    batch_id: str
    database: str
    schema: str
    pipe: str
    reason: str
    rows: list[dict[str, Any]]
    task: str
    deliveries: int

    def as_json(self) -> dict[str, Any]:
        """The entry for `dead-letters list --json` (rows included)."""
        return {**asdict(self), "source": "broker", "kind": "broker"}


def _death(headers: dict[str, Any]) -> tuple[str, int]:
    """Why RabbitMQ dead-lettered a message, and how often it was delivered before."""
    reason = str(headers.get("x-first-death-reason") or "")
    deaths = headers.get("x-death") or []
    count = int(headers.get("x-delivery-count") or 0)
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        reason = reason or str(deaths[0].get("reason") or "")
        count = max(count, int(deaths[0].get("count") or 0))
    return reason or "unknown", count


def _broker_letter(message: Any) -> BrokerDeadLetter:
    headers = dict(message.headers or {})
    reason, deliveries = _death(headers)
    try:
        body = message.decode()
    except Exception:  # noqa: BLE001 (an undecodable body is listed, never dropped)
        body = None
    kwargs: dict[str, Any] = {}
    if isinstance(body, list | tuple) and len(body) >= 2 and isinstance(body[1], dict):
        kwargs = body[1]
    rows = kwargs.get("rows")
    return BrokerDeadLetter(
        batch_id=str(kwargs.get("batch_id") or headers.get("id") or "?"),
        database=str(kwargs.get("database") or "?"),
        schema=str(kwargs.get("schema") or "?"),
        pipe=str(kwargs.get("pipe") or "?"),
        reason=f"dead-lettered by the broker: {reason}"
        + (f" after {deliveries} deliveries" if deliveries else ""),
        rows=rows if isinstance(rows, list) else [],
        task=str(headers.get("task") or ""),
        deliveries=deliveries,
    )


class BrokerDeadLetters:
    """RabbitMQ's dead-letter queue of the ingest queue (`<queue>.dead`); nothing on Redis.

    `entries()` reads the messages without taking them (they are returned to the queue when the
    connection closes); `requeue()` publishes each batch again, then acknowledges its message.
    """

    def __init__(self, settings: Any) -> None:
        from worker.celery_config import dead_queue

        self.settings = settings
        self.enabled = not settings.broker_is_redis
        self.queue = dead_queue(settings) if self.enabled else None
        self.name = f"{settings.queue_name}.dead"

    def _connection(self) -> Any:
        from worker.connectivity import broker_connection

        return broker_connection(self.settings, timeout=5)

    def count(self) -> int:
        """Messages in the dead-letter queue (0 on Redis, which has none)."""
        if self.queue is None:
            return 0
        with self._connection() as conn:
            declared = self.queue(conn.default_channel).queue_declare(passive=False)
            return int(declared.message_count)

    def entries(self, *, batch_id: str | None = None) -> list[BrokerDeadLetter]:
        """The dead-lettered messages (left in the queue)."""
        if self.queue is None:
            return []
        with self._connection() as conn:
            # Closing the connection returns every message read to the queue, unacknowledged.
            return [
                letter
                for _, letter in self._read(conn)
                if batch_id is None or letter.batch_id == batch_id
            ]

    def _read(self, conn: Any) -> Iterator[tuple[Any, BrokerDeadLetter]]:
        """The queue's messages (up to BROKER_PEEK_LIMIT), unacknowledged, with their letters."""
        assert self.queue is not None
        bound = self.queue(conn.default_channel)
        bound.declare()
        for _ in range(BROKER_PEEK_LIMIT):
            message = bound.get(no_ack=False)
            if message is None:
                return
            yield message, _broker_letter(message)

    def requeue(
        self, publish: Callable[[BrokerDeadLetter], None], *, batch_id: str | None = None
    ) -> tuple[int, int]:
        """Publish each dead-lettered batch again, then acknowledge its message; (requeued, kept).

        Kept: messages of other tasks, for another batch id, or whose rows cannot be published
        (they stay in the queue). Publish first, then acknowledge: a crash in between leaves a
        duplicate, which the channel log deduplicates by batch id.
        """
        from worker.celery_config import INGEST_TASK

        if self.queue is None:
            return 0, 0
        requeued = kept = 0
        with self._connection() as conn:
            for message, letter in self._read(conn):
                if (batch_id is not None and letter.batch_id != batch_id) or (
                    letter.task != INGEST_TASK or not letter.rows
                ):
                    kept += 1
                    continue
                try:
                    publish(letter)
                except ValueError:  # InvalidBatchError: leave it where it is, visible
                    kept += 1
                    continue
                message.ack()
                requeued += 1
        return requeued, kept
