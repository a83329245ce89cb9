"""Rejected rows, to the row: find each row Snowflake rejected and the batch and row it came from.

Snowflake commits a request's good rows and rejects the bad ones one by one (a NOT NULL column
given null, a wrong type): the channel status only counts them (`rows_error_count`). With error
logging on the table, each rejected row is in its error table, with the offset-token bounds of
the request it came in and the row's text as sent (worker.snowpipe.errortable). This module maps
those rows back to the log entries of the requests, and so to a batch and a row index, and builds
the dead letters that hold exactly the rejected rows.

The pump's interface (docs/architecture.md#rejected-rows): `ErrorTableAttribution` is the
`ExactAttribution` of worker.delivery.rowerrors (its `letters(ref, window, entries)`), built on

    resolver = RowErrorResolver.from_settings(settings, snowpipe_client)
    resolution = resolver.resolve(ref, entries, expected)   # never raises Snowflake's errors
    if resolution.status == "complete":
        for letter in rejected_letters(ref, resolution): dead_letters.add(letter)
    elif resolution.status == "short":        # not all in the error table yet: ask again later
        ...                                   # (after a deadline: coarse)
    else:  # "unavailable": error logging off, no table, SNOWPIPE_ERROR_TABLE=off: coarse now

The mapping (`match_error_rows`, pure): an error row belongs to the entries whose offsets lie
within its [lower, upper] offset-token bounds; among their NDJSON lines it is the one whose text
equals the row's `$1` byte for byte, else the one that parses to the same JSON value (numbers
compared as decimals, so `1.10` equals `1.1`; `true` never equals `1`), else (a truncated
payload) the one it is a prefix of. Each line is matched at most once; identical lines take the
next unmatched one, in offset order. What is left over is reported (`unmatched`), and the count
of matched rows is compared with the rise in `rows_error_count` the caller expected.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from worker.deadletter import DeadLetter
from worker.errors import (
    ErrorTableUnavailableError,
    PipeTableUnknownError,
    RetryableError,
    SnowpipeError,
    SqlStatementError,
)
from worker.messages import IngestMessage
from worker.observability import get_logger
from worker.snowpipe.encoding import decode_exact
from worker.snowpipe.errortable import ErrorRow, ErrorTableReader, TableLocator, TableName

if TYPE_CHECKING:
    from worker.delivery.channels import ChannelRef
    from worker.delivery.log import Entry, HeldWindow
    from worker.settings import Settings
    from worker.snowpipe.client import SnowpipeClient

__all__ = [
    "Rejection",
    "Resolution",
    "RowErrorResolver",
    "letter_id",
    "match_error_rows",
    "rejected_letters",
]

_log = get_logger("worker.rejections")

Status = Literal["complete", "short", "unavailable"]
# A table whose error table could not be read is not asked again for this long.
DEFAULT_RECHECK_SECONDS = 300.0
_WS = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Rejection:
    """One rejected row: where it is in its batch, and what Snowflake said about it."""

    row: int  # index in the batch's rows
    message: str
    code: str | None
    column: str | None
    offset: int  # the log entry it was sent in
    line: bytes  # its NDJSON line, as sent


@dataclass(frozen=True, slots=True)
class Resolution:
    """What became of the rows Snowflake rejected in some requests.

    status  "complete": at least `expected` rows were found and mapped;
            "short": fewer (not in the error table yet, or a transient failure: ask again);
            "unavailable": no error table can tell (off, no such table, no privilege): coarse
    rejected  batch id -> its rejected rows, in row order (only batches with one)
    unmatched error rows that belong to no line of the entries (reported, never guessed)
    """

    status: Status
    expected: int
    matched: int = 0
    rejected: Mapping[str, tuple[Rejection, ...]] = field(default_factory=dict)
    unmatched: tuple[ErrorRow, ...] = ()
    reason: str = ""

    @property
    def complete(self) -> bool:
        """Every expected rejected row was found."""
        return self.status == "complete"

    @property
    def shortfall(self) -> int:
        """How many of the expected rows were not found."""
        return max(0, self.expected - self.matched)


# --- The mapping (pure) ------------------------------------------------------------------------


class _Line(NamedTuple):
    batch_id: str
    row: int
    offset: int
    raw: bytes  # stripped of surrounding whitespace


def _scan(entries: Sequence[Entry]) -> Iterator[_Line]:
    """Every NDJSON line of `entries` (in offset order), with its row index in its batch."""
    for entry in entries:
        batch_id, offset = entry.batch_id, entry.offset
        lines = (line for line in (x.strip() for x in entry.data.split(b"\n")) if line)
        for row, line in enumerate(lines, start=entry.first_row):
            yield _Line(batch_id, row, offset, line)


# Numbers as decimals (`1.10` equals `1.1`, 2**70 stays exact); one decoder for every line.
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_int=Decimal)
# Booleans stand for themselves only: True == Decimal(1) in Python, `true` is not `1` in JSON.
_TRUE, _FALSE = object(), object()
_NOT_JSON = object()


def _canon(value: Any) -> Any:
    """A hashable form of a decoded JSON value in which equal JSON values are equal: objects as
    frozensets of pairs, arrays as tuples, booleans as two markers; strings, decimals and null as
    they are (none of these forms equals another)."""
    if isinstance(value, dict):
        return frozenset((k, _canon(v)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(_canon(v) for v in value)
    if value is True:
        return _TRUE
    if value is False:
        return _FALSE
    return value


def _parse(raw: bytes) -> Any:
    """The canonical form of a JSON text (`_NOT_JSON` when it is not JSON)."""
    try:
        return _canon(_DECODER.decode(raw.decode("utf-8")))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        return _NOT_JSON


def _payload(row: ErrorRow) -> bytes | None:
    """The bytes of an error row's `$1` (decoded from base64 when it was stored so)."""
    if row.data is None:
        return None
    if (row.content_type or "").lower() == "binary-base64":
        try:
            return base64.b64decode(row.data, validate=True).strip()
        except (binascii.Error, ValueError):
            return None
    return row.data.encode("utf-8", "surrogatepass").strip()


