"""Per-process state of tasks: settings, the state Redis, the channel logs, dead letters.

Everything here is created lazily on first use in a process and dropped (not closed: the parent
may still use it) after `fork()`, so a prefork child never shares a socket, a lock or a half-open
HTTP connection with its parent. `current()` is the process's `Runtime`; the threads pool shares
it between threads (every part is thread-safe).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import redis

from worker.deadletter import DeadLetters
from worker.delivery.channels import STATS_KEY, ChannelRef, channel_for
from worker.delivery.log import ChannelLog
from worker.settings import Settings, load_settings
from worker.statestore import state_redis
from worker.tokenstore import SharedToken, TokenStore

if TYPE_CHECKING:
    from worker.auth.guard import Token
    from worker.snowpipe.client import SnowpipeClient

_settings: Settings | None = None
_producer_settings: Settings | None = None
_settings_lock = threading.Lock()


def settings() -> Settings:
    """The process's settings, loaded once (immutable, so a forked child may keep them)."""
    global _settings  # noqa: PLW0603 (one process-wide value, set once)
    if _settings is None:
        with _settings_lock:
            if _settings is None:
                _settings = load_settings()
    return _settings


def producer_settings() -> Settings:
    """The settings of a producer (publish, dead letters, stats): no Snowflake identity needed."""
    global _producer_settings  # noqa: PLW0603 (one process-wide value, set once)
    if _settings is not None:
        return _settings
    if _producer_settings is None:
        with _settings_lock:
            if _producer_settings is None:
                _producer_settings = load_settings(require_identity=False)
    return _producer_settings


def identity(s: Settings) -> str:
    """The shared-token identity: one token per account, user and role."""
    return f"{s.account.upper()}.{s.user.upper()}.{(s.role or '').upper()}"


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


_local = threading.local()


@contextmanager
def beat_refresh() -> Iterator[None]:
    """Within this block, a token refresh in this thread is counted as beat's."""
    _local.beat = True
    try:
        yield
    finally:
        _local.beat = False


class TokenHooks:
    """The TokenGuard's adopt/publish hooks on the shared token store."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    def adopt(self) -> Token | None:
        """The token another process shared, if any."""
        from worker.auth.guard import Token

        shared = self.store.load()
        if shared is None:
            return None
        return Token(shared.value, shared.lifetime, shared.expires_at)

    def publish(self, token: Token) -> None:
        """Share a token this process fetched, and count where the refresh happened."""
        self.store.save(SharedToken(token.value, token.lifetime, token.expires_at))
        reason = "beat" if getattr(_local, "beat", False) else "request_path"
        self.store.count_refresh(reason)


def token_hooks(client: redis.Redis, s: Settings) -> TokenHooks:
    """Adopt/publish hooks for a TokenGuard, sharing tokens through `client`."""
    return TokenHooks(TokenStore(client, identity(s)))


class Runtime:
    """The per-process objects of tasks (created on first use; see the module docstring)."""

    def __init__(self, s: Settings) -> None:
        self.settings = s
        self.pid = os.getpid()
        self.redis = state_redis(s)
        self.log = ChannelLog(self.redis, dedup_ttl_seconds=s.dedup_ttl_seconds)
        self.dead_letters = DeadLetters(self.redis)
        self.stats = Counters(self.redis)
        self.tokens = token_hooks(self.redis, s)
        self.token_store = self.tokens.store
        self._lock = threading.Lock()
        self._client: SnowpipeClient | None = None

    def count(self, name: str, amount: int = 1) -> None:
        """Add to one of the worker's counters in Redis (best effort: never fails a task)."""
        self.stats.count(name, amount)

    def channel(self, batch_id: str, database: str, schema: str, pipe: str) -> ChannelRef:
        """The channel whose log takes batch `batch_id`."""
        s = self.settings
        return channel_for(
            batch_id, database, schema, pipe, prefix=s.channel_prefix, channels=s.channels_per_pipe
        )

    @property
    def client(self) -> SnowpipeClient:
        """The process's Snowpipe client (beat's token refresh uses it)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from worker.snowpipe.client import SnowpipeClient

                    self._client = SnowpipeClient.from_settings(
                        self.settings, adopt=self.tokens.adopt, publish=self.tokens.publish
                    )
        return self._client


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def current() -> Runtime:
    """This process's Runtime (built on first use, and again after a fork)."""
    global _runtime  # noqa: PLW0603 (per-process singleton, reset after fork)
    rt = _runtime
    if rt is not None and rt.pid == os.getpid():
        return rt
    with _runtime_lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = Runtime(settings())
        return _runtime


def reset() -> None:
    """Drop this process's state (after fork: the parent's sockets and locks are not ours)."""
    global _runtime, _runtime_lock, _settings_lock  # noqa: PLW0603
    _runtime = None
    _runtime_lock = threading.Lock()
    _settings_lock = threading.Lock()


os.register_at_fork(after_in_child=reset)
