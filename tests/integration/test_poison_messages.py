"""No message can stop a node: whatever arrives on the ingest queue that is not a valid batch
becomes a dead letter of kind "malformed" (reason and raw body), and the batches around it are
committed exactly once. Real workers on both brokers and both pools (docs/message-format.md).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    CeleryProcess,
    assert_exactly_once,
    delete_rabbit_queues,
    launch_worker,
    make_rows,
    running,
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import REPO_ROOT, RunningEmulator, start_emulator
from tests.support.keys import key_pair
from tests.support.messages import celery_body, publish_amqp, push_envelope, rabbit_ready
from tests.support.redis import RedisDB, private_redis
from worker.deadletter import DeadLetter, DeadLetters
from worker.publish import Publisher
from worker.settings import load_settings

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
INGEST = "snowpipe.ingest_batch"
ROWS = 5


@dataclass(frozen=True)
class Poison:
    """One malformed message: what is sent, and what its dead letter's reason must say."""

    name: str
    body: bytes
    headers: dict[str, Any] | None
    reason: str
    content_type: str | None = "application/json"


def _kwargs(**fields: Any) -> dict[str, Any]:
    return {"batch_id": "b", "database": DATABASE, "schema": SCHEMA, "pipe": "P",
            "rows": [{"id": 1}], **fields}  # fmt: skip


# The four kinds of the issue: not Celery's shape, not JSON (or another content type), wrong or
# missing keyword arguments and types, an unknown task name.
POISONS = [
    Poison("shape", b'{"hello": "world"}', {"task": INGEST, "id": "m-shape"},
           "not Celery's [args, kwargs, embed] array"),
    Poison("not-json", b"this is not json", {"task": INGEST, "id": "m-text"},
           "the body is not JSON"),
    Poison("pickle", b"\x80\x04K\x01.", {"task": INGEST, "id": "m-pickle"},
           "is not application/json", content_type="application/x-python-serialize"),
    Poison("type", celery_body(_kwargs(batch_id=7)), {"task": INGEST, "id": "m-type"},
           "batch_id must be a string"),
    Poison("missing", celery_body({"batch_id": "m-missing", "database": DATABASE}),
           {"task": INGEST, "id": "m-missing"}, "missing keyword argument(s) schema, pipe, rows"),
    Poison("unknown-kwarg", celery_body(_kwargs(colour="red")), {"task": INGEST, "id": "m-kw"},
           "unknown keyword argument(s) colour"),
    Poison("unknown-task", celery_body({}), {"task": "other.task", "id": "m-unknown"},
           "unknown task 'other.task'"),
    Poison("no-task", b'{"rows": [{"id": 1}]}', {}, "no 'task' header"),
    Poison("bad-timelimit", celery_body(_kwargs(batch_id="m-tl")),
           {"task": INGEST, "id": "m-tl", "timelimit": "soon"}, "'timelimit' header"),
]  # fmt: skip
# Redis only: items that are no kombu envelope at all (LPUSH of the body alone).
RAW_ITEMS = [
    (b'{"batch_id": "pushed-alone"}', "JSON but not a kombu message envelope"),
    (b"plain text", "not JSON, so not a kombu message envelope"),
    (b"\xff\x00\x81binary", "not JSON, so not a kombu message envelope"),
]


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    with start_emulator(
        "--commit-delay", "0.2", "--rate-limit", "0", "--accept-any-pipe",
        workdir=tmp_path_factory.mktemp("emulator"),
    ) as emulator:  # fmt: skip
        emulator.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        yield emulator


def _raw_of(letter: DeadLetter) -> bytes:
    assert letter.raw is not None
    if letter.detail.get("raw_encoding") == "base64":
        return base64.b64decode(letter.raw)
    return letter.raw.encode()


def _alive(worker: CeleryProcess) -> None:
    assert worker.process.poll() is None, f"the worker exited\n{worker.log_tail()}"
    assert "Unrecoverable error" not in worker.log(), worker.log_tail()


