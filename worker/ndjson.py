"""The NDJSON input of `snowpipe-worker publish`: checked whole, then cut into batches whose ids
are derived from their content, so that running the same command again publishes the same ids.

    check_ndjson(stream, settings=...)   every line parsed and checked with the row contract
                                         (`worker.snowpipe.encoding.encode_row`) before anything
                                         is published; NdjsonError names the first bad line
    file_batches(stream, ...)            the batches of `batch_rows` rows, with their ids and
                                         line numbers

A batch id is the first 128 bits of SHA-256 over the target (database, schema, pipe), the batch's
position in the file (0, 1, ...) and its lines (as in the file, without surrounding whitespace),
as 32 hex digits, after `<id prefix>-` when one is given. Blank lines are skipped and count for
nothing. So the same file, cut with the same --batch-rows, for the same target and prefix, gives
the same ids; the worker logs a batch id once (SNOWPIPE_DEDUP_TTL_SECONDS), so a batch already
published is not committed twice. Two equal batches at different positions get different ids.

Numbers are read exactly: a line with a run of 16 or more digits (an integer beyond 2^53, a
decimal with many digits) is parsed with Python's own JSON reader, integers as `int` and
fractions as `Decimal`, which the worker writes back digit for digit; other lines with orjson.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import IO, Any

from worker.errors import EncodingError, NdjsonError
from worker.settings import Settings
from worker.snowpipe.encoding import decode_exact, encode_row

__all__ = [
    "MAX_LISTED_LINES",
    "FileBatch",
    "PublishedBatch",
    "batch_id_for",
    "check_id_prefix",
    "check_ndjson",
    "file_batches",
    "parse_line",
]

# Changing how ids are derived changes every id: a re-run across the change would publish again.
ID_SCHEME = b"snowpipe-worker publish v1"
ID_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Bad lines named after the first one, at most.
MAX_LISTED_LINES = 10


def parse_line(line: bytes, number: int) -> dict[str, Any]:
    """The JSON object on line `number` (NdjsonError if it is not one); numbers exact."""
    try:
        row = decode_exact(line)
    except ValueError as exc:  # orjson's and json's decode errors, invalid UTF-8
        raise NdjsonError(f"line {number}: not JSON ({_first_line(exc)})") from None
    if not isinstance(row, dict):
        raise NdjsonError(f"line {number}: a {_json_kind(row)}, not a JSON object")
    return row


def _json_kind(value: Any) -> str:
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    if value is None:
        return "null"
    return kinds.get(type(value), "number" if isinstance(value, Decimal) else type(value).__name__)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def check_id_prefix(prefix: str) -> str:
    """`prefix` if it can start a batch id, else NdjsonError naming the rule."""
    if not ID_PREFIX_PATTERN.fullmatch(prefix):
        raise NdjsonError(
            f"--id-prefix {prefix!r} must be 1 to 64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (it starts every batch id)"
        )
    return prefix


def batch_id_for(
    database: str,
    schema: str,
    pipe: str,
    index: int,
    lines: Sequence[bytes],
    *,
    prefix: str | None = None,
) -> str:
    """The id of batch number `index` (from 0) holding `lines` (see the module docstring)."""
    digest = hashlib.sha256(ID_SCHEME)
    for part in (database, schema, pipe, str(index)):
        encoded = part.encode()
        digest.update(len(encoded).to_bytes(8, "big") + encoded)
    for line in lines:
        digest.update(len(line).to_bytes(8, "big") + line)
    hex_id = digest.hexdigest()[:32]
    return f"{prefix}-{hex_id}" if prefix else hex_id


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, line without surrounding whitespace) of the non-blank lines."""
    for number, raw in enumerate(stream, start=1):
        line = raw.strip()
        if line:
            yield number, line


def _row_problem(exc: EncodingError, number: int) -> str:
    # encode_row names the row by its index in a batch ("row 0 ..."): here the line says where.
    return f"line {number}: " + str(exc).replace("row 0 ", "the row ", 1)


def check_ndjson(stream: IO[bytes], *, settings: Settings) -> int:
    """Check every line of `stream`; how many rows it holds.

    Raises NdjsonError naming the first bad line and the problem, with the numbers of up to
    MAX_LISTED_LINES more bad lines, and the fix.
    """
    rows = 0
    first: str | None = None
    others: list[int] = []
    more = 0
    for number, line in _lines(stream):
        try:
            encode_row(
                parse_line(line, number),
                compression=settings.compression,
                max_request_bytes=settings.max_request_bytes,
            )
        except NdjsonError as exc:
            problem = str(exc)
        except EncodingError as exc:
            problem = _row_problem(exc, number)
        else:
            rows += 1
            continue
        if first is None:
            first = problem
        elif len(others) < MAX_LISTED_LINES:
            others.append(number)
        else:
            more += 1
    if first is not None:
        also = ""
        if others:
            listed = ", ".join(str(n) for n in others) + (f" and {more} more" if more else "")
            also = f" (bad lines too: {listed})"
        raise NdjsonError(
            f"{first}{also}; nothing was published: fix the input (one JSON object per line) "
            "and run the same command again"
        )
    return rows


@dataclass(frozen=True, slots=True)
class PublishedBatch:
    """What is kept of a published batch: its position (from 0), id, row count and lines."""

    index: int
    batch_id: str
    rows: int
    first_line: int
    last_line: int


@dataclass(frozen=True, slots=True)
class FileBatch:
    """One batch of the input: its position (from 0), id, rows and the lines they came from."""

    index: int
    batch_id: str
    rows: list[dict[str, Any]]
    first_line: int
    last_line: int

    def summary(self) -> PublishedBatch:
        """The batch without its rows."""
        return PublishedBatch(
            self.index, self.batch_id, len(self.rows), self.first_line, self.last_line
        )


def file_batches(
    stream: IO[bytes],
    *,
    database: str,
    schema: str,
    pipe: str,
    batch_rows: int,
    id_prefix: str | None = None,
) -> Iterator[FileBatch]:
    """The batches of `batch_rows` rows of `stream` (checked before with `check_ndjson`)."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    index = 0
    lines: list[bytes] = []
    numbers: list[int] = []

    def batch() -> FileBatch:
        rows = [parse_line(line, n) for n, line in zip(numbers, lines, strict=True)]
        batch_id = batch_id_for(database, schema, pipe, index, lines, prefix=id_prefix)
        return FileBatch(index, batch_id, rows, numbers[0], numbers[-1])

    for number, line in _lines(stream):
        lines.append(line)
        numbers.append(number)
        if len(lines) >= batch_rows:
            yield batch()
            index += 1
            lines, numbers = [], []
    if lines:
        yield batch()
