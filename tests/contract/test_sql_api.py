"""Snowflake's SQL API on the account host, the subset that reads error tables: key-pair JWT auth,
SELECT ... FROM ERROR_TABLE with paths and bindings, Snowflake's ResultSet, QueryStatus and
QueryFailureStatus, async handles, partitions, TRUNCATE and DESCRIBE PIPE.

Each test runs over HTTP and over HTTPS (tests/contract/conftest.py).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.contract.refclient import RefClient, mint_jwt
from tests.support.emulator import RunningEmulator, Starter
from tests.support.keys import key_pair

ACCOUNT, USER = "SQLACCT", "LOADER"
DB, SCHEMA = "DB", "PUBLIC"
PIPE, TABLE = "ORDERS_PIPE", "ORDERS"
COLUMNS = [{"name": "ID", "type": "NUMBER", "nullable": False}, {"name": "N", "type": "NUMBER"}]
# One append per channel: rows 0..4 of the body, two of them rejected.
BODY = b'{"ID": 1}\n{"N": 1}\n{"ID": 2}\n{"ID": 3, "N": "x"}\n{"ID": 4}\n'
CHANNEL_QUERY = """
    SELECT error_metadata:error_message::STRING AS message,
           error_metadata:details:channel_name::STRING,
           error_metadata:details.offset_token_lower_bound::STRING,
           error_metadata['details']['offset_token_upper_bound']::STRING,
           error_data:"$1"::STRING,
           error_metadata:error_code,
           TO_JSON(error_metadata:details)
    FROM ERROR_TABLE(ORDERS)
    WHERE error_metadata:service = 'snowpipe_streaming'
      AND error_metadata:details:channel_name = ?
    ORDER BY error_code
"""


@pytest.fixture(scope="module")
def loaded(shared_emulator: RunningEmulator) -> RunningEmulator:
    """The shared emulator with a table whose error table holds rows of channels a and b."""
    emu = shared_emulator
    emu.register_key(ACCOUNT, USER, key_pair().public_pem)
    emu.add_pipe(DB, SCHEMA, PIPE, columns=COLUMNS, table=TABLE, error_logging=True)
    with contextlib.closing(
        RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
    ) as c:
        for channel, start, end in (("a", "a:0", "a:4"), ("b", "b:0", "b:4")):
            token = c.open(DB, SCHEMA, PIPE, channel)["next_continuation_token"]
            c.append(DB, SCHEMA, PIPE, channel, BODY, continuation_token=token, start=start,
                     end=end).raise_for_status()
            c.wait_committed(DB, SCHEMA, PIPE, channel, end)
    return emu


@pytest.fixture
def client(loaded: RunningEmulator) -> Iterator[RefClient]:
    c = RefClient(loaded.url, ACCOUNT, USER, key_pair().private_key)
    yield c
    c.close()


def failure(response: httpx.Response, status: int, code: str, sql_state: str) -> dict[str, Any]:
    """Snowflake's QueryFailureStatus: exactly code, message, sqlState, statementHandle."""
    assert response.status_code == status, response.text
    body = dict(response.json())
    assert set(body) == {"code", "message", "sqlState", "statementHandle"}, body
    assert (body["code"], body["sqlState"]) == (code, sql_state), body
    return body


# --- the supported SELECT ---------------------------------------------------------------------


def test_select_with_paths_and_a_binding_answers_snowflakes_result_set(client: RefClient) -> None:
    response = client.statement(
        CHANNEL_QUERY, bindings={"1": {"type": "TEXT", "value": "b"}},
        database=DB, schema=SCHEMA, warehouse="ANY_WH", role="ANY_ROLE",
    )

    assert response.status_code == 200, response.text
    body = response.json()
    handle = body["statementHandle"]
    uuid.UUID(handle)
    assert body["code"] == "090001" and body["sqlState"] == "00000"
    assert body["message"] == "Statement executed successfully."
    status_url = f"/api/v2/statements/{handle}?requestId={body['requestId']}"
    assert body["statementStatusUrl"] == status_url
    assert isinstance(body["createdOn"], int)
    meta = body["resultSetMetaData"]
    assert meta["format"] == "jsonv2" and meta["numRows"] == 2
    assert meta["partitionInfo"][0]["rowCount"] == 2
    assert [(c["name"], c["type"]) for c in meta["rowType"]] == [
        ("MESSAGE", "text"),
        ("ERROR_METADATA:DETAILS:CHANNEL_NAME::STRING", "text"),
        ("ERROR_METADATA:DETAILS.OFFSET_TOKEN_LOWER_BOUND::STRING", "text"),
        ("ERROR_METADATA['details']['offset_token_upper_bound']::STRING", "text"),
        ('ERROR_DATA:"$1"::STRING', "text"),
        ("ERROR_METADATA:ERROR_CODE", "variant"),
        ("TO_JSON(ERROR_METADATA:DETAILS)", "text"),
    ]
    details = (
        '{"channel_name":"b","error_data_content_type":"json","error_data_truncated":false,'
        '"offset_token_lower_bound":"b:0","offset_token_upper_bound":"b:4",'
        '"pipe_name":"ORDERS_PIPE"}'
    )
    assert body["data"] == [
        ["Numeric value 'x' is not recognized", "b", "b:0", "b:4", '{"ID": 3, "N": "x"}',
         "100038", details],
        ["NULL result in a non-nullable column", "b", "b:0", "b:4", '{"N": 1}', "100072",
         details],
    ]
    assert response.headers["link"].startswith(f"</api/v2/statements/{handle}?requestId=")


