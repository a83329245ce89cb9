"""Per-process state of the worker: settings, Redis, Snowpipe client, commit tracker, writers.

Everything here is created lazily on first use in a process and dropped (not closed: the parent
may still use it) after `fork()`, so a prefork child never shares a socket, a lock or a half-open
HTTP connection with its parent. `current()` is the process's `Runtime`; the threads pool shares
it between threads (every part is thread-safe).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import redis

from worker.deadletter import DeadLetters
from worker.ledger import ChannelRef, Ledger
from worker.settings import Settings, load_settings
from worker.tokenstore import SharedToken, TokenStore

if TYPE_CHECKING:
    from worker.auth.guard import Token
    from worker.ingest import Ingestor
    from worker.snowpipe.channel import ChannelWriter, CommitTracker
    from worker.snowpipe.client import SnowpipeClient

CHANNEL_PREFIX = "snowpipe"
# Hash of counters (committed, already_committed, retry_later, dead_letter, rows_committed).
STATS_KEY = "snowpipe:stats"
REDIS_SOCKET_TIMEOUT_SECONDS = 10.0
REDIS_CONNECT_TIMEOUT_SECONDS = 5.0
REDIS_HEALTH_CHECK_SECONDS = 25

_settings: Settings | None = None
_settings_lock = threading.Lock()


def settings() -> Settings:
    """The process's settings, loaded once (immutable, so a forked child may keep them)."""
    global _settings  # noqa: PLW0603 (one process-wide value, set once)
    if _settings is None:
        with _settings_lock:
            if _settings is None:
                _settings = load_settings()
    return _settings


def redis_client(url: str) -> redis.Redis:
    """A Redis client with explicit timeouts (the threads pool has no time limits)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS,
        health_check_interval=REDIS_HEALTH_CHECK_SECONDS,
        retry_on_timeout=True,
    )


def identity(s: Settings) -> str:
    """The shared-token identity: one token per account, user and role."""
    return f"{s.account.upper()}.{s.user.upper()}.{(s.role or '').upper()}"


def channel_name(node: str, slot: int) -> str:
    """The stable channel name of a worker process: `snowpipe_<node>_<slot>`."""
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", node) or "node"
    return f"{CHANNEL_PREFIX}_{clean}_{slot}"


def process_slot() -> int:
    """The prefork pool slot of this process (stable across child restarts); 0 otherwise."""
    try:
        from billiard.process import current_process

        index = getattr(current_process(), "index", None)
    except ImportError:  # pragma: no cover - billiard ships with celery
        return 0
    return int(index) if isinstance(index, int) else 0


def counters(client: redis.Redis) -> dict[str, int]:
    """The worker's counters (committed, already_committed, retry_later, dead_letter, ...)."""
    raw = client.hgetall(STATS_KEY)
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()
    }


_local = threading.local()


@contextmanager
def beat_refresh() -> Iterator[None]:
    """Within this block, a token refresh in this thread is counted as beat's."""
    _local.beat = True
    try:
        yield
    finally:
        _local.beat = False


class Runtime:
    """The per-process objects (created on first use; see the module docstring)."""

    def __init__(self, s: Settings) -> None:
        self.settings = s
        self.pid = os.getpid()
        self.redis = redis_client(s.state_url)
        self.ledger = Ledger(self.redis)
        self.dead_letters = DeadLetters(self.redis)
        self.token_store = TokenStore(self.redis, identity(s))
        self._lock = threading.RLock()  # the lazy properties build on each other
        self._client: SnowpipeClient | None = None
        self._tracker: CommitTracker | None = None
        self._ingestor: Ingestor | None = None
        self._writers: dict[ChannelRef, ChannelWriter] = {}
        self.node = "local"

    def count(self, name: str, amount: int = 1) -> None:
        """Add to one of the worker's counters in Redis (best effort: never fails a task)."""
        with contextlib.suppress(redis.RedisError):
            self.redis.hincrby(STATS_KEY, name, amount)

    # --- The shared token hooks (TokenGuard adopt/publish) -------------------------------------

    def adopt_token(self) -> Token | None:
        """The token another process shared, if any (TokenGuard's `adopt` hook)."""
        from worker.auth.guard import Token

        shared = self.token_store.load()
        if shared is None:
            return None
        return Token(shared.value, shared.lifetime, shared.expires_at)

    def publish_token(self, token: Token) -> None:
        """Share a token this process fetched (TokenGuard's `publish` hook), and count it."""
        self.token_store.save(SharedToken(token.value, token.lifetime, token.expires_at))
        reason = "beat" if getattr(_local, "beat", False) else "request_path"
        self.token_store.count_refresh(reason)

    # --- Lazily built parts ----------------------------------------------------------------------

    @property
    def client(self) -> SnowpipeClient:
        """The process's Snowpipe client (one httpx.Client, one TokenGuard)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from worker.snowpipe.client import SnowpipeClient

                    self._client = SnowpipeClient.from_settings(
                        self.settings, adopt=self.adopt_token, publish=self.publish_token
                    )
        return self._client

    @property
    def tracker(self) -> CommitTracker:
        """The process's commit tracker."""
        if self._tracker is None:
            with self._lock:
                if self._tracker is None:
                    from worker.snowpipe.channel import CommitTracker

                    self._tracker = CommitTracker(
                        self.client, poll_seconds=self.settings.commit_poll_seconds
                    )
        return self._tracker

    @property
    def ingestor(self) -> Ingestor:
        """The process's batch ingestor."""
        if self._ingestor is None:
            from worker.ingest import Ingestor

            tracker = self.tracker
            with self._lock:
                if self._ingestor is None:
                    self._ingestor = Ingestor(self.client, self.ledger, tracker, self.writer)
        return self._ingestor

    def writer(self, database: str, schema: str, pipe: str) -> ChannelWriter:
        """This process's writer on the pipe (its channel is named for node and slot)."""
        ref = ChannelRef(database, schema, pipe, channel_name(self.node, process_slot()))
        found = self._writers.get(ref)
        if found is not None:
            return found
        from worker.snowpipe.channel import ChannelWriter

        tracker = self.tracker
        with self._lock:
            found = self._writers.get(ref)
            if found is None:
                found = ChannelWriter(self.client, self.ledger, tracker, ref)
                self._writers[ref] = found
        return found


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