def _sort_key(row: ErrorRow) -> tuple[Any, ...]:
    bounds = row.bounds or (-1, -1)
    return (bounds, row.data or "", row.message, row.code or "", row.column or "")


class _Matcher:
    """The lines of some entries, and which of them an error row has taken.

    Lines are indexed by their bytes only where an error row's payload has those bytes; the
    looser ways (the same JSON value, a prefix) read every line, and only when a row needs them.
    """

    def __init__(self, entries: Sequence[Entry], payloads: set[bytes]) -> None:
        self._entries = sorted(entries, key=lambda e: e.offset)
        self.used: set[tuple[int, int]] = set()
        self.by_bytes: dict[bytes, list[_Line]] = {}
        for line in _scan(self._entries):
            if line.raw in payloads:
                self.by_bytes.setdefault(line.raw, []).append(line)
        self._all: list[_Line] | None = None
        self._by_canon: dict[Any, list[_Line]] | None = None

    @property
    def lines(self) -> list[_Line]:
        """Every line (read on first use)."""
        if self._all is None:
            self._all = list(_scan(self._entries))
        return self._all

    def take(self, candidates: Iterable[_Line], lower: int, upper: int) -> _Line | None:
        """The first candidate line not yet taken whose entry lies within [lower, upper]."""
        for line in candidates:
            key = (line.offset, line.row)
            if key not in self.used and lower <= line.offset <= upper:
                self.used.add(key)
                return line
        return None

    def same_bytes(self, payload: bytes, lower: int, upper: int) -> _Line | None:
        return self.take(self.by_bytes.get(payload, ()), lower, upper)

    def same_json(self, payload: bytes, lower: int, upper: int) -> _Line | None:
        canon = _parse(payload)
        if canon is _NOT_JSON:
            return None
        if self._by_canon is None:  # parsed once, on the first row that needs it
            self._by_canon = {}
            for line in self.lines:
                key = _parse(line.raw)
                if key is not _NOT_JSON:
                    self._by_canon.setdefault(key, []).append(line)
        return self.take(self._by_canon.get(canon, ()), lower, upper)

    def prefix(self, payload: bytes, lower: int, upper: int) -> _Line | None:
        if not payload:
            return None
        return self.take((x for x in self.lines if x.raw.startswith(payload)), lower, upper)


