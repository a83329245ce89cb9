"""One row contract: the publisher accepts exactly the rows the worker can encode, and refuses the
rest with the same error and message (worker.snowpipe.encoding.encode_row)."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import math
import os
import uuid
from typing import Any

import orjson
import pytest
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

from worker.deadletter import DeadLetter
from worker.errors import EncodingError, InvalidBatchError, RowTooLargeError
from worker.messages import IngestMessage
from worker.publish import check_batch
from worker.settings import Settings
from worker.snowpipe.encoding import encode_pieces, encode_row

MB4 = 4 * 1024 * 1024


def settings(**overrides: Any) -> Settings:
    return Settings(account="a", user="u", private_key="unused", **overrides)


def publisher_error(rows: list[Any]) -> InvalidBatchError:
    with pytest.raises(InvalidBatchError) as info:
        check_batch(rows, database="DB", schema="S", pipe="P", settings=settings())
    return info.value


def worker_error(rows: list[Any]) -> EncodingError:
    s = settings()
    with pytest.raises(EncodingError) as info:
        encode_pieces(rows, compression=s.compression, max_request_bytes=s.max_request_bytes)
    return info.value


RICH_ROW = {
    "id": 1,
    "price": decimal.Decimal("12345678901234567890.123456789"),
    "at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    "day": dt.date(2026, 1, 2),
    "time": dt.time(3, 4, 5),
    "uid": uuid.UUID(int=1),
    "big": 2**70,
    "nested": {"d": decimal.Decimal("1.10"), "list": [1, "x", None]},
}


def test_decimal_datetime_and_friends_are_accepted_by_publisher_and_worker() -> None:
    assert check_batch([RICH_ROW], database="DB", schema="S", pipe="P", settings=settings())
    ((count, ndjson),) = encode_pieces([RICH_ROW])
    assert count == 1
    assert orjson.loads(ndjson)["at"] == "2026-01-02T03:04:05+00:00"
    assert b'"price":12345678901234567890.123456789' in ndjson


def test_what_the_publisher_sends_reaches_the_worker_unchanged_through_the_broker_json() -> None:
    # Celery's JSON (kombu) carries Decimal, datetimes and UUIDs with their types, so the worker
    # encodes what the producer passed: the same line as encoding the row in the producer.
    kwargs = IngestMessage("b", "DB", "S", "P", [RICH_ROW]).kwargs()
    received = kombu_loads(kombu_dumps(kwargs))
    assert encode_row(received["rows"][0]) == encode_row(RICH_ROW)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": 1}, {"id": 2, "v": {1, 2}}], "row 1 is not JSON-serialisable"),
        ([{"id": 1, "v": object()}], "row 0 is not JSON-serialisable"),
        ([{"id": 1, "b": b"bytes"}], "row 0 is not JSON-serialisable"),
        ([{1: "x"}], "row 0 is not JSON-serialisable"),
        ([{"id": 1, "v": {"w": [math.nan]}}], "row 0 has a NaN or infinite float at 'v.w[0]'"),
        ([{"d": decimal.Decimal("Infinity")}], "row 0 is not JSON-serialisable: Decimal"),
        ([{}], "row 0 is empty"),
        (["not a dict"], "row 0 is a str, not a mapping"),
    ],
    ids=["set", "object", "bytes", "int-key", "nan", "decimal-inf", "empty-row", "str-row"],
)
def test_a_bad_row_is_refused_by_both_with_the_same_message(rows: list[Any], message: str) -> None:
    published = publisher_error(rows)
    encoded = worker_error(rows)
    assert type(published) is type(encoded)
    assert str(published) == str(encoded)
    assert message in str(published)


def test_an_oversized_row_is_judged_on_the_wire_by_both() -> None:
    # 5 MB of one repeated byte compresses far under the cap: both accept it.
    compressible = [{"blob": "x" * (5 * 1024 * 1024)}]
    check_batch(compressible, database="DB", schema="S", pipe="P", settings=settings())
    assert encode_pieces(compressible, max_request_bytes=MB4)[0][0] == 1
    # Random data does not compress: both refuse it, naming the row and the cap.
    incompressible = [{"id": 1}, {"blob": base64.b64encode(os.urandom(4 * 1024 * 1024)).decode()}]
    published = publisher_error(incompressible)
    assert isinstance(published, RowTooLargeError)
    assert str(published) == str(worker_error(incompressible))
    assert "row 1 alone is" in str(published)


def test_a_dead_letter_keeps_decimal_and_big_integers_exactly() -> None:
    letter = DeadLetter.of(IngestMessage("b", "DB", "S", "P", [RICH_ROW], 2), "why", task_id="t")
    stored = orjson.loads(letter.dumps())
    assert stored["attempts"] == 2 and stored["task_id"] == "t" and stored["kind"] == "failed"
    assert b'"price":12345678901234567890.123456789' in letter.dumps()
    assert b'"big":1180591620717411303424' in letter.dumps()
