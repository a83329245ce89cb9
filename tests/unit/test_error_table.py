"""The error-table reader and the table locator, against recorded SQL API answers (respx)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx

from tests.support.keys import key_pair
from worker.errors import PipeTableUnknownError, ProtocolError
from worker.retry import RetryBudget, RetryPolicy
from worker.settings import Settings
from worker.snowpipe import errors as e
from worker.snowpipe.client import SnowpipeClient
from worker.snowpipe.errortable import (
    ERROR_ROW_COLUMNS,
    ErrorRow,
    ErrorTableReader,
    TableLocator,
    TableName,
    copy_into_target,
    default_pipe_table,
    error_rows_statement,
    quote_identifier,
    same_identifier,
)

ACCOUNT_URL = "https://acme-prod.snowflakecomputing.com"
STATEMENTS = f"{ACCOUNT_URL}/api/v2/statements"
HANDLE = "01b2c3d4-0000-1111-0000-000000000002"


def client(**overrides: Any) -> SnowpipeClient:
    base: dict[str, Any] = {
        "account": "acme_prod",
        "user": "loader",
        "private_key": key_pair().private_pem.decode(),
        "account_url": ACCOUNT_URL,
    }
    base.update(overrides)
    policy = RetryPolicy(sleep=lambda s: None, rng=lambda: 1.0, budget=RetryBudget(100))
    return SnowpipeClient(Settings(**base), policy=policy)


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


def answer(columns: tuple[str, ...], rows: list[list[str | None]]) -> httpx.Response:
    """A 200 ResultSet as the SQL API sends it: every value a string or null."""
    return httpx.Response(
        200,
        json={
            "resultSetMetaData": {
                "numRows": len(rows),
                "format": "jsonv2",
                "rowType": [{"name": c, "type": "text"} for c in columns],
                "partitionInfo": [{"rowCount": len(rows), "uncompressedSize": 100}],
            },
            "data": rows,
            "code": "090001",
            "sqlState": "00000",
            "statementHandle": HANDLE,
            "statementStatusUrl": f"/api/v2/statements/{HANDLE}",
            "message": "Statement executed successfully.",
        },
    )


def error_row(
    raw: str | None,
    *,
    lower: str | None = "1000",
    upper: str | None = "1002",
    pipe: str | None = "T-STREAMING",
    channel: str = "snowpipe_0",
    code: str | None = "100072",
    message: str = "NULL result in a non-nullable column",
    column: str | None = "ID",
    content_type: str | None = "json",
    truncated: str | None = "false",
) -> list[str | None]:
    values = {
        "ERROR_CODE": code,
        "ERROR_MESSAGE": message,
        "ERROR_SOURCE": column,
        "PIPE_NAME": pipe,
        "CHANNEL_NAME": channel,
        "OFFSET_TOKEN_LOWER_BOUND": lower,
        "OFFSET_TOKEN_UPPER_BOUND": upper,
        "ERROR_DATA_CONTENT_TYPE": content_type,
        "ERROR_DATA_TRUNCATED": truncated,
        "RAW_ROW": raw,
    }
    return [values[c] for c in ERROR_ROW_COLUMNS]


TABLE = TableName("DB", "SC", "T")


# --- The reader ----------------------------------------------------------------------------------


def test_the_reader_asks_for_the_channels_streaming_rows_of_the_tables_error_table(
    mock: respx.MockRouter,
) -> None:
    route = mock.post(STATEMENTS).mock(
        return_value=answer(ERROR_ROW_COLUMNS, [error_row('{"ID":null,"NAME":"x"}')])
    )
    rows = ErrorTableReader(client(sql_warehouse="WH").sql()).rows(
        TABLE, "T-STREAMING", "snowpipe_0", 1000, 1002
    )
    assert rows == [
        ErrorRow(
            channel="snowpipe_0",
            offset_token_lower_bound="1000",
            offset_token_upper_bound="1002",
            data='{"ID":null,"NAME":"x"}',
            content_type="json",
            truncated=False,
            message="NULL result in a non-nullable column",
            code="100072",
            column="ID",
            pipe="T-STREAMING",
        )
    ]
    body = json.loads(route.calls.last.request.content)
    assert "FROM ERROR_TABLE(DB.SC.T)" in body["statement"]
    assert "error_metadata:service = 'snowpipe_streaming'" in body["statement"]
    assert 'error_data:"$1"::STRING' in body["statement"]
    assert body["bindings"] == {"1": {"type": "TEXT", "value": "snowpipe_0"}}
    assert body["warehouse"] == "WH"


def test_rows_of_other_pipes_and_of_requests_outside_the_range_are_left_out(
    mock: respx.MockRouter,
) -> None:
    mock.post(STATEMENTS).mock(
        return_value=answer(
            ERROR_ROW_COLUMNS,
            [
                error_row("in", lower="1000", upper="1002"),
                error_row("overlaps the start", lower="990", upper="1000"),
                error_row("overlaps the end", lower="1002", upper="1010"),
                error_row("before", lower="900", upper="999"),
                error_row("after", lower="1003", upper="1004"),
                error_row("other pipe", pipe="OTHER"),
                error_row("same pipe, other spelling", pipe="db.sc.t-streaming"),
                error_row("no pipe named", pipe=None),
                error_row("bounds not offsets", lower="a", upper="b"),
            ],
        )
    )
    rows = ErrorTableReader(client().sql()).rows(TABLE, "T-STREAMING", "snowpipe_0", 1000, 1002)
    assert [r.data for r in rows] == [
        "in",
        "overlaps the start",
        "overlaps the end",
        "same pipe, other spelling",
        "no pipe named",
        "bounds not offsets",  # kept: the mapper reports it as unmatched, never drops it
    ]


def test_an_unreadable_error_table_raises_the_sql_apis_error(mock: respx.MockRouter) -> None:
    mock.post(STATEMENTS).mock(
        return_value=httpx.Response(
            422,
            json={
                "code": "002003",
                "message": "SQL compilation error:\nTable 'T' does not exist or not authorized.",
                "sqlState": "42S02",
                "statementHandle": HANDLE,
            },
        )
    )
    with pytest.raises(e.SqlObjectNotFoundError, match="ERROR_LOGGING = TRUE"):
        ErrorTableReader(client().sql()).rows(TABLE, "T-STREAMING", "snowpipe_0", 1, 2)


def test_an_answer_without_the_queried_columns_is_a_protocol_error(
    mock: respx.MockRouter,
) -> None:
    mock.post(STATEMENTS).mock(return_value=answer(("A",), [["1"]]))
    with pytest.raises(ProtocolError, match="other columns"):
        ErrorTableReader(client().sql()).rows(TABLE, "T-STREAMING", "snowpipe_0", 1, 2)


def test_a_truncated_flag_and_a_missing_lower_bound_are_read() -> None:
    row = ErrorRow("c", None, "7", "x", "json", True, "m", None, None)
    assert row.bounds == (7, 7)
    assert ErrorRow("c", "5", None, "x", "json", False, "m", None, None).bounds is None


# --- Names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("part", "sql"),
    [
        ("EVENTS", "EVENTS"),
        ("events_2$", "events_2$"),
        ('"My Table"', '"My Table"'),
        ("My Table", '"My Table"'),
        ('a"b', '"a""b"'),
        ('"a"b"', '"""a""b"""'),  # not a well-formed quoted name: quoted as a whole
        ("x); DROP TABLE y; --", '"x); DROP TABLE y; --"'),
    ],
)
def test_names_are_quoted_when_they_must_be(part: str, sql: str) -> None:
    assert quote_identifier(part) == sql


def test_the_error_rows_statement_quotes_the_table() -> None:
    statement = error_rows_statement(TableName("DB", "SC", "my table"))
    assert 'FROM ERROR_TABLE(DB.SC."my table")' in statement


@pytest.mark.parametrize(
    ("pipe", "table"),
    [
        ("EVENTS-STREAMING", "EVENTS"),
        ("events-streaming", "events"),
        ('"My T-STREAMING"', '"My T"'),
        ("EVENTS", None),
        ("-STREAMING", None),
        ('"My T-streaming"', None),  # quoted names are exact
    ],
)
def test_a_default_pipe_loads_the_table_it_is_named_after(pipe: str, table: str | None) -> None:
    found = default_pipe_table("DB", "SC", pipe)
    assert (found.table if found else None) == table
    if found:
        assert (found.database, found.schema) == ("DB", "SC")


@pytest.mark.parametrize(
    ("definition", "table"),
    [
        (
            "COPY INTO T FROM (SELECT $1 FROM TABLE(DATA_SOURCE(TYPE => 'STREAMING')))",
            ("DB", "SC", "T"),
        ),
        ("copy into other.T2 from (select 1)", ("DB", "other", "T2")),
        ('COPY  INTO  D2 . S2 . "My Table" FROM x', ("D2", "S2", '"My Table"')),
        ("SELECT 1", None),
    ],
)
def test_a_pipe_definition_names_its_table(
    definition: str, table: tuple[str, str, str] | None
) -> None:
    found = copy_into_target(definition, "DB", "SC")
    assert found == (TableName(*table) if table else None)


def test_same_identifier_compares_last_parts_as_snowflake_resolves_them() -> None:
    assert same_identifier("T-STREAMING", "DB.SC.T-STREAMING")
    assert same_identifier('"My T"', '"My T"')
    assert same_identifier("t_streaming", "T_STREAMING")
    assert not same_identifier("T-STREAMING", "U-STREAMING")


# --- Which table a pipe loads --------------------------------------------------------------------


def test_the_setting_wins_then_the_default_pipe_then_describe_pipe(
    mock: respx.MockRouter,
) -> None:
    route = mock.post(STATEMENTS).mock(
        return_value=answer(
            ("created_on", "name", "database_name", "schema_name", "definition"),
            [["1", "NAMED", "DB", "SC", "COPY INTO TARGET FROM (SELECT $1:a FROM TABLE(x))"]],
        )
    )
    locator = TableLocator(
        client().sql(), {("DB", "SC", "EVENTS-STREAMING"): ("DB", "OTHER", "ELSEWHERE")}
    )
    assert locator.table_of("DB", "SC", "EVENTS-STREAMING") == TableName("DB", "OTHER", "ELSEWHERE")
    assert locator.table_of("DB", "SC", "T-STREAMING") == TableName("DB", "SC", "T")
    assert not route.called
    assert locator.table_of("DB", "SC", "NAMED") == TableName("DB", "SC", "TARGET")
    assert locator.table_of("DB", "SC", "NAMED") == TableName("DB", "SC", "TARGET")
    assert route.call_count == 1  # asked once
    assert json.loads(route.calls.last.request.content)["statement"] == "DESCRIBE PIPE DB.SC.NAMED"


def test_a_pipe_whose_table_cannot_be_found_names_the_setting(mock: respx.MockRouter) -> None:
    mock.post(STATEMENTS).mock(
        return_value=httpx.Response(
            422,
            json={
                "code": "391911",
                "message": "Command not supported by SQL API",
                "sqlState": "0A000",
                "statementHandle": HANDLE,
            },
        )
    )
    with pytest.raises(PipeTableUnknownError) as info:
        TableLocator(client().sql()).table_of("DB", "SC", "NAMED")
    text = str(info.value)
    assert "DESCRIBE PIPE DB.SC.NAMED failed (391911: Command not supported by SQL API)" in text
    assert "SNOWPIPE_PIPE_TABLES (DB.SC.NAMED=TABLE)" in text
    assert "\n" not in text
    with pytest.raises(PipeTableUnknownError, match="not a default pipe"):
        TableLocator(None).table_of("DB", "SC", "NAMED")


# --- Settings ------------------------------------------------------------------------------------


def test_pipe_tables_name_a_table_per_pipe_quoted_names_included() -> None:
    s = Settings(pipe_tables='DB.SC.NAMED=T, DB.SC."a.b"=X.Y."z,="')
    assert s.pipe_tables_map() == {
        ("DB", "SC", "NAMED"): ("DB", "SC", "T"),
        ("DB", "SC", '"a.b"'): ("X", "Y", '"z,="'),
    }


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("pipe_tables", "DB.SC.P", "'DB.SC.P' is not DB.SCHEMA.PIPE=TABLE"),
        ("pipe_tables", "P=T", "'P=T' is not DB.SCHEMA.PIPE=TABLE"),
        ("pipe_tables", 'DB.SC."P=T', "unterminated double quote"),
        ("error_table", "on", "SNOWPIPE_ERROR_TABLE"),
        ("sql_timeout_seconds", "0", "SNOWPIPE_SQL_TIMEOUT_SECONDS"),
    ],
)
def test_a_bad_error_table_setting_is_one_line_naming_it(name: str, value: str, says: str) -> None:
    from worker.settings import SettingsError, load_settings

    with pytest.raises(SettingsError) as info:
        load_settings(require_identity=False, **{name: value})
    assert says in str(info.value)


def test_a_blank_warehouse_is_the_users_default() -> None:
    assert Settings(sql_warehouse="  ").sql_warehouse is None
