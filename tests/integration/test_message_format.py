"""The message format of docs/message-format.md, held to what is really sent and really read:
messages published by `publish_batch` on both brokers match the documented envelope and the JSON
Schema (docs/schemas/ingest-batch.schema.json), and the Node.js producer of
examples/node-producer/ gets each row committed exactly once by real workers, run twice."""

from __future__ import annotations

import base64
import fcntl
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import amqp
import jsonschema
import pytest

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    assert_exactly_once,
    delete_rabbit_queues,
    launch_worker,
    make_rows,
    running,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import REPO_ROOT, RunningEmulator, start_emulator
from tests.support.keys import key_pair
from tests.support.messages import RABBIT_HOST
from tests.support.redis import RedisDB
from worker.celery_config import declare_dead_letter_queue
from worker.deadletter import DeadLetters
from worker.publish import Publisher
from worker.settings import load_settings

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
EXAMPLE = REPO_ROOT / "examples" / "node-producer"
BATCH_SCHEMA = json.loads((REPO_ROOT / "docs/schemas/ingest-batch.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(BATCH_SCHEMA)
# The headers docs/message-format.md lists as required, with their values.
REQUIRED_HEADERS = ("task", "id")


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    with start_emulator(
        "--commit-delay", "0.2", "--rate-limit", "0", "--accept-any-pipe",
        workdir=tmp_path_factory.mktemp("emulator"),
    ) as emulator:  # fmt: skip
        emulator.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        yield emulator


@pytest.fixture(scope="module")
def node_producer() -> Path:
    """examples/node-producer/publish.mjs with its packages installed (`npm ci`, once)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "the example producer needs Node.js 18+ and npm on PATH"
    with (EXAMPLE / ".npm-install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # xdist workers: one install at a time
        if not (EXAMPLE / "node_modules" / "amqplib").is_dir() or not (
            EXAMPLE / "node_modules" / "redis"
        ).is_dir():
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, capture_output=True,
                text=True, timeout=300, check=False,
            )  # fmt: skip
            assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return EXAMPLE / "publish.mjs"


def run_node(script: Path, broker_url: str, queue: str, pipe: str, rows: Path,
             prefix: str, *extra: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        ["node", str(script), "--broker", broker_url, "--queue", queue, "--database", DATABASE,
         "--schema", SCHEMA, "--pipe", pipe, "--id-prefix", prefix, "--batch-rows", "40",
         *extra, str(rows)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def check_message(body: bytes, headers: dict[str, Any], content_type: str) -> dict[str, Any]:
    """The checks of docs/message-format.md on one message; its keyword arguments."""
    assert content_type == "application/json"
    assert headers["task"] == "snowpipe.ingest_batch"
    assert all(isinstance(headers[name], str) and headers[name] for name in REQUIRED_HEADERS)
    decoded = json.loads(body)
    errors = [e.message for e in VALIDATOR.iter_errors(decoded)]
    assert errors == [], errors
    kwargs: dict[str, Any] = decoded[1]
    return kwargs


def redis_messages(db: RedisDB, queue: str) -> list[dict[str, Any]]:
    """The kwargs of every message waiting in the Redis list `queue`, each checked."""
    found = []
    for item in db.client.lrange(queue, 0, -1):
        envelope = json.loads(item)
        assert set(envelope) >= {"body", "content-encoding", "content-type", "headers",
                                 "properties"}  # fmt: skip
        props = envelope["properties"]
        assert props["body_encoding"] == "base64" and isinstance(props["delivery_tag"], str)
        assert props["delivery_info"] == {"exchange": "", "routing_key": queue}
        body = base64.b64decode(envelope["body"])
        found.append(check_message(body, envelope["headers"], envelope["content-type"]))
    return found


def test_published_batches_on_redis_match_the_documented_envelope_and_schema(
    db: RedisDB, tmp_path: Path, node_producer: Path
) -> None:
    queue = unique_queue("format")
    settings = load_settings(require_identity=False, broker_url=db.url, queue_name=queue)
    publisher = Publisher(settings)
    try:
        publisher.publish(make_rows(0, 3), database=DATABASE, schema=SCHEMA, pipe="T-STREAMING",
                          batch_id="py-0")  # fmt: skip
    finally:
        publisher.close()
    rows = tmp_path / "rows.ndjson"
    rows.write_text("".join(json.dumps(r) + "\n" for r in make_rows(3, 50)))
    done = run_node(node_producer, db.url, queue, '"Mixed Case"', rows, "js")
    assert done.returncode == 0, done.stderr
    done = run_node(node_producer, db.url, queue, "P", rows, "jsnd", "--form", "ndjson")
    assert done.returncode == 0, done.stderr
    kwargs = redis_messages(db, queue)
    assert sorted(k["batch_id"] for k in kwargs) == ["js-0", "js-1", "jsnd-0", "jsnd-1", "py-0"]
    assert sum(len(k["rows"]) for k in kwargs if "rows" in k) == 53
    ndjson = [k for k in kwargs if "ndjson" in k]
    assert [k["row_count"] for k in sorted(ndjson, key=lambda k: k["batch_id"])] == [40, 10]
    assert "".join(k["ndjson"] for k in sorted(ndjson, key=lambda k: k["batch_id"])) == (
        rows.read_text()  # the file's lines as they are
    )


def test_a_batch_published_in_the_ndjson_form_matches_the_schema(db: RedisDB) -> None:
    queue = unique_queue("format-nd")
    settings = load_settings(require_identity=False, broker_url=db.url, queue_name=queue)
    publisher = Publisher(settings)
    try:
        publisher.publish([*make_rows(0, 3), {"id": 3, "big": 2**70}], database=DATABASE,
                          schema=SCHEMA, pipe="P", batch_id="nd-0", form="ndjson")  # fmt: skip
    finally:
        publisher.close()
    [kwargs] = redis_messages(db, queue)
    assert "rows" not in kwargs and kwargs["row_count"] == 4
    assert kwargs["ndjson"].endswith('{"id":3,"big":1180591620717411303424}\n')
    assert kwargs["ndjson"].count("\n") == 4


@pytest.mark.rabbitmq
def test_published_batches_on_rabbitmq_match_the_documented_properties_and_schema(
    tmp_path: Path,
) -> None:
    queue = unique_queue("format-amqp")
    settings = load_settings(require_identity=False, broker_url=RABBIT_URL, queue_name=queue)
    publisher = Publisher(settings)
    try:
        declare_queues(settings)
        publisher.publish(make_rows(0, 3), database=DATABASE, schema=SCHEMA, pipe="P",
                          batch_id="py-0")  # fmt: skip
        with amqp.Connection(RABBIT_HOST, userid="guest", password="guest") as conn:
            got = conn.channel().basic_get(queue, no_ack=True)
            assert got is not None
            assert got.properties["delivery_mode"] == 2
            assert got.properties["content_encoding"] == "utf-8"
            kwargs = check_message(got.body, got.properties["application_headers"],
                                   got.properties["content_type"])  # fmt: skip
            assert kwargs["batch_id"] == "py-0"
    finally:
        publisher.close()
        delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")


def declare_queues(settings: Any) -> None:
    """Declare the worker's queues on RabbitMQ, as a starting worker does."""
    from celery import Celery

    from worker.celery_config import build_config

    app = Celery("declare", set_as_current=False)
    app.conf.update(build_config(settings))
    declare_dead_letter_queue(app, settings)
    with app.connection_for_write() as conn:
        for queue in app.conf.task_queues:
            queue(conn.default_channel).declare()
    app.close()


@pytest.mark.parametrize(
    "broker", ["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]
)
def test_the_node_producer_gets_each_row_committed_exactly_once_when_run_twice(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path, node_producer: Path, broker: str
) -> None:
    queue = unique_queue(f"node-{broker}")
    pipe = f"NODE_{broker.upper()}"
    broker_url = db.url if broker == "redis" else RABBIT_URL
    env = worker_env(emu, broker_url, key_pair("celery").write_private(tmp_path / "key.pem"),
                     queue=queue, state_url=db.url)  # fmt: skip
    total = 200
    rows = tmp_path / "rows.ndjson"
    rows.write_text("".join(json.dumps(r) + "\n" for r in make_rows(0, total)))
    try:
        worker = launch_worker(env, tmp_path, name=f"node{broker}", pool="threads", concurrency=4)
        with running(worker):
            for _ in range(2):  # a producer that retries the whole run: same batch ids
                done = run_node(node_producer, broker_url, queue, pipe, rows, "orders-1")
                assert done.returncode == 0, done.stderr
                assert "published 200 rows in 5 batches" in done.stdout
            wait_until(lambda: len(emu.rows(DATABASE, SCHEMA, pipe)) >= total, timeout=60,
                       what="the node producer's rows", logs=[worker])  # fmt: skip
            wait_until(lambda: emu.stats()["batches_pending"] == 0, timeout=10, what="idle")
            assert_exactly_once(emu, [pipe], set(range(total)), logs=[worker])
            assert DeadLetters(db.client).count() == 0
    finally:
        if broker == "rabbitmq":
            delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")


def test_the_node_producer_refuses_a_bad_line_before_sending_anything(
    db: RedisDB, tmp_path: Path, node_producer: Path
) -> None:
    queue = unique_queue("node-bad")
    rows = tmp_path / "rows.ndjson"
    rows.write_text('{"id": 1}\n{"id": 2,\n')
    done = run_node(node_producer, db.url, queue, "P", rows, "bad")
    assert done.returncode == 2
    assert "line 2 is not JSON" in done.stderr
    assert db.client.llen(queue) == 0