@pytest.mark.parametrize(
    ("broker", "pool"),
    [
        ("redis", "threads"),
        ("redis", "prefork"),
        pytest.param("rabbitmq", "threads", marks=pytest.mark.rabbitmq),
        pytest.param("rabbitmq", "prefork", marks=pytest.mark.rabbitmq),
    ],
)
def test_malformed_messages_become_dead_letters_and_the_node_keeps_consuming(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path, broker: str, pool: str
) -> None:
    queue = unique_queue(f"poison-{broker}-{pool}")
    pipe = f"POISON_{broker}_{pool}".upper()
    key_path = key_pair("celery").write_private(tmp_path / "key.pem")
    env = worker_env(emu, db.url if broker == "redis" else RABBIT_URL, key_path, queue=queue,
                     state_url=db.url)  # fmt: skip
    publisher = Publisher(load_settings(**settings_overrides(env)))
    sent: list[tuple[bytes, str]] = []

    def send(poison: Poison) -> None:
        if broker == "redis":
            push_envelope(db.client, queue, poison.body, poison.headers or {},
                          content_type=poison.content_type)  # fmt: skip
        else:
            publish_amqp(queue, poison.body, poison.headers, content_type=poison.content_type)
        sent.append((poison.body, poison.reason))

    batches = 0

    def valid_batch() -> None:
        nonlocal batches
        publisher.publish(make_rows(batches * ROWS, ROWS), database=DATABASE, schema=SCHEMA,
                          pipe=pipe, batch_id=f"{queue}-{batches}")  # fmt: skip
        batches += 1

    try:
        worker = launch_worker(env, tmp_path, name=f"poison{pool}", pool=pool, concurrency=2)
        with running(worker):
            valid_batch()
            for poison in POISONS:
                send(poison)
                valid_batch()
            if broker == "redis":
                for item, reason in RAW_ITEMS:
                    db.client.lpush(queue, item)
                    sent.append((item, reason))
                    valid_batch()
            dead = DeadLetters(db.client)
            wait_until(lambda: dead.count() >= len(sent), timeout=60,
                       what=f"{len(sent)} dead letters", logs=[worker])  # fmt: skip
            wait_until(lambda: len(emu.rows(DATABASE, SCHEMA, pipe)) >= batches * ROWS,
                       timeout=60, what="the valid batches committed", logs=[worker])  # fmt: skip
            wait_until(lambda: emu.stats()["batches_pending"] == 0, timeout=10, what="idle")
            assert_exactly_once(emu, [pipe], set(range(batches * ROWS)), logs=[worker])
            _alive(worker)

            letters = [stored.letter for stored in dead.entries()]
            assert len(letters) == len(sent), letters
            by_raw = {_raw_of(letter): letter for letter in letters}
            for body, reason in sent:
                letter = by_raw[body]
                assert letter.kind == "malformed"
                assert reason in letter.reason, (reason, letter.reason)
                assert letter.rows == [] and letter.letter_id
            assert by_raw[b"\x80\x04K\x01."].detail["raw_encoding"] == "base64"
            assert by_raw[POISONS[3].body].detail["message_id"] == "m-type"

            # Nothing is left behind: every malformed message was acknowledged once stored.
            if broker == "redis":
                wait_until(lambda: db.client.llen(queue) == 0 and db.client.hlen("unacked") == 0,
                           timeout=10, what="the queue drained", logs=[worker])  # fmt: skip
            else:
                assert rabbit_ready(queue) == 0
                assert rabbit_ready(f"{queue}.dead") == 0
            listed = _cli_json(env, "dead-letters", "list", "--json")
            assert sorted(e["raw"] for e in listed) == sorted(letter.raw for letter in letters)
            assert {e["kind"] for e in listed} == {"malformed"}
    finally:
        publisher.close()
        if broker == "rabbitmq":
            delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")


def _cli_json(env: dict[str, str], *args: str) -> Any:
    """`snowpipe-worker ARGS` with the worker's environment, its stdout as JSON."""
    result = subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", *args], env=env,
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _send_batch(publisher: Publisher, **kwargs: Any) -> None:
    """An ingest_batch message with exactly these keyword arguments (no producer-side checks)."""
    publisher.app.send_task(INGEST, kwargs=kwargs, queue=publisher.settings.queue_name)


