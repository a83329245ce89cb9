"""A client for Snowflake's SQL API: run one statement with the key-pair JWT, get its rows.

    submit     POST {account}/api/v2/statements?requestId=R[&retry=true]   body: statement,
               timeout, bindings, and warehouse/role/database/schema when given
    poll       GET  {account}{statementStatusUrl}           while the answer is 202
    partition  GET  {account}{statementStatusUrl}?partition=N   for N = 1 .. partitions - 1
    cancel     POST {account}/api/v2/statements/{handle}/cancel   when the wait runs out

Every request goes through the one `RetryPolicy` and a `GuardAuth` over the JWT guard of the
process's `SnowflakeTokens` (header `X-Snowflake-Authorization-Token-Type: KEYPAIR_JWT`), on the
same per-process `httpx.Client` as the Snowpipe endpoints (`SnowpipeClient.sql()` builds it).
A retried submit carries the same `requestId` with `retry=true`, which is how the SQL API is told
that a request is sent again.

Answers (Snowflake's SQL API reference):

    200  a ResultSet: resultSetMetaData {numRows, rowType [{name, type}], partitionInfo [...]},
         data (the first partition: rows of strings, SQL NULL as null), statementHandle,
         statementStatusUrl
    202  a QueryStatus: still running; poll statementStatusUrl
    422  a QueryFailureStatus {code, message, sqlState, statementHandle}: `SqlStatementError`
         (worker.snowpipe.errors.error_from_sql_response)
    4xx/5xx  the same typed errors as the Snowpipe endpoints (401: `InvalidJWTError` with the
         key, account and user that were sent; 408/429/5xx: retried)

Every value comes back as a string (or None): the caller converts. Bindings are positional
(`?`), typed from the Python value (str TEXT, int FIXED, float REAL, bool BOOLEAN, None a TEXT
null). No token, and no statement text, is ever logged: a statement may hold names an operator
considers private; the log has the operation, the statement handle and the timing.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urlsplit

import httpx
import orjson

from worker.errors import (
    ProtocolError,
    RequestTimeoutError,
    SnowpipeError,
    TokenUnavailableError,
)
from worker.observability import get_logger
from worker.snowpipe.errors import (
    error_from_sql_response,
    error_from_token,
    error_from_transport,
    json_object,
)
from worker.snowpipe.http import OP_EXTENSION, TOKEN_TYPE_HEADER, GuardAuth

if TYPE_CHECKING:
    from worker.auth.guard import TokenGuard
    from worker.retry import RetryPolicy

__all__ = [
    "STATEMENTS_PATH",
    "Binding",
    "ResultSet",
    "SqlApi",
    "binding",
]

log = get_logger("worker.snowpipe.sql")

STATEMENTS_PATH: Final = "/api/v2/statements"
_HEADERS: Final = {
    TOKEN_TYPE_HEADER: "KEYPAIR_JWT",
    "Content-Type": "application/json",
    "Accept": "application/json",
}
# Between polls of a running statement: from the first to the longest wait, doubling.
FIRST_POLL_SECONDS: Final = 0.1
MAX_POLL_SECONDS: Final = 2.0
# Beyond the statement's own timeout, how long the client waits for Snowflake to say so.
WAIT_SLACK_SECONDS: Final = 10.0

Binding = str | int | float | bool | None


def binding(value: Binding) -> dict[str, str | None]:
    """One positional binding of the SQL API: `{"type": ..., "value": <string or null>}`."""
    if value is None:
        return {"type": "TEXT", "value": None}
    if isinstance(value, bool):
        return {"type": "BOOLEAN", "value": "true" if value else "false"}
    if isinstance(value, int):
        return {"type": "FIXED", "value": str(value)}
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a SQL binding must be a finite number, not {value!r}")
        return {"type": "REAL", "value": repr(value)}
    if isinstance(value, str):
        return {"type": "TEXT", "value": value}
    raise TypeError(f"a SQL binding must be str, int, float, bool or None, not {type(value)}")


@dataclass(frozen=True, slots=True)
class ResultSet:
    """The rows of one statement: column names and types as Snowflake gave them, every value a
    string or None."""

    columns: tuple[str, ...]
    types: tuple[str, ...]
    rows: tuple[tuple[str | None, ...], ...]
    statement_handle: str

    def index(self, name: str) -> int:
        """The position of column `name` (case-insensitive); KeyError naming the columns."""
        wanted = name.upper()
        for i, column in enumerate(self.columns):
            if column.upper() == wanted:
                return i
        raise KeyError(f"no column {name!r} in the result (columns: {', '.join(self.columns)})")

    def dicts(self) -> list[dict[str, str | None]]:
        """Each row as a dict keyed by lower-cased column name."""
        names = [c.lower() for c in self.columns]
        return [dict(zip(names, row, strict=False)) for row in self.rows]


class SqlApi:
    """Runs statements through the SQL API of one account (see the module docstring)."""

    def __init__(
        self,
        account_url: str,
        *,
        http: Callable[[], httpx.Client],
        auth: GuardAuth,
        policy: RetryPolicy,
        rejected: Callable[[SnowpipeError, TokenGuard], SnowpipeError] | None = None,
        warehouse: str | None = None,
        role: str | None = None,
        timeout_seconds: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("the SQL API timeout must be > 0 (SNOWPIPE_SQL_TIMEOUT_SECONDS)")
        self.account_url = account_url.rstrip("/")
        self._http = http
        self._auth = auth
        self.policy = policy
        self._rejected = rejected
        self.warehouse = warehouse or None
        self.role = role or None
        self.timeout_seconds = timeout_seconds
        self._sleep = sleep
        self._clock = clock

    def execute(
        self,
        statement: str,
        bindings: Sequence[Binding] = (),
        *,
        database: str | None = None,
        schema: str | None = None,
    ) -> ResultSet:
        """Run `statement` (with `?` bound to `bindings`, in order) and return all its rows."""
        if not statement.strip():
            raise ValueError("an empty SQL statement")
        body: dict[str, Any] = {"statement": statement, "timeout": math.ceil(self.timeout_seconds)}
        if bindings:
            body["bindings"] = {str(i): binding(v) for i, v in enumerate(bindings, start=1)}
        for key, value in (
            ("warehouse", self.warehouse),
            ("role", self.role),
            ("database", database),
            ("schema", schema),
        ):
            if value:
                body[key] = value
        started = self._clock()
        deadline = started + self.timeout_seconds + WAIT_SLACK_SECONDS
        data = self._submit(orjson.dumps(body))
        wait = FIRST_POLL_SECONDS
        while data.status == 202:
            if self._clock() + wait > deadline:
                self._cancel(data.handle)
                raise RequestTimeoutError(
                    f"the statement {data.handle} was still running after "
                    f"{self._clock() - started:.0f} s (cancelled)",
                    op="sql",
                    hint="raise SNOWPIPE_SQL_TIMEOUT_SECONDS, or give the query a larger "
                    "warehouse (SNOWPIPE_SQL_WAREHOUSE)",
                )
            self._sleep(wait)
            wait = min(MAX_POLL_SECONDS, wait * 2)
            data = self._get("sql_poll", data.status_path)
        result = self._result(data)
        log.debug(
            "sql.statement",
            handle=result.statement_handle,
            rows=len(result.rows),
            elapsed_ms=round((self._clock() - started) * 1000, 2),
        )
        return result

    # --- The requests ----------------------------------------------------------------------------

    def _submit(self, body: bytes) -> _Answer:
        request_id = str(uuid.uuid4())
        attempts = 0

        def params() -> dict[str, str]:
            nonlocal attempts
            attempts += 1
            query = {"requestId": request_id}
            if attempts > 1:
                query["retry"] = "true"  # the same request, sent again (not run twice)
            return query

        return self._call(
            "sql_submit", "POST", STATEMENTS_PATH, params=params, content=body,
            request_id=request_id,
        )  # fmt: skip

    def _get(self, op: str, path: str, partition: int | None = None) -> _Answer:
        query = {"partition": str(partition)} if partition is not None else {}
        return self._call(op, "GET", path, params=lambda: query)

    def _cancel(self, handle: str) -> None:
        path = f"{STATEMENTS_PATH}/{quote(handle, safe='')}/cancel"
        try:
            self._call("sql_cancel", "POST", path, params=dict, content=b"")
        except SnowpipeError as exc:  # best effort: the statement times out on its own
            log.info("sql.cancel_failed", handle=handle, error=type(exc).__name__)

    def _call(
        self,
        op: str,
        method: str,
        path: str,
        *,
        params: Callable[[], Mapping[str, str]],
        content: bytes | None = None,
        request_id: str | None = None,
    ) -> _Answer:
        url = self.account_url + path
        extensions = {OP_EXTENSION: op}

        def attempt() -> _Answer:
            try:
                response = self._http().request(
                    method, url, params=params(), content=content, headers=_HEADERS,
                    auth=self._auth, extensions=extensions,
                )  # fmt: skip
            except httpx.TransportError as exc:
                raise error_from_transport(
                    exc, op=op, request_id=request_id or "", idempotent=True
                ) from None
            except TokenUnavailableError as exc:
                raise error_from_token(exc, op=op) from exc
            if response.status_code in (200, 202):
                return _Answer.parse(response, op)
            err = error_from_sql_response(
                response.status_code,
                response.content,
                headers=response.headers,
                request_id=request_id,
                op=op,
            )
            if response.status_code == 401 and self._rejected is not None:
                err = self._rejected(err, self._auth.guard)
            raise err

        return self.policy.call(attempt, op=op)

    # --- The answers -----------------------------------------------------------------------------

    def _result(self, first: _Answer) -> ResultSet:
        meta = first.body.get("resultSetMetaData")
        if not isinstance(meta, Mapping):
            raise ProtocolError("the SQL API answered 200 without resultSetMetaData", op="sql")
        row_type = meta.get("rowType")
        if not isinstance(row_type, list) or not all(
            isinstance(c, Mapping) and isinstance(c.get("name"), str) for c in row_type
        ):
            raise ProtocolError(
                "the SQL API answered a rowType that is not a column list", op="sql"
            )
        columns = tuple(str(c["name"]) for c in row_type)
        types = tuple(str(c.get("type") or "") for c in row_type)
        rows = _rows(first.body.get("data"), len(columns))
        partitions = meta.get("partitionInfo")
        count = len(partitions) if isinstance(partitions, list) else 1
        for n in range(1, count):
            more = self._get("sql_partition", first.status_path, partition=n)
            rows.extend(_rows(more.body.get("data"), len(columns)))
        return ResultSet(columns, types, tuple(rows), first.handle)


@dataclass(frozen=True, slots=True)
class _Answer:
    """A 200 or 202 answer: its JSON object, the statement handle and where to ask next."""

    status: int
    body: Mapping[str, Any]
    handle: str
    status_path: str

    @classmethod
    def parse(cls, response: httpx.Response, op: str) -> _Answer:
        body = json_object(response, op=op, what="the SQL API")
        handle = body.get("statementHandle")
        handle = handle if isinstance(handle, str) else ""
        status_url = body.get("statementStatusUrl")
        if isinstance(status_url, str) and status_url:
            # Only the path: the JWT goes to the account host, whatever host an answer names.
            parts = urlsplit(status_url)
            path = parts.path
        elif handle:
            path = f"{STATEMENTS_PATH}/{quote(handle, safe='')}"
        else:
            path = ""
        if not path.startswith(STATEMENTS_PATH + "/") and (response.status_code == 202 or path):
            raise ProtocolError(
                f"the SQL API answered HTTP {response.status_code} without a usable "
                "statementStatusUrl",
                op=op,
                status=response.status_code,
            )
        return cls(response.status_code, body, handle, path)


def _rows(data: Any, width: int) -> list[tuple[str | None, ...]]:
    if data is None:
        return []
    if not isinstance(data, list):
        raise ProtocolError("the SQL API answered data that is not a list of rows", op="sql")
    rows: list[tuple[str | None, ...]] = []
    for row in data:
        if not isinstance(row, list) or len(row) != width:
            raise ProtocolError(
                f"the SQL API answered a row that is not a list of {width} values", op="sql"
            )
        rows.append(tuple(None if v is None else str(v) for v in row))
    return rows
