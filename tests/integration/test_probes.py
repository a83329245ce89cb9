"""Probes that mean what they say, with real worker processes.

- liveness (the heartbeat file) holds through a state-store outage, while readiness drops and
  comes back; a frozen node (SIGSTOP) fails liveness;
- `health` asks only this deployment's nodes and answers as soon as they have: two deployments
  on one RabbitMQ vhost (two queue names) each see their own node only, `status` too;
- a second node with a live node's name is refused at start with one line; a node restarted
  after a crash under its old name is not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.support.celery import (
    ACCOUNT,
    USER,
    CeleryProcess,
    delete_rabbit_queues,
    launch_worker,
    running,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import REPO_ROOT, RunningEmulator
from tests.support.keys import key_pair
from tests.support.redis import RedisDB, claimed_db, private_redis
from worker import heartbeat_file

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", *args],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout, check=False,
    )  # fmt: skip


def key(emulator: RunningEmulator, tmp_path: Path) -> Path:
    pair = key_pair("probes")
    emulator.register_key(ACCOUNT, USER, pair.public_pem)
    return pair.write_private(tmp_path / "key.pem")


def test_liveness_holds_and_readiness_drops_through_a_state_store_outage(
    emulator: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    heartbeat = tmp_path / "heartbeat.json"
    with private_redis(tmp_path / "state") as state:
        env = worker_env(emulator, db.url, key(emulator, tmp_path), queue=unique_queue("probe"),
                         state_url=state.url(0), heartbeat_file=heartbeat,
                         heartbeat_seconds=1)  # fmt: skip
        worker = launch_worker(env, tmp_path, name="probe", concurrency=2)
        with running(worker):

            # Written every second; 6 s without a write is a dead node, with room for a loaded
            # machine.
            def probe(kind: str) -> subprocess.CompletedProcess[str]:
                return cli(env, "health", kind, "--max-age", "6")

            # Polls read the file in-process (what the CLI does, without a process start each).
            def ready() -> bool:
                return heartbeat_file.readiness(heartbeat, 6)[0].ok

            def alive() -> bool:
                return heartbeat_file.liveness(heartbeat, 6).ok

            wait_until(ready, timeout=30, what="the node ready", logs=[worker])
            assert probe("--readiness").returncode == 0

            state.stop()
            wait_until(lambda: not ready(), timeout=30, what="readiness to drop", logs=[worker])
            not_ready = probe("--readiness")
            assert not_ready.returncode == 1, not_ready.stdout
            assert "is not ready" in not_ready.stdout and "state store" in not_ready.stdout
            # Ridden out, not stuck: the file keeps being written throughout (8 s, longer than
            # the limit).
            for _ in range(16):
                assert alive(), heartbeat.read_text() + worker.log_tail()
                time.sleep(0.5)
            assert probe("--liveness").returncode == 0

            state.start()
            wait_until(ready, timeout=30, what="ready again after the outage", logs=[worker])

            # A node that stops making progress (frozen here) fails liveness; thawed, it passes.
            os.kill(worker.pid, signal.SIGSTOP)
            try:
                wait_until(lambda: not alive(), timeout=30, what="liveness to fail when frozen")
                dead = probe("--liveness")
                assert dead.returncode == 1 and "dead or stuck" in dead.stdout
            finally:
                os.kill(worker.pid, signal.SIGCONT)
            wait_until(alive, timeout=30, what="liveness back after SIGCONT", logs=[worker])
    assert "Traceback" not in worker.log()


def test_shell_probes_read_the_same_file(emulator: RunningEmulator, db: RedisDB,
                                         tmp_path: Path) -> None:  # fmt: skip
    heartbeat = tmp_path / "heartbeat.json"
    env = worker_env(emulator, db.url, key(emulator, tmp_path), queue=unique_queue("shell"),
                     heartbeat_file=heartbeat, heartbeat_seconds=1)  # fmt: skip
    worker = launch_worker(env, tmp_path, name="shell", concurrency=2)
    with running(worker):
        wait_until(heartbeat.exists, timeout=10, what="the heartbeat file", logs=[worker])
        # The probe docs/operations.md shows for images without the CLI on the probe's path.
        found = subprocess.run(["find", str(heartbeat), "-mmin", "-1"], capture_output=True,
                               text=True, check=True)  # fmt: skip
        assert found.stdout.strip() == str(heartbeat)
        doc = orjson.loads(heartbeat.read_bytes())
        assert doc["node"] == "shell@test" and doc["alive"] is True


def _start_raw(
    env: dict[str, str], log_dir: Path, name: str
) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = log_dir / f"raw-{name}-{time.monotonic_ns()}.log"
    args = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool", "threads",
            "--concurrency", "2", "--hostname", name, "--loglevel", "INFO", "--without-gossip",
            "--without-mingle", "--without-heartbeat"]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    return process, log_path


def _refused_once(env: dict[str, str], tmp_path: Path, name: str) -> str:
    process, log_path = _start_raw(env, tmp_path, name)
    try:
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    log = log_path.read_text(errors="replace")
    assert code == 78, log
    assert log.count("node.duplicate_name") == 1, log
    assert "Traceback" not in log and "RESOURCE_LOCKED" not in log, log
    return log


def test_a_live_nodes_name_is_refused_and_a_crashed_nodes_name_is_not(
    emulator: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    env = worker_env(emulator, db.url, key(emulator, tmp_path), queue=unique_queue("twin"),
                     heartbeat_seconds=1)  # fmt: skip
    env["SNOWPIPE_BROKR_URL"] = "redis://typo"  # a misspelt variable: warned once at start
    first = launch_worker(env, tmp_path, name="twin", concurrency=2)
    restarted: CeleryProcess | None = None
    try:
        log = _refused_once(env, tmp_path, "twin@test")
        assert "give each node a name of its own with -n" in log
        first.kill()  # a crash: its registration stays until it expires
        restarted = launch_worker(env, tmp_path, name="twin", concurrency=2)
    finally:
        first.stop()
        if restarted is not None:
            restarted.stop()
    warnings = [ln for ln in first.log().splitlines() if "settings.unknown_variable" in ln]
    assert len(warnings) == 1 and "did you mean SNOWPIPE_BROKER_URL?" in warnings[0]


@pytest.mark.rabbitmq
def test_two_deployments_on_one_vhost_each_see_only_their_own_nodes(
    emulator: RunningEmulator, tmp_path: Path
) -> None:
    key_path = key(emulator, tmp_path)
    queues = {"alpha": unique_queue("depa"), "beta": unique_queue("depb")}
    try:
        with claimed_db() as state_a, claimed_db() as state_b:
            envs = {
                name: worker_env(emulator, AMQP_URL, key_path, queue=queue, state_url=state.url)
                for (name, queue), state in zip(queues.items(), (state_a, state_b), strict=True)
            }
            workers = [launch_worker(envs[name], tmp_path, name=name, concurrency=2)
                       for name in envs]  # fmt: skip
            with running(*workers):
                for mine, other in (("alpha", "beta"), ("beta", "alpha")):
                    env = envs[mine]
                    # Answers once its one node has: far inside a 60 s --timeout.
                    health = cli(env, "health", "--json", "--timeout", "60", timeout=30)
                    answer = orjson.loads(health.stdout)
                    assert health.returncode == 0, health.stdout + health.stderr
                    assert sorted(answer["nodes"]) == [f"{mine}@test"]
                    status = orjson.loads(cli(env, "status", "--json", "--no-snowflake").stdout)
                    assert [n["node"] for n in status["nodes"]] == [f"{mine}@test"]
                    assert status["queues"][0]["unacked_source"].startswith("1 worker node(s)")
                    elsewhere = cli(env, "health", "--node", f"{other}@test", "--timeout", "1")
                    assert elsewhere.returncode == 1
                    assert f"node {other}@test did not answer within 1 s (no live node of that " \
                           "name is registered in the state store" in elsewhere.stdout  # fmt: skip
                # On RabbitMQ a second node of the name would fail later with RESOURCE_LOCKED.
                _refused_once(envs["alpha"], tmp_path, "alpha@test")
    finally:
        for queue in queues.values():
            delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")
