"""Real `celery` worker and beat processes for tests, configured by SNOWPIPE_* environment.

    env = worker_env(emulator, db, key_path, queue="t-abc")
    with start_worker(env, tmp_path, pool="threads", concurrency=16) as w:
        ... publish with Publisher(load_settings_from(env)) ...
        wait_until(lambda: ..., timeout=60, what="rows committed", logs=[w])

Every wait is bounded; on failure the worker's log is included in the assertion message.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import amqp

from tests.support.emulator import REPO_ROOT, RunningEmulator

ACCOUNT = "TESTACC"
USER = "LOADER"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
LOG_TAIL_CHARS = 6000


def unique_queue(prefix: str = "t") -> str:
    """A queue name nobody else uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def worker_env(
    emulator: RunningEmulator,
    broker_url: str,
    key_path: Path,
    *,
    queue: str,
    state_url: str | None = None,
    **settings: Any,
) -> dict[str, str]:
    """The environment of a worker process: SNOWPIPE_* from the arguments, nothing inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNOWPIPE_")}
    env.update(
        {
            "PYTHONPATH": str(REPO_ROOT),
            "SNOWPIPE_ACCOUNT": ACCOUNT,
            "SNOWPIPE_USER": USER,
            "SNOWPIPE_PRIVATE_KEY_PATH": str(key_path),
            "SNOWPIPE_ACCOUNT_URL": emulator.url,
            "SNOWPIPE_BROKER_URL": broker_url,
            "SNOWPIPE_QUEUE_NAME": queue,
            "SNOWPIPE_COMMIT_POLL_SECONDS": "0.1",
        }
    )
    if state_url:
        env["SNOWPIPE_STATE_URL"] = state_url
    for name, value in settings.items():
        env[f"SNOWPIPE_{name.upper()}"] = str(value)
    return env


def settings_overrides(env: Mapping[str, str]) -> dict[str, str]:
    """The SNOWPIPE_* values of `env` as load_settings() keyword overrides."""
    return {
        k.removeprefix("SNOWPIPE_").lower(): v
        for k, v in env.items()
        if k.startswith("SNOWPIPE_") and k != "SNOWPIPE_CONFIG"
    }


class CeleryProcess:
    """A started `celery` process (worker or beat) with its log file."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, name: str) -> None:
        self.process = process
        self.log_path = log_path
        self.name = name

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the process logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self) -> str:
        """The end of the log, for failure messages."""
        return f"--- {self.name} log ({self.log_path}) ---\n{self.log()[-LOG_TAIL_CHARS:]}"

    def children(self) -> list[int]:
        """PIDs of the process's direct children (prefork pool processes)."""
        try:
            out = subprocess.run(
                ["ps", "-o", "pid=", "--ppid", str(self.pid)],
                capture_output=True,
                text=True,
                check=False,
                timeout=10,
            ).stdout
        except subprocess.TimeoutExpired:
            return []
        return [int(p) for p in out.split()]

    def kill(self) -> None:
        """SIGKILL the process and its pool children (a crash: nothing runs its shutdown)."""
        kids = self.children()
        with _suppress():
            os.kill(self.pid, signal.SIGKILL)
        for kid in kids:
            with _suppress():
                os.kill(kid, signal.SIGKILL)
        self.process.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL after a timeout."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()


def _suppress() -> contextlib.suppress:
    return contextlib.suppress(ProcessLookupError, PermissionError)


def launch_worker(
    env: Mapping[str, str],
    log_dir: Path,
    *,
    name: str,
    pool: str = "threads",
    concurrency: int = 8,
    extra: Sequence[str] = (),
) -> CeleryProcess:
    """Start `celery -A worker worker` and wait until it is ready (or fail with its log)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"worker-{name}-{int(time.time() * 1000)}.log"
    args = [
        sys.executable, "-m", "celery", "-A", "worker", "worker",
        "--pool", pool, "--concurrency", str(concurrency),
        "--hostname", f"{name}@test", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        *extra,
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            args, cwd=REPO_ROOT, env=dict(env), stdout=log_file, stderr=subprocess.STDOUT
        )
    worker = CeleryProcess(process, log_path, name)
    deadline = time.monotonic() + READY_TIMEOUT
    while "ready." not in worker.log():
        if process.poll() is not None or time.monotonic() > deadline:
            worker.stop()
            raise AssertionError(f"worker {name} did not become ready\n{worker.log_tail()}")
        time.sleep(0.1)
    return worker


def launch_beat(env: Mapping[str, str], log_dir: Path) -> CeleryProcess:
    """Start `celery -A worker beat` with its schedule file in `log_dir`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"beat-{int(time.time() * 1000)}.log"
    args = [
        sys.executable, "-m", "celery", "-A", "worker", "beat",
        "--loglevel", "INFO", "--schedule", str(log_dir / "beat-schedule"),
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            args, cwd=REPO_ROOT, env=dict(env), stdout=log_file, stderr=subprocess.STDOUT
        )
    return CeleryProcess(process, log_path, "beat")


@contextmanager
def running(*processes: CeleryProcess) -> Iterator[None]:
    """Stop the processes when the block ends."""
    try:
        yield
    finally:
        for process in processes:
            process.stop()


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    logs: Sequence[CeleryProcess] = (),
    interval: float = 0.2,
) -> None:
    """Poll `condition` until true; on timeout fail with `what` and the processes' logs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(p.log_tail() for p in logs)
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{tails}")
        time.sleep(interval)


def delete_rabbit_queues(*names: str) -> None:
    """Delete RabbitMQ queues (tests use unique names: leave nothing behind)."""
    with amqp.Connection("127.0.0.1:5672", userid="guest", password="guest") as conn:
        channel = conn.channel()
        for name in names:
            try:
                channel.queue_delete(name)
            except amqp.exceptions.AMQPError:
                channel = conn.channel()
        for name in names:
            try:
                channel.exchange_delete(name)
            except amqp.exceptions.AMQPError:
                channel = conn.channel()


DATABASE = "DB"
SCHEMA = "PUBLIC"


def make_rows(first_id: int, count: int, *, pad: int = 0) -> list[dict[str, Any]]:
    """Rows with unique integer ids first_id .. first_id + count - 1."""
    filler = "x" * pad
    return [
        {"id": i, "name": f"row-{i}", "filler": filler} for i in range(first_id, first_id + count)
    ]


def committed_ids(emulator: RunningEmulator, pipes: Sequence[str]) -> list[int]:
    """Every committed row id over `pipes`, duplicates included."""
    ids: list[int] = []
    for pipe in pipes:
        ids.extend(int(r["row"]["id"]) for r in emulator.rows(DATABASE, SCHEMA, pipe))
    return ids


def assert_exactly_once(
    emulator: RunningEmulator,
    pipes: Sequence[str],
    expected: set[int],
    logs: Sequence[CeleryProcess] = (),
) -> None:
    """Every id in `expected` committed exactly once over `pipes`, nothing else."""
    ids = committed_ids(emulator, pipes)
    seen: dict[int, int] = {}
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
    duplicates = sorted(i for i, n in seen.items() if n > 1)
    missing = sorted(expected - seen.keys())
    extra = sorted(seen.keys() - expected)
    if duplicates or missing or extra:
        tails = "\n".join(p.log_tail() for p in logs)
        raise AssertionError(
            f"not exactly once: {len(duplicates)} duplicated (e.g. {duplicates[:10]}), "
            f"{len(missing)} missing (e.g. {missing[:10]}), {len(extra)} unexpected\n{tails}"
        )
