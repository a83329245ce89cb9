"""The consumer's check of every message (worker/intake.py), on kombu messages built in memory."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from kombu.message import Message

from worker import intake
from worker.observability import OTHER_PIPE, PIPE_LABELS_MAX, pipe_label, serve_pipe_labels

INGEST = "snowpipe.ingest_batch"
GOOD = {"batch_id": "b-1", "database": "DB", "schema": "PUBLIC", "pipe": "P", "rows": [{"id": 1}]}


def message(
    body: Any = None,
    headers: dict[str, Any] | None = None,
    content_type: str | None = "application/json",
) -> Message:
    if body is None:
        body = [[], GOOD, {}]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Message(
        body=data,
        content_type=content_type,
        content_encoding="utf-8",
        headers={"task": INGEST, "id": "t-1"} if headers is None else headers,
        delivery_info={"exchange": "q", "routing_key": "q"},
        accept=["application/json"],
    )


def test_a_valid_batch_passes_and_its_body_is_decoded_once() -> None:
    m = message()
    assert intake.check(m) is None
    assert m.payload == [[], GOOD, {}]  # kombu's cache: Celery reads it without decoding again
    refresh = message([[], {}, {"callbacks": None}], {"task": "snowpipe.refresh_tokens", "id": "r"})
    assert intake.check(refresh) is None


@pytest.mark.parametrize(
    ("m", "reason"),
    [
        (message({"hello": "world"}), "the body is a JSON object, not Celery's [args, kwargs"),
        (message(b"not json"), "the body is not JSON"),
        (message(content_type="application/x-python-serialize"), "is not application/json"),
        (message(content_type=None), "content type None is not application/json"),
        (message(headers={}), "no 'task' header"),
        (message(headers={"task": "x.y", "id": "1"}), "unknown task 'x.y'"),
        (message(headers={"task": ["x"], "id": "1"}), "unknown task ['x']"),
        (message(headers={"task": "snowpipe.dead_letter_message", "id": "1"}), "unknown task"),
        (message(headers={"task": INGEST}), "the 'id' header is null"),
        (message(headers={"task": INGEST, "id": "1", "timelimit": "x"}), "'timelimit' header"),
        (message(headers={"task": INGEST, "id": "1", "eta": "soon"}), "not an ISO 8601 time"),
        (message(headers={"task": INGEST, "id": "1", "expires": "2030-01-01T00:00:00"}),
         "a batch never expires"),
        (message(headers={"task": INGEST, "id": "1", "retries": "3"}), "'retries' header"),
        (message([["b-1"], GOOD, {}]), "positional arguments"),
        (message([[], GOOD, {"chain": [{"task": "x"}]}]), "links other tasks (chain)"),
        (message([[], GOOD, 5]), "the embed part is int"),
        (message([[], {**GOOD, "pipe": "X|Y"}, {}]), "contains '|'"),
        (message([[], {**GOOD, "rows": "[]"}, {}]), "rows must be an array"),
        (message([[], {"a": 1}, {}], {"task": "snowpipe.refresh_tokens", "id": "r"}),
         "takes no arguments"),
    ],
)  # fmt: skip
def test_a_message_the_worker_cannot_run_is_a_problem_with_its_reason(
    m: Message, reason: str
) -> None:
    problem = intake.check(m)
    assert problem is not None
    assert reason in problem.reason
    assert problem.raw == m.body


def test_the_readable_names_of_a_bad_batch_are_kept() -> None:
    problem = intake.check(message([[], {**GOOD, "batch_id": "b-9", "pipe": ".."}, {}]))
    assert problem is not None
    assert problem.fields == {"batch_id": "b-9", "database": "DB", "schema": "PUBLIC",
                              "pipe": ".."}  # fmt: skip


def test_an_unreadable_redis_item_is_read_back_from_its_hex_body() -> None:
    raw = b"\xff\x00 not an envelope"
    m = message(raw.hex().encode(), {intake.UNREADABLE_HEADER: "not-json"},
                content_type=intake.UNREADABLE_CONTENT_TYPE)  # fmt: skip
    problem = intake.check(m)
    assert problem is not None
    assert problem.raw == raw
    assert "the Redis list item is not JSON" in problem.reason


def test_the_dead_letter_keeps_text_or_base64_and_the_message_detail() -> None:
    assert intake.raw_text(b"{}") == ("{}", {"raw_bytes": 2, "raw_encoding": "text"})
    text, note = intake.raw_text(b"\xff")
    assert base64.b64decode(text) == b"\xff" and note["raw_encoding"] == "base64"
    big = b"x" * (intake.RAW_MAX_BYTES + 5)
    text, note = intake.raw_text(big)
    assert len(text) == intake.RAW_MAX_BYTES
    assert note == {"raw_bytes": len(big), "raw_truncated": True, "raw_encoding": "text"}

    m = message({"hello": "world"})
    problem = intake.check(m)
    assert problem is not None
    kwargs = intake.malformed_kwargs(m, problem)
    assert kwargs["raw"] == '{"hello": "world"}' and kwargs["task_id"] == "t-1"
    assert kwargs["detail"]["task"] == INGEST and kwargs["detail"]["routing_key"] == "q"
    assert kwargs["detail"]["headers"] == {"task": INGEST, "id": "t-1"}
    assert len(kwargs["letter_id"]) == 32


def test_pipe_labels_are_bounded() -> None:
    try:
        serve_pipe_labels([("DB", "PUBLIC", "P")])
        assert pipe_label("DB.PUBLIC.P") == "DB.PUBLIC.P"
        assert pipe_label("DB.PUBLIC.Q") == OTHER_PIPE
        serve_pipe_labels(None)
        labels = {pipe_label(f"DB.PUBLIC.P{n}") for n in range(PIPE_LABELS_MAX + 50)}
        assert len(labels) == PIPE_LABELS_MAX + 1 and OTHER_PIPE in labels
        assert pipe_label("DB.PUBLIC.P0") == "DB.PUBLIC.P0"  # a label once given stays
    finally:
        serve_pipe_labels(None)
