"""Rows to append-request bodies: NDJSON by orjson, compressed, split to fit Snowflake's size cap.

The row contract is `encode_row(row, index, compression=..., max_request_bytes=...)`: the one
function that decides whether a row is valid. The publisher (`worker.publish.check_batch`)
refuses with its error what it refuses, and the worker (`encode_pieces`, in the task) encodes
with it, so a row is accepted by both or refused by both, with the same `EncodingError` (an
`InvalidBatchError`) and the same message naming the row and the fix. A valid row:

- is a non-empty mapping with `str` keys (no silent key coercion);
- holds values orjson writes natively (str, int, float, bool, None, list, tuple, dict,
  datetime/date/time as RFC 3339, UUID) or `decimal.Decimal` (an exact JSON number); the
  broker's JSON (kombu) carries each of these, Decimal and datetimes included;
- has no NaN or infinite float (nor Decimal);
- fits one request on the wire after compression (`max_request_bytes`, 4 MB).

`encode_rows(rows, compression=..., max_request_bytes=...)` returns consecutive `EncodedRows`,
each one request body of at most `max_request_bytes` on the wire (after compression; Snowflake's
cap is 4 MB per append), in row order, never splitting a row. A row that alone cannot fit raises
`RowTooLargeError` naming its index.

Encoding decisions:

- orjson refuses integers beyond 64 bits, but Snowflake's NUMBER(38,0) holds them. Such a row is
  re-encoded with those integers written as exact JSON numbers (orjson `Fragment`): same output
  shape, no float rounding, no second JSON library. Only rows that hit the limit pay for it.
- JSON has no NaN or infinity and orjson would write them as `null`, silently changing the data.
  A row whose line contains `null` is checked, and a non-finite float raises `EncodingError`
  naming the row and the key. (Rows without `null` cannot hold one, so the check is nearly free.)
- Each line ends with `\\n` (RFC 8259 JSON text per line, as the API requires).

Splitting is "estimate, then verify": the whole payload is compressed once; if it fits, that is
the one request. Otherwise the measured compression ratio sizes chunks of uncompressed lines,
each chunk is compressed once, and the rare chunk that still exceeds the cap is halved and
recompressed. No loop compresses the same bytes over and over.
"""

from __future__ import annotations

import decimal
import json
import math
import re
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
import zstandard

from worker.errors import EncodingError, RowTooLargeError

__all__ = [
    "NDJSON_CONTENT_TYPE",
    "Compression",
    "EncodedRows",
    "compress",
    "decode_exact",
    "encode_line",
    "encode_pieces",
    "encode_request",
    "encode_row",
    "encode_rows",
    "piece_limit",
    "to_json",
]

Compression = Literal["zstd", "gzip", "none"]

NDJSON_CONTENT_TYPE: Final = "application/x-ndjson"
UNCOMPRESSED_LENGTH_HEADER: Final = "x-snowflake-uncompressed-content-length"
# zstd level 3 is zstd's own default: fast, and it compresses row data well.
ZSTD_LEVEL: Final = 3
# zlib's level 6 is gzip's usual default (gzip.compress() uses 9, which is far slower).
GZIP_LEVEL: Final = 6
# Chunks are sized to this fraction of the cap (by the measured ratio) so few need a second pass.
_SIZE_SAFETY: Final = 0.9
# Payloads up to this many times the cap are compressed whole (they probably fit in one request);
# bigger ones learn the compression ratio from a sample of _SAMPLE_BYTES.
_WHOLE_FACTOR: Final = 8
_SAMPLE_BYTES: Final = 1024 * 1024
_SCALARS: Final = frozenset({str, int, bool, type(None)})
_INT64_MIN: Final = -(2**63)
_UINT64_MAX: Final = 2**64 - 1


@dataclass(frozen=True, slots=True)
class EncodedRows:
    """One append request's body: the bytes on the wire and what they hold."""

    body: bytes  # on the wire: compressed when content_encoding is set
    row_count: int
    first_row: int  # index of the first row in the input sequence
    uncompressed_length: int  # bytes of NDJSON before compression
    content_encoding: Literal["zstd", "gzip"] | None

    @property
    def wire_bytes(self) -> int:
        """Size of the request body as sent."""
        return len(self.body)

    @property
    def last_row(self) -> int:
        """Index of the last row in the input sequence."""
        return self.first_row + self.row_count - 1

    def headers(self) -> dict[str, str]:
        """The content headers for this body (type, encoding and uncompressed length)."""
        headers = {"Content-Type": NDJSON_CONTENT_TYPE}
        if self.content_encoding is not None:
            headers["Content-Encoding"] = self.content_encoding
            headers[UNCOMPRESSED_LENGTH_HEADER] = str(self.uncompressed_length)
        return headers


