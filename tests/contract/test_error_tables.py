"""A table with error logging records every row it rejects in its error table, with Snowflake's
columns and the Snowpipe Streaming details, when the append commits; read over the SQL API.

Each test runs over HTTP and over HTTPS (tests/contract/conftest.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.contract.refclient import RefClient
from tests.support.emulator import RunningEmulator, Starter, start_emulator
from tests.support.keys import key_pair

ACCOUNT, USER = "ERRACCT", "LOADER"
DB, SCHEMA = "DB", "PUBLIC"
COLUMNS = [
    {"name": "ID", "type": "NUMBER", "nullable": False},
    {"name": "NAME", "type": "VARCHAR"},
    {"name": "OK", "type": "BOOLEAN"},
]
ALL_COLUMNS = (
    "SELECT timestamp, query_id, error_code, error_metadata, error_data FROM ERROR_TABLE({})"
)


@pytest.fixture(scope="module")
def registered(shared_emulator: RunningEmulator) -> RunningEmulator:
    shared_emulator.register_key(ACCOUNT, USER, key_pair().public_pem)
    return shared_emulator


@pytest.fixture
def client(registered: RunningEmulator) -> Iterator[RefClient]:
    c = RefClient(registered.url, ACCOUNT, USER, key_pair().private_key).connect()
    yield c
    c.close()


def error_rows(client: RefClient, table: str) -> list[dict[str, Any]]:
    """Every row of the table's error table, its OBJECT columns parsed."""
    result = client.query(ALL_COLUMNS.format(f"{DB}.{SCHEMA}.{table}"))
    names = [c["name"] for c in result["resultSetMetaData"]["rowType"]]
    rows = [dict(zip(names, row, strict=True)) for row in result["data"]]
    for row in rows:
        row["ERROR_METADATA"] = json.loads(row["ERROR_METADATA"])
        row["ERROR_DATA"] = json.loads(row["ERROR_DATA"])
    return rows


def test_rejected_rows_are_recorded_with_snowflakes_columns_and_the_request_offset_bounds(
    client: RefClient, registered: RunningEmulator
) -> None:
    registered.add_pipe(DB, SCHEMA, "EVENTS_PIPE", columns=COLUMNS, table="EVENTS",
                        error_logging=True)
    token = client.open(DB, SCHEMA, "EVENTS_PIPE", "orders-1")["next_continuation_token"]
    lines = [
        b'{"ID": 1, "NAME": "good"}',
        b'{"NAME": "no id",  "big": 1180591620717411303424, "price": 1.10}',
        b'{"ID": "two"}',
        b"not json",
        b'{"ID": 3, "OK": "maybe"}',
        b'{"ID": 4}',
    ]
    response = client.append(
        DB, SCHEMA, "EVENTS_PIPE", "orders-1", b"\n".join(lines) + b"\n",
        continuation_token=token, start="batch-7:0", end="batch-7:5",
    )
    assert response.status_code == 200, response.text
    status = client.wait_committed(DB, SCHEMA, "EVENTS_PIPE", "orders-1", "batch-7:5")
    assert status["rows_error_count"] == 4
    assert status["rows_inserted"] == 2

    rows = error_rows(client, "EVENTS")

    assert [r["ERROR_DATA"] for r in rows] == [
        {"$1": lines[1].decode()}, {"$1": lines[2].decode()}, {"$1": lines[3].decode()},
        {"$1": lines[4].decode()},
    ]
    assert [(r["ERROR_CODE"], r["ERROR_METADATA"]["error_message"]) for r in rows] == [
        ("100072", "NULL result in a non-nullable column"),
        ("100038", "Numeric value 'two' is not recognized"),
        ("100069", rows[2]["ERROR_METADATA"]["error_message"]),
        ("100037", "Boolean value 'maybe' is not recognized"),
    ]
    assert rows[2]["ERROR_METADATA"]["error_message"].startswith("Error parsing JSON: ")
    first = rows[0]["ERROR_METADATA"]
    assert first == {
        "error_code": 100072,
        "error_message": "NULL result in a non-nullable column",
        "error_source": "ID",
        "sql_state": "22000",
        "service": "snowpipe_streaming",
        "details": {
            "pipe_name": "EVENTS_PIPE",
            "channel_name": "orders-1",
            "offset_token_lower_bound": "batch-7:0",
            "offset_token_upper_bound": "batch-7:5",
            "error_data_truncated": False,
            "error_data_content_type": "json",
        },
    }
    assert rows[2]["ERROR_METADATA"]["error_source"] is None
    assert rows[2]["ERROR_METADATA"]["details"]["error_data_content_type"] == "json-invalid"
    # One append is one statement: one query id and one timestamp for all its rows.
    assert len({r["QUERY_ID"] for r in rows}) == 1
    assert len({r["TIMESTAMP"] for r in rows}) == 1
    seconds, _, nanos = rows[0]["TIMESTAMP"].partition(".")
    assert seconds.isdigit() and len(nanos) == 9
    # The raw text keeps every number exactly as sent, through the error table too.
    payload = json.loads(rows[0]["ERROR_DATA"]["$1"], parse_float=Decimal)
    assert payload["big"] == 2**70 and str(payload["price"]) == "1.10"


