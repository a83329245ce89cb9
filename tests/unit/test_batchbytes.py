"""A batch's bytes (worker/batchbytes.py): the rows form encoded with one orjson call, the NDJSON
form checked line by line and kept as sent, and the errors that name the row or the line."""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from typing import Any

import orjson
import pytest
from kombu.message import Message

from worker import intake, serialization
from worker.batchbytes import ndjson_pieces, parse_rows, rows_ndjson, rows_pieces
from worker.errors import EncodingError, NdjsonBatchError, RowTooLargeError
from worker.messages import IngestMessage
from worker.snowpipe.encoding import encode_line, encode_pieces

CAP = 4 * 1024 * 1024
ROWS: list[dict[str, Any]] = [
    {
        "id": i,
        "s": 'a "quoted" line\nbreak },\n,{ and é ✓',
        "amount": decimal.Decimal("1.10"),
        "tiny": decimal.Decimal("-1.000E-30"),
        "at": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "day": datetime.date(2026, 1, 2),
        "uid": uuid.UUID(int=i),
        "none": None,
        "f": i * 0.5,
        "nested": {"list": [1, "two", None, {"x": [True, False]}], "empty": {}},
        "max": 2**64 - 1,
        "min": -(2**63),
    }
    for i in range(40)
]


def test_the_whole_batch_is_encoded_as_each_row_would_be() -> None:
    data = rows_ndjson(ROWS)
    assert data == b"".join(encode_line(row, i) for i, row in enumerate(ROWS))
    assert data is not None and data.count(b"\n") == len(ROWS)
    assert rows_pieces(ROWS, compression="zstd", max_request_bytes=CAP) == [(len(ROWS), data)]


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_large_batches_split_as_the_per_row_encoder_splits_them(compression: Any) -> None:
    rows = [{"id": i, "pad": "x" * (i % 700)} for i in range(400)]
    cap = 40_000
    got = rows_pieces(rows, compression=compression, max_request_bytes=cap)
    assert got == encode_pieces(rows, compression=compression, max_request_bytes=cap)
    assert len(got) > 2 and sum(n for n, _ in got) == len(rows)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": 1}, {"x": float("nan")}], "row 1 has a NaN or infinite float at 'x'"),
        ([{"id": 1}, {"x": [1, float("inf")]}], "row 1 has a NaN or infinite float at 'x[1]'"),
        ([{"id": 1}, {}], "row 1 is empty"),
        ([{"id": 1}, [1, 2]], "row 1 is a list, not a mapping"),
        ([{"id": 1}, {1: "a"}], "row 1 is not JSON-serialisable"),
        ([{"id": 1}, {"s": {1, 2}}], "row 1 is not JSON-serialisable"),
        ([{"d": decimal.Decimal("NaN")}], "row 0 is not JSON-serialisable: Decimal NaN"),
    ],
)
def test_a_bad_row_falls_back_to_the_row_contract_which_names_it(
    rows: list[Any], message: str
) -> None:
    assert rows_ndjson(rows) is None
    with pytest.raises(EncodingError, match=message.replace("[", r"\[").replace("]", r"\]")):
        rows_pieces(rows, compression="zstd", max_request_bytes=CAP)


def test_integers_beyond_64_bits_take_the_exact_per_row_path() -> None:
    rows = [{"id": 1, "big": 2**70 + 1}, {"id": 2, "neg": -(10**30) - 7}]
    assert rows_ndjson(rows) is None
    [(count, data)] = rows_pieces(rows, compression="zstd", max_request_bytes=CAP)
    assert count == 2
    big = b'{"id":1,"big":1180591620717411303425}\n'
    neg = b'{"id":2,"neg":-1000000000000000000000000000007}\n'
    assert data == big + neg


def test_a_row_over_the_cap_is_named() -> None:
    rows = [{"id": 1}, {"id": 2, "pad": "ab" * 20_000}]
    with pytest.raises(RowTooLargeError, match="row 1 alone"):
        rows_pieces(rows, compression="none", max_request_bytes=10_000)


# --- the NDJSON form ------------------------------------------------------------------------------


