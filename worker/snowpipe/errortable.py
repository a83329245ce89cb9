"""Snowflake error tables: which table a pipe loads, and the rows Snowflake rejected on a channel.

A table with `ERROR_LOGGING = TRUE` keeps every row that Snowpipe Streaming rejected (a NOT NULL
column given null, a value of the wrong type, invalid JSON) in its error table, read with
`SELECT ... FROM ERROR_TABLE(<table>)` (docs/operations.md#from-a-rejected-row-to-its-fix). The
columns used here, per Snowflake's documentation of error tables and of error logging in
Snowpipe Streaming (high-performance architecture):

    error_code                           NUMBER: the first error of the row
    error_metadata:error_message         Snowflake's message
    error_metadata:error_source          the column at fault (may be null)
    error_metadata:service               'snowpipe_streaming' for rows of Snowpipe Streaming
    error_metadata:details:pipe_name, :channel_name
    error_metadata:details:offset_token_lower_bound / _upper_bound
                                         the row was in a request (or a rowset of requests)
                                         whose offset tokens span these bounds: not the row's own
                                         token; the worker sends start/end tokens per request
    error_metadata:details:error_data_content_type   json | json-invalid | binary-base64
    error_metadata:details:error_data_truncated      the payload was cut (over 128 MB)
    error_data:"$1"                      the row as sent, before any pipe transformation (as
                                         base64 when it was not valid UTF-8)

There is no row index and no per-row token in an error table: `worker.rejections` maps each
error row back to its batch and row by the offset bounds and the row's text.

Which table a pipe loads (`TableLocator.table_of`), first that answers:

1. `SNOWPIPE_PIPE_TABLES` (`DB.SCHEMA.PIPE=TABLE`): the operator says so;
2. the default pipe `<TABLE>-STREAMING` loads `<TABLE>` of the same database and schema
   (`"My T-STREAMING"` loads `"My T"`);
3. `DESCRIBE PIPE DB.SCHEMA.PIPE` through the SQL API: the target of its `COPY INTO`.

Otherwise `PipeTableUnknownError`, whose message names the pipe and SNOWPIPE_PIPE_TABLES.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from worker.errors import PipeTableUnknownError, ProtocolError, SqlStatementError
from worker.settings import split_name

if TYPE_CHECKING:
    from worker.snowpipe.sql import ResultSet, SqlApi

__all__ = [
    "DEFAULT_PIPE_SUFFIX",
    "ERROR_ROW_COLUMNS",
    "ErrorRow",
    "ErrorTableReader",
    "TableLocator",
    "TableName",
    "default_pipe_table",
    "error_rows_statement",
    "quote_identifier",
    "same_identifier",
]

DEFAULT_PIPE_SUFFIX: Final = "-STREAMING"
_PLAIN_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")
# `COPY INTO <name>` in a pipe's definition; <name> is up to three parts, each plain or quoted.
_PART = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_COPY_INTO = re.compile(rf"\bCOPY\s+INTO\s+({_PART}(?:\s*\.\s*{_PART}){{0,2}})", re.IGNORECASE)

# The columns of `error_rows_statement`, in order.
ERROR_ROW_COLUMNS: Final = (
    "ERROR_CODE",
    "ERROR_MESSAGE",
    "ERROR_SOURCE",
    "PIPE_NAME",
    "CHANNEL_NAME",
    "OFFSET_TOKEN_LOWER_BOUND",
    "OFFSET_TOKEN_UPPER_BOUND",
    "ERROR_DATA_CONTENT_TYPE",
    "ERROR_DATA_TRUNCATED",
    "RAW_ROW",
)


def quote_identifier(part: str) -> str:
    """`part` as SQL text: a quoted name as given, a plain one as is, anything else quoted."""
    if len(part) >= 2 and part.startswith('"') and part.endswith('"'):
        if '"' not in part[1:-1].replace('""', ""):
            return part  # a well-formed quoted name
    elif _PLAIN_IDENTIFIER.match(part):
        return part
    return '"' + part.replace('"', '""') + '"'


def _resolved(part: str) -> str:
    """The name Snowflake stores: a quoted name without its quotes, a plain one upper-cased."""
    part = part.strip()
    if len(part) >= 2 and part.startswith('"') and part.endswith('"'):
        return part[1:-1].replace('""', '"')
    if _PLAIN_IDENTIFIER.match(part):
        return part.upper()
    return part


def same_identifier(a: str, b: str) -> bool:
    """True when `a` and `b` name the same object part (quotes and case as Snowflake has them).

    Either side may be a fully qualified name; the last parts are compared.
    """
    try:
        last_a, last_b = split_name(a)[-1], split_name(b)[-1]
    except ValueError:
        return a == b
    return _resolved(last_a) == _resolved(last_b) or (
        last_a.strip('"').upper() == last_b.strip('"').upper()
    )


@dataclass(frozen=True, slots=True, order=True)
class TableName:
    """A fully qualified table: database, schema, table, each as written (quoted or plain)."""

    database: str
    schema: str
    table: str

    def sql(self) -> str:
        """`DB.SCHEMA.TABLE` as SQL text, each part quoted when it must be."""
        return ".".join(quote_identifier(p) for p in (self.database, self.schema, self.table))

    def __str__(self) -> str:
        return self.sql()


def default_pipe_table(database: str, schema: str, pipe: str) -> TableName | None:
    """The table of a default pipe (`T-STREAMING` loads `T`), or None for another pipe."""
    name = pipe.strip()
    if len(name) >= 2 and name.startswith('"') and name.endswith('"'):
        inner = name[1:-1]
        if inner.endswith(DEFAULT_PIPE_SUFFIX) and len(inner) > len(DEFAULT_PIPE_SUFFIX):
            return TableName(database, schema, '"' + inner[: -len(DEFAULT_PIPE_SUFFIX)] + '"')
        return None
    if name.upper().endswith(DEFAULT_PIPE_SUFFIX) and len(name) > len(DEFAULT_PIPE_SUFFIX):
        return TableName(database, schema, name[: -len(DEFAULT_PIPE_SUFFIX)])
    return None


def copy_into_target(definition: str, database: str, schema: str) -> TableName | None:
    """The table a pipe definition copies into, qualified with the pipe's database and schema."""
    match = _COPY_INTO.search(definition)
    if match is None:
        return None
    parts = [p.strip() for p in split_name(match.group(1))]
    if len(parts) == 1:
        return TableName(database, schema, parts[0])
    if len(parts) == 2:
        return TableName(database, parts[0], parts[1])
    return TableName(parts[0], parts[1], parts[2])


