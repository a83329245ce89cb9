"""Operating the worker: health (CLI and `celery inspect`), start-up checks, errors at the edge,
and `snowpipe-worker up` stopping its children on SIGTERM. Real worker processes, the emulator,
a claimed database of the shared Redis."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.support.celery import (
    ACCOUNT,
    USER,
    launch_worker,
    running,
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import REPO_ROOT, RunningEmulator
from tests.support.keys import key_pair
from tests.support.redis import RedisDB, free_port
from worker.connectivity import BrokerUnavailableError
from worker.publish import Publisher
from worker.settings import load_settings


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", *args],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout, check=False,
    )  # fmt: skip


def test_health_is_0_then_1_when_the_token_guard_escalates(
    emulator: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    pair = key_pair("health")
    emulator.register_key(ACCOUNT, USER, pair.public_pem)
    env = worker_env(emulator, db.url, pair.write_private(tmp_path / "key.pem"),
                     queue=unique_queue("health"), refresh_escalate_after=1,
                     refresh_failure_backoff_seconds=0.2, retry_attempts=1)  # fmt: skip
    worker = launch_worker(env, tmp_path, name="health", concurrency=2)
    with running(worker):
        wait_until(lambda: "startup.checks_passed" in worker.log(), timeout=20,
                   what="start-up checks", logs=[worker])  # fmt: skip
        healthy = cli(env, "health", "--node", "health@test")
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr + worker.log_tail()
        assert "token guard: not escalated" in healthy.stdout

        inspect = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "worker", "inspect", "snowpipe_health",
             "--destination", "health@test", "--json", "--timeout", "5"],
            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60, check=False,
        )  # fmt: skip
        assert inspect.returncode == 0, inspect.stdout + inspect.stderr
        assert orjson.loads(inspect.stdout)["health@test"]["ok"] is True

        # Every token exchange fails from now on: the pump's refresh fails and the guard escalates.
        emulator.fault(endpoint="token", status=500, count=1000)
        emulator.expire_tokens()
        publisher = Publisher(load_settings(**settings_overrides(env)))
        try:
            publisher.publish([{"id": 1}], database="DB", schema="PUBLIC", pipe="H-STREAMING")
        finally:
            publisher.close()

        def escalated() -> bool:
            return cli(env, "health", "--node", "health@test", "--timeout", "3").returncode == 1

        wait_until(escalated, timeout=40, what="health 1 after escalation", logs=[worker],
                   interval=0.5)  # fmt: skip
        answer = orjson.loads(cli(env, "health", "--json", "--node", "health@test").stdout)
        assert answer["ok"] is False
        assert answer["nodes"]["health@test"]["checks"]["token guard"]["ok"] is False


def test_a_key_snowflake_rejects_is_reported_once_at_start(
    emulator: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    env = worker_env(emulator, db.url, key_pair("never-registered").write_private(tmp_path / "k"),
                     queue=unique_queue("badkey"))  # fmt: skip
    worker = launch_worker(env, tmp_path, name="badkey", concurrency=2)
    with running(worker):
        wait_until(lambda: "startup.checks_failed" in worker.log(), timeout=30,
                   what="the start-up check failure", logs=[worker])  # fmt: skip
        log = worker.log()
        failures = [ln for ln in log.splitlines() if "startup.check_failed" in ln]
        assert len(failures) == 1, log
        assert "key-pair JWT" in failures[0] and "RSA_PUBLIC_KEY_FP" in failures[0]
        assert "no batch can be delivered" in failures[0]
        health = cli(env, "health", "--node", "badkey@test")
        assert health.returncode == 1
        assert "startup checks" in health.stdout


def test_cli_names_the_unreachable_broker_or_state_store_without_a_traceback(
    tmp_path: Path,
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "SNOWPIPE_BROKER_URL": dead}
    source = tmp_path / "rows.ndjson"
    source.write_bytes(b'{"id": 1}\n')
    published = cli(env, "publish", "--database", "D", "--schema", "S", "--pipe", "P",
                    str(source))  # fmt: skip
    assert published.returncode == 3
    assert "SNOWPIPE_BROKER_URL" in published.stderr and "start Redis" in published.stderr
    assert "Traceback" not in published.stderr
    for args in (("stats",), ("dead-letters", "list")):
        result = cli(env, *args)
        assert result.returncode == 3, result.stderr
        assert "SNOWPIPE_STATE_URL" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1  # one line
    debug = cli(env, "--debug", "stats")
    assert "Traceback" in debug.stderr


def test_publish_batch_raises_a_project_error_when_the_broker_is_down() -> None:
    settings = load_settings(require_identity=False,
                             broker_url=f"redis://127.0.0.1:{free_port()}/0")  # fmt: skip
    publisher = Publisher(settings)
    publisher.app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0}
    try:
        with pytest.raises(BrokerUnavailableError, match="SNOWPIPE_BROKER_URL"):
            publisher.publish([{"id": 1}], database="D", schema="S", pipe="P")
    finally:
        publisher.close()


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(todo.pop())],
                             capture_output=True, text=True, check=False).stdout  # fmt: skip
        for child in map(int, out.split()):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (already exited, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_up_stops_every_child_on_sigterm_and_names_a_port_in_use(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNOWPIPE_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    redis_port, emulator_port = free_port(), free_port()
    args = [sys.executable, "-c", "from worker.cli import main; main()", "up", "--concurrency",
            "2", "--redis-port", str(redis_port), "--emulator-port", str(emulator_port)]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = cli(env, "up", "--emulator-port", str(port), "--redis-port", str(free_port()))
        assert busy.returncode == 1
        assert f"port {port} (the emulator) is already in use" in busy.stderr

    log = (tmp_path / "up.log").open("wb")
    process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C" not in (tmp_path / "up.log").read_text():
            assert process.poll() is None and time.monotonic() < deadline, (
                (tmp_path / "up.log").read_text()
            )
            time.sleep(0.2)
        children = _descendants(process.pid)
        assert len(children) >= 3  # emulator, worker, beat
        process.send_signal(signal.SIGTERM)
        process.wait(40)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if _alive(pid)], (tmp_path / "up.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for pid in children:  # only what this test started, if anything survived
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()


def test_a_dead_lettered_batch_is_a_failed_task_in_celery_events(
    emulator: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    import threading

    from celery import Celery

    from worker.celery_config import INGEST_TASK, build_config

    pair = key_pair("events")
    emulator.register_key(ACCOUNT, USER, pair.public_pem)
    env = worker_env(emulator, db.url, pair.write_private(tmp_path / "key.pem"),
                     queue=unique_queue("events"))  # fmt: skip
    settings = load_settings(**settings_overrides(env))
    app = Celery("events-test", set_as_current=False)
    app.conf.update(build_config(settings))
    seen: list[dict[str, object]] = []
    worker = launch_worker(env, tmp_path, name="events", concurrency=2, extra=["-E"])
    with running(worker), app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        listener = threading.Thread(
            target=lambda: receiver.capture(limit=None, timeout=None, wakeup=True), daemon=True
        )
        listener.start()
        time.sleep(0.5)  # subscribed before the task runs
        app.send_task(INGEST_TASK, task_id="empty-batch", queue=settings.queue_name,
                      kwargs={"batch_id": "empty-batch", "database": "DB", "schema": "PUBLIC",
                              "pipe": "P", "rows": []})  # fmt: skip
        wait_until(lambda: any(e.get("type") == "task-failed" for e in seen), timeout=20,
                   what="a task-failed event", logs=[worker])  # fmt: skip
        receiver.should_stop = True
        failed = next(e for e in seen if e.get("type") == "task-failed")
        assert failed["uuid"] == "empty-batch" and "DeadLettered" in str(failed["exception"])
        assert not any(e.get("type") == "task-succeeded" for e in seen)
        wait_until(lambda: db.client.llen(settings.queue_name) == 0, timeout=10,
                   what="the message acknowledged")  # fmt: skip
        assert db.client.hlen("snowpipe:letters") == 1
    app.close()