# --- one row -------------------------------------------------------------------------------------

_local = threading.local()  # per-thread zstd compressor and the last default() problem


def _default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            # orjson replaces a default's message with its own: leave ours for encode_line.
            _local.default_problem = f"Decimal {value} has no JSON form; send None or a number"
            raise TypeError(_local.default_problem)
        return orjson.Fragment(str(value).encode())
    raise TypeError(f"type {type(value).__name__} is not JSON-serialisable")


def _problem(exc: TypeError) -> str:
    problem: str | None = getattr(_local, "default_problem", None)
    if problem is not None:
        _local.default_problem = None
        return problem
    return str(exc)


def _exact_big_ints(value: Any) -> Any:
    """`value` with integers beyond 64 bits replaced by exact JSON number fragments."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value < _INT64_MIN or value > _UINT64_MAX:
            return orjson.Fragment(str(value).encode())
        return value
    if isinstance(value, Mapping):
        return {k: _exact_big_ints(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_exact_big_ints(v) for v in value]
    return value


def _non_finite_path(value: Any, path: str = "") -> str | None:
    """Where in `value` a NaN or infinite float sits (a key path), or None."""
    # Exact type checks first: this runs for every row holding a null, so keep it cheap.
    kind = type(value)
    if kind is float:
        return None if math.isfinite(value) else (path or "<row>")
    if kind in _SCALARS:
        return None
    if kind is dict or (kind is not list and kind is not tuple and isinstance(value, Mapping)):
        for k, v in value.items():
            if type(v) in _SCALARS:
                continue
            found = _non_finite_path(v, f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
    elif kind is list or kind is tuple:
        for i, v in enumerate(value):
            found = _non_finite_path(v, f"{path}[{i}]")
            if found is not None:
                return found
    elif isinstance(value, float):  # a float subclass
        return None if math.isfinite(value) else (path or "<row>")
    return None


def encode_line(row: Mapping[str, Any], index: int = 0) -> bytes:
    """One row as an NDJSON line ending in `\\n`; `EncodingError` naming `index` if impossible.

    Every rule of the row contract but the size cap (`encode_row` adds that one).
    """
    if type(row) is not dict:
        if not isinstance(row, Mapping):
            raise EncodingError(
                f"row {index} is a {type(row).__name__}, not a mapping: each row must be a JSON "
                "object (a dict of column name -> value)"
            )
        row = dict(row)
    if not row:
        raise EncodingError(f"row {index} is empty: every row needs at least one column")
    try:
        line = orjson.dumps(row, default=_default, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError as exc:
        if "64-bit" not in str(exc):
            raise _not_serialisable(index, exc) from None
        try:
            line = orjson.dumps(
                _exact_big_ints(row), default=_default, option=orjson.OPT_APPEND_NEWLINE
            )
        except TypeError as again:
            raise _not_serialisable(index, again) from None
    if b"null" in line:
        where = _non_finite_path(row)
        if where is not None:
            raise EncodingError(
                f"row {index} has a NaN or infinite float at {where!r}: JSON cannot carry it; "
                "send None (SQL NULL) or a finite number"
            )
    return line


def _not_serialisable(index: int, exc: TypeError) -> EncodingError:
    return EncodingError(f"row {index} is not JSON-serialisable: {_problem(exc)}")


def encode_row(
    row: Mapping[str, Any],
    index: int = 0,
    *,
    compression: Compression = "zstd",
    max_request_bytes: int = 4 * 1024 * 1024,
) -> bytes:
    """The row contract (module docstring): `row` as its NDJSON line, or `EncodingError` /
    `RowTooLargeError` naming `index`. Only a row over a log piece's size is compressed (to see
    whether it still fits one request), so the common row costs one orjson call."""
    line = encode_line(row, index)
    if len(line) > piece_limit(compression, max_request_bytes):
        _check_fits(line, index, compression, max_request_bytes)
    return line


def _check_fits(line: bytes, index: int, compression: Compression, max_request_bytes: int) -> None:
    """`RowTooLargeError` unless the (large) line alone fits one request on the wire."""
    wire = len(line) if compression == "none" else len(compress(line, compression))
    if wire > max_request_bytes:
        raise _too_large(index, wire, max_request_bytes, compression)


# A run of 16 digits or more: a number a double may not hold exactly (an integer beyond 2**53 or
# 64 bits, a long fraction). Text without one decodes exactly with orjson.
_LONG_NUMBER: Final = re.compile(rb"\d{16}")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_exact(data: bytes, *, decimal_fractions: bool = False) -> Any:
    """JSON text (a row, a stored letter) decoded with every number as written: an integer of
    any size stays an int and, in text with a long number (or always, with
    `decimal_fractions`), a fraction becomes a `Decimal`, which `encode_line` and `to_json`
    write back digit for digit (orjson alone would round both through a double). Raises
    ValueError (orjson's or json's decode error) for text that is not JSON, NaN and Infinity
    included."""
    if not decimal_fractions and _LONG_NUMBER.search(data) is None:
        return orjson.loads(data)
    return json.loads(data, parse_float=decimal.Decimal, parse_constant=_refuse_constant)


def to_json(value: Any, option: int = 0) -> bytes:
    """`value` as JSON with row values written as `encode_line` writes them (Decimal as an exact
    number, integers beyond 64 bits exactly); for records that hold rows (dead letters).
    `option`: orjson's options (`orjson.OPT_INDENT_2` for a listing)."""
    try:
        return orjson.dumps(value, default=_default, option=option)
    except TypeError as exc:
        if "64-bit" not in str(exc):
            raise
        return orjson.dumps(_exact_big_ints(value), default=_default, option=option)


