"""The NDJSON form of a batch (docs/message-format.md#the-ndjson-form) end to end: published by
`Publisher(form="ndjson")` on both brokers, taken by a real worker, committed by the emulator
exactly once with every digit of its numbers; a batch with a bad line becomes a malformed dead
letter naming the line, and nothing of it is committed."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

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
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import start_emulator
from tests.support.keys import key_pair
from tests.support.redis import RedisDB
from worker.deadletter import DeadLetters
from worker.publish import Publisher
from worker.settings import load_settings

RABBIT = "amqp://guest:guest@127.0.0.1:5672//"
# Numbers orjson (or a JavaScript producer) could not carry as values: the bytes must.
EXACT_LINES = (
    '{"id": 1000, "big": 1180591620717411303425, "neg": -1000000000000000000000000000007}\n'
    '{"id":1001,"price":0.1000000000000000055511151231257827,"tens":1.10,"tiny":-1.000E-30}\n'
)
BAD_LINES = '{"id": 2000}\n[2001]\n{"id": 2002}\n'


@pytest.mark.parametrize(
    ("broker", "pool"),
    [
        ("redis", "threads"),
        ("redis", "prefork"),  # the request carries the decoded arguments to a child process
        pytest.param("rabbitmq", "threads", marks=pytest.mark.rabbitmq),
    ],
)
def test_ndjson_batches_are_committed_exactly_once_with_exact_numbers(
    db: RedisDB, tmp_path: Path, broker: str, pool: str
) -> None:
    with start_emulator("--commit-delay", "0.2", "--rate-limit", "0", "--accept-any-pipe",
                        workdir=tmp_path / "emu") as emu:  # fmt: skip
        emu.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        queue = unique_queue(f"ndjson-{broker}")
        env = worker_env(
            emu, db.url if broker == "redis" else RABBIT,
            key_pair("celery").write_private(tmp_path / "key.pem"), queue=queue,
            state_url=db.url, publish_form="ndjson",
        )  # fmt: skip
        publisher = Publisher(load_settings(**settings_overrides(env)))
        worker = launch_worker(env, tmp_path, name=f"ndjson{broker}{pool}", pool=pool,
                               concurrency=4 if pool == "threads" else 2)  # fmt: skip
        pipe, exact_pipe = "EVENTS", "NUMBERS"
        total = 450
        try:
            with running(worker):
                # SNOWPIPE_PUBLISH_FORM=ndjson makes it the publisher's default form.
                for b, start in enumerate(range(0, total, 100)):
                    rows = make_rows(start, min(100, total - start))
                    publisher.publish(rows, database=DATABASE, schema=SCHEMA, pipe=pipe,
                                      batch_id=f"nd-{b}")  # fmt: skip
                # The same batch again (a producer's retry): committed once.
                publisher.publish(make_rows(0, 100), database=DATABASE, schema=SCHEMA, pipe=pipe,
                                  batch_id="nd-0")  # fmt: skip
                # Another producer's lines, sent as they are.
                send(publisher, "exact-1", exact_pipe, EXACT_LINES, row_count=2)
                # A bad line among good ones: the whole batch is a malformed dead letter.
                send(publisher, "bad-1", pipe, BAD_LINES, row_count=3)
                wait_until(lambda: len(emu.rows(DATABASE, SCHEMA, pipe)) >= total
                           and len(emu.rows(DATABASE, SCHEMA, exact_pipe)) >= 2,
                           timeout=60, what="every row committed", logs=[worker])  # fmt: skip
                dead = DeadLetters(db.client)
                wait_until(lambda: dead.count() >= 1, timeout=30, what="the malformed letter",
                           logs=[worker])  # fmt: skip
                wait_until(lambda: emu.stats()["batches_pending"] == 0, timeout=10, what="idle")
                assert_exactly_once(emu, [pipe], set(range(total)), logs=[worker])

            exact = {r["row"]["id"]: r["row"] for r in emu.rows(DATABASE, SCHEMA, exact_pipe)}
            assert exact[1000]["big"] == 2**70 + 1 and type(exact[1000]["big"]) is int
            assert exact[1000]["neg"] == -(10**30) - 7
            assert str(exact[1001]["price"]) == "0.1000000000000000055511151231257827"
            assert str(exact[1001]["tens"]) == "1.10"
            assert exact[1001]["tiny"] == Decimal("-1.000E-30")

            [stored] = list(dead.entries())
            letter = stored.letter
            assert letter.kind == "malformed" and letter.batch_id == "bad-1"
            assert letter.reason.startswith("ndjson line 2 is an array, not a JSON object")
            assert "send one non-empty JSON object per line" in letter.reason
            assert letter.detail["ndjson_line"] == 2
            assert letter.raw is not None and json.loads(letter.raw)["ndjson"] == BAD_LINES
            assert "ndjson line 2 is an array" in worker.log()
        finally:
            publisher.close()
            if broker == "rabbitmq":
                delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")


def send(publisher: Publisher, batch_id: str, pipe: str, ndjson: str, *, row_count: int) -> None:
    """A message in the NDJSON form as another producer sends it (no publisher check)."""
    publisher.app.send_task(
        "snowpipe.ingest_batch",
        kwargs={"batch_id": batch_id, "database": DATABASE, "schema": SCHEMA, "pipe": pipe,
                "ndjson": ndjson, "row_count": row_count},
        task_id=batch_id, queue=publisher.settings.queue_name,
        routing_key=publisher.settings.queue_name,
    )  # fmt: skip
