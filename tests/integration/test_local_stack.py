"""The local stack (`snowpipe-worker up`) as a developer uses it: idle, it costs next to no CPU;
`doctor` passes against it; stopped, it starts again at once on the same ports. And its embedded
broker waits in BLMOVE as Redis does (what kept an idle stack busy).

Each stack is a real `snowpipe-worker up` (embedded broker, emulator, worker, beat) in its own
process group and its own directory (its key pair and logs in `.local/` there), on free ports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.emulator import REPO_ROOT
from tests.support.redis import RedisDB, free_port
from worker.embedded import is_embedded, start_embedded_redis

START_TIMEOUT = 90.0
# Idle CPU of the whole stack, in CPU seconds per second (1.0 = one core). Measured on a 2-core
# machine: about 0.03 (beat's 5 s token checks, 10 s tokens, lease renewals); before the embedded
# broker's BLMOVE blocked, about 1.1.
IDLE_CPU_BOUND = 0.2
SETTLE_SECONDS = 4.0
MEASURE_SECONDS = 6.0


class Up:
    """`snowpipe-worker up` in `directory`, in a process group of its own."""

    def __init__(self, directory: Path, redis_port: int, emulator_port: int) -> None:
        self.directory = directory
        self.redis_port, self.emulator_port = redis_port, emulator_port
        self.log_path = directory / f"up-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNOWPIPE_")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        return env

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Up:
        args = [sys.executable, "-c", "from worker.cli import main; main()", "up",
                "--concurrency", "4", "--redis-port", str(self.redis_port),
                "--emulator-port", str(self.emulator_port)]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                args, cwd=self.directory, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while "Ctrl-C" not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"`snowpipe-worker up` did not start:\n{self.log()}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        """SIGTERM (what Ctrl-C does), then whatever of its group is left gets SIGKILL."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        for pid in group_pids(process.pid):  # only this test's stack: its own process group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A `snowpipe-worker` command with the stack's settings, from its directory."""
        env = self.env | {
            "SNOWPIPE_CONFIG": "local",
            "SNOWPIPE_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "SNOWPIPE_ACCOUNT_URL": f"http://127.0.0.1:{self.emulator_port}",
        }
        return subprocess.run(
            [sys.executable, "-c", "from worker.cli import main; main()", *args],
            capture_output=True, text=True, env=env, cwd=self.directory, timeout=120,
            check=False,
        )  # fmt: skip


def group_pids(pgid: int) -> list[int]:
    """The processes of a process group (read from /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            pids.append(int(stat.parent.name))
    return pids


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time used so far by the live processes of a process group."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in group_pids(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / ticks


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    up = Up(tmp_path_factory.mktemp("up"), free_port(), free_port()).start()
    try:
        yield up
    finally:
        up.stop()


def test_an_idle_local_stack_uses_next_to_no_cpu(stack: Up) -> None:
    assert stack.process is not None
    pgid = stack.process.pid
    assert len(group_pids(pgid)) >= 4  # up (with the embedded broker), emulator, worker, beat
    time.sleep(SETTLE_SECONDS)  # past start-up and the first token exchange
    before, started = group_cpu_seconds(pgid), time.monotonic()
    time.sleep(MEASURE_SECONDS)
    used = group_cpu_seconds(pgid) - before
    elapsed = time.monotonic() - started
    assert used / elapsed < IDLE_CPU_BOUND, (
        f"the idle stack used {used:.2f} CPU seconds in {elapsed:.1f} s\n{stack.log()}"
    )


def test_doctor_passes_against_the_local_stack(stack: Up) -> None:
    done = stack.cli("doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 failed" in done.stdout
    # The persistence check does not apply to an in-memory broker, and says so.
    assert "state persistence: does not apply: the local stack's embedded broker" in done.stdout


def test_up_starts_again_at_once_after_a_stop_on_the_same_ports(tmp_path: Path) -> None:
    first = Up(tmp_path, free_port(), free_port()).start()
    ports = (first.redis_port, first.emulator_port)
    # A client connected to each server while it stops: the servers close those connections,
    # which leaves them in TIME_WAIT on the servers' ports for a minute.
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for port in ports]
    try:
        clients[0].sendall(b"PING\r\n")
        clients[1].sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for client in clients:
            assert client.recv(4096)
        first.stop()
        assert first.process is not None and first.process.returncode == 0, first.log()
        for client in clients:
            client.settimeout(10)
            # The rest of an answer that came in two segments (an HTTP head, then its body),
            # then the end of the stream: closed by the server (a timeout here fails the test).
            while client.recv(4096):
                pass
    finally:
        for client in clients:
            client.close()
    assert any(plain_bind_fails(port) for port in ports)  # what the old port check tripped on

    again = Up(tmp_path, *ports)
    try:
        again.start()
        done = again.cli("doctor")
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        again.stop()


def plain_bind_fails(port: int) -> bool:
    """Whether binding the port without SO_REUSEADDR fails (a socket in TIME_WAIT is enough)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# --- The embedded broker behaves like Redis where the worker's transport relies on it -----------


@pytest.fixture
def embedded() -> Iterator[redis.Redis]:
    server = start_embedded_redis()
    client = redis.Redis(host=server.host, port=server.port)
    try:
        yield client
    finally:
        client.close()
        server.stop()


@pytest.mark.parametrize("server", ["embedded", "redis"])
def test_blmove_waits_for_an_element_as_on_redis(
    server: str, embedded: redis.Redis, db: RedisDB
) -> None:
    # The transport waits for a message with `BLMOVE q q LEFT LEFT 1` (worker/broker.py): on an
    # empty queue (no key at all) it must wait, not answer at once (an idle consumer would spin).
    client = embedded if server == "embedded" else db.client
    started = time.monotonic()
    assert client.blmove("q", "q", 0.5, "LEFT", "LEFT") is None
    assert time.monotonic() - started >= 0.45

    pusher = threading.Timer(0.2, lambda: client.rpush("q", "m1", "m2"))
    pusher.start()
    assert client.blmove("q", "q", 5, "LEFT", "LEFT") == b"m1"  # woken by the push
    pusher.join()
    assert client.lrange("q", 0, -1) == [b"m1", b"m2"]  # head popped and pushed back: unchanged
    assert client.blmove("q", "other", 1, "RIGHT", "LEFT") == b"m2"
    assert client.lrange("q", 0, -1) == [b"m1"]
    assert client.lrange("other", 0, -1) == [b"m2"]
    client.set("s", "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        client.blmove("s", "q", 1, "LEFT", "LEFT")


def test_is_embedded_tells_the_embedded_broker_from_a_redis(
    embedded: redis.Redis, db: RedisDB
) -> None:
    assert is_embedded(embedded)
    assert not is_embedded(db.client)
