"""NDJSON encoding, compression and the split into requests under the 4 MB wire cap."""

from __future__ import annotations

import datetime as dt
import decimal
import gzip
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import pytest
import zstandard

from worker.snowpipe import encoding
from worker.snowpipe.encoding import (
    Compression,
    EncodedRows,
    encode_line,
    encode_pieces,
    encode_request,
    encode_rows,
    piece_limit,
)
from worker.snowpipe.errors import EncodingError, PermanentError, RowTooLargeError

MB4 = 4 * 1024 * 1024


def decode(piece: EncodedRows) -> list[dict[str, Any]]:
    if piece.content_encoding == "zstd":
        raw = zstandard.ZstdDecompressor().decompress(piece.body)
    elif piece.content_encoding == "gzip":
        raw = gzip.decompress(piece.body)
    else:
        raw = piece.body
    assert len(raw) == piece.uncompressed_length
    assert raw.endswith(b"\n")
    return [orjson.loads(line) for line in raw.split(b"\n")[:-1]]


def assert_covers(pieces: Sequence[EncodedRows], rows: Sequence[Mapping[str, Any]]) -> None:
    """The pieces hold exactly `rows`, in order, consecutively, each under the cap."""
    got: list[dict[str, Any]] = []
    expected_first = 0
    for piece in pieces:
        assert piece.first_row == expected_first
        assert piece.row_count == len(decode(piece)) > 0
        expected_first += piece.row_count
        got.extend(decode(piece))
    assert got == list(rows)


def test_rows_become_newline_terminated_json_lines() -> None:
    rows = [{"id": 1, "name": "é", "ok": True, "none": None}, {"id": 2, "f": 1.5, "l": [1, {}]}]
    [piece] = encode_rows(rows, compression="none")
    assert (
        piece.body
        == b'{"id":1,"name":"\xc3\xa9","ok":true,"none":null}\n{"id":2,"f":1.5,"l":[1,{}]}\n'
    )
    assert (piece.row_count, piece.first_row, piece.content_encoding) == (2, 0, None)
    assert piece.wire_bytes == piece.uncompressed_length == len(piece.body)


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_compressed_body_round_trips_and_carries_its_headers(compression: str) -> None:
    rows = [{"id": i, "text": "hello " * 20} for i in range(200)]
    [piece] = encode_rows(rows, compression=compression)  # type: ignore[arg-type]
    assert piece.content_encoding == compression
    assert piece.wire_bytes < piece.uncompressed_length
    assert decode(piece) == rows
    assert piece.headers() == {
        "Content-Type": "application/x-ndjson",
        "Content-Encoding": compression,
        "x-snowflake-uncompressed-content-length": str(piece.uncompressed_length),
    }


def test_uncompressed_body_sends_only_its_content_type() -> None:
    [piece] = encode_rows([{"a": 1}], compression="none")
    assert piece.headers() == {"Content-Type": "application/x-ndjson"}


def test_empty_batch_gives_no_requests() -> None:
    assert encode_rows([], compression="zstd") == []


def test_integers_beyond_64_bits_are_written_exactly() -> None:
    big = 12345678901234567890123456789012345678  # NUMBER(38,0)
    line = encode_line({"n": big, "neg": -(2**70), "nested": [{"x": 2**64}], "small": 5})
    assert line == (
        b'{"n":12345678901234567890123456789012345678,"neg":-1180591620717411303424,'
        b'"nested":[{"x":18446744073709551616}],"small":5}\n'
    )


def test_decimals_are_written_as_exact_numbers() -> None:
    line = encode_line({"d": decimal.Decimal("12345678901234567890.123456789")})
    assert line == b'{"d":12345678901234567890.123456789}\n'


def test_datetimes_and_uuids_are_written_as_strings() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    u = uuid.UUID(int=1)
    assert orjson.loads(encode_line({"t": when, "u": u})) == {
        "t": "2026-01-02T03:04:05+00:00",
        "u": str(u),
    }


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_floats_are_refused_naming_row_and_key(bad: float) -> None:
    rows = [{"a": 1}, {"a": 2, "b": {"c": [1, bad]}}]
    with pytest.raises(EncodingError, match=r"row 1 .*'b\.c\[1\]'"):
        encode_rows(rows)


def test_null_alone_is_fine() -> None:
    assert encode_line({"a": None}) == b'{"a":null}\n'


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({1: "x"}, "key must be str"),
        ({"a": b"bytes"}, "bytes"),
        ({"a": object()}, "object"),
        ({"d": decimal.Decimal("NaN")}, "NaN"),
    ],
)
def test_unencodable_rows_raise_naming_the_row(row: dict[Any, Any], problem: str) -> None:
    with pytest.raises(EncodingError, match=rf"row 2 .*{problem}"):
        encode_rows([{"ok": 1}, {"ok": 2}, row])


def test_a_row_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(EncodingError, match="row 0 is a list, not a mapping"):
        encode_rows([[1, 2]])  # type: ignore[list-item]


def test_encoding_errors_are_permanent() -> None:
    assert issubclass(EncodingError, PermanentError)