def test_a_bad_pipe_name_is_dead_lettered_and_new_pipes_are_still_served(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    # Before names were checked, a pipe `X|Y` was logged under a key the state store could not
    # read back, and every node's lease tick failed on it: no new channel was ever taken again.
    # Such a key left over from then is skipped (and shown by status); new bad names never get
    # that far.
    db.client.sadd("snowpipe:channels", "OLD|PUBLIC|X|Y|old_0")
    queue = unique_queue("badname")
    env = worker_env(emu, db.url, key_pair("celery").write_private(tmp_path / "key.pem"),
                     queue=queue)  # fmt: skip
    publisher = Publisher(load_settings(**settings_overrides(env)))
    bad = {
        "X|Y": "contains '|'",
        "..": "is a path step",
        "": "pipe is empty",
        "A.B": "contains '.'",
        "9LIVES": "not a valid Snowflake identifier",
        '"unterminated': "opens a double quote",
    }
    try:
        worker = launch_worker(env, tmp_path, name="badname", pool="threads", concurrency=2)
        with running(worker):
            for n, name in enumerate(bad):
                _send_batch(publisher, batch_id=f"bad-{n}", database=DATABASE, schema=SCHEMA,
                            pipe=name, rows=[{"id": 1000 + n}])  # fmt: skip
                publisher.publish(make_rows(n * ROWS, ROWS), database=DATABASE, schema=SCHEMA,
                                  pipe="NEW_PIPE", batch_id=f"good-{n}")  # fmt: skip
            # Another spelling of the same pipe (unquoted names are case-insensitive) shares its
            # channels: committed once, on NEW_PIPE.
            publisher.publish(make_rows(len(bad) * ROWS, ROWS), database=DATABASE.lower(),
                              schema=SCHEMA.lower(), pipe='"NEW_PIPE"',
                              batch_id="good-spelt")  # fmt: skip
            dead = DeadLetters(db.client)
            wait_until(lambda: dead.count() >= len(bad), timeout=60, what="dead letters",
                       logs=[worker])  # fmt: skip
            total = (len(bad) + 1) * ROWS
            wait_until(lambda: len(emu.rows(DATABASE, SCHEMA, "NEW_PIPE")) >= total, timeout=60,
                       what="the new pipe's batches", logs=[worker])  # fmt: skip
            assert_exactly_once(emu, ["NEW_PIPE"], set(range(total)), logs=[worker])
            reasons = {s.letter.batch_id: s.letter for s in dead.entries()}
            for n, (name, rule) in enumerate(bad.items()):
                letter = reasons[f"bad-{n}"]
                assert letter.kind == "malformed"
                assert rule in letter.reason, (name, letter.reason)
                assert letter.pipe == name and json.loads(letter.raw or "")  # the body as sent
            members = {m.decode() for m in db.client.smembers("snowpipe:channels")}
            assert all(m.startswith("DB|PUBLIC|NEW_PIPE|") for m in members - {
                "OLD|PUBLIC|X|Y|old_0"})
            assert worker.log().count("channels.invalid_key") == 1
            _alive(worker)
            status = _cli_json(env, "status", "--json", "--no-snowflake")
            assert status["invalid_channel_keys"] == ["OLD|PUBLIC|X|Y|old_0"]
    finally:
        publisher.close()


def test_a_pipe_outside_snowpipe_pipes_is_dead_lettered_naming_the_setting(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    queue = unique_queue("served")
    env = worker_env(emu, db.url, key_pair("celery").write_private(tmp_path / "key.pem"),
                     queue=queue, pipes="DB.PUBLIC.SERVED")  # fmt: skip
    publisher = Publisher(load_settings(**settings_overrides(env)))
    try:
        worker = launch_worker(env, tmp_path, name="served", pool="threads", concurrency=2)
        with running(worker):
            publisher.publish(make_rows(0, ROWS), database=DATABASE, schema=SCHEMA,
                              pipe="SERVED", batch_id="served-0")  # fmt: skip
            publisher.publish([{"id": 99}], database=DATABASE, schema=SCHEMA, pipe="ELSEWHERE",
                              batch_id="elsewhere-0")  # fmt: skip
            # The setting's names follow Snowflake's case rules too: `served` is SERVED.
            publisher.publish(make_rows(ROWS, ROWS), database="db", schema="public",
                              pipe="served", batch_id="served-1")  # fmt: skip
            dead = DeadLetters(db.client)
            wait_until(lambda: dead.count() >= 1, timeout=60, what="a dead letter", logs=[worker])
            wait_until(lambda: len(emu.rows(DATABASE, SCHEMA, "SERVED")) >= 2 * ROWS, timeout=60,
                       what="the served pipe's batches", logs=[worker])  # fmt: skip
            assert_exactly_once(emu, ["SERVED"], set(range(2 * ROWS)), logs=[worker])
            (stored,) = list(dead.entries())
            letter = stored.letter
            assert letter.batch_id == "elsewhere-0" and letter.kind == "failed"
            assert "SNOWPIPE_PIPES" in letter.reason and "DB.PUBLIC.ELSEWHERE" in letter.reason
            assert letter.rows == [{"id": 99}]  # kept for a requeue once the pipe is listed
            assert emu.rows(DATABASE, SCHEMA, "ELSEWHERE") == []
    finally:
        publisher.close()


def test_a_malformed_message_waits_in_the_queue_while_the_state_store_is_down(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    queue = unique_queue("poison-outage")
    with private_redis(tmp_path / "state") as state:
        env = worker_env(emu, db.url, key_pair("celery").write_private(tmp_path / "key.pem"),
                         queue=queue, state_url=state.url(0),
                         state_outage_seconds=2)  # fmt: skip
        worker = launch_worker(env, tmp_path, name="poisonout", pool="threads", concurrency=2)
        with running(worker):
            state.stop()
            push_envelope(db.client, queue, b'{"hello": "world"}', {"task": INGEST, "id": "m-o"})
            wait_until(lambda: worker.log().count("ingest.state_unavailable") >= 2, timeout=30,
                       what="the message held, put back and held again",
                       logs=[worker])  # fmt: skip
            # Held or back in the queue, never acknowledged while it cannot be stored.
            in_broker: Callable[[], int] = lambda: (  # noqa: E731
                db.client.llen(queue) + db.client.hlen("unacked"))
            assert in_broker() == 1
            assert "Reject" in worker.log() or db.client.llen(queue) == 1
            state.start()
            dead = DeadLetters(state.client(0))
            wait_until(lambda: dead.count() == 1, timeout=30, what="the dead letter stored",
                       logs=[worker])  # fmt: skip
            wait_until(lambda: in_broker() == 0, timeout=10, what="the message acknowledged",
                       logs=[worker])  # fmt: skip
            (stored,) = list(dead.entries())
            assert stored.letter.kind == "malformed" and stored.letter.raw == '{"hello": "world"}'
            _alive(worker)
