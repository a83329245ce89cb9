"""Dead letters: batches that can never succeed as sent, kept in the Redis list `snowpipe:dead`.

A batch is dead-lettered (never silently dropped) when Snowflake refuses it for good (unknown pipe,
bad request, credentials a refresh did not fix, rows that cannot be encoded) or when its retries
ran out. Each entry keeps the rows, so `snowpipe-worker dead-letters requeue` can send it again
after the cause is fixed (a dead-lettered batch's id is forgotten by the channel log, so the
requeued batch is logged again; it was never committed).

Kind "row_errors" records rows Snowflake committed with errors (reported in the channel status):
the batch was committed, so requeueing it would duplicate its good rows; it is kept for inspection.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson
import redis

from worker.delivery.channels import KEY_PREFIX

DEAD_KEY = KEY_PREFIX + "dead"

Kind = Literal["failed", "row_errors"]


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

    def dumps(self) -> bytes:
        """The entry as stored in Redis (JSON)."""
        return orjson.dumps(asdict(self))

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
        """Publish the failed dead letters again and remove them; (requeued, skipped row_errors).

        Publish first, then remove: a crash in between leaves a duplicate dead letter, never a
        lost one (and the channel log dedups a batch that is published twice).
        """
        requeued = skipped = 0
        for stored in list(self.entries(batch_id=batch_id)):
            if stored.letter.kind == "row_errors":
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
