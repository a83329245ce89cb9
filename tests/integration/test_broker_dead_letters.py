"""The RabbitMQ dead-letter queue (`<queue>.dead`) in `stats` and `dead-letters list|requeue`:
a batch the broker dead-lettered (rejected without requeue) is listed with its whole id, as JSON
too, and moved back to the ingest queue."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import amqp
import orjson
import pytest

from tests.support.celery import delete_rabbit_queues, settings_overrides, unique_queue
from tests.support.emulator import REPO_ROOT
from tests.support.redis import RedisDB
from worker.publish import Publisher
from worker.settings import load_settings

RABBIT = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def env(db: RedisDB) -> Iterator[dict[str, str]]:
    queue = unique_queue("dlq")
    yield _env(db, queue)
    delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")


def _env(db: RedisDB, queue: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "SNOWPIPE_BROKER_URL": RABBIT,
        "SNOWPIPE_STATE_URL": db.url,
        "SNOWPIPE_QUEUE_NAME": queue,
    }


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", *args],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60, check=False,
    )  # fmt: skip


def _depth(queue: str) -> int:
    with amqp.Connection("127.0.0.1:5672", userid="guest", password="guest") as conn:
        return int(conn.channel().queue_declare(queue, passive=True).message_count)


def test_a_broker_dead_letter_is_listed_and_requeued(env: dict[str, str]) -> None:
    queue = env["SNOWPIPE_QUEUE_NAME"]
    batch_id = "a-batch-id-long-enough-that-a-table-of-80-columns-would-cut-it-0123456789"
    publisher = Publisher(load_settings(require_identity=False, **settings_overrides(env)))
    try:
        publisher.publish([{"id": 1}, {"id": 2}], database="DB", schema="PUBLIC", pipe="P",
                          batch_id=batch_id)  # fmt: skip
    finally:
        publisher.close()
    # What RabbitMQ does to a poison message: reject it without requeue -> the dead-letter queue.
    with amqp.Connection("127.0.0.1:5672", userid="guest", password="guest") as conn:
        channel = conn.channel()
        message = channel.basic_get(queue, no_ack=False)
        assert message is not None
        channel.basic_reject(message.delivery_tag, requeue=False)
    for _ in range(50):
        if _depth(f"{queue}.dead") == 1:
            break
        time.sleep(0.1)
    assert _depth(f"{queue}.dead") == 1

    stats = cli(env, "stats")
    assert stats.returncode == 0, stats.stderr
    assert f"{queue}.dead" in stats.stdout

    listed = cli(env, "dead-letters", "list")
    assert listed.returncode == 0, listed.stderr
    assert batch_id in listed.stdout  # whole, although stdout is not a terminal
    assert "rejected" in listed.stdout and "DB.PUBLIC.P" in listed.stdout
    entries = orjson.loads(cli(env, "dead-letters", "list", "--json").stdout)
    assert [(e["source"], e["batch_id"], len(e["rows"])) for e in entries] == [
        ("broker", batch_id, 2)
    ]
    assert _depth(f"{queue}.dead") == 1  # listing leaves it where it is

    requeued = cli(env, "dead-letters", "requeue")
    assert requeued.returncode == 0, requeued.stderr
    assert "requeued 1 batch(es)" in requeued.stdout
    assert _depth(f"{queue}.dead") == 0
    assert _depth(queue) == 1