def test_filters_combine_equality_ranges_in_lists_and_null_tests(client: RefClient) -> None:
    result = client.query(
        "SELECT error_data:\"$1\"::STRING FROM ERROR_TABLE(DB.PUBLIC.ORDERS) "
        "WHERE error_code >= ? AND error_code < 100072 "
        "AND error_metadata:details:channel_name IN ('a', 'z') "
        "AND error_metadata:error_source IS NOT NULL AND error_metadata:nothing IS NULL "
        "AND error_metadata:details:offset_token_upper_bound::STRING <= 'a:9' "
        "AND timestamp > '2020-01-01T00:00:00Z'",
        bindings={"1": {"type": "FIXED", "value": "100038"}},
    )

    assert result["data"] == [['{"ID": 3, "N": "x"}']]


def test_count_limit_offset_and_ordinal_order(client: RefClient) -> None:
    count = client.query("SELECT COUNT(*) FROM ERROR_TABLE(DB.PUBLIC.ORDERS)")
    page = client.query(
        "SELECT error_metadata:details:channel_name::STRING AS ch, error_code "
        "FROM ERROR_TABLE(DB.PUBLIC.ORDERS) ORDER BY 1 DESC, 2 LIMIT 2 OFFSET 1"
    )

    assert count["data"] == [["4"]]
    assert page["data"] == [["b", "100072"], ["a", "100038"]]


def test_select_star_sends_objects_as_indented_json(client: RefClient) -> None:
    result = client.query(
        "SELECT * FROM ERROR_TABLE(ORDERS) LIMIT 1", database=DB, schema=SCHEMA
    )

    (row,) = result["data"]
    assert row[4] == '{\n  "$1": "{\\"N\\": 1}"\n}'
    assert row[3].startswith('{\n  "details": {\n    "channel_name": "a",')


def test_nullable_false_sends_sql_null_as_the_text_null(client: RefClient) -> None:
    result = client.query(
        "SELECT error_metadata:error_source::STRING FROM ERROR_TABLE(DB.PUBLIC.ORDERS) "
        "WHERE error_code = 100072 AND error_metadata:details:channel_name = 'a'",
        params={"nullable": "false"},
    )
    plain = client.query(
        "SELECT error_metadata:no_such_key::STRING FROM ERROR_TABLE(DB.PUBLIC.ORDERS) LIMIT 1"
    )

    assert result["data"] == [["ID"]]
    assert plain["data"] == [[None]]


# --- authentication -----------------------------------------------------------------------------


def test_a_bad_jwt_is_refused_with_401_390144(client: RefClient) -> None:
    stranger = mint_jwt(key_pair("sql-stranger").private_key, ACCOUNT, USER)
    statement = "SELECT COUNT(*) FROM ERROR_TABLE(DB.PUBLIC.ORDERS)"
    refused = [
        client.http.post(f"{client.url}/api/v2/statements", json={"statement": statement},
                         headers=client.sql_headers(token)) for token in (stranger, "garbage")
    ]
    no_auth = client.http.post(
        f"{client.url}/api/v2/statements", json={"statement": statement},
        headers={"Accept": "application/json"},
    )

    for response in [*refused, no_auth]:
        assert response.status_code == 401, response.text
        assert response.json()["code"] == "390144"
        assert response.json()["message"].startswith("JWT token is invalid.")


def test_a_scoped_ingest_token_is_not_a_sql_api_credential(client: RefClient) -> None:
    client.connect()
    assert client.scoped_token is not None
    response = client.http.post(
        f"{client.url}/api/v2/statements",
        json={"statement": "SELECT COUNT(*) FROM ERROR_TABLE(DB.PUBLIC.ORDERS)"},
        headers=client.sql_headers(client.scoped_token),
    )

    assert response.status_code == 401
    assert response.json()["code"] == "390144"