class TableLocator:
    """Which table a pipe loads (the order is in the module docstring); answers are cached."""

    def __init__(
        self,
        sql: SqlApi | None,
        overrides: Mapping[tuple[str, str, str], tuple[str, str, str]] | None = None,
    ) -> None:
        self._sql = sql
        self._overrides = {k: TableName(*v) for k, v in (overrides or {}).items()}
        self._cache: dict[tuple[str, str, str], TableName] = {}
        self._lock = threading.Lock()

    def table_of(self, database: str, schema: str, pipe: str) -> TableName:
        """The table `database.schema.pipe` loads; PipeTableUnknownError when no way tells."""
        key = (database, schema, pipe)
        found = self._overrides.get(key) or self._cache.get(key)
        if found is not None:
            return found
        found = default_pipe_table(database, schema, pipe) or self._describe(*key)
        with self._lock:
            self._cache[key] = found
        return found

    def _describe(self, database: str, schema: str, pipe: str) -> TableName:
        name = TableName(database, schema, pipe).sql()
        fix = (
            f"name its table in SNOWPIPE_PIPE_TABLES ({database}.{schema}.{pipe}=TABLE); until "
            "then its rejected rows are attributed to whole batches"
        )
        if self._sql is None:
            raise PipeTableUnknownError(f"pipe {name} is not a default pipe", fix)
        try:
            result = self._sql.execute(f"DESCRIBE PIPE {name}")
        except SqlStatementError as exc:
            raise PipeTableUnknownError(
                f"DESCRIBE PIPE {name} failed ({exc.code}: {exc.message})", fix
            ) from exc
        try:
            definition = result.rows[0][result.index("definition")] if result.rows else None
        except KeyError:
            definition = None
        target = copy_into_target(definition or "", database, schema)
        if target is None:
            raise PipeTableUnknownError(f"DESCRIBE PIPE {name} shows no COPY INTO target", fix)
        return target