# --- compression ---------------------------------------------------------------------------------


def _zstd() -> zstandard.ZstdCompressor:
    # A ZstdCompressor must not be used by two threads at once: one per thread, reused.
    compressor: zstandard.ZstdCompressor | None = getattr(_local, "zstd", None)
    if compressor is None:
        compressor = _local.zstd = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, write_content_size=True
        )
    return compressor


def compress(data: bytes, compression: Compression) -> bytes:
    """`data` compressed as `compression` (`none` returns it unchanged)."""
    if compression == "zstd":
        return bytes(_zstd().compress(data))
    if compression == "gzip":
        # wbits=31: gzip framing; no file name or mtime, so equal input gives equal bytes.
        obj = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        return obj.compress(data) + obj.flush()
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}: use zstd, gzip or none")


# --- splitting -----------------------------------------------------------------------------------


def encode_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    compression: Compression = "zstd",
    max_request_bytes: int = 4 * 1024 * 1024,
) -> list[EncodedRows]:
    """Consecutive request bodies holding `rows` in order, each at most `max_request_bytes`.

    Raises `EncodingError` for a row that is not a JSON object of JSON values and
    `RowTooLargeError` for a row that alone exceeds the cap; both name the row's index.
    An empty `rows` gives an empty list.
    """
    if compression not in ("zstd", "gzip", "none"):
        raise ValueError(f"unknown compression {compression!r}: use zstd, gzip or none")
    if max_request_bytes <= 0:
        raise ValueError("max_request_bytes must be positive (SNOWPIPE_MAX_REQUEST_BYTES)")
    if not rows:
        return []
    lines = [encode_line(row, i) for i, row in enumerate(rows)]
    encoding: Literal["zstd", "gzip"] | None = None if compression == "none" else compression

    if compression == "none":
        return _split_plain(lines, max_request_bytes)

    payload = b"".join(lines)
    if len(payload) <= _WHOLE_FACTOR * max_request_bytes:
        # Likely one request: compress it all; the result is the body when it fits.
        body = compress(payload, compression)
        if len(body) <= max_request_bytes:
            return [EncodedRows(body, len(lines), 0, len(payload), encoding)]
        ratio = len(body) / len(payload)
    else:
        # Surely several requests: a sample is enough to learn the ratio.
        sample = payload[:_SAMPLE_BYTES]
        ratio = len(compress(sample, compression)) / len(sample)
    del payload

    # Size chunks by the measured ratio, then verify each one.
    ratio = max(ratio, 1e-3)
    target = max(1, int(max_request_bytes * _SIZE_SAFETY / ratio))
    pieces: list[EncodedRows] = []
    start = 0
    while start < len(lines):
        end = start
        size = 0
        while end < len(lines) and (end == start or size + len(lines[end]) <= target):
            size += len(lines[end])
            end += 1
        _compress_fitting(
            lines, start, end, compression=compression, limit=max_request_bytes, out=pieces
        )
        start = end
    return pieces


