"""The broker's dead-letter queue (RabbitMQ's `<queue>.dead`), listed and requeued beside the
state store's dead letters (worker/deadletter.py). Redis has none."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

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
    ndjson = kwargs.get("ndjson")
    if rows is None and isinstance(ndjson, str):  # a batch in the NDJSON form: its rows, exact
        from worker.batchbytes import parse_rows

        try:
            rows = parse_rows(ndjson)
        except ValueError:  # lines that are not JSON: listed without rows, kept in the queue
            rows = None
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