@dataclass(frozen=True, slots=True)
class ErrorRow:
    """One row of an error table written by Snowpipe Streaming."""

    channel: str
    offset_token_lower_bound: str | None
    offset_token_upper_bound: str | None
    data: str | None  # error_data:"$1": the row as sent (base64 if content_type says so)
    content_type: str | None  # json | json-invalid | binary-base64
    truncated: bool
    message: str
    code: str | None
    column: str | None  # error_metadata:error_source
    pipe: str | None = None

    @property
    def bounds(self) -> tuple[int, int] | None:
        """(lower, upper) as offsets; a missing lower bound is the upper one's; None when the
        upper bound is missing or a bound is not a decimal offset."""
        upper = _offset(self.offset_token_upper_bound)
        if upper is None:
            return None
        if self.offset_token_lower_bound is None:
            return (upper, upper)
        lower = _offset(self.offset_token_lower_bound)
        return None if lower is None else (lower, upper)


def _offset(token: str | None) -> int | None:
    if token is None:
        return None
    token = token.strip()
    return int(token) if token.isdigit() else None


# The columns of the query, then `FROM ERROR_TABLE(<TABLE>)` and the filter; the channel is
# bound (`?`), the table's name is quoted by quote_identifier.
_ERROR_ROWS_SQL: Final = (
    "SELECT error_code AS error_code, "
    "error_metadata:error_message::STRING AS error_message, "
    "error_metadata:error_source::STRING AS error_source, "
    "error_metadata:details:pipe_name::STRING AS pipe_name, "
    "error_metadata:details:channel_name::STRING AS channel_name, "
    "error_metadata:details:offset_token_lower_bound::STRING AS offset_token_lower_bound, "
    "error_metadata:details:offset_token_upper_bound::STRING AS offset_token_upper_bound, "
    "error_metadata:details:error_data_content_type::STRING AS error_data_content_type, "
    "error_metadata:details:error_data_truncated::BOOLEAN AS error_data_truncated, "
    'error_data:"$1"::STRING AS raw_row '
    "FROM ERROR_TABLE(<TABLE>) "
    "WHERE error_metadata:service = 'snowpipe_streaming' "
    "AND error_metadata:details:channel_name = ?"
)


def error_rows_statement(table: TableName) -> str:
    """The query of a channel's error rows in `table`'s error table (`?` = the channel name)."""
    return _ERROR_ROWS_SQL.replace("<TABLE>", table.sql())


class ErrorTableReader:
    """Reads the rows Snowflake rejected on one channel from a table's error table."""

    def __init__(self, sql: SqlApi) -> None:
        self._sql = sql

    def rows(
        self, table: TableName, pipe: str, channel: str, lower: int, upper: int
    ) -> list[ErrorRow]:
        """The error rows of `pipe`'s `channel` whose offset bounds overlap [lower, upper].

        The query selects the channel's rows of the error table; the pipe and the offsets are
        compared here (the pipe's name as Snowflake spells it, the bounds as numbers).
        Raises the SQL API's errors (`SqlStatementError` when the error table cannot be read).
        """
        result = self._sql.execute(error_rows_statement(table), [channel])
        out: list[ErrorRow] = []
        for row in parse_error_rows(result):
            if row.pipe is not None and not same_identifier(row.pipe, pipe):
                continue
            bounds = row.bounds
            if bounds is not None and (bounds[1] < lower or bounds[0] > upper):
                continue
            out.append(row)
        return out


def parse_error_rows(result: ResultSet) -> list[ErrorRow]:
    """The `ErrorRow`s of a result of `error_rows_statement` (ProtocolError for another shape)."""
    try:
        at = {name: result.index(name) for name in ERROR_ROW_COLUMNS}
    except KeyError as exc:
        raise ProtocolError(
            f"the error-table query answered other columns: {exc}", op="sql"
        ) from None
    rows: list[ErrorRow] = []
    for values in result.rows:

        def get(name: str, values: Sequence[str | None] = values) -> str | None:
            return values[at[name]]

        rows.append(
            ErrorRow(
                channel=get("CHANNEL_NAME") or "",
                offset_token_lower_bound=get("OFFSET_TOKEN_LOWER_BOUND"),
                offset_token_upper_bound=get("OFFSET_TOKEN_UPPER_BOUND"),
                data=get("RAW_ROW"),
                content_type=get("ERROR_DATA_CONTENT_TYPE"),
                truncated=(get("ERROR_DATA_TRUNCATED") or "").lower() in ("true", "1"),
                message=get("ERROR_MESSAGE") or "(no message)",
                code=get("ERROR_CODE"),
                column=get("ERROR_SOURCE"),
                pipe=get("PIPE_NAME"),
            )
        )
    return rows
