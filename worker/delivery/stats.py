"""The worker's counters: a hash in the state Redis (`snowpipe:stats`) that tasks and pumps add
to, read by `snowpipe-worker stats`, `status` and the tests."""

from __future__ import annotations

import collections
import contextlib
import threading

import redis

from worker.delivery.channels import STATS_KEY

__all__ = ["STATS_KEY", "BufferedCounters", "Counters", "counters"]


def counters(client: redis.Redis) -> dict[str, int]:
    """The worker's counters (logged, already_logged, rows_committed, dead_letter, ...)."""
    raw = client.hgetall(STATS_KEY)
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()
    }


class Counters:
    """Adds to the worker's counters in Redis (best effort: never fails the caller)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def count(self, name: str, amount: int = 1) -> None:
        """Add `amount` to counter `name`."""
        with contextlib.suppress(redis.RedisError):
            self._redis.hincrby(STATS_KEY, name, amount)


class BufferedCounters(Counters):
    """Counters kept in memory and written in one round trip by `flush()` (the pumps' hot path
    counts every append and commit; a Redis call each would cost more than the append)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self._pending: collections.Counter[str] = collections.Counter()
        self._pending_lock = threading.Lock()

    def count(self, name: str, amount: int = 1) -> None:
        """Add `amount` to counter `name` (written at the next flush)."""
        with self._pending_lock:
            self._pending[name] += amount

    def flush(self) -> None:
        """Write what was counted since the last flush (kept for the next one if Redis fails)."""
        with self._pending_lock:
            pending, self._pending = self._pending, collections.Counter()
        if not pending:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for name, amount in pending.items():
                pipe.hincrby(STATS_KEY, name, amount)
            pipe.execute()
        except redis.RedisError:
            with self._pending_lock:
                self._pending.update(pending)
