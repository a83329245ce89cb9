"""doctor's SQL API and error-table lines, against recorded SQL API answers (respx)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx

from tests.support.keys import key_pair
from worker.doctor import Check, Doctor
from worker.retry import RetryBudget, RetryPolicy
from worker.settings import Settings
from worker.snowpipe.client import SnowpipeClient
from worker.snowpipe.errortable import ERROR_ROW_COLUMNS

ACCOUNT_URL = "https://acme-prod.snowflakecomputing.com"
STATEMENTS = f"{ACCOUNT_URL}/api/v2/statements"


def client(**overrides: Any) -> SnowpipeClient:
    base: dict[str, Any] = {
        "account": "acme_prod",
        "user": "loader",
        "private_key": key_pair().private_pem.decode(),
        "account_url": ACCOUNT_URL,
    }
    base.update(overrides)
    policy = RetryPolicy(attempts=1, sleep=lambda s: None, budget=RetryBudget(100))
    return SnowpipeClient(Settings(**base), policy=policy)


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


def ok(columns: tuple[str, ...] = ERROR_ROW_COLUMNS) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "resultSetMetaData": {
                "numRows": 0,
                "rowType": [{"name": c, "type": "text"} for c in columns],
                "partitionInfo": [],
            },
            "data": [],
            "statementHandle": "h",
            "statementStatusUrl": "/api/v2/statements/h",
        },
    )


def failure(status: int, code: str, message: str, sql_state: str = "42S02") -> httpx.Response:
    return httpx.Response(
        status,
        json={"code": code, "message": message, "sqlState": sql_state, "statementHandle": "h"},
    )


def run(c: SnowpipeClient, *pipes: str) -> list[Check]:
    doctor = Doctor(c.settings)
    doctor._error_tables(c, list(pipes))
    return doctor.results


def by_statement(answers: dict[str, httpx.Response]) -> Any:
    def answer(request: httpx.Request) -> httpx.Response:
        statement = json.loads(request.content)["statement"]
        for needle, response in answers.items():
            if needle in statement:
                return response
        raise AssertionError(f"unexpected statement {statement}")

    return answer


def test_a_readable_error_table_passes_and_one_without_logging_says_how_to_turn_it_on(
    mock: respx.MockRouter,
) -> None:
    mock.post(STATEMENTS).mock(
        side_effect=by_statement(
            {
                "ERROR_TABLE(DB.SC.GOOD)": ok(),
                "ERROR_TABLE(DB.SC.PLAIN)": failure(
                    422,
                    "002003",
                    "SQL compilation error:\nError table for table 'PLAIN' does not exist or "
                    "not authorized.",
                ),
            }
        )
    )
    results = run(client(role="LOADER"), "DB.SC.GOOD-STREAMING", "DB.SC.PLAIN-STREAMING")
    assert [(c.name, c.mark) for c in results] == [
        ("SQL API", "✓"),
        ("error table of DB.SC.GOOD-STREAMING", "✓"),
        ("error table of DB.SC.PLAIN-STREAMING", "!"),
    ]
    assert "the user's default warehouse" in results[0].detail
    plain = results[2]
    assert plain.ok  # a warning: the pipe works without it
    assert "attributed to whole batches" in plain.detail
    assert "002003" in plain.detail
    assert "ALTER TABLE DB.SC.PLAIN SET ERROR_LOGGING = TRUE" in plain.fix
    assert "GRANT SELECT ERROR TABLE ON TABLE DB.SC.PLAIN TO ROLE LOADER" in plain.fix
    assert "\n    fix: turn error logging on" in plain.line()
    assert plain.line().startswith("! error table of DB.SC.PLAIN-STREAMING:")


def test_no_warehouse_fails_the_sql_api_line_with_the_setting(mock: respx.MockRouter) -> None:
    mock.post(STATEMENTS).mock(
        return_value=failure(
            422,
            "000606",
            "No active warehouse selected in the current session.",
            "57P03",
        )
    )
    results = run(client(), "DB.SC.T-STREAMING", "DB.SC.U-STREAMING")
    assert len(results) == 1  # the first failure of the API stops the error-table checks
    (api,) = results
    assert (api.name, api.ok) == ("SQL API", False)
    assert "SNOWPIPE_SQL_WAREHOUSE" in api.fix
    assert "SNOWPIPE_ERROR_TABLE=off" in api.fix


def test_a_pipe_whose_table_is_unknown_is_a_warning_naming_the_setting(
    mock: respx.MockRouter,
) -> None:
    mock.post(STATEMENTS).mock(
        return_value=failure(422, "391911", "Command not supported by SQL API", "0A000")
    )
    results = run(client(), "DB.SC.NAMED")
    assert [(c.name, c.mark) for c in results] == [
        ("SQL API", "✓"),
        ("error table of DB.SC.NAMED", "!"),
    ]
    assert "DESCRIBE PIPE DB.SC.NAMED failed" in results[1].detail
    assert "SNOWPIPE_PIPE_TABLES" in results[1].fix


def test_nothing_is_asked_with_error_tables_off(mock: respx.MockRouter) -> None:
    route = mock.post(STATEMENTS)
    assert run(client(error_table="off"), "DB.SC.T-STREAMING") == []
    assert not route.called
