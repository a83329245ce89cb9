"""Append bodies: decompression per Content-Encoding and NDJSON rows with ON_ERROR = CONTINUE."""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field

import orjson
import zstandard

from emulator.errors import ApiError, bad_request

_ZSTD = zstandard.ZstdDecompressor()
# A decompressed body larger than this is refused (protects the emulator from a zip bomb; the
# real service's limit on uncompressed size is not documented).
MAX_DECOMPRESSED_BYTES = 256 * 1024 * 1024


_MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}


def decode_body(body: bytes, content_encoding: str | None, *, strict: bool = False) -> bytes:
    """The uncompressed body; 400 ApiError for an unknown encoding or a corrupt stream.

    A body that does not start with the encoding's magic bytes is read as uncompressed (one of
    Snowflake's tutorials leaves `Content-Encoding: zstd` on a plain body), unless `strict`.
    """
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    magic = _MAGIC.get(encoding)
    if magic is not None and not strict and not body.startswith(magic):
        return body
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "zstd":
            # decompressobj copes with frames that do not record their content size.
            out = _ZSTD.decompressobj().decompress(body)
            if len(out) > MAX_DECOMPRESSED_BYTES:
                raise bad_request("ERR_PAYLOAD_TOO_LARGE", "decompressed body is too large")
            return out
        if encoding == "deflate":
            return zlib.decompress(body)
    except ApiError:
        raise
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise bad_request(
            "ERR_INVALID_CONTENT_ENCODING",
            f"body could not be decompressed as {encoding}: {exc}",
        ) from None
    raise bad_request(
        "ERR_UNSUPPORTED_CONTENT_ENCODING",
        f"Content-Encoding {content_encoding!r} is not supported; use gzip or zstd",
    )


# Snowflake's code and SQL state for a row that is not valid JSON ("Error parsing JSON: ...").
JSON_ERROR_CODE = 100069
JSON_ERROR_STATE = "22P02"


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """One row the table rejected, as an error table records it."""

    position: int  # index among the request's rows
    raw: bytes  # the row exactly as sent (without the line break)
    code: int  # Snowflake's error code, e.g. 100072
    message: str  # Snowflake's message, e.g. "NULL result in a non-nullable column"
    sql_state: str
    source: str | None = None  # the column that failed, if one did

    @property
    def content_type(self) -> str:
        """`json`, `json-invalid` or `binary-base64` (the error table's
        `error_data_content_type`)."""
        try:
            text = self.raw.decode("utf-8")
        except UnicodeDecodeError:
            return "binary-base64"
        try:
            orjson.loads(text)
        except orjson.JSONDecodeError:
            return "json-invalid"
        return "json"


@dataclass(slots=True)
class ParsedRows:
    """The rows of one append: the good ones as raw JSON text, and the errors."""

    good: list[bytes]
    # Position of each good row among all rows; None when every row was good (the common case).
    good_positions: list[int] | None
    total: int
    errors: int
    first_error: str | None
    # Every rejected row with Snowflake's code and message, in request order.
    rejected: list[RejectedRow] = field(default_factory=list)


def parse_rows(body: bytes) -> ParsedRows:
    """Split NDJSON (optional \\r before \\n); a line that is not a JSON object is a row error.

    A body whose lines do not parse on their own but which is a sequence of JSON objects as a
    whole (pretty-printed rows, as some of Snowflake's tutorials post) is read as those objects.
    """
    rows = _parse_lines(body)
    if rows.errors:
        whole = _parse_sequence(body)
        if whole is not None:
            return whole
    return rows


def _parse_sequence(body: bytes) -> ParsedRows | None:
    """The JSON objects of a body of concatenated JSON texts, or None if it is not one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    decoder = json.JSONDecoder()
    good: list[bytes] = []
    index, end = 0, len(text)
    while True:
        while index < end and text[index] in " \t\r\n":
            index += 1
        if index >= end:
            break
        start = index
        try:
            value, index = decoder.raw_decode(text, index)
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        # The object's own text with the layout whitespace taken out: numbers stay as sent
        # (2**70 and 1.10 are not rounded through a float).
        good.append(compact_json(text[start:index]).encode("utf-8"))
    if not good:
        return None
    return ParsedRows(good=good, good_positions=None, total=len(good), errors=0, first_error=None)


def _parse_lines(body: bytes) -> ParsedRows:
    lines = body.split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()
    good: list[bytes] = []
    positions: list[int] = []
    errors = 0
    first_error: str | None = None
    rejected: list[RejectedRow] = []
    total = 0
    loads = orjson.loads
    for raw in lines:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line.strip():
            continue  # blank lines are not rows
        index = total
        total += 1
        try:
            ok = isinstance(loads(line), dict)
            problem = "" if ok else "is valid JSON but not an object"
            detail = "the row is not a JSON object"
        except orjson.JSONDecodeError as exc:
            ok, problem = False, f"is not valid JSON ({exc})"
            detail = f"{exc.msg}, pos {exc.pos}"
        if ok:
            good.append(line)
            positions.append(index)
        else:
            errors += 1
            rejected.append(
                RejectedRow(
                    index, bytes(line), JSON_ERROR_CODE, f"Error parsing JSON: {detail}",
                    JSON_ERROR_STATE,
                )
            )
            if first_error is None:
                first_error = f"Row {index + 1} of the request {problem}"
    return ParsedRows(
        good=good,
        good_positions=None if errors == 0 else positions,
        total=total,
        errors=errors,
        first_error=first_error,
        rejected=rejected,
    )


def compact_json(text: str) -> str:
    """`text` (valid JSON) without the whitespace between tokens; every token kept as written."""
    out: list[str] = []
    in_string = escaped = False
    for ch in text:
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif ch not in " \t\r\n":
            out.append(ch)
    return "".join(out)