def test_the_error_table_has_snowflakes_column_names_and_types(
    client: RefClient, registered: RunningEmulator
) -> None:
    registered.add_pipe(DB, SCHEMA, "SHAPE-STREAMING", columns=COLUMNS, error_logging=True)

    result = client.query(f"SELECT * FROM ERROR_TABLE({DB}.{SCHEMA}.SHAPE)")

    row_type = result["resultSetMetaData"]["rowType"]
    assert [(c["name"], c["type"]) for c in row_type] == [
        ("TIMESTAMP", "timestamp_ltz"),
        ("QUERY_ID", "text"),
        ("ERROR_CODE", "fixed"),
        ("ERROR_METADATA", "object"),
        ("ERROR_DATA", "object"),
    ]
    assert result["data"] == []


def test_error_rows_appear_when_the_append_commits_not_before(
    client: RefClient, registered: RunningEmulator
) -> None:
    registered.add_pipe(DB, SCHEMA, "LATER-STREAMING", columns=COLUMNS, error_logging=True)
    token = client.open(DB, SCHEMA, "LATER-STREAMING", "c")["next_continuation_token"]
    registered.pause_commits(True)
    try:
        client.append(DB, SCHEMA, "LATER-STREAMING", "c", [{"NAME": "no id"}],
                      continuation_token=token, end="1").raise_for_status()
        pending = client.query(f"SELECT COUNT(*) FROM ERROR_TABLE({DB}.{SCHEMA}.LATER)")
        status = client.status(DB, SCHEMA, "LATER-STREAMING", ["c"]).json()
    finally:
        registered.pause_commits(False)
    assert pending["data"] == [["0"]]
    assert status["channel_statuses"]["c"]["rows_error_count"] == 0

    committed = client.wait_committed(DB, SCHEMA, "LATER-STREAMING", "c", "1")

    assert committed["rows_error_count"] == 1
    after = client.query(f"SELECT COUNT(*) FROM ERROR_TABLE({DB}.{SCHEMA}.LATER)")
    assert after["data"] == [["1"]]


def test_a_single_row_append_has_its_offset_token_as_both_bounds(
    client: RefClient, registered: RunningEmulator
) -> None:
    registered.add_pipe(DB, SCHEMA, "SINGLE-STREAMING", columns=COLUMNS, error_logging=True)
    token = client.open(DB, SCHEMA, "SINGLE-STREAMING", "c")["next_continuation_token"]
    client.append(DB, SCHEMA, "SINGLE-STREAMING", "c", [{"ID": None}], continuation_token=token,
                  offset_token="41").raise_for_status()
    client.wait_committed(DB, SCHEMA, "SINGLE-STREAMING", "c", "41")

    (details,) = [r["ERROR_METADATA"]["details"] for r in error_rows(client, "SINGLE")]

    assert details["offset_token_lower_bound"] == details["offset_token_upper_bound"] == "41"


def test_a_row_that_is_not_utf8_is_kept_as_base64(
    client: RefClient, registered: RunningEmulator
) -> None:
    registered.add_pipe(DB, SCHEMA, "BYTES-STREAMING", error_logging=True)
    token = client.open(DB, SCHEMA, "BYTES-STREAMING", "c")["next_continuation_token"]
    raw = b'{"name": "\xff\xfe"}'
    client.append(DB, SCHEMA, "BYTES-STREAMING", "c", raw + b'\n{"ok": 1}\n',
                  continuation_token=token, start="1", end="2").raise_for_status()
    client.wait_committed(DB, SCHEMA, "BYTES-STREAMING", "c", "2")

    (row,) = error_rows(client, "BYTES")

    assert row["ERROR_METADATA"]["details"]["error_data_content_type"] == "binary-base64"
    assert base64.b64decode(row["ERROR_DATA"]["$1"]) == raw


