"""A batch's bytes: its rows as NDJSON log pieces, with C doing the per-row work.

Two forms of a batch reach the task (docs/message-format.md):

- `rows`, an array of JSON objects: `rows_ndjson` encodes the whole list with ONE orjson call
  (each row followed by a raw newline fragment, so that the output splits into lines exactly:
  orjson never writes a raw newline of its own), and checks the row contract in bulk (every
  row a non-empty dict, no NaN or infinity). Only a batch the bulk path refuses (a row that is
  not a dict, a key that is not a string, an integer beyond 64 bits, a `null` that may hide a
  NaN) is encoded row by row by `worker.snowpipe.encoding.encode_line`, which then names the
  row. Output and errors are byte for byte those of the per-row encoder.
- `ndjson`, one string of NDJSON lines: `check_ndjson` parses each line with orjson (through
  `map`, no Python code per row), checks that every line is a non-empty JSON object and none is
  over the request cap, and keeps the bytes as they are: numbers keep every digit the producer
  wrote (an integer beyond 64 bits, a decimal), since the parsed values are thrown away. A bad
  batch raises `NdjsonBatchError` (a `MalformedMessageError`) naming the first bad line, its
  problem and the fix.

Either way the task gets `(row count, NDJSON bytes)` pieces of at most `piece_limit()` bytes
(a single larger row that still fits one request compressed is a piece of its own), in row
order, for the channel log. Nothing is compressed here (the pump compresses each request once),
except a line over the piece limit, to see whether it fits a request at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from worker.errors import NdjsonBatchError, RowTooLargeError
from worker.snowpipe.encoding import (
    Compression,
    _check_fits,  # (private helpers of the row contract, reused as they are)
    _default,
    _non_finite_path,
    decode_exact,
    encode_pieces,
    piece_limit,
)

__all__ = [
    "NdjsonBatchError",
    "check_ndjson",
    "ndjson_pieces",
    "parse_rows",
    "rows_ndjson",
    "rows_pieces",
    "split_pieces",
]

# A raw newline between rows: orjson writes it verbatim, and escapes every newline of its own.
_NEWLINE = orjson.Fragment(b"\n")
_SEPARATOR = b",\n,"
_FIX = "send one non-empty JSON object per line, each line ending in \\n (docs/message-format.md)"


# --- the rows form -------------------------------------------------------------------------------


def rows_ndjson(rows: Sequence[Any]) -> bytes | None:
    """The NDJSON of `rows` (each line ending in `\\n`, as `encode_line` writes it), or None when
    the bulk path cannot vouch for the batch (then encode row by row: `encode_pieces`)."""
    if not rows or type(rows) is not list:
        return None
    kinds = set(map(type, rows))
    if kinds != {dict} or not all(rows):
        return None  # a row that is not a dict, or an empty one: the per-row path names it
    try:
        data = orjson.dumps(
            list(itertools.chain.from_iterable(zip(rows, itertools.repeat(_NEWLINE)))),
            default=_default,
        )
    except TypeError:
        return None  # beyond 64 bits, a key that is not a string, a value of no JSON form
    if b"null" in data and any(map(_non_finite_path, rows)):
        return None
    # b'[{r0},\n,{r1},\n]' -> b'{r0}\n{r1}\n'
    return data[1:-3].replace(_SEPARATOR, b"\n") + b"\n"


def rows_pieces(
    rows: Sequence[Mapping[str, Any]], *, compression: Compression, max_request_bytes: int
) -> list[tuple[int, bytes]]:
    """`rows` as log pieces (see the module docstring); EncodingError / RowTooLargeError name the
    row, as `encode_pieces` does."""
    data = rows_ndjson(rows)
    if data is None:
        return encode_pieces(rows, compression=compression, max_request_bytes=max_request_bytes)
    limit = piece_limit(compression, max_request_bytes)
    if len(data) <= limit:
        return [(len(rows), data)]
    lines = data.split(b"\n")
    lines.pop()
    for index, line in enumerate(lines):
        if len(line) + 1 > limit:
            _check_fits(line + b"\n", index, compression, max_request_bytes)
    return split_pieces(lines, limit)


def split_pieces(lines: list[bytes], limit: int) -> list[tuple[int, bytes]]:
    """Consecutive pieces of `lines` (without their newlines), each at most `limit` bytes with
    its newlines, except a single line that is longer (checked by the caller)."""
    pieces: list[tuple[int, bytes]] = []
    start = size = 0
    for end, line in enumerate(lines):
        length = len(line) + 1
        if end > start and size + length > limit:
            pieces.append((end - start, b"\n".join(lines[start:end]) + b"\n"))
            start, size = end, 0
        size += length
    pieces.append((len(lines) - start, b"\n".join(lines[start:]) + b"\n"))
    return pieces


# --- the ndjson form -----------------------------------------------------------------------------


def check_ndjson(
    text: str | bytes, *, compression: Compression, max_request_bytes: int
) -> tuple[bytes, list[bytes]]:
    """The batch's NDJSON as bytes ending in a newline, and its lines (without newlines), once
    every line is a non-empty JSON object within the request cap; else `NdjsonBatchError` naming
    the first bad line."""
    if isinstance(text, str):
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            number = text.count("\n", 0, exc.start) + 1
            raise NdjsonBatchError(
                f"ndjson line {number} is not valid UTF-8 (a lone surrogate, {exc.reason}): {_FIX}",
                line=number,
            ) from None
    else:
        data = bytes(text)
    if not data:
        raise NdjsonBatchError(f"ndjson is empty: the batch needs at least one row; {_FIX}", line=1)
    if not data.endswith(b"\n"):
        data += b"\n"
    lines = data.split(b"\n")
    lines.pop()  # after the last newline
    try:
        values = list(map(orjson.loads, lines))
    except orjson.JSONDecodeError:
        values = None
    if values is None or set(map(type, values)) != {dict} or not all(values):
        raise _first_bad_line(lines)
    limit = piece_limit(compression, max_request_bytes)
    if max(map(len, lines)) + 1 > limit:
        for index, line in enumerate(lines):
            if len(line) + 1 > limit:
                try:
                    _check_fits(line + b"\n", index, compression, max_request_bytes)
                except RowTooLargeError as exc:
                    how = "uncompressed" if compression == "none" else f"after {compression}"
                    raise NdjsonBatchError(
                        f"ndjson line {index + 1} is {exc.row_bytes} bytes {how}, over the "
                        f"{exc.limit}-byte request cap: shrink the row or split it "
                        "(SNOWPIPE_MAX_REQUEST_BYTES; Snowflake's cap is 4 MB per request)",
                        line=index + 1,
                    ) from None
    return data, lines


def ndjson_pieces(
    text: str | bytes,
    *,
    row_count: int | None = None,
    compression: Compression,
    max_request_bytes: int,
) -> list[tuple[int, bytes]]:
    """The log pieces of an `ndjson` batch (see `check_ndjson`); `row_count`, when the producer
    sent one, must be the number of lines."""
    data, lines = check_ndjson(text, compression=compression, max_request_bytes=max_request_bytes)
    if row_count is not None and row_count != len(lines):
        raise NdjsonBatchError(
            f"row_count is {row_count} but ndjson holds {len(lines)} line(s): send the number "
            "of lines as row_count, or leave it out",
            line=min(row_count, len(lines)) + 1,
        )
    limit = piece_limit(compression, max_request_bytes)
    if len(data) <= limit:
        return [(len(lines), data)]
    return split_pieces(lines, limit)


def _first_bad_line(lines: list[bytes]) -> NdjsonBatchError:
    """The error for the first line that is not a non-empty JSON object (slow: errors only)."""
    for index, line in enumerate(lines):
        number = index + 1
        if not line.strip():
            problem = "is empty (a blank line between rows, or two newlines in a row)"
        else:
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                problem = _not_json(exc, line)
            else:
                if type(value) is not dict:
                    problem = f"is {_kind(value)}, not a JSON object"
                elif not value:
                    problem = "is an empty object: every row needs at least one column"
                else:
                    continue
        return NdjsonBatchError(f"ndjson line {number} {problem}: {_FIX}", line=number)
    return NdjsonBatchError(f"ndjson cannot be read: {_FIX}", line=1)  # (not reached)


def _not_json(exc: orjson.JSONDecodeError, line: bytes) -> str:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"is not valid UTF-8 (byte {bad.start + 1} of the line)"
    return f"is not JSON ({str(exc).split(': line ', 1)[0]})"


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    return "null" if value is None else "a number"


def parse_rows(text: str | bytes) -> list[dict[str, Any]]:
    """The rows of an `ndjson` batch as objects, numbers exact (integers beyond 64 bits as int,
    fractions as Decimal, digit for digit): for a dead letter of the batch, which keeps rows,
    never on the way to Snowflake. ValueError for a line that is not a JSON object."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        row = decode_exact(line, decimal_fractions=True)
        if type(row) is not dict:
            raise ValueError(f"ndjson line {number} is {_kind(row)}, not a JSON object")
        rows.append(row)
    return rows

