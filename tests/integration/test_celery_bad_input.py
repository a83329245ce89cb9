"""Every bad input gives a clear error at publish time or a dead letter with its reason."""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
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
from worker.publish import InvalidBatchError, Publisher
from worker.settings import load_settings


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[RunningEmulator]:
    # Only pipe P exists: anything else is an unknown pipe.
    with start_emulator(
        "--commit-delay", "0.2", "--rate-limit", "0", "--pipe", f"{DATABASE}.{SCHEMA}.P",
        workdir=tmp_path / "emu",
    ) as emulator:  # fmt: skip
        emulator.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        yield emulator


def _publisher(emu: RunningEmulator, db: RedisDB, tmp_path: Path, **kw: object) -> Publisher:
    key_path = key_pair("celery").write_private(tmp_path / "key.pem")
    env = worker_env(emu, db.url, key_path, queue=unique_queue("bad"), **kw)  # type: ignore[arg-type]
    return Publisher(load_settings(**settings_overrides(env)))


def _incompressible(size: int) -> str:
    """Text that stays over `size` bytes after compression (random data)."""
    return base64.b64encode(os.urandom(size)).decode()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": 1}, {"id": 2, "v": {1, 2}}], "row 1 is not JSON-serialisable"),
        ([{"id": 1, "v": math.nan}], "row 0 has a NaN or infinite float at 'v'"),
        ([{"id": 1, "blob": _incompressible(4 * 1024 * 1024)}], "row 0 alone is"),
        ([], "the batch is empty"),
        ([{}], "row 0 is empty"),
        (["not a dict"], "row 0 is a str, not a mapping"),
        ({"id": 1}, "rows must be a list of dicts"),
    ],
    ids=["set", "nan", "oversized", "empty-batch", "empty-row", "str-row", "dict"],
)
def test_bad_rows_are_refused_at_publish_time_naming_the_row(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path, rows: object, message: str
) -> None:
    publisher = _publisher(emu, db, tmp_path)
    try:
        with pytest.raises(InvalidBatchError) as info:
            publisher.publish(rows, database=DATABASE, schema=SCHEMA, pipe="P")  # type: ignore[arg-type]
        assert message in str(info.value)
    finally:
        publisher.close()


def test_a_pipe_name_with_a_newline_is_refused_at_publish_time(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    publisher = _publisher(emu, db, tmp_path)
    try:
        with pytest.raises(InvalidBatchError, match="control character"):
            publisher.publish([{"id": 1}], database=DATABASE, schema=SCHEMA, pipe="P\nX")
    finally:
        publisher.close()


def test_unknown_pipe_and_empty_batch_become_dead_letters_with_their_reason(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    publisher = _publisher(emu, db, tmp_path)
    env_worker = worker_env(
        emu, db.url, tmp_path / "key.pem", queue=publisher.settings.queue_name
    )
    worker = launch_worker(env_worker, tmp_path, name="badpipe", pool="threads", concurrency=2)
    try:
        with running(worker):
            publisher.publish([{"id": 1}], database=DATABASE, schema=SCHEMA, pipe="NOPE")
            # An empty batch published around the checks (another producer): dead-lettered too.
            publisher.app.send_task(
                "snowpipe.ingest_batch",
                kwargs={"batch_id": "empty-1", "database": DATABASE, "schema": SCHEMA,
                        "pipe": "P", "rows": []},
                queue=publisher.settings.queue_name,
            )
            # A NaN row sent around the checks: the worker refuses it with the publisher's message.
            nan_rows = [{"id": 3, "v": math.nan}]
            publisher.app.send_task(
                "snowpipe.ingest_batch",
                kwargs={"batch_id": "nan-1", "database": DATABASE, "schema": SCHEMA,
                        "pipe": "P", "rows": nan_rows},
                queue=publisher.settings.queue_name,
            )
            publisher.publish([{"id": 2}], database=DATABASE, schema=SCHEMA, pipe="P")
            # Decimal and datetime: accepted at publish time, committed as the worker writes them.
            rich = {"id": 4, "price": Decimal("12.50"), "at": datetime(2026, 1, 2, tzinfo=UTC)}
            publisher.publish([rich], database=DATABASE, schema=SCHEMA, pipe="P")
            dead = DeadLetters(db.client)
            wait_until(lambda: dead.count() >= 3, timeout=60, what="three dead letters",
                       logs=[worker])
            wait_until(lambda: len(emu.rows(DATABASE, SCHEMA, "P")) == 2, timeout=30,
                       what="the good batches", logs=[worker])
            letters = {s.letter.batch_id if s.letter.pipe == "P" else "NOPE": s.letter
                       for s in dead.entries()}
            assert "NOPE" in letters["NOPE"].reason
            assert letters["NOPE"].rows == [{"id": 1}]
            assert "no rows" in letters["empty-1"].reason
            with pytest.raises(InvalidBatchError) as refused:
                publisher.publish(nan_rows, database=DATABASE, schema=SCHEMA, pipe="P")
            assert str(refused.value) in letters["nan-1"].reason
            committed = {r["row"]["id"]: r["row"] for r in emu.rows(DATABASE, SCHEMA, "P")}
            assert committed[4] == {"id": 4, "price": 12.5, "at": "2026-01-02T00:00:00+00:00"}
    finally:
        publisher.close()


def test_a_key_the_service_rejects_keeps_batches_waiting_until_the_key_is_registered(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    # A rejected key is the node's problem, not the batch's: nothing is dead-lettered, the pump
    # says which key to register, and once it is registered the batch is delivered.
    wrong_key = key_pair("not-registered")
    wrong = wrong_key.write_private(tmp_path / "wrong.pem")
    env = worker_env(emu, db.url, wrong, queue=unique_queue("badkey"),
                     refresh_failure_backoff_cap_seconds=1)
    publisher = Publisher(load_settings(**settings_overrides(env)))
    worker = launch_worker(env, tmp_path, name="badkey", pool="threads", concurrency=2)
    try:
        with running(worker):
            publisher.publish([{"id": 1}], database=DATABASE, schema=SCHEMA, pipe="P")
            wait_until(lambda: "InvalidJWTError" in worker.log(), timeout=30,
                       what="the key problem in the log", logs=[worker])
            assert "fingerprint" in worker.log()
            assert DeadLetters(db.client).count() == 0
            # No pump could open (and settle) the new channel: the batch waits in the queue,
            # put back by the task each time it finds the channel unsettled.
            wait_until(lambda: int(db.client.hget("snowpipe:stats", "unsettled") or 0) > 0,
                       timeout=30, what="the task finding the channel unsettled",
                       logs=[worker])  # fmt: skip
            emu.register_key(ACCOUNT, USER, wrong_key.public_pem)
            wait_until(lambda: len(emu.rows(DATABASE, SCHEMA, "P")) == 1, timeout=60,
                       what="the batch delivered once the key is registered", logs=[worker])
            assert DeadLetters(db.client).count() == 0
    finally:
        publisher.close()

