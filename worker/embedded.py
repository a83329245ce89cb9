"""An embedded Redis for a machine with no broker: fakeredis's TCP server on loopback.

Used by `make run` and `snowpipe-worker up`: the Celery broker, the ledger and the shared token
store all live in it. It speaks RESP with Lua (`fakeredis[lua]`), so kombu's Redis transport works
unchanged and keeps Redis's redelivery semantics (visibility timeout, unacked sweep). It lives in
one process's memory: nothing survives a restart, which is why it is for local runs only.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"


@dataclass
class EmbeddedRedis:
    """A running embedded Redis: its URL (database 0) and how to stop it."""

    host: str
    port: int
    _server: object
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """redis://HOST:PORT/0."""
        return f"redis://{self.host}:{self.port}/0"

    def stop(self) -> None:
        """Shut the server down (clients see the connection close)."""
        server = self._server
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]
        self._thread.join(5)


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_embedded_redis(host: str = DEFAULT_HOST, port: int = 0) -> EmbeddedRedis:
    """Start the fakeredis TCP server in a daemon thread; port 0 picks a free port."""
    from worker.extras import missing_extra

    # fakeredis with lupa: kombu's Redis transport needs EVALSHA.
    problem = missing_extra("local", "the embedded broker")
    if problem is not None:
        raise RuntimeError(problem)
    from fakeredis import TcpFakeServer

    chosen = port or free_port(host)
    TcpFakeServer.allow_reuse_address = True
    server = TcpFakeServer((host, chosen), server_type="redis")
    # Without these, interpreter exit waits on the handler threads of open client connections.
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(
        target=server.serve_forever, name="embedded-redis", kwargs={"poll_interval": 0.2}
    )
    thread.daemon = True
    thread.start()
    return EmbeddedRedis(host, chosen, server, thread)