def _compress_fitting(
    lines: list[bytes],
    start: int,
    end: int,
    *,
    compression: Literal["zstd", "gzip"],
    limit: int,
    out: list[EncodedRows],
) -> None:
    """Append lines[start:end] to `out` as one piece, halving it while it exceeds `limit`."""
    payload = b"".join(lines[start:end])
    body = compress(payload, compression)
    if len(body) <= limit:
        out.append(EncodedRows(body, end - start, start, len(payload), compression))
        return
    if end - start == 1:
        raise _too_large(start, len(body), limit, compression)
    # Halve by bytes, not by row count, so one huge row does not drag its neighbours along.
    half = len(payload) // 2
    mid = start + 1
    acc = len(lines[start])
    while mid < end - 1 and acc + len(lines[mid]) <= half:
        acc += len(lines[mid])
        mid += 1
    _compress_fitting(lines, start, mid, compression=compression, limit=limit, out=out)
    _compress_fitting(lines, mid, end, compression=compression, limit=limit, out=out)


def _split_plain(lines: list[bytes], limit: int) -> list[EncodedRows]:
    pieces: list[EncodedRows] = []
    start = 0
    while start < len(lines):
        if len(lines[start]) > limit:
            raise _too_large(start, len(lines[start]), limit, "none")
        end = start
        size = 0
        while end < len(lines) and size + len(lines[end]) <= limit:
            size += len(lines[end])
            end += 1
        payload = b"".join(lines[start:end])
        pieces.append(EncodedRows(payload, end - start, start, size, None))
        start = end
    return pieces


def _too_large(index: int, size: int, limit: int, compression: str) -> RowTooLargeError:
    how = "uncompressed" if compression == "none" else f"after {compression} compression"
    return RowTooLargeError(
        f"row {index} alone is {size} bytes {how}, over the {limit}-byte request cap",
        row_index=index,
        row_bytes=size,
        limit=limit,
    )


# --- log pieces and coalesced requests ------------------------------------------------------------


def piece_limit(compression: Compression, max_request_bytes: int) -> int:
    """Most uncompressed bytes in one log piece, so that it fits one request even incompressible.

    zstd and gzip add at most a few bytes per 256 (plus a frame header) to incompressible data.
    """
    if compression == "none":
        return max_request_bytes
    return max(1024, int(max_request_bytes * 0.99) - 4096)


def encode_pieces(
    rows: Sequence[Mapping[str, Any]],
    *,
    compression: Compression = "zstd",
    max_request_bytes: int = 4 * 1024 * 1024,
) -> list[tuple[int, bytes]]:
    """`rows` as consecutive (row count, NDJSON) pieces, each able to travel in one request.

    A piece is at most `piece_limit()` bytes of NDJSON, except a single row that is larger but
    still compresses under `max_request_bytes`. Raises `EncodingError` / `RowTooLargeError`
    naming the row, like `encode_rows`.
    """
    limit = piece_limit(compression, max_request_bytes)
    pieces: list[tuple[int, bytes]] = []
    current: list[bytes] = []
    size = 0
    for index, row in enumerate(rows):
        # The row contract (`encode_row`), with the piece limit computed once per batch.
        line = encode_line(row, index)
        if len(line) > limit:
            _check_fits(line, index, compression, max_request_bytes)
            if current:
                pieces.append((len(current), b"".join(current)))
                current, size = [], 0
            pieces.append((1, line))
            continue
        if current and size + len(line) > limit:
            pieces.append((len(current), b"".join(current)))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append((len(current), b"".join(current)))
    return pieces


def encode_request(ndjson: bytes, row_count: int, compression: Compression) -> EncodedRows:
    """One append request's body from NDJSON lines (the pump's coalesced log entries)."""
    encoding: Literal["zstd", "gzip"] | None = None if compression == "none" else compression
    return EncodedRows(compress(ndjson, compression), row_count, 0, len(ndjson), encoding)
