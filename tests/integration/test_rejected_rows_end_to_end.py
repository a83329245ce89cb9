"""Rows Snowflake rejects, to the row, end to end: a real worker, a pipe whose table has error
logging on, batches coalesced into shared requests with a few bad rows among many good ones.
Exactly the bad rows are dead-lettered (one letter per batch that has any, holding only those
rows, with Snowflake's message), every good row is committed once, and no batch without a
rejected row is flagged. Without error logging, the coarse attribution names whole batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.celery import (
    ACCOUNT,
    USER,
    delete_rabbit_queues,
    launch_worker,
    running,
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import RunningEmulator, start_emulator
from tests.support.keys import key_pair
from tests.support.redis import RedisDB
from worker.deadletter import DeadLetters
from worker.publish import Form, Publisher
from worker.settings import load_settings

DB, SCHEMA = "DEMO", "PUBLIC"
LOGGED, UNLOGGED = "ORDERS", "ITEMS"
BAD = {(7, 3), (21, 0), (39, 9)}  # (batch, row) with a NULL id: the table refuses them
BATCHES, ROWS = 40, 10
RABBIT = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[RunningEmulator]:
    with start_emulator(
        "--commit-delay", "0.5", "--rate-limit", "0",
        "--pipe", f"{DB}.{SCHEMA}.{LOGGED}-STREAMING(ID NUMBER NOT NULL, N VARCHAR) "
        f"TABLE = {LOGGED} ERROR_LOGGING = TRUE",
        "--pipe", f"{DB}.{SCHEMA}.{UNLOGGED}-STREAMING(ID NUMBER NOT NULL, N VARCHAR)",
        workdir=tmp_path / "emulator",
    ) as emulator:  # fmt: skip
        emulator.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        yield emulator


def rows_of(batch: int) -> list[dict[str, object]]:
    return [
        {"ID": None if (batch, r) in BAD else batch * ROWS + r, "N": f"b{batch}r{r}"}
        for r in range(ROWS)
    ]


@pytest.mark.parametrize(
    ("broker", "form"), [("redis", "rows"), ("rabbitmq", "rows"), ("redis", "ndjson")]
)
def test_exactly_the_rejected_rows_are_dead_lettered_with_snowflakes_message(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path, broker: str, form: Form
) -> None:
    # The NDJSON form (lines stored as sent) maps rejected rows to the same row numbers.
    queue = unique_queue("rejected")
    env = worker_env(
        emu, db.url if broker == "redis" else RABBIT, key_pair("celery").write_private(
            tmp_path / "key.pem"), queue=queue, state_url=db.url,
        channels_per_pipe=1, append_linger_seconds=2,
    )  # fmt: skip
    publisher = Publisher(load_settings(**settings_overrides(env)))
    worker = launch_worker(env, tmp_path, name="rejected", pool="threads", concurrency=8)
    try:
        with running(worker):
            pipe = f"{LOGGED}-STREAMING"
            for b in range(BATCHES):
                publisher.publish(rows_of(b), database=DB, schema=SCHEMA, pipe=pipe,
                                  batch_id=f"b{b:02}", form=form)  # fmt: skip
            dead = DeadLetters(db.client)
            wait_until(lambda: dead.count() >= len(BAD), timeout=90,
                       what="the row_errors letters", logs=[worker])  # fmt: skip
            good = {b * ROWS + r for b in range(BATCHES) for r in range(ROWS)} - {
                b * ROWS + r for b, r in BAD
            }
            wait_until(lambda: {int(r["row"]["ID"]) for r in emu.rows(DB, SCHEMA, pipe)
                                if r["row"]["ID"] is not None} >= good,
                       timeout=60, what="every good row committed", logs=[worker])  # fmt: skip
            committed = [int(r["row"]["ID"]) for r in emu.rows(DB, SCHEMA, pipe)]
            assert sorted(committed) == sorted(good)  # each good row once, no bad one
            letters = {s.letter.batch_id: s.letter for s in dead.entries()}
            assert sorted(letters) == sorted(f"b{b:02}" for b, _ in BAD), letters
            for b, r in BAD:
                letter = letters[f"b{b:02}"]
                assert letter.kind == "row_errors"
                assert letter.rows == [rows_of(b)[r]]  # that row, not its batch
                [rejected] = letter.detail["rejected"]
                assert rejected["row"] == r
                assert "NULL result in a non-nullable column" in rejected["message"]
            # The 40 batches went out in a few coalesced requests, not one each.
            assert emu.stats()["appends"] < BATCHES / 2
            assert dead.count() == len(BAD)
    finally:
        publisher.close()
        if broker == "rabbitmq":
            delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")


def test_without_error_logging_the_batches_of_the_request_are_flagged(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    queue = unique_queue("coarse")
    env = worker_env(
        emu, db.url, key_pair("celery").write_private(tmp_path / "key.pem"), queue=queue,
        channels_per_pipe=1, append_linger_seconds=2,
    )  # fmt: skip
    publisher = Publisher(load_settings(**settings_overrides(env)))
    worker = launch_worker(env, tmp_path, name="coarse", pool="threads", concurrency=8)
    try:
        with running(worker):
            pipe = f"{UNLOGGED}-STREAMING"
            for b in range(5):
                publisher.publish(rows_of(b if b != 4 else 7), database=DB, schema=SCHEMA,
                                  pipe=pipe, batch_id=f"c{b}")  # fmt: skip
            dead = DeadLetters(db.client)
            wait_until(lambda: dead.count() >= 1, timeout=90 + 30,
                       what="a coarse row_errors letter", logs=[worker])  # fmt: skip
            letters = [s.letter for s in dead.entries()]
            assert {letter.kind for letter in letters} == {"row_errors"}
            assert "c4" in {letter.batch_id for letter in letters}
            assert all(letter.detail.get("attribution") == "request" for letter in letters)
    finally:
        publisher.close()