def test_the_token_type_header_may_be_left_out(client: RefClient) -> None:
    response = client.statement(
        "SELECT COUNT(*) FROM ERROR_TABLE(DB.PUBLIC.ORDERS)",
        headers={"X-Snowflake-Authorization-Token-Type": ""},
    )

    assert response.status_code == 200, response.text


# --- what is outside the subset -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "status", "code", "sql_state"),
    [
        ("USE DATABASE DB", 422, "391911", "0A000"),
        ("BEGIN", 422, "391911", "0A000"),
        ("INSERT INTO ORDERS VALUES (1)", 422, "000002", "0A000"),
        ("SELECT * FROM ORDERS", 422, "000002", "0A000"),
        ("SELECT 1", 422, "000002", "0A000"),
        ("TRUNCATE TABLE ORDERS", 422, "000002", "0A000"),
        ("SELEC 1", 422, "001003", "42000"),
        ("SELECT * FROM ERROR_TABLE(DB.PUBLIC.ORDERS) WHERE error_code = 1 OR 1 = 1", 422,
         "001003", "42000"),
        ("SELECT nope FROM ERROR_TABLE(DB.PUBLIC.ORDERS)", 422, "000904", "42000"),
        ("SELECT * FROM ERROR_TABLE(DB.PUBLIC.NO_SUCH)", 422, "002003", "42S02"),
        ("SELECT * FROM ERROR_TABLE(ORDERS)", 422, "090105", "22000"),
        ("SELECT * FROM ERROR_TABLE(DB.PUBLIC.ORDERS) WHERE query_id = ?", 422, "002049",
         "42601"),
        ("SELECT COUNT(*) FROM ERROR_TABLE(DB.PUBLIC.ORDERS); SELECT 1", 422, "000008",
         "0A000"),
        ("  -- nothing but a comment", 400, "000900", "42601"),
    ],
)
def test_statements_outside_the_subset_get_snowflakes_error(
    client: RefClient, statement: str, status: int, code: str, sql_state: str
) -> None:
    response = client.statement(statement)

    body = failure(response, status, code, sql_state)
    assert body["message"]
    assert response.headers["x-emulator-reason"]
    if status == 422:
        uuid.UUID(body["statementHandle"])


def test_a_missing_statement_is_400_000900_without_a_handle(client: RefClient) -> None:
    body = failure(client.statement(None), 400, "000900", "42601")

    assert body["message"] == "SQL compilation error:\nEmpty SQL statement."
    assert body["statementHandle"] is None


def test_a_variant_binding_is_refused(client: RefClient) -> None:
    response = client.statement(
        "SELECT * FROM ERROR_TABLE(DB.PUBLIC.ORDERS) WHERE query_id = ?",
        bindings={"1": {"type": "VARIANT", "value": "{}"}},
    )

    failure(response, 422, "002040", "42601")


def test_an_unknown_body_field_is_named(client: RefClient) -> None:
    response = client.statement("SELECT 1", bindigs={})

    assert response.status_code == 400
    assert "bindigs" in response.json()["message"]


# --- async, handles, partitions ------------------------------------------------------------------


def test_async_answers_202_and_the_status_url_gives_the_result(client: RefClient) -> None:
    submitted = client.statement(
        "SELECT COUNT(*) FROM ERROR_TABLE(DB.PUBLIC.ORDERS)", params={"async": "true"}
    )

    assert submitted.status_code == 202, submitted.text
    status = submitted.json()
    assert status["code"] == "333334"
    assert status["message"].startswith("Asynchronous execution in progress.")
    assert status["statementStatusUrl"] == f"/api/v2/statements/{status['statementHandle']}"
    done = client.statement_status(status["statementStatusUrl"])
    assert done.status_code == 200, done.text
    assert done.json()["data"] == [["4"]]
    assert done.json()["statementHandle"] == status["statementHandle"]


def test_a_failed_async_statement_answers_422_on_its_status_url(client: RefClient) -> None:
    submitted = client.statement("SELECT nope FROM ERROR_TABLE(DB.PUBLIC.ORDERS)",
                                 params={"async": "true"})
    assert submitted.status_code == 202

    body = failure(client.statement_status(submitted.json()["statementHandle"]), 422, "000904",
                   "42000")
    assert body["statementHandle"] == submitted.json()["statementHandle"]


def test_an_unknown_handle_is_400_000709(client: RefClient) -> None:
    handle = str(uuid.uuid4())

    body = failure(client.statement_status(handle), 400, "000709", "02000")

    assert body["message"] == f"Statement {handle} not found"


