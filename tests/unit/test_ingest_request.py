"""ingest_batch's request (worker/tasks.py): a batch in the NDJSON form, decoded once by the
consumer's check, reaches the pool decoded; the rows form is left to Celery."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu.message import Message

from tests.support.keys import key_pair
from tests.support.redis import free_port
from worker import intake
from worker.settings import load_settings

NAMES = {"batch_id": "b-1", "database": "DB", "schema": "PUBLIC", "pipe": "P"}


@pytest.fixture
def tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from worker import runtime

    settings = load_settings(
        account="A", user="U", account_url="http://127.0.0.1:1",
        private_key_path=key_pair("request").write_private(tmp_path / "key.pem"),
        broker_url=f"redis://127.0.0.1:{free_port()}/0",
    )  # fmt: skip
    monkeypatch.setattr(runtime, "_settings", settings)
    monkeypatch.setattr(runtime, "_runtime", None)
    from worker import tasks as module

    yield module


def request(tasks: Any, kwargs: dict[str, Any]) -> Any:
    from worker.celery_app import app

    body = json.dumps([[], kwargs, {}]).encode()
    message = Message(
        body=body, content_type="application/json", content_encoding="utf-8",
        headers={"task": "snowpipe.ingest_batch", "id": "t-1"},
        delivery_info={"exchange": "q", "routing_key": "q"}, accept=["application/json"],
    )  # fmt: skip
    assert intake.check(message) is None  # the consumer's check decodes the body (cached)
    return tasks.IngestRequest(message, app=app, task=tasks.ingest_batch, body=message.body,
                               headers=message.headers, decoded=False)  # fmt: skip


def test_an_ndjson_batch_reaches_the_pool_decoded(tasks: Any) -> None:
    kwargs = {**NAMES, "ndjson": '{"id":1}\n{"id":2}\n', "row_count": 2}
    req = request(tasks, kwargs)
    assert req.content_type is None  # Celery's trace takes the body as (args, kwargs, embed)
    assert req.body == ([], kwargs, {})
    assert req.kwargs == kwargs


def test_a_rows_batch_is_decoded_by_celery_as_before(tasks: Any) -> None:
    kwargs = {**NAMES, "rows": [{"id": 1}]}
    req = request(tasks, kwargs)
    assert req.content_type == "application/json"
    assert isinstance(req.body, bytes)
    assert req.kwargs == kwargs


def test_a_dead_letter_of_an_ndjson_batch_keeps_its_rows_with_exact_numbers(tasks: Any) -> None:
    from worker.deadletter import DeadLetter
    from worker.messages import IngestMessage

    ndjson = '{"id":1,"big":1180591620717411303425}\n{"id":2,"p":1.10,"t":-1.000E-30}\n'
    batch = IngestMessage.from_kwargs({**NAMES, "ndjson": ndjson, "row_count": 2})
    letter = DeadLetter.of(tasks._with_rows(batch), "pipe not served")
    assert letter.rows[0]["big"] == 2**70 + 1
    stored = letter.dumps()
    assert b'"big":1180591620717411303425' in stored
    assert b'"p":1.10' in stored and b'"t":-1.000E-30' in stored
    assert tasks._with_rows(batch).kwargs()["rows"] == letter.rows  # requeued as rows


@pytest.mark.parametrize(
    ("pool", "in_process"), [("threads", True), ("solo", True), ("prefork", False)]
)
def test_a_rows_batch_reaches_an_in_process_pool_decoded(
    tasks: Any, pool: str, in_process: bool
) -> None:
    from celery import concurrency

    class Worker:
        pool_cls: Any = pool

    try:
        tasks._note_pool(sender=Worker())
        assert tasks._pool_in_process.is_set() is in_process
        Worker.pool_cls = concurrency.get_implementation(pool)  # the class, as well
        tasks._note_pool(sender=Worker())
        assert tasks._pool_in_process.is_set() is in_process
        kwargs = {**NAMES, "rows": [{"id": 1}]}
        req = request(tasks, kwargs)
        assert (req.content_type is None) is in_process
        assert req.kwargs == kwargs
    finally:
        tasks._pool_in_process.clear()
