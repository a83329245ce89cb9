"""A private database on the shared Redis for one test: claimed in DB 0, emptied when released.

The Redis on 127.0.0.1:6379 is shared with other test runs. A test claims one of DBs 2-15 by
`SET snowpipe-test:db:<n> <pid> NX EX 1800` in DB 0, takes it only if it is empty (someone who
did not claim it may be using it), and deletes the keys in it when done (all of them were created
by the test: the database was empty and claimed). Never FLUSHALL.

A test that stops, kills or restarts its Redis uses `private_redis` instead: a `redis-server` of
its own on a free port, with its data dir (AOF, fsync always) in the test's tmp dir.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
FIRST_DB, LAST_DB = 2, 15
CLAIM_SECONDS = 1800
CLAIM_WAIT_SECONDS = 120.0


@dataclass(frozen=True)
class RedisDB:
    """A claimed database: its number, URL and a client."""

    number: int
    url: str
    client: redis.Redis


def _claim_key(n: int) -> str:
    return f"snowpipe-test:db:{n}"


def _empty(client: redis.Redis) -> None:
    for key in client.scan_iter(count=500):
        client.delete(key)


@contextmanager
def claimed_db(timeout: float = CLAIM_WAIT_SECONDS) -> Iterator[RedisDB]:
    """Claim an empty Redis DB for the duration of the block; empty and release it afterwards."""
    control = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    owner = f"{os.getpid()}:{time.time_ns()}"
    deadline = time.monotonic() + timeout
    number = None
    while number is None:
        for n in range(FIRST_DB, LAST_DB + 1):
            if not control.set(_claim_key(n), owner, nx=True, ex=CLAIM_SECONDS):
                continue
            probe = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=n)
            if probe.dbsize() == 0:
                number = n
                probe.close()
                break
            probe.close()
            control.delete(_claim_key(n))  # in use by someone who did not claim it: leave it
        else:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no free Redis DB among {FIRST_DB}-{LAST_DB} within {timeout:g} s "
                    "(claims are keys snowpipe-test:db:<n> in DB 0)"
                )
            time.sleep(0.5)
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
    try:
        yield RedisDB(number, f"redis://{REDIS_HOST}:{REDIS_PORT}/{number}", client)
    finally:
        try:
            _empty(client)
        finally:
            client.close()
            if control.get(_claim_key(number)) == owner.encode():
                control.delete(_claim_key(number))
            control.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((REDIS_HOST, 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A `redis-server` of one test: its own port and data dir, AOF with fsync on every write.

    `appendfsync="everysec"` starts it with the fsync policy that may lose its last second (what
    bench/durability.py compares). Automatic AOF rewrites are off, so the AOF only grows.

    Use it where a test stops, kills or restarts the server (never the shared one):

        with private_redis(tmp_path / "redis") as server:
            ... server.url(0) ...
            server.restart(kill=True)  # kill -9, then start again: same port, same AOF

    Every wait is bounded; `stop()` (and the context manager) ends only the process it started.
    """

    START_TIMEOUT = 20.0
    STOP_TIMEOUT = 10.0

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        appendfsync: str = "always",
        extra_args: tuple[str, ...] = (),
        password: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendfsync = appendfsync  # "always" (the default) or "everysec" / "no"
        # False: start without AOF, so that the server loads the RDB snapshot of its data dir
        # (taken with SAVE): what a restore from an older backup looks like.
        self.appendonly = True
        self.extra_args = extra_args  # e.g. ("--replicaof", "127.0.0.1", "6400")
        self.password = password  # `requirepass`: clients must AUTH with it
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "redis-server.log"

    def url(self, db: int = 0, *, password: str | None = None) -> str:
        """The server's URL; with `password` (e.g. a wrong one) in its user info."""
        auth = f":{password}@" if password is not None else ""
        return f"redis://{auth}{REDIS_HOST}:{self.port}/{db}"

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("password", self.password)
        return redis.Redis(host=REDIS_HOST, port=self.port, db=db, **kwargs)

    def start(self) -> None:
        """Start the server (same port, same data dir) and wait until it answers PING."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server", "--port", str(self.port), "--bind", REDIS_HOST,
            "--dir", str(self.data_dir), "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--save", "", "--daemonize", "no", "--protected-mode", "yes",
            "--logfile", str(self.log_path), "--auto-aof-rewrite-percentage", "0",
            *self.extra_args,
        ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.START_TIMEOUT
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"private redis-server on :{self.port} did not start\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def answers(self) -> bool:
        """True if the server answers PING (and has finished loading its AOF)."""
        probe = self.client(socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(probe.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False
        finally:
            probe.close()

    def stop(self, *, kill: bool = False) -> None:
        """SIGKILL (`kill`: a crash) or SIGTERM the server, and wait until it has exited."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(self.STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(self.STOP_TIMEOUT)

    def restore_snapshot(self) -> None:
        """Kill the server and start it from the RDB snapshot its last SAVE wrote: the state
        as it was then (every later write lost), a new run_id, no AOF from here on."""
        self.stop(kill=True)
        self.appendonly = False
        self.start()

    def restart(self, *, kill: bool = True, down_for: float = 0.0) -> None:
        """Stop (kill -9 by default), stay down `down_for` seconds, start again."""
        self.stop(kill=kill)
        time.sleep(down_for)
        self.start()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@contextmanager
def private_redis(
    data_dir: Path,
    port: int | None = None,
    *,
    appendfsync: str = "always",
    extra_args: tuple[str, ...] = (),
    password: str | None = None,
) -> Iterator[PrivateRedis]:
    """A started PrivateRedis for the block; stopped afterwards (its data dir stays in tmp)."""
    server = PrivateRedis(
        data_dir, port, appendfsync=appendfsync, extra_args=extra_args, password=password
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def redis_server(data_dir: Path, *args: str) -> Iterator[int]:
    """`redis-server *args` (a configuration file, options) of one test on a free port of
    127.0.0.1, its files in `data_dir`; yields the port. Stopped (SIGTERM) afterwards."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = data_dir / "redis-server.log"
    process = subprocess.Popen(
        ["redis-server", *args, "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(data_dir), "--logfile", str(log), "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + PrivateRedis.START_TIMEOUT
        while True:
            try:
                # An unauthenticated PING: answered, or refused with NOAUTH once the ACLs are up.
                redis.Redis(port=port, socket_timeout=1).ping()
                break
            except redis.AuthenticationError:
                break
            except redis.ConnectionError:
                text = log.read_text() if log.exists() else ""
                assert process.poll() is None and time.monotonic() < deadline, text
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
