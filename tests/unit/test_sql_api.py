"""The SQL API client: request shape, polling, partitions, errors, retries; with respx."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
import respx

from tests.support.keys import key_pair
from worker.retry import RetryBudget, RetryPolicy
from worker.settings import Settings
from worker.snowpipe import errors as e
from worker.snowpipe.client import SnowpipeClient
from worker.snowpipe.sql import ResultSet, binding

ACCOUNT_URL = "https://acme-prod.snowflakecomputing.com"
STATEMENTS = f"{ACCOUNT_URL}/api/v2/statements"
HANDLE = "01b2c3d4-0000-1111-0000-000000000001"
STATUS_URL = f"/api/v2/statements/{HANDLE}"


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "account": "acme_prod",
        "user": "loader",
        "private_key": key_pair().private_pem.decode(),
        "account_url": ACCOUNT_URL,
    }
    base.update(overrides)
    return Settings(**base)


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def make_client(sleeps: Sleeps, **overrides: Any) -> SnowpipeClient:
    policy = RetryPolicy(sleep=sleeps, rng=lambda: 1.0, budget=RetryBudget(100))
    return SnowpipeClient(settings(**overrides), policy=policy)


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


def result_set(
    rows: list[list[str | None]],
    columns: tuple[str, ...] = ("N", "TEXT"),
    *,
    partitions: int = 1,
) -> dict[str, Any]:
    return {
        "resultSetMetaData": {
            "numRows": len(rows),
            "format": "jsonv2",
            "rowType": [{"name": c, "type": "text", "nullable": True} for c in columns],
            "partitionInfo": [{"rowCount": len(rows), "uncompressedSize": 1}] * partitions,
        },
        "data": rows,
        "code": "090001",
        "sqlState": "00000",
        "statementHandle": HANDLE,
        "statementStatusUrl": f"{STATUS_URL}?requestId=x",
        "message": "Statement executed successfully.",
        "createdOn": 1620151584132,
    }


def running() -> httpx.Response:
    return httpx.Response(
        202,
        json={
            "code": "333334",
            "message": "Asynchronous execution in progress. Use provided query id to perform "
            "query monitoring and management.",
            "statementHandle": HANDLE,
            "statementStatusUrl": STATUS_URL,
        },
    )


def failure(code: str, message: str, sql_state: str) -> httpx.Response:
    return httpx.Response(
        422,
        json={"code": code, "message": message, "sqlState": sql_state, "statementHandle": HANDLE},
    )


# --- The request ---------------------------------------------------------------------------------


def test_a_statement_is_posted_with_the_key_pair_jwt_bindings_and_context(
    mock: respx.MockRouter, sleeps: Sleeps
) -> None:
    route = mock.post(STATEMENTS).mock(
        return_value=httpx.Response(200, json=result_set([["1", "a"], ["2", None]]))
    )
    client = make_client(sleeps, sql_warehouse="LOADER_WH", role="LOADER")
    result = client.sql().execute(
        "SELECT n, text FROM t WHERE a = ? AND b = ?", ["x", 7], database="DB", schema="SC"
    )
    assert result.rows == (("1", "a"), ("2", None))
    assert result.columns == ("N", "TEXT")
    assert result.statement_handle == HANDLE
    request = route.calls.last.request
    assert request.headers["x-snowflake-authorization-token-type"] == "KEYPAIR_JWT"
    assert request.headers["user-agent"].startswith("snowpipe-worker/")
    assert request.headers["accept"] == "application/json"
    assert request.headers["content-type"] == "application/json"
    claims = jwt.decode(
        request.headers["authorization"].removeprefix("Bearer "),
        options={"verify_signature": False},
    )
    assert claims["sub"] == "ACME_PROD.LOADER"
    assert request.url.params["requestId"]
    assert "retry" not in request.url.params
    body = json.loads(request.content)
    assert body == {
        "statement": "SELECT n, text FROM t WHERE a = ? AND b = ?",
        "timeout": 60,
        "bindings": {"1": {"type": "TEXT", "value": "x"}, "2": {"type": "FIXED", "value": "7"}},
        "warehouse": "LOADER_WH",
        "role": "LOADER",
        "database": "DB",
        "schema": "SC",
    }


def test_without_a_warehouse_or_role_the_users_defaults_apply(
    mock: respx.MockRouter, sleeps: Sleeps
) -> None:
    route = mock.post(STATEMENTS).mock(return_value=httpx.Response(200, json=result_set([])))
    make_client(sleeps).sql().execute("SELECT 1")
    body = json.loads(route.calls.last.request.content)
    assert body == {"statement": "SELECT 1", "timeout": 60}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a", {"type": "TEXT", "value": "a"}),
        (12345678901234567890, {"type": "FIXED", "value": "12345678901234567890"}),
        (True, {"type": "BOOLEAN", "value": "true"}),
        (1.5, {"type": "REAL", "value": "1.5"}),
        (None, {"type": "TEXT", "value": None}),
    ],
)
def test_bindings_are_typed_from_the_python_value(value: Any, expected: dict[str, Any]) -> None:
    assert binding(value) == expected


def test_a_binding_of_another_type_is_refused_naming_it() -> None:
    with pytest.raises(TypeError, match="bytes"):
        binding(b"x")  # type: ignore[arg-type]


def test_the_result_reads_columns_by_name() -> None:
    result = ResultSet(("A", "b"), ("text", "text"), (("1", None),), HANDLE)
    assert result.index("B") == 1
    assert result.dicts() == [{"a": "1", "b": None}]
    with pytest.raises(KeyError, match="columns: A, b"):
        result.index("c")


# --- Polling and partitions ----------------------------------------------------------------------


def test_a_running_statement_is_polled_until_it_answers_with_its_rows(
    mock: respx.MockRouter, sleeps: Sleeps
) -> None:
    mock.post(STATEMENTS).mock(return_value=running())
    poll = mock.get(f"{ACCOUNT_URL}{STATUS_URL}").mock(
        side_effect=[running(), running(), httpx.Response(200, json=result_set([["1", "x"]]))]
    )
    result = make_client(sleeps).sql().execute("SELECT 1")
    assert result.rows == (("1", "x"),)
    assert poll.call_count == 3
    assert sleeps == [0.1, 0.2, 0.4]  # the waits between polls double
    assert poll.calls.last.request.headers["x-snowflake-authorization-token-type"] == (
        "KEYPAIR_JWT"
    )


def test_every_partition_is_fetched_in_order(mock: respx.MockRouter, sleeps: Sleeps) -> None:
    mock.post(STATEMENTS).mock(
        return_value=httpx.Response(200, json=result_set([["1", "a"]], partitions=3))
    )

    def partition(request: httpx.Request) -> httpx.Response:
        n = int(request.url.params["partition"])
        body = gzip.compress(json.dumps({"data": [[str(n + 1), f"p{n}"]]}).encode())
        return httpx.Response(200, content=body, headers={"Content-Encoding": "gzip"})

    route = mock.get(f"{ACCOUNT_URL}{STATUS_URL}").mock(side_effect=partition)
    result = make_client(sleeps).sql().execute("SELECT 1")
    assert result.rows == (("1", "a"), ("2", "p1"), ("3", "p2"))
    assert [c.request.url.params["partition"] for c in route.calls] == ["1", "2"]


def test_a_statement_that_runs_past_the_timeout_is_cancelled_and_reported(
    mock: respx.MockRouter, sleeps: Sleeps
) -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    mock.post(STATEMENTS).mock(return_value=running())
    mock.get(f"{ACCOUNT_URL}{STATUS_URL}").mock(return_value=running())
    cancel = mock.post(f"{ACCOUNT_URL}{STATUS_URL}/cancel").mock(
        return_value=httpx.Response(200, json={"code": "000604", "message": "cancelled"})
    )
    policy = RetryPolicy(sleep=sleep, clock=lambda: now[0], budget=RetryBudget(100))
    api = SnowpipeClient(settings(sql_timeout_seconds=5), policy=policy).sql()
    with pytest.raises(e.RequestTimeoutError, match=r"still running after 1[0-9] s") as info:
        api.execute("SELECT 1")
    assert cancel.called
    assert "SNOWPIPE_SQL_TIMEOUT_SECONDS" in str(info.value)


def test_a_status_url_on_another_host_is_asked_on_the_account_host(
    mock: respx.MockRouter, sleeps: Sleeps
) -> None:
    answer = running()
    body = json.loads(answer.content)
    body["statementStatusUrl"] = f"https://elsewhere.example{STATUS_URL}"
    mock.post(STATEMENTS).mock(return_value=httpx.Response(202, json=body))
    poll = mock.get(f"{ACCOUNT_URL}{STATUS_URL}").mock(
        return_value=httpx.Response(200, json=result_set([]))
    )
    make_client(sleeps).sql().execute("SELECT 1")
    assert poll.called


# --- Errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "sql_state", "cls", "fix"),
    [
        ("002003", "42S02", e.SqlObjectNotFoundError, "ERROR_LOGGING = TRUE"),
        ("000606", "57P03", e.SqlNoWarehouseError, "SNOWPIPE_SQL_WAREHOUSE"),
        ("391911", "0A000", e.SqlUnsupportedError, "refuses this statement type"),
        ("000904", "42000", e.SqlStatementError, "see the message"),
    ],
)
def test_a_failed_statement_is_one_typed_line_with_code_state_handle_and_fix(
    mock: respx.MockRouter, sleeps: Sleeps, code: str, sql_state: str, cls: type, fix: str
) -> None:
    mock.post(STATEMENTS).mock(
        return_value=failure(code, "SQL compilation error:\nsomething is\n  wrong", sql_state)
    )
    with pytest.raises(e.SqlStatementError) as info:
        make_client(sleeps).sql().execute("SELECT 1")
    err = info.value
    assert type(err) is cls
    assert (err.status, err.code, err.sql_state, err.statement_handle) == (
        422,
        code,
        sql_state,
        HANDLE,
    )
    text = str(err)
    assert "\n" not in text
    assert "SQL compilation error: something is wrong" in text
    assert fix in text
    assert isinstance(err, e.PermanentError)
    assert sleeps == []  # not retried


def test_a_failure_while_polling_is_the_same_typed_error(
    mock: respx.MockRouter, sleeps: Sleeps
) -> None:
    mock.post(STATEMENTS).mock(return_value=running())
    mock.get(f"{ACCOUNT_URL}{STATUS_URL}").mock(
        return_value=failure("002003", "Object 'T' does not exist or not authorized.", "42S02")
    )
    with pytest.raises(e.SqlObjectNotFoundError, match="does not exist"):
        make_client(sleeps).sql().execute("SELECT 1")


def test_transient_answers_are_retried_with_the_same_request_id_marked_as_a_retry(
    mock: respx.MockRouter, sleeps: Sleeps
) -> None:
    route = mock.post(STATEMENTS).mock(
        side_effect=[
            httpx.Response(503, text="unavailable"),
            httpx.Response(429, json={"code": "390701", "message": "slow down"}),
            httpx.Response(200, json=result_set([])),
        ]
    )
    make_client(sleeps).sql().execute("SELECT 1")
    ids = [c.request.url.params["requestId"] for c in route.calls]
    assert len(set(ids)) == 1
    assert [c.request.url.params.get("retry") for c in route.calls] == [None, "true", "true"]
    assert len(sleeps) == 2


def test_a_rejected_jwt_is_resent_once_then_names_key_account_and_user(
    mock: respx.MockRouter, sleeps: Sleeps
) -> None:
    route = mock.post(STATEMENTS).mock(
        return_value=httpx.Response(
            401, json={"code": "390144", "message": "JWT token is invalid. [abc]"}
        )
    )
    with pytest.raises(e.InvalidJWTError) as info:
        make_client(sleeps).sql().execute("SELECT 1")
    assert route.call_count == 2  # GuardAuth: one resend with a new JWT
    first, second = (c.request.headers["authorization"] for c in route.calls)
    assert first != second
    text = str(info.value)
    assert "fingerprint" in text
    assert "SNOWPIPE_USER='loader'" in text
    assert "eyJ" not in text


def test_a_role_that_is_not_granted_names_the_setting(
    mock: respx.MockRouter, sleeps: Sleeps
) -> None:
    mock.post(STATEMENTS).mock(
        return_value=httpx.Response(
            400,
            json={
                "code": "390186",
                "message": "The role requested in the connection or the default role if none "
                "was requested in the connection ('LOADER') is not granted to this user.",
            },
        )
    )
    with pytest.raises(e.ForbiddenError, match="grant SNOWPIPE_ROLE"):
        make_client(sleeps, role="LOADER").sql().execute("SELECT 1")


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>proxy</html>"),
        httpx.Response(200, json=[1, 2]),
        httpx.Response(200, json={"data": []}),
        httpx.Response(202, json={"code": "333334"}),
        httpx.Response(200, json={**result_set([["only one"]])}),
    ],
)
def test_an_answer_of_another_shape_is_a_protocol_error(
    mock: respx.MockRouter, sleeps: Sleeps, answer: httpx.Response
) -> None:
    mock.post(STATEMENTS).mock(return_value=answer)
    with pytest.raises(e.ProtocolError):
        make_client(sleeps).sql().execute("SELECT 1")


def test_an_empty_statement_is_refused_before_anything_is_sent(sleeps: Sleeps) -> None:
    with pytest.raises(ValueError, match="empty SQL statement"):
        make_client(sleeps).sql().execute("  ")


def test_the_sql_api_shares_the_snowpipe_clients_http_client_and_policy(sleeps: Sleeps) -> None:
    client = make_client(sleeps)
    api = client.sql()
    assert api is client.sql()
    assert api.policy is client.policy
    assert api._http() is client.http


def test_no_token_reaches_the_log_or_the_error(
    mock: respx.MockRouter, sleeps: Sleeps, capsys: pytest.CaptureFixture[str]
) -> None:
    sent: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        token = request.headers["authorization"].removeprefix("Bearer ")
        sent.append(token)
        return httpx.Response(401, json={"code": "390144", "message": f"bad JWT {token}"})

    mock.post(STATEMENTS).mock(side_effect=refuse)
    with pytest.raises(e.InvalidJWTError) as info:
        make_client(sleeps).sql().execute("SELECT 1")
    logged = capsys.readouterr()
    for token in sent:
        assert token not in str(info.value)
        assert token not in repr(info.value)
        assert token not in logged.out + logged.err
