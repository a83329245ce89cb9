"""Per-process state of tasks: settings, the state Redis, the channel logs, dead letters.

Everything here is created lazily on first use in a process and dropped (not closed: the parent
may still use it) after `fork()`, so a prefork child never shares a socket, a lock or a half-open
HTTP connection with its parent. `current()` is the process's `Runtime`; the threads pool shares
it between threads (every part is thread-safe).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from worker.deadletter import DeadLetters
from worker.delivery.channels import ChannelRef, channel_for
from worker.delivery.log import ChannelLog
from worker.delivery.stats import Counters
from worker.settings import Settings, load_settings
from worker.statestore import state_redis
from worker.tokenstore import token_hooks

if TYPE_CHECKING:
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


_warned_unknown = False


def warn_unknown_variables() -> None:
    """Log each `SNOWPIPE_*` variable that is no setting, once per process tree (the worker and
    beat at start, a producer at its first publish): a misspelt name would be ignored silently."""
    global _warned_unknown  # noqa: PLW0603 (once per process, inherited by forks)
    if _warned_unknown:
        return
    _warned_unknown = True
    from worker.observability import get_logger
    from worker.settings import unknown_variables

    for line in unknown_variables():
        get_logger("worker.settings").warning("settings.unknown_variable", detail=line)


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
