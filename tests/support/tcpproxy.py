"""A loopback TCP proxy a test can cut and restore: connection loss without touching the server.

    with TcpProxy("127.0.0.1", 5672) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
        ... start a client on `url` ...
        proxy.cut()      # close every proxied connection; refuse new ones (accept + close)
        proxy.restore()  # accept and forward again (and end a hold_after)
        proxy.mute()     # keep forwarding requests but swallow every reply (lost answers)
        proxy.hold_after(n)  # forward the first n bytes clients send, then nothing more
                             # (`proxy.held` is set then): a client stuck mid-stream
        proxy.retarget(host, port)  # drop every connection; new ones go to another server

Threads only (one pump thread per direction per connection); every socket operation is bounded
by a short timeout, and `close()` ends every thread it started.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from types import TracebackType

POLL_SECONDS = 0.2
CONNECT_TIMEOUT = 5.0
JOIN_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0


class TcpProxy:
    """Forward 127.0.0.1:<port> to (host, target_port) until cut."""

    def __init__(self, host: str, target_port: int) -> None:
        self.target = (host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(POLL_SECONDS)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._cut = threading.Event()
        self._muted = threading.Event()
        self._closed = threading.Event()
        self.held = threading.Event()
        self._budget: int | None = None  # bytes clients may still send, when held after a count
        self.accepted = 0
        self.cuts = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name="tcpproxy", daemon=True)
        self._acceptor.start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def active(self) -> int:
        """Connections being forwarded right now."""
        with self._lock:
            return len(self._pairs)

    def cut(self) -> None:
        """Close every forwarded connection (both ends) and refuse new ones until restore()."""
        self._cut.set()
        self.cuts += 1
        self._drop_all()

    def restore(self) -> None:
        """Forward new connections again (and replies, after mute())."""
        self._cut.clear()
        self._muted.clear()
        with self._lock:
            self._budget = None

    def retarget(self, host: str, target_port: int) -> None:
        """Close every proxied connection and forward new ones to (host, target_port): what a
        client sees when the address it uses moves to another server (a promoted replica)."""
        with self._lock:
            self.target = (host, target_port)
        self._drop_all()
        self.cuts += 1

    def hold_after(self, nbytes: int) -> None:
        """Forward `nbytes` more bytes from clients (over all connections), then hold: forward
        nothing more they send (it is dropped) and set `held`. Replies keep flowing."""
        with self._lock:
            self._budget = nbytes
        self.held.clear()

    def _allowed(self, data: bytes) -> bytes:
        """The part of `data` a client may still send (all of it unless held after a count)."""
        with self._lock:
            if self._budget is None:
                return data
            part = data[: self._budget]
            self._budget -= len(part)
            if self._budget == 0:
                self.held.set()
            return part

    def mute(self) -> None:
        """Forward what clients send, drop what the server answers: a request executes, and its
        reply never arrives."""
        self._muted.set()

    def close(self) -> None:
        """Stop accepting, drop every connection, join every thread."""
        self._closed.set()
        self._drop_all()
        self._acceptor.join(JOIN_TIMEOUT)
        with contextlib.suppress(OSError):
            self._listener.close()
        for thread in list(self._threads):
            thread.join(JOIN_TIMEOUT)

    def _drop_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _shut(sock)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut.is_set() or self._closed.is_set():
                _shut(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
            except OSError:
                _shut(client)
                continue
            self.accepted += 1
            for sock in (client, upstream):
                sock.settimeout(SEND_TIMEOUT)
            pair = (client, upstream)
            with self._lock:
                self._pairs.append(pair)
            for src, dst, replies in ((client, upstream, False), (upstream, client, True)):
                thread = threading.Thread(
                    target=self._pump,
                    args=(src, dst, pair, replies),
                    name="tcpproxy-pump",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        pair: tuple[socket.socket, socket.socket],
        replies: bool,
    ) -> None:
        try:
            while not self._closed.is_set():
                readable, _, _ = select.select([src], [], [], POLL_SECONDS)
                if not readable:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                if replies and self._muted.is_set():
                    continue
                if not replies:
                    data = self._allowed(data)
                if data:
                    dst.sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket cut() just closed
            pass
        finally:
            with self._lock:
                if pair in self._pairs:
                    self._pairs.remove(pair)
            for sock in pair:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