def pieces(text: str | bytes, **kw: Any) -> list[tuple[int, bytes]]:
    return ndjson_pieces(text, compression="zstd", max_request_bytes=CAP, **kw)


def test_ndjson_is_kept_byte_for_byte_numbers_included() -> None:
    text = (
        '{"id": 1, "big": 123456789012345678901234567890}\n'
        '{"id":2,"price":0.1000000000000000055511151231257827,"z":1.10}\r\n'
        '{ "id" : 3 , "s" : "é ✓ \\n" }\n'
    )
    assert pieces(text, row_count=3) == [(3, text.encode())]


def test_the_last_newline_is_optional() -> None:
    assert pieces('{"a":1}\n{"b":2}') == [(2, b'{"a":1}\n{"b":2}\n')]
    assert pieces(b'{"a":1}') == [(1, b'{"a":1}\n')]


def test_a_large_ndjson_batch_is_split_on_line_boundaries() -> None:
    lines = [orjson.dumps({"id": i, "pad": "y" * (i % 900)}) for i in range(300)]
    text = b"\n".join(lines) + b"\n"
    got = ndjson_pieces(text, compression="none", max_request_bytes=10_000)
    assert len(got) > 3
    assert b"".join(data for _, data in got) == text
    assert sum(n for n, _ in got) == 300
    assert all(len(data) <= 10_000 for _, data in got)
    assert all(data.count(b"\n") == n for n, data in got)


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ('{"a":1}\n\n{"b":2}\n', 2, "is empty"),
        ('{"a":1}\n{"b":2}\n\n', 3, "is empty"),
        ('{"a":1}\n   \n', 2, "is empty"),
        ('{"a":1}\n[1, 2]\n', 2, "is an array, not a JSON object"),
        ('{"a":1}\n"text"\n', 2, "is a string, not a JSON object"),
        ('{"a":1}\n{"b":2}\n42\n', 3, "is a number, not a JSON object"),
        ('{"a":1}\nnull\n', 2, "is null, not a JSON object"),
        ('{"a":1}\n{}\n', 2, "is an empty object"),
        ('{"a":1}\n{"a":\n', 2, "is not JSON"),
        ('{"a":1},{"b":2}\n', 1, "is not JSON"),
        ('{"a":NaN}\n', 1, "is not JSON"),
        ('{"a":1}\n{"b":"x\ud800"}\n', 2, "is not valid UTF-8"),
        (b'{"a":1}\n{"a":1}\n{"b":"\xff"}\n', 3, "is not valid UTF-8 (byte 7 of the line)"),
        # Two bad lines that would make a valid array if joined by commas: still found.
        ('{"a":1},{"b":[1\n2]}\n', 1, "is not JSON"),
    ],
)
def test_a_bad_line_is_named_with_the_fix(text: str | bytes, line: int, problem: str) -> None:
    with pytest.raises(NdjsonBatchError) as caught:
        pieces(text)
    assert caught.value.line == line
    assert f"ndjson line {line} {problem}" in str(caught.value)
    assert "send one non-empty JSON object per line" in str(caught.value)


def test_a_line_over_the_cap_is_named() -> None:
    text = '{"a":1}\n{"pad":"' + "x" * 9000 + '"}\n'
    with pytest.raises(NdjsonBatchError, match=r"ndjson line 2 is 9011 bytes uncompressed, over"):
        ndjson_pieces(text, compression="none", max_request_bytes=5000)


def test_a_wrong_row_count_is_refused() -> None:
    with pytest.raises(NdjsonBatchError, match="row_count is 3 but ndjson holds 2 line"):
        pieces('{"a":1}\n{"b":2}\n', row_count=3)


def test_an_empty_ndjson_is_refused() -> None:
    with pytest.raises(NdjsonBatchError, match="ndjson is empty"):
        pieces("")


def test_parse_rows_reads_numbers_exactly_for_dead_letters() -> None:
    rows = parse_rows('{"big":123456789012345678901234567890,"p":1.10}\n{"e":-1.000E-30}\n')
    assert rows == [
        {"big": 123456789012345678901234567890, "p": decimal.Decimal("1.10")},
        {"e": decimal.Decimal("-1.000E-30")},
    ]
    assert str(rows[0]["p"]) == "1.10"
    with pytest.raises(ValueError, match="line 2 is an array"):
        parse_rows('{"a":1}\n[1]\n')