def test_without_error_logging_nothing_is_recorded_and_error_table_is_refused(
    client: RefClient, registered: RunningEmulator
) -> None:
    registered.add_pipe(DB, SCHEMA, "PLAIN-STREAMING", columns=COLUMNS)
    token = client.open(DB, SCHEMA, "PLAIN-STREAMING", "c")["next_continuation_token"]
    client.append(DB, SCHEMA, "PLAIN-STREAMING", "c", [{"NAME": "no id"}],
                  continuation_token=token, end="1").raise_for_status()
    status = client.wait_committed(DB, SCHEMA, "PLAIN-STREAMING", "c", "1")
    assert status["rows_error_count"] == 1

    response = client.statement(f"SELECT * FROM ERROR_TABLE({DB}.{SCHEMA}.PLAIN)")

    assert response.status_code == 422
    body = response.json()
    assert (body["code"], body["sqlState"]) == ("002003", "42S02")
    assert "ERROR_LOGGING" in body["message"]
    assert "error_logging" in response.headers["x-emulator-reason"]


def test_turning_error_logging_off_drops_the_error_tables_rows(
    client: RefClient, registered: RunningEmulator
) -> None:
    registered.add_pipe(DB, SCHEMA, "TOGGLE-STREAMING", columns=COLUMNS, error_logging=True)
    token = client.open(DB, SCHEMA, "TOGGLE-STREAMING", "c")["next_continuation_token"]
    client.append(DB, SCHEMA, "TOGGLE-STREAMING", "c", [{"NAME": "x"}],
                  continuation_token=token, end="1").raise_for_status()
    client.wait_committed(DB, SCHEMA, "TOGGLE-STREAMING", "c", "1")
    assert len(error_rows(client, "TOGGLE")) == 1

    off = registered.add_pipe(DB, SCHEMA, "TOGGLE-STREAMING", error_logging=False)
    on = registered.add_pipe(DB, SCHEMA, "TOGGLE-STREAMING", error_logging=True)

    assert (off["table"], off["error_logging"], on["error_logging"]) == ("TOGGLE", False, True)
    assert error_rows(client, "TOGGLE") == []


@contextlib.contextmanager
def started(start: Starter, *args: str) -> Iterator[tuple[RunningEmulator, RefClient]]:
    with start(*args) as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        try:
            yield emu, c
        finally:
            c.close()


def test_error_logging_from_the_command_line(emulator_starter: Starter) -> None:
    pipe = "DB.PUBLIC.CLI_PIPE(ID NUMBER(38,0) NOT NULL, T VARCHAR) TABLE = CLI ERROR_LOGGING=TRUE"
    with started(emulator_starter, "--pipe", pipe) as (emu, c):
        token = c.open(DB, SCHEMA, "CLI_PIPE", "c")["next_continuation_token"]
        c.append(DB, SCHEMA, "CLI_PIPE", "c", [{"T": "x"}], continuation_token=token,
                 end="1").raise_for_status()
        c.wait_committed(DB, SCHEMA, "CLI_PIPE", "c", "1")

        rows = error_rows(c, "CLI")

        assert [r["ERROR_METADATA"]["error_source"] for r in rows] == ["ID"]
        assert emu.admin.get("/_emulator/pipes").json() == [
            {"database": "DB", "schema": "PUBLIC", "pipe": "CLI_PIPE", "table": "CLI",
             "error_logging": True},
        ]


def test_error_rows_survive_a_restart_with_db(tmp_path: Path) -> None:
    db = str(tmp_path / "emulator.sqlite")
    pipe = "DB.PUBLIC.KEPT(ID NUMBER NOT NULL) ERROR_LOGGING = TRUE"
    with start_emulator("--commit-delay", "0.05", "--db", db, "--pipe", pipe) as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        with contextlib.closing(
            RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        ) as c:
            token = c.open(DB, SCHEMA, "KEPT", "c")["next_continuation_token"]
            c.append(DB, SCHEMA, "KEPT", "c", [{"x": 1}], continuation_token=token,
                     end="1").raise_for_status()
            c.wait_committed(DB, SCHEMA, "KEPT", "c", "1")

    with start_emulator("--db", db) as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        with contextlib.closing(RefClient(emu.url, ACCOUNT, USER, key_pair().private_key)) as c:
            rows = error_rows(c, "KEPT")

    assert [r["ERROR_DATA"] for r in rows] == [{"$1": '{"x":1}'}]