def test_uncompressed_split_packs_requests_up_to_the_cap() -> None:
    rows = [{"i": i, "pad": "x" * 100_000} for i in range(100)]  # ~10 MB
    pieces = encode_rows(rows, compression="none", max_request_bytes=MB4)
    assert len(pieces) == 3
    assert all(p.wire_bytes <= MB4 for p in pieces)
    assert_covers(pieces, rows)
    # Greedy: the next row would not have fitted in any earlier piece.
    line = len(encode_line(rows[0]))
    for p in pieces[:-1]:
        assert p.wire_bytes + line > MB4


def test_exactly_at_the_cap_is_one_request() -> None:
    row = {"pad": ""}
    overhead = len(encode_line(row))
    rows = [{"pad": "x" * (1000 - overhead)} for _ in range(4)]
    assert all(len(encode_line(r)) == 1000 for r in rows)
    assert len(encode_rows(rows, compression="none", max_request_bytes=4000)) == 1
    assert len(encode_rows(rows, compression="none", max_request_bytes=3999)) == 2


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_incompressible_rows_split_under_the_wire_cap(compression: str) -> None:
    rows = [{"i": i, "blob": os.urandom(40_000).hex()} for i in range(150)]  # 12 MB, ratio ~0.5
    pieces = encode_rows(rows, compression=compression, max_request_bytes=MB4)  # type: ignore[arg-type]
    assert all(p.wire_bytes <= MB4 for p in pieces)
    assert all(p.content_encoding == compression for p in pieces)
    assert_covers(pieces, rows)
    # Well filled: no more than one piece beyond the minimum the wire size needs.
    total = sum(p.wire_bytes for p in pieces)
    assert len(pieces) <= -(-total // MB4) + 1


def test_compressible_batch_over_4mb_uncompressed_fits_in_one_request() -> None:
    rows = [{"i": i, "text": "the same words again " * 10} for i in range(30_000)]  # ~7 MB
    pieces = encode_rows(rows, compression="zstd", max_request_bytes=MB4)
    assert len(pieces) == 1
    assert pieces[0].uncompressed_length > MB4
    assert_covers(pieces, rows)


def test_compression_runs_once_per_piece_plus_one_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = encoding.compress

    def counting(data: bytes, compression: Any) -> bytes:
        calls.append(len(data))
        return real(data, compression)

    monkeypatch.setattr(encoding, "compress", counting)
    rows = [{"i": i, "blob": os.urandom(20_000).hex()} for i in range(2_000)]  # ~80 MB
    pieces = encode_rows(rows, compression="zstd", max_request_bytes=MB4)
    # One sample for the ratio, then (almost always) one compression per piece.
    assert calls[0] <= 1024 * 1024 + 40_100
    assert len(calls) <= len(pieces) + 3
    assert sum(calls[1:]) <= 1.2 * sum(p.uncompressed_length for p in pieces)


def test_a_row_too_large_uncompressed_names_its_index() -> None:
    rows = [{"a": 1}, {"a": 2}, {"big": "x" * 5000}, {"a": 3}]
    with pytest.raises(RowTooLargeError) as info:
        encode_rows(rows, compression="none", max_request_bytes=4096)
    assert info.value.row_index == 2
    assert "row 2" in str(info.value)
    assert info.value.limit == 4096


def test_a_row_too_large_after_compression_names_its_index() -> None:
    rows = [{"a": i} for i in range(5)] + [{"blob": os.urandom(3000).hex()}]
    with pytest.raises(RowTooLargeError, match="row 5"):
        encode_rows(rows, compression="zstd", max_request_bytes=2048)


def test_a_large_row_that_compresses_below_the_cap_is_sent() -> None:
    rows = [{"a": 1}, {"big": "y" * 50_000}, {"a": 2}]
    pieces = encode_rows(rows, compression="gzip", max_request_bytes=4096)
    assert all(p.wire_bytes <= 4096 for p in pieces)
    assert_covers(pieces, rows)


def test_unknown_compression_is_refused() -> None:
    with pytest.raises(ValueError, match="use zstd, gzip or none"):
        encode_rows([{"a": 1}], compression="brotli")  # type: ignore[arg-type]


# --- log pieces and coalesced requests ---------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_pieces_keep_rows_in_order_and_each_fits_one_request(compression: Compression) -> None:
    cap = 64 * 1024
    rows = [{"id": i, "blob": os.urandom(600).hex()} for i in range(300)]
    pieces = encode_pieces(rows, compression=compression, max_request_bytes=cap)
    assert len(pieces) > 1
    assert sum(n for n, _ in pieces) == len(rows)
    lines = b"".join(data for _, data in pieces).splitlines()
    assert [orjson.loads(line)["id"] for line in lines] == list(range(300))
    for n, data in pieces:
        assert len(data) <= piece_limit(compression, cap)
        assert encode_request(data, n, compression).wire_bytes <= cap


def test_a_large_row_that_compresses_under_the_cap_is_a_piece_of_its_own() -> None:
    cap = 8 * 1024
    rows = [{"id": 0}, {"id": 1, "text": "a" * 50_000}, {"id": 2}]
    pieces = encode_pieces(rows, compression="zstd", max_request_bytes=cap)
    assert [n for n, _ in pieces] == [1, 1, 1]
    assert encode_request(pieces[1][1], 1, "zstd").wire_bytes <= cap


def test_a_row_that_cannot_fit_one_request_is_refused_by_index() -> None:
    with pytest.raises(RowTooLargeError, match="row 1"):
        encode_pieces([{"id": 0}, {"b": os.urandom(20_000).hex()}], max_request_bytes=8 * 1024)