def match_error_rows(
    error_rows: Iterable[ErrorRow], entries: Sequence[Entry], expected: int
) -> Resolution:
    """Map error rows to the batches and rows of `entries` (module docstring); no I/O.

    The status is "complete" when at least `expected` rows were matched, else "short".
    """
    found: dict[_Line, ErrorRow] = {}
    unmatched: list[ErrorRow] = []
    pending: list[tuple[ErrorRow, bytes, int, int]] = []
    for row in sorted(error_rows, key=_sort_key):
        bounds, payload = row.bounds, _payload(row)
        if bounds is None or payload is None:
            unmatched.append(row)
        else:
            pending.append((row, payload, *bounds))
    matcher = _Matcher(entries, {payload for _, payload, _, _ in pending})
    # Each way in turn, for every row, before the next way may take a line: an exact match is
    # never taken away by a looser one.
    ways = (matcher.same_bytes, matcher.same_json, matcher.prefix)
    for n, way in enumerate(ways):
        rest = []
        for row, payload, lower, upper in pending:
            if (way is matcher.same_json or way is matcher.prefix) and (
                row.truncated != (way is matcher.prefix)
            ):
                rest.append((row, payload, lower, upper))  # JSON of whole rows; prefixes of cut
                continue
            line = way(payload, lower, upper)
            if line is None:
                rest.append((row, payload, lower, upper))
            else:
                found[line] = row
        pending = rest
        if n == len(ways) - 1:
            unmatched.extend(row for row, *_ in rest)
    rejected: dict[str, list[Rejection]] = {}
    for line in sorted(found, key=lambda x: (x.offset, x.row)):
        row = found[line]
        rejected.setdefault(line.batch_id, []).append(
            Rejection(line.row, _one_line(row.message), row.code, row.column, line.offset, line.raw)
        )
    matched = len(found)
    return Resolution(
        "complete" if matched >= expected else "short",
        expected,
        matched,
        {batch: tuple(sorted(rows, key=lambda r: r.row)) for batch, rows in rejected.items()},
        tuple(unmatched),
        "" if matched >= expected else f"{matched} of {expected} rejected rows found",
    )


def _one_line(text: str) -> str:
    return _WS.sub(" ", text).strip() or "(no message)"


# --- The dead letters ----------------------------------------------------------------------------