def test_a_retried_request_id_is_answered_without_running_again(client: RefClient) -> None:
    request_id = str(uuid.uuid4())
    params = {"requestId": request_id}
    first = client.query("SELECT COUNT(*) FROM ERROR_TABLE(DB.PUBLIC.ORDERS)", params=params)

    again = client.query("SELECT COUNT(*) FROM ERROR_TABLE(DB.PUBLIC.ORDERS)",
                         params={**params, "retry": "true"})

    assert again["statementHandle"] == first["statementHandle"]
    assert again["requestId"] == request_id


def test_an_injected_202_lets_a_client_exercise_its_polling(
    client: RefClient, loaded: RunningEmulator
) -> None:
    handle = client.query("SELECT COUNT(*) FROM ERROR_TABLE(DB.PUBLIC.ORDERS)")["statementHandle"]
    loaded.fault(endpoint="statement-status", status=202, count=1, body={
        "code": "333334", "message": "Asynchronous execution in progress.",
        "statementHandle": handle, "statementStatusUrl": f"/api/v2/statements/{handle}",
    })
    try:
        running = client.statement_status(handle)
        done = client.statement_status(handle)
    finally:
        loaded.clear_faults()

    assert running.status_code == 202
    assert done.status_code == 200 and done.json()["data"] == [["4"]]


@contextlib.contextmanager
def partitioned(start: Starter) -> Iterator[RefClient]:
    with start("--sql-partition-rows", "2", "--pipe",
               "DB.PUBLIC.P(ID NUMBER NOT NULL) ERROR_LOGGING = TRUE") as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        with contextlib.closing(
            RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        ) as c:
            token = c.open(DB, SCHEMA, "P", "c")["next_continuation_token"]
            body = b"".join(b'{"n": %d}\n' % i for i in range(5))
            c.append(DB, SCHEMA, "P", "c", body, continuation_token=token, start="0",
                     end="4").raise_for_status()
            c.wait_committed(DB, SCHEMA, "P", "c", "4")
            yield c


def test_a_large_result_comes_in_partitions(emulator_starter: Starter) -> None:
    with partitioned(emulator_starter) as c:
        query = "SELECT error_data:\"$1\"::STRING FROM ERROR_TABLE(DB.PUBLIC.P)"
        result = c.query(query)
        handle = result["statementHandle"]
        second = c.statement_status(handle, partition="2")
        beyond = c.statement_status(handle, partition="3")

    meta = result["resultSetMetaData"]
    assert meta["numRows"] == 5
    assert [p["rowCount"] for p in meta["partitionInfo"]] == [2, 2, 1]
    assert result["data"] == [['{"n": 0}'], ['{"n": 1}']]
    assert second.status_code == 200
    assert second.headers["content-encoding"] == "gzip"
    assert second.json() == {"data": [['{"n": 4}']]}
    failure(beyond, 400, "391922", "22000")


# --- TRUNCATE and DESCRIBE PIPE --------------------------------------------------------------


def test_truncate_error_table_empties_it(emulator_starter: Starter) -> None:
    with partitioned(emulator_starter) as c:
        truncated = c.query("TRUNCATE TABLE ERROR_TABLE(DB.PUBLIC.P)")
        after = c.query("SELECT COUNT(*) FROM ERROR_TABLE(DB.PUBLIC.P)")
        missing = c.query("TRUNCATE TABLE IF EXISTS ERROR_TABLE(DB.PUBLIC.NO_SUCH)")

    assert truncated["data"] == [["Statement executed successfully."]]
    assert truncated["stats"]["numRowsDeleted"] == 5
    assert after["data"] == [["0"]]
    assert missing["stats"]["numRowsDeleted"] == 0


def test_describe_pipe_names_the_table_it_loads(client: RefClient) -> None:
    result = client.query("DESC PIPE ORDERS_PIPE", database=DB, schema=SCHEMA)
    default = client.query('DESCRIBE PIPE DB.PUBLIC."EVENTS-STREAMING"')
    missing = client.statement("DESCRIBE PIPE DB.PUBLIC.NO_SUCH_PIPE")

    names = [c["name"] for c in result["resultSetMetaData"]["rowType"]]
    row = dict(zip(names, result["data"][0], strict=True))
    assert (row["name"], row["database_name"], row["schema_name"]) == (PIPE, DB, SCHEMA)
    assert row["definition"].startswith("COPY INTO DB.PUBLIC.ORDERS FROM ")
    default_row = dict(zip(names, default["data"][0], strict=True))
    assert default_row["definition"].startswith('COPY INTO DB.PUBLIC.EVENTS FROM ')
    failure(missing, 422, "002003", "42S02")