# --- the message ---------------------------------------------------------------------------------

NAMES = {"batch_id": "b-1", "database": "db", "schema": "PUBLIC", "pipe": "P"}


def test_the_ndjson_form_of_the_message() -> None:
    batch = IngestMessage.from_kwargs({**NAMES, "ndjson": '{"a":1}\n{"b":2}\n', "row_count": 2})
    assert (batch.form, batch.size, batch.rows, batch.row_count) == ("ndjson", 2, [], 2)
    assert batch.database == "DB"
    assert batch.kwargs() == {**NAMES, "database": "DB", "ndjson": '{"a":1}\n{"b":2}\n',
                              "row_count": 2}  # fmt: skip
    again = batch.again(attempt=2, outage_since=5.0)
    assert IngestMessage.from_kwargs(again.kwargs()) == again
    assert IngestMessage.from_kwargs({**NAMES, "ndjson": '{"a":1}'}).size == 1


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"ndjson": '{"a":1}\n', "rows": [{"a": 1}]}, "both rows and ndjson"),
        ({"rows": [{"a": 1}], "row_count": 1}, "row_count goes with ndjson only"),
        ({"ndjson": [{"a": 1}]}, "ndjson must be a string of NDJSON lines, got an array"),
        ({"ndjson": ""}, "ndjson is empty"),
        ({"ndjson": '{"a":1}\n', "row_count": 0}, "row_count must be the number of lines"),
        ({"ndjson": '{"a":1}\n', "row_count": "1"}, "row_count must be the number of lines"),
        ({"ndjson": '{"a":1}\n', "row_count": True}, "row_count must be the number of lines"),
        ({}, "missing keyword argument(s) rows"),
    ],
)
def test_a_bad_ndjson_message_is_malformed_at_intake(kwargs: dict[str, Any], reason: str) -> None:
    body = json.dumps([[], {**NAMES, **kwargs}, {}]).encode()
    m = Message(
        body=body, content_type="application/json", content_encoding="utf-8",
        headers={"task": "snowpipe.ingest_batch", "id": "t-1"},
        delivery_info={"exchange": "q", "routing_key": "q"}, accept=["application/json"],
    )  # fmt: skip
    problem = intake.check(m)
    assert problem is not None
    assert reason in problem.reason
    assert problem.fields["batch_id"] == "b-1"


def test_an_ndjson_message_passes_intake_and_decodes_with_orjson() -> None:
    ndjson = '{"id":1,"big":123456789012345678901234567890}\n{"id":2,"p":1.10}\n'
    body = json.dumps([[], {**NAMES, "ndjson": ndjson, "row_count": 2}, {}])
    m = Message(
        body=body.encode(), content_type="application/json", content_encoding="utf-8",
        headers={"task": "snowpipe.ingest_batch", "id": "t-1"},
        delivery_info={"exchange": "q", "routing_key": "q"}, accept=["application/json"],
    )  # fmt: skip
    assert intake.check(m) is None
    assert serialization.loads(body)[1]["ndjson"] == ndjson


# --- the producer ---------------------------------------------------------------------------------


def test_the_producer_encodes_the_batch_once_as_the_worker_would() -> None:
    from worker.publish import encode_batch
    from worker.settings import Settings

    s = Settings(account="a", user="u", private_key="unused")
    rows = [*ROWS, {"big": 2**70 + 1, "neg": -(10**30)}]
    data, count = encode_batch(rows, database="DB", schema="S", pipe="P", settings=s)
    assert count == len(rows)
    assert data == b"".join(encode_line(row, i) for i, row in enumerate(rows))
    assert ndjson_pieces(data.decode(), row_count=count, compression="zstd",
                         max_request_bytes=CAP) == [(count, data)]  # fmt: skip
    for bad, message in (([{"id": 1}, {}], "row 1 is empty"), ([{"x": float("nan")}], "row 0")):
        with pytest.raises(EncodingError, match=message):
            encode_batch(bad, database="DB", schema="S", pipe="P", settings=s)