def letter_id(ref: ChannelRef, batch_id: str, rows: Iterable[int]) -> str:
    """The id of the row_errors letter of `batch_id`'s rejected `rows` on `ref`: the same for
    the same rows, so that storing one letter twice keeps one; also the batch id of its
    requeue."""
    text = "\0".join((ref.key, batch_id, ",".join(str(r) for r in sorted(rows))))
    return f"{batch_id}-rejected-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def rejected_letters(ref: ChannelRef, resolution: Resolution) -> list[DeadLetter]:
    """One "row_errors" dead letter per batch with a rejected row: its rows are exactly the
    rejected ones (in row order), `detail["rejected"][k]` says which row of the batch rows[k]
    was and why. Batches without a rejected row get none."""
    letters: list[DeadLetter] = []
    for batch_id, rejections in sorted(
        resolution.rejected.items(), key=lambda item: (item[1][0].offset, item[0])
    ):
        if not rejections:
            continue
        rows: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        unparsed: list[dict[str, Any]] = []
        for r in rejections:
            about = {"row": r.row, "message": r.message, "code": r.code, "column": r.column}
            try:
                value = decode_exact(r.line)
            except ValueError:
                value = None
            if isinstance(value, dict):
                rows.append(value)
                rejected.append(about)
            else:  # not a JSON object (never from this worker's encoder): kept as text
                unparsed.append({**about, "line": r.line.decode("utf-8", "replace")})
        first = rejections[0]
        more = f" (and {len(rejections) - 1} more)" if len(rejections) > 1 else ""
        reason = (
            f"Snowflake rejected {len(rejections)} row(s) of the batch on channel "
            f"{ref.channel}: row {first.row}: {first.message}{more}; the batch's other rows "
            "are committed"
        )
        detail: dict[str, Any] = {
            "channel": ref.channel,
            "offsets": sorted({r.offset for r in rejections}),
            "rejected": rejected,
            "attribution": "error_table",
        }
        if unparsed:
            detail["unparsed_lines"] = unparsed
        message = IngestMessage(batch_id, ref.database, ref.schema, ref.pipe, rows)
        letter = DeadLetter.of(message, reason, kind="row_errors", detail=detail)
        letters.append(_with_id(letter, letter_id(ref, batch_id, (r.row for r in rejections))))
    return letters


def _with_id(letter: DeadLetter, value: str) -> DeadLetter:
    from dataclasses import replace

    return replace(letter, letter_id=value)


# --- The resolver --------------------------------------------------------------------------------


