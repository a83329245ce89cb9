"""`snowpipe-worker status`: channels (owner, committed offset from Snowflake, log depth and age),
the shared token, queue depths with unacknowledged messages, dead letters by kind and the broker's
dead-letter queue. A real worker, the emulator, a claimed database of the shared Redis (Redis
broker), and the shared RabbitMQ with unique queue names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
from kombu import Connection, Queue

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    delete_rabbit_queues,
    launch_worker,
    make_rows,
    running,
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import REPO_ROOT, RunningEmulator
from tests.support.keys import key_pair
from tests.support.redis import RedisDB, free_port
from worker.deadletter import DeadLetter, DeadLetters
from worker.publish import Publisher
from worker.settings import load_settings

RABBIT = "amqp://guest:guest@127.0.0.1:5672//"
PIPES = ["ST0-STREAMING", "ST1-STREAMING"]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", *args],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60, check=False,
    )  # fmt: skip


def status_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    result = cli(env, "status", "--json", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    doc: dict[str, Any] = orjson.loads(result.stdout)
    return doc


def test_status_on_redis_shows_channels_token_queues_and_dead_letters(
    emulator: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    pair = key_pair("status")
    emulator.register_key(ACCOUNT, USER, pair.public_pem)
    queue = unique_queue("status")
    env = worker_env(emulator, db.url, pair.write_private(tmp_path / "key.pem"), queue=queue,
                     channels_per_pipe=2, append_linger_seconds=0)  # fmt: skip
    publisher = Publisher(load_settings(**settings_overrides(env)))
    try:
        worker = launch_worker(env, tmp_path, name="status", concurrency=2)
        with running(worker):
            for n in range(8):
                publisher.publish(make_rows(n * 10, 10), database=DATABASE, schema=SCHEMA,
                                  pipe=PIPES[n % 2], batch_id=f"st-{n}")  # fmt: skip
            wait_until(lambda: int(emulator.stats()["rows_committed"]) >= 80, timeout=30,
                       what="80 rows committed", logs=[worker])  # fmt: skip
            # Commits paused: the next batches wait in their channel logs.
            emulator.pause_commits(True)
            for n in range(8, 12):
                publisher.publish(make_rows(n * 10, 10), database=DATABASE, schema=SCHEMA,
                                  pipe=PIPES[0], batch_id=f"st-{n}")  # fmt: skip
            wait_until(lambda: _logged(db) >= 12, timeout=20,
                       what="12 batches logged", logs=[worker])  # fmt: skip
            DeadLetters(db.client).add(DeadLetter("st-dead", DATABASE, SCHEMA, PIPES[1],
                                                  "refused", [{"id": -1}]))  # fmt: skip
            DeadLetters(db.client).add(DeadLetter("st-rows", DATABASE, SCHEMA, PIPES[1],
                                                  "row errors", [{"id": -2}],
                                                  kind="row_errors"))  # fmt: skip
            doc = status_json(env)
            emulator.pause_commits(False)
        channels = {(c["pipe"], c["channel"]): c for c in doc["channels"]}
        assert len(channels) == 4, doc["channels"]
        assert doc["snowflake"] == {"queried": True, "errors": {}}
        for (_pipe, _name), c in channels.items():
            assert c["owner"] == "status@test"
            assert isinstance(c["committed_offset"], int) and c["committed_offset"] > 0
            assert c["rows_inserted"] > 0 and c["rows_errors"] == 0
            assert c["status_code"] == "SUCCESS" and c["last_error"] is None
            assert c["last_issued_offset"] >= c["committed_offset"]
        waiting = [c for c in channels.values() if c["log_entries"]]
        assert waiting and all(c["pipe"].endswith(PIPES[0]) for c in waiting)
        assert sum(c["log_entries"] for c in waiting) == 4
        assert all(c["oldest_age_seconds"] >= 0 and c["log_bytes"] > 0 for c in waiting)
        token = doc["token"]
        assert token["shared"] is True and 0 <= token["age_seconds"] < 120
        assert token["expires_in_seconds"] > token["beat_refresh_in_seconds"] >= 0
        assert token["guard_refresh_in_seconds"] >= token["beat_refresh_in_seconds"]
        assert "value" not in token  # never the token itself
        queues = {q["queue"]: q for q in doc["queues"]}
        assert queues[queue]["ready"] == 0 and queues[queue]["unacked"] == 0
        assert doc["dead_letters"] == {
            "state_store": {"failed": 1, "row_errors": 1},
            "broker_queue": None,
        }
        assert [n["node"] for n in doc["nodes"]] == ["status@test"]

        # The worker is gone: two batches wait, one of them taken and not acknowledged.
        for n in range(12, 14):
            publisher.publish(make_rows(n * 10, 10), database=DATABASE, schema=SCHEMA,
                              pipe=PIPES[0], batch_id=f"st-{n}")  # fmt: skip
        with Connection(db.url, transport="worker.broker:Transport") as conn:
            held = Queue(queue, routing_key=queue)(conn.default_channel).get(no_ack=False)
            assert held is not None
            queues = {q["queue"]: q for q in status_json(env, "--no-snowflake")["queues"]}
            assert (queues[queue]["ready"], queues[queue]["unacked"]) == (1, 1)
            held.reject(requeue=True)
        # Not a terminal: tab-separated sections with whole values.
        plain = cli(env, "status", "--no-snowflake")
        assert plain.returncode == 0, plain.stderr
        assert "[channels]\npipe\tchannel\towner\tcommitted" in plain.stdout
        assert f"\n{queue}\t2\t0\t" in plain.stdout
        assert "\t…" not in plain.stdout and "..." not in plain.stdout
    finally:
        publisher.close()


def _logged(db: RedisDB) -> int:
    return int(db.client.hget("snowpipe:stats", "logged") or 0)


def test_status_on_rabbitmq_counts_ready_messages_and_the_broker_dead_letter_queue(
    db: RedisDB,
) -> None:
    queue = unique_queue("status")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "SNOWPIPE_BROKER_URL": RABBIT,
           "SNOWPIPE_STATE_URL": db.url, "SNOWPIPE_QUEUE_NAME": queue}  # fmt: skip
    publisher = Publisher(load_settings(require_identity=False, **settings_overrides(env)))
    try:
        for n in range(3):
            publisher.publish([{"id": n}], database="DB", schema="PUBLIC", pipe="P")
        doc = status_json(env, "--timeout", "0.5")
        queues = {q["queue"]: q for q in doc["queues"]}
        assert queues[queue]["ready"] == 3 and queues[queue]["consumers"] == 0
        # No worker answers: unacknowledged messages cannot be counted over AMQP; it says so.
        assert queues[queue]["unacked"] is None
        assert queues[queue]["unacked_source"] == "no worker node answered"
        assert doc["dead_letters"]["broker_queue"] == {"queue": f"{queue}.dead", "messages": 0}
        assert doc["token"]["configured"] is False and doc["channels"] == []
    finally:
        publisher.close()
        delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")


def test_status_names_an_unreachable_state_store_in_one_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT),
           "SNOWPIPE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}  # fmt: skip
    result = cli(env, "status")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "SNOWPIPE_STATE_URL" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
