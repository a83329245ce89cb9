"""The HTTP layer under the Snowpipe client: one `httpx.Client` per process and `GuardAuth`.

`ProcessHttp` hands out this process's keep-alive `httpx.Client` (created on first use). After
`fork()` the child drops the inherited client without closing it (closing would tear down
connections the parent still uses) and opens its own on first use. SSL contexts are built once
per CA file (~20 ms each) and shared.

`GuardAuth` is the `httpx.Auth` of one `TokenGuard`, and the only place the 401 flow lives:

    attach `Authorization: Bearer <token from the guard>` and send
    401/403  invalidate that token (the guard fetches a new one unless another thread already
             did), attach the fresh one and send once more; a second 401/403 is returned as is
             (the client raises it as an AuthError): one resend, never a loop
    410      the pipe failed over (docs/protocol.md#pipe-failover): `on_failover()` (the client
             forgets the ingest host) and that token is invalidated, so the next call rediscovers
             the host and exchanges a new scoped token; the response is returned (the client
             raises PipeFailoverError and the channel is reopened)

Each request reads its token from the guard afresh: a retry never reuses a token that expired
meanwhile. The guard's fast path is one snapshot read and one clock compare, so the auth costs
what httpx's default no-op auth flow costs plus that read. No token is ever logged.
"""

from __future__ import annotations

import os
import platform
import ssl
import threading
import weakref
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Final

import httpx

from worker.observability import get_logger
from worker.tls import client_context

if TYPE_CHECKING:
    from worker.auth.guard import TokenGuard

__all__ = [
    "OP_EXTENSION",
    "TOKEN_TYPE_HEADER",
    "USER_AGENT",
    "GuardAuth",
    "ProcessHttp",
    "ssl_context",
]

log = get_logger("worker.snowpipe.http")

try:
    from importlib.metadata import version as _pkg_version

    _VERSION = _pkg_version("snowpipe-worker")
except Exception:  # noqa: BLE001 - running from a checkout without metadata
    _VERSION = "0.0.0"

# Format recommended by Snowflake (docs/protocol.md#headers), with our own product name.
USER_AGENT: Final = (
    f"snowpipe-worker/{_VERSION} ({platform.system().lower()} {platform.machine()}) "
    f"PYTHON/{platform.python_version()}"
)
TOKEN_TYPE_HEADER: Final = "X-Snowflake-Authorization-Token-Type"  # noqa: S105 - a header name
# The request extension naming the client operation (for the auth flow's log events).
OP_EXTENSION: Final = "snowpipe_op"
AUTH_STATUSES: Final = frozenset({401, 403})
# The pipe failed over to another ingest host (docs/protocol.md#pipe-failover).
FAILOVER_STATUS: Final = 410


# --- The auth flow -------------------------------------------------------------------------------


class GuardAuth(httpx.Auth):
    """Bearer tokens from `guard`, with the one resend after a 401/403 (module docstring)."""

    def __init__(self, guard: TokenGuard, *, on_failover: Callable[[], None] | None = None) -> None:
        self.guard = guard
        self._on_failover = on_failover

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Attach a token; on 401/403 invalidate it and resend once; on 410 report the failover.

        A guard that cannot give a token raises `TokenUnavailableError` out of the request.
        """
        guard = self.guard
        token = guard.get()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        status = response.status_code
        if status in AUTH_STATUSES:
            # Rejected: if that token is still current the guard fetches a new one.
            guard.invalidate(token)
            log.info(
                "snowpipe.unauthorized",
                op=request.extensions.get(OP_EXTENSION),
                status=status,
                guard=guard.name,
            )
            token = guard.get()
            request.headers["Authorization"] = f"Bearer {token}"
            response = yield request
            status = response.status_code
        if status == FAILOVER_STATUS and self._on_failover is not None:
            # Only the token the 410 came with is invalidated: when several calls see it at
            # once, the first invalidation refreshes and the later ones are no-ops.
            log.warning("snowpipe.pipe_failover", op=request.extensions.get(OP_EXTENSION))
            self._on_failover()
            guard.invalidate(token)


# --- SSL -----------------------------------------------------------------------------------------

_ssl_contexts: dict[str | None, ssl.SSLContext] = {}
_ssl_lock = threading.Lock()


def ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """One SSL context per CA file per process tree (building one costs ~20 ms): the system's
    CAs plus `ca_file`, host names checked (worker/tls.py)."""
    key = str(ca_file) if ca_file is not None else None
    ctx = _ssl_contexts.get(key)
    if ctx is None:
        with _ssl_lock:
            ctx = _ssl_contexts.get(key)
            if ctx is None:
                ctx = _ssl_contexts[key] = client_context(key)
    return ctx


# --- One httpx.Client per process ----------------------------------------------------------------

# Clients inherited across fork(): kept referenced so nothing in the child ever closes them.
_abandoned: list[httpx.Client] = []
_holders: weakref.WeakSet[ProcessHttp] = weakref.WeakSet()


class ProcessHttp:
    """This process's `httpx.Client` for one `SnowpipeClient`, made by `factory` on first use
    and again in a forked child (which drops the parent's, never closes it)."""

    def __init__(self, factory: Callable[[], httpx.Client]) -> None:
        self._factory = factory
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        _holders.add(self)

    def get(self) -> httpx.Client:
        """The client (created on first use, and again after a fork)."""
        client = self._client
        if client is None or self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._after_fork_in_child()
                client = self._client
                if client is None:
                    client = self._client = self._factory()
        return client

    def close(self) -> None:
        """Close this process's connections (a later `get()` opens new ones)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None and self._pid == os.getpid():
            client.close()

    def _after_fork_in_child(self) -> None:
        # Drop, never close: the parent still uses those sockets.
        if self._client is not None:
            _abandoned.append(self._client)
        self._client = None
        self._lock = threading.Lock()
        self._pid = os.getpid()


def _after_fork_in_child() -> None:
    global _ssl_lock  # noqa: PLW0603 - a lock held at fork() stays held in the child
    _ssl_lock = threading.Lock()
    for holder in list(_holders):
        holder._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
