"""An embedded Redis for a machine with no broker: fakeredis's TCP server on loopback.

Used by `make run` and `snowpipe-worker up`: the Celery broker, the ledger and the shared token
store all live in it. It speaks RESP with Lua (`fakeredis[lua]`), so kombu's Redis transport works
unchanged and keeps Redis's redelivery semantics (visibility timeout, unacked sweep). It lives in
one process's memory: nothing survives a restart, which is why it is for local runs only.

Two adjustments to fakeredis keep an idle stack idle (near 0 % CPU instead of about one core):
BLMOVE blocks as on Redis (`_make_blmove_block`), and an idle connection's thread looks for
replies to push ten times a second instead of a hundred (`IDLE_POLL_SECONDS`). `is_embedded`
tells a client of this server from a client of a Redis (for `doctor`).
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import redis

DEFAULT_HOST = "127.0.0.1"
# What HELLO answers as `server` on the embedded broker (a Redis answers "redis").
EMBEDDED_SERVER = "fakeredis"
# How often an idle connection's thread looks for a reply to push (a pub/sub message: Celery's
# remote control, `celery inspect`, `snowpipe-worker health`). fakeredis polls every 10 ms, which
# with the dozen connections of the local stack costs several percent of a core while nothing
# happens; a command from a client still wakes its thread at once.
IDLE_POLL_SECONDS = 0.1


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

    _make_blmove_block()
    _poll_idle_connections_less()
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


def is_embedded(client: redis.Redis) -> bool:
    """Whether `client` talks to an in-memory fakeredis server such as the embedded broker (by
    the `server` HELLO reports); False for a Redis, or when HELLO is refused."""
    import redis as redis_lib

    try:
        answer: Any = client.execute_command("HELLO")  # type: ignore[no-untyped-call]
    except redis_lib.RedisError:
        return False
    if isinstance(answer, list):
        answer = dict(zip(answer[::2], answer[1::2], strict=False))
    server = answer.get(b"server", answer.get("server")) if isinstance(answer, dict) else None
    if isinstance(server, bytes):
        server = server.decode(errors="replace")
    return server == EMBEDDED_SERVER


def _poll_idle_connections_less() -> None:
    try:
        from fakeredis._clients import _tcp_server
    except ImportError:  # a fakeredis laid out differently: keep its own interval
        return
    if hasattr(_tcp_server, "_POLL_INTERVAL"):
        _tcp_server._POLL_INTERVAL = IDLE_POLL_SECONDS


def _make_blmove_block() -> None:
    """Make the embedded broker's BLMOVE wait for an element, as Redis does.

    fakeredis (seen in 2.41) answers `BLMOVE src dst LEFT LEFT timeout` at once with nil when the
    source list does not exist, instead of waiting up to `timeout`. The worker's broker transport
    waits for a message with `BLMOVE q q LEFT LEFT 1` (worker/broker.py), and an empty queue is a
    missing key in Redis, so every idle consumer of the embedded broker asked again at once, in a
    loop: about one core busy while nothing happened. This replaces fakeredis's BLMOVE, in this
    process, with one that reads the source again on every write to the database and answers
    when an element is there or the timeout has passed (0: no limit). If fakeredis's internals
    moved, it leaves BLMOVE as it is (the stack works, only busier).
    """
    try:
        import fakeredis._commands as commands
        from fakeredis._command_args_parsing import Timeout
        from fakeredis._core import CommandItem
        from fakeredis._helpers import SimpleError
        from fakeredis._socket._base import BaseFakeSocket
    except ImportError:
        return
    wrong_type = "WRONGTYPE Operation against a key holding the wrong kind of value"
    ends = {b"LEFT": True, b"RIGHT": False}

    def blmove(sock: Any, *args: bytes) -> Any:
        source, destination, wherefrom, whereto, timeout = args
        from_left, to_left = ends.get(wherefrom.upper()), ends.get(whereto.upper())
        if from_left is None or to_left is None:
            raise SimpleError("ERR syntax error")

        def attempt(first_pass: bool) -> bytes | None:
            db = sock._db
            src = CommandItem(source, db, item=db.get(source), default=[])
            if not isinstance(src.value, list):
                raise SimpleError(wrong_type)
            if not src.value:
                return None
            dst = src
            if destination != source:
                dst = CommandItem(destination, db, item=db.get(destination), default=[])
                if not isinstance(dst.value, list):
                    raise SimpleError(wrong_type)
            element: bytes = src.value.pop(0 if from_left else -1)
            if to_left:
                dst.value.insert(0, element)
            else:
                dst.value.append(element)
            for item in {id(src): src, id(dst): dst}.values():
                item.updated()
                item.writeback()
            return element

        return sock._blocking(Timeout.decode(timeout), attempt)

    if not hasattr(BaseFakeSocket, "_blocking") or "blmove" not in commands.SUPPORTED_COMMANDS:
        return
    setattr(BaseFakeSocket, "_snowpipe_blmove", blmove)  # noqa: B010 (no such attribute in its type)
    commands.SUPPORTED_COMMANDS["blmove"] = commands.Signature(
        "blmove", "_snowpipe_blmove", cast(Any, (bytes,) * 5)
    )