class RowErrorResolver:
    """Finds the rows Snowflake rejected in some requests of a channel: the pump's one call.

    `resolve(ref, entries, expected)` reads the error table of the pipe's table for the offset
    range of `entries` and maps the rows (`match_error_rows`). It never raises Snowflake's
    errors: a transient failure is a "short" resolution (ask again), anything else
    "unavailable" (attribute coarsely), and a table whose error table cannot be read is not
    asked again for `recheck_seconds`. Thread-safe (one resolver per node, called by its pumps).
    """

    def __init__(
        self,
        reader: ErrorTableReader | None,
        locator: TableLocator | None,
        *,
        off_reason: str = "",
        recheck_seconds: float = DEFAULT_RECHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reader = reader
        self._locator = locator
        self._off_reason = off_reason or "error tables are not read"
        self.recheck_seconds = recheck_seconds
        self._clock = clock
        self._down: dict[object, tuple[float, str]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, client: SnowpipeClient) -> RowErrorResolver:
        """The resolver of SNOWPIPE_ERROR_TABLE (auto: through `client.sql()`; off: none)."""
        if settings.error_table == "off":
            return cls(None, None, off_reason="SNOWPIPE_ERROR_TABLE=off")
        sql = client.sql()
        return cls(ErrorTableReader(sql), TableLocator(sql, settings.pipe_tables_map()))

    @property
    def enabled(self) -> bool:
        """False when SNOWPIPE_ERROR_TABLE=off (every resolution is "unavailable")."""
        return self._reader is not None

    def resolve(self, ref: ChannelRef, entries: Sequence[Entry], expected: int) -> Resolution:
        """The rejected rows of the requests that sent `entries` on `ref` (class docstring)."""
        if self._reader is None or self._locator is None:
            return Resolution("unavailable", expected, reason=self._off_reason)
        if not entries:
            return Resolution("unavailable", expected, reason="no log entries to map rows to")
        table = self._table(ref, expected)
        if isinstance(table, Resolution):
            return table
        rows = self._read(ref, table, entries, expected)
        if isinstance(rows, Resolution):
            return rows
        resolution = match_error_rows(rows, entries, expected)
        if resolution.unmatched:
            _log.warning(
                "row_errors.unmatched",
                table=str(table),
                channel=ref.channel,
                unmatched=len(resolution.unmatched),
            )
        return resolution

    def _read(
        self, ref: ChannelRef, table: TableName, entries: Sequence[Entry], expected: int
    ) -> list[ErrorRow] | Resolution:
        """The error rows for the offsets of `entries`, or the resolution that says why not."""
        assert self._reader is not None
        offsets = [e.offset for e in entries]
        try:
            return self._reader.rows(table, ref.pipe, ref.channel, min(offsets), max(offsets))
        except RetryableError as exc:
            _log.info("row_errors.error_table_retry", table=str(table), error=str(exc))
            return Resolution("short", expected, reason=f"reading {table}'s error table: {exc}")
        except SqlStatementError as exc:
            reason = (
                f"the error table of {table} cannot be read ({exc.code}: {exc.message}); "
                f"turn error logging on with ALTER TABLE {table} SET ERROR_LOGGING = TRUE, or "
                "grant the role SELECT ERROR TABLE on it"
            )
        except SnowpipeError as exc:
            reason = f"the error table of {table} cannot be read: {exc}"
        return Resolution("unavailable", expected, reason=self._mark_down(table, reason))

    def _table(self, ref: ChannelRef, expected: int) -> TableName | Resolution:
        """The pipe's table, or the resolution that says why there is none to read."""
        assert self._locator is not None
        pipe_key = ("pipe", ref.target)
        down = self._is_down(pipe_key)
        if down is not None:
            return Resolution("unavailable", expected, reason=down)
        try:
            table = self._locator.table_of(*ref.target)
        except RetryableError as exc:
            return Resolution("short", expected, reason=f"finding the pipe's table: {exc}")
        except (PipeTableUnknownError, SnowpipeError) as exc:
            return Resolution("unavailable", expected, reason=self._mark_down(pipe_key, str(exc)))
        down = self._is_down(table)
        if down is not None:
            return Resolution("unavailable", expected, reason=down)
        return table

    def _is_down(self, key: object) -> str | None:
        with self._lock:
            down = self._down.get(key)
            if down is None:
                return None
            if self._clock() >= down[0]:
                del self._down[key]
                return None
            return down[1]

    def _mark_down(self, key: object, reason: str) -> str:
        with self._lock:
            self._down[key] = (self._clock() + self.recheck_seconds, reason)
        _log.warning(
            "row_errors.error_table_unavailable",
            reason=reason,
            consequence="rejected rows are attributed to whole batches",
            recheck_seconds=self.recheck_seconds,
        )
        return reason



class ErrorTableAttribution:
    """The pump's exact attribution of a held window (worker.delivery.rowerrors
    `ExactAttribution`): the window's rejected rows from the error table, as letters.

    `letters` returns the letters when every row the window counted was found, None while some
    are not in the error table yet (the pump asks again, and attributes coarsely after its
    deadline), and raises `ErrorTableUnavailableError` when no error table can tell (the pump
    attributes coarsely at once).
    """

    def __init__(self, resolver: RowErrorResolver) -> None:
        self.resolver = resolver

    @classmethod
    def from_settings(
        cls, settings: Settings, client: SnowpipeClient
    ) -> ErrorTableAttribution | None:
        """The attribution of SNOWPIPE_ERROR_TABLE: None when it is off (coarse only)."""
        if settings.error_table == "off":
            return None
        return cls(RowErrorResolver.from_settings(settings, client))

    def letters(
        self, ref: ChannelRef, window: HeldWindow, entries: Sequence[Entry]
    ) -> list[DeadLetter] | None:
        """The window's row_errors letters (see the class docstring)."""
        resolution = self.resolver.resolve(ref, entries, window.errors)
        if resolution.status == "complete":
            return rejected_letters(ref, resolution)
        if resolution.status == "short":
            return None
        raise ErrorTableUnavailableError(resolution.reason)


__all__ += ["DEFAULT_RECHECK_SECONDS", "ErrorTableAttribution", "Status", "TableName"]
