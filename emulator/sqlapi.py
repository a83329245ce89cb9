"""Running SQL API statements against the emulator's state, and remembering their results.

`execute` resolves the names of a parsed statement (`emulator.sql`) with the request's database
and schema, runs it over the error tables and pipes of `EmulatorState`, and returns a `Result`
or raises `SqlError` with Snowflake's code. `StatementStore` keeps recent outcomes by handle, so
that `GET /api/v2/statements/{handle}` can answer them (docs/emulator.md#the-sql-api-subset).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from emulator import sql
from emulator.sql import TEXT, TIMESTAMP, Result, ResultColumn, SqlError, Token, quote
from emulator.state import IMPLICIT_PIPE_SUFFIX, EmulatorState, PipeKey
from emulator.storage import TableKey

# How many statements' outcomes are kept for GET /api/v2/statements/{handle}.
STATEMENT_HISTORY = 1000


def _resolve(
    parts: list[Token], database: str | None, schema: str | None, verb: str
) -> tuple[str, str, str]:
    """A 1-3 part name with the request's database and schema filled in (exact case)."""
    names = [sql.identifier(t) for t in parts]
    if len(names) < 3 and not database:
        raise SqlError(
            422, "090105", "22000",
            f"Cannot perform {verb}. This session does not have a current database. Call 'USE "
            "DATABASE', or use a qualified name.",
            reason='qualify the name (DB.SCHEMA.NAME) or send "database" in the request body',
        )
    if len(names) < 2 and not schema:
        raise SqlError(
            422, "090106", "22000",
            f"Cannot perform {verb}. This session does not have a current schema. Call 'USE "
            "SCHEMA', or use a qualified name.",
            reason='qualify the name (DB.SCHEMA.NAME) or send "schema" in the request body',
        )
    if len(names) == 1:
        return (str(database), str(schema), names[0])
    if len(names) == 2:
        return (str(database), names[0], names[1])
    return (names[0], names[1], names[2])


def _shown(key: tuple[str, str, str]) -> str:
    return ".".join(quote(part) for part in key)


def _error_table(
    state: EmulatorState, parts: list[Token], database: str | None, schema: str | None, verb: str
) -> TableKey | None:
    """The table whose error table is named; None when it does not exist."""
    table = _resolve(parts, database, schema, verb)
    if table not in state.tables():
        return None
    if table not in state.error_logging:
        raise SqlError(
            422, "002003", "42S02",
            f"SQL compilation error:\nError table for table '{_shown(table)}' does not exist or "
            "not authorized (ERROR_LOGGING is not TRUE on the table).",
            reason=(
                "turn error logging on: register a pipe that loads the table with "
                '"error_logging": true (POST /_emulator/pipes) or --pipe \'... ERROR_LOGGING = '
                "TRUE'; on Snowflake: ALTER TABLE <table> SET ERROR_LOGGING = TRUE"
            ),
        )
    return table


def _missing(key: tuple[str, str, str], what: str = "Object") -> SqlError:
    return SqlError(
        422, "002003", "42S02",
        f"SQL compilation error:\n{what} '{_shown(key)}' does not exist or not authorized.",
        reason=(
            f"no known pipe loads {_shown(key)}: register one with POST /_emulator/pipes "
            '(optionally "table") or --pipe, or append to <TABLE>-STREAMING first'
        ),
    )


def execute(
    state: EmulatorState,
    text: str,
    *,
    bindings: dict[str, object] | None = None,
    database: str | None = None,
    schema: str | None = None,
) -> Result:
    """Run one statement of the subset; SqlError with Snowflake's code otherwise."""
    statement = sql.parse(text, bindings)
    if isinstance(statement, sql.Select):
        table = _error_table(state, statement.table, database, schema, "SELECT")
        if table is None:
            raise _missing(_resolve(statement.table, database, schema, "SELECT"))
        return sql.select_rows(statement, state.storage.iter_error_rows(table))
    if isinstance(statement, sql.Truncate):
        table = _error_table(state, statement.table, database, schema, "TRUNCATE")
        deleted = 0
        if table is not None:
            deleted = state.storage.truncate_error_rows(table)
        elif not statement.if_exists:
            raise _missing(_resolve(statement.table, database, schema, "TRUNCATE"))
        return Result(
            [ResultColumn("status", TEXT)], [[sql.SUCCESS_MESSAGE]],
            stats={
                "numRowsInserted": 0, "numRowsUpdated": 0, "numRowsDeleted": deleted,
                "numDmlDuplicates": 0,
            },
        )
    return _describe_pipe(state, _resolve(statement.pipe, database, schema, "DESCRIBE"))


_DESCRIBE_COLUMNS = (
    "created_on", "name", "database_name", "schema_name", "definition", "owner",
    "notification_channel", "comment", "integration", "pattern", "error_integration",
    "owner_role_type", "invalid_reason",
)


def _describe_pipe(state: EmulatorState, key: PipeKey) -> Result:
    implicit = key[2].endswith(IMPLICIT_PIPE_SUFFIX) and len(key[2]) > len(IMPLICIT_PIPE_SUFFIX)
    if key not in state.pipes and not implicit and not state.config.accept_any_pipe:
        raise _missing(key, "Pipe")
    table = state.table_of(key)
    definition = (
        f"COPY INTO {_shown(table)} FROM TABLE(DATA_SOURCE(TYPE => 'STREAMING')) "
        "MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE"
    )
    created = sql.render(sql.Value(TIMESTAMP, state.started_ns))
    values: list[str | None] = [
        created, key[2], key[0], key[1], definition, None, None, None, None, None, None, None,
        None,
    ]
    columns = [
        ResultColumn(name, TIMESTAMP if name == "created_on" else TEXT)
        for name in _DESCRIBE_COLUMNS
    ]
    return Result(columns, [values])


@dataclass
class Outcome:
    """What a statement came to: its result or its error, by handle."""

    handle: str
    request_id: str
    created_on_ms: int
    result: Result | None = None
    error: SqlError | None = None
    nullable: bool = True  # False: SQL NULL is sent as the string "null" (`?nullable=false`)


class StatementStore:
    """The latest `STATEMENT_HISTORY` outcomes by statement handle and by request id."""

    def __init__(self, limit: int = STATEMENT_HISTORY) -> None:
        self.limit = limit
        self._by_handle: OrderedDict[str, Outcome] = OrderedDict()
        self._by_request: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, outcome: Outcome) -> None:
        """Remember an outcome (the oldest is forgotten beyond the limit)."""
        with self._lock:
            self._by_handle[outcome.handle] = outcome
            self._by_request[outcome.request_id] = outcome.handle
            while len(self._by_handle) > self.limit:
                _, old = self._by_handle.popitem(last=False)
                self._by_request.pop(old.request_id, None)

    def get(self, handle: str) -> Outcome | None:
        """The outcome of a statement, if remembered."""
        return self._by_handle.get(handle)

    def for_request(self, request_id: str) -> Outcome | None:
        """The outcome of the statement a request id submitted, if remembered."""
        handle = self._by_request.get(request_id)
        return None if handle is None else self._by_handle.get(handle)
