"""Account-host endpoints of Snowflake's SQL API: POST /api/v2/statements and
GET /api/v2/statements/{handle}.

Only the subset in `emulator.sql` runs (error tables and DESCRIBE PIPE); the wire shapes are
Snowflake's: a ResultSet (200), a QueryStatus (202 for `async=true`), a QueryFailureStatus (422),
partitions of the result as gzip JSON under `?partition=N`. See
docs/emulator.md#the-sql-api-subset.
"""

from __future__ import annotations

import gzip
import logging
import time
import uuid
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from emulator.auth import KeyPairIdentity, verify_keypair_jwt
from emulator.context import Emulator
from emulator.errors import ApiError, coded, jwt_invalid
from emulator.http import JSONResponse, bearer, json_body
from emulator.sql import FIXED, TEXT, TIMESTAMP, Result, ResultColumn, SqlError
from emulator.sqlapi import Outcome, execute

log = logging.getLogger("emulator")

# A statement request is a small JSON document.
_MAX_STATEMENT_BODY = 1024 * 1024
# "timeout: 0 means the maximum", seven days.
MAX_TIMEOUT_SECONDS = 604800
_FIELDS = frozenset(
    {"statement", "timeout", "database", "schema", "warehouse", "role", "bindings", "parameters"}
)
ASYNC_MESSAGE = (
    "Asynchronous execution in progress. Use provided query id to perform query monitoring and "
    "management."
)


def require_sql_auth(request: Request, emu: Emulator) -> KeyPairIdentity:
    """The caller's identity: a key-pair JWT (or a PAT), as on the token exchange; 401 otherwise.

    `X-Snowflake-Authorization-Token-Type` may be left out (the token says what it is), or be
    `KEYPAIR_JWT` or `PROGRAMMATIC_ACCESS_TOKEN`.
    """
    token = bearer(request)
    if token is None:
        raise jwt_invalid("missing Authorization: Bearer <key-pair JWT>")
    kind = (request.headers.get("x-snowflake-authorization-token-type") or "").strip().upper()
    if kind == "KEYPAIR_JWT":
        return verify_keypair_jwt(token, emu.keys)
    if kind in ("", "PROGRAMMATIC_ACCESS_TOKEN"):
        pat = emu.pats.lookup(token)
        if pat is not None:
            return pat
        if kind:
            raise jwt_invalid("the programmatic access token is not one this emulator issued")
        return verify_keypair_jwt(token, emu.keys)
    raise jwt_invalid(
        f"X-Snowflake-Authorization-Token-Type {kind!r} is not served: send KEYPAIR_JWT with a "
        "key-pair JWT (or PROGRAMMATIC_ACCESS_TOKEN with a PAT)"
    )


def _bad_body(message: str) -> ApiError:
    return coded(400, "ERR_INVALID_REQUEST_BODY", message, reason=message)


def _optional(body: dict[str, Any], name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise _bad_body(f"{name} must be {what}")
    return value


def _check_body(body: dict[str, Any]) -> None:
    unknown = set(body) - _FIELDS
    if unknown:
        raise _bad_body(
            f"unknown field(s) {', '.join(sorted(unknown))}: the body takes "
            f"{', '.join(sorted(_FIELDS))}"
        )
    timeout = _optional(body, "timeout", int, "a whole number of seconds")
    if timeout is not None and not 0 <= timeout <= MAX_TIMEOUT_SECONDS:
        raise _bad_body(f"timeout must be between 0 and {MAX_TIMEOUT_SECONDS} seconds")
    for name in ("database", "schema", "warehouse", "role"):
        _optional(body, name, str, "a string")
    _optional(body, "bindings", dict, 'an object like {"1": {"type": "TEXT", "value": "x"}}')
    parameters = _optional(body, "parameters", dict, "an object of session parameters")
    count = (parameters or {}).get("MULTI_STATEMENT_COUNT", (parameters or {}).get(
        "multi_statement_count"
    ))
    if count is not None and str(count) != "1":
        raise SqlError(
            422, "000002", "0A000", "SQL compilation error:\nUnsupported feature "
            "'MULTI_STATEMENT_COUNT'.",
            reason="the emulator runs one statement per request (MULTI_STATEMENT_COUNT 1)",
        )


def _empty_statement() -> SqlError:
    return SqlError(400, "000900", "42601", "SQL compilation error:\nEmpty SQL statement.")


async def submit(request: Request, emu: Emulator) -> Response:
    """POST /api/v2/statements: run one statement; 200 ResultSet, 202 for async, 422 on error."""
    require_sql_auth(request, emu)
    body = await json_body(request, _MAX_STATEMENT_BODY)
    q = request.query_params
    request_id = q.get("requestId") or str(uuid.uuid4())
    nullable = q.get("nullable", "true").lower() != "false"
    run_async = q.get("async", "false").lower() == "true"
    if q.get("retry", "false").lower() == "true":
        previous = emu.statements.for_request(request_id)
        if previous is not None:  # a resubmitted request: the same statement, not run again
            return _answer(emu, previous, run_async=run_async)
    try:
        _check_body(body)
        text = body.get("statement")
        if text is None or (isinstance(text, str) and not text.strip()):
            raise _empty_statement()
        if not isinstance(text, str):
            raise _bad_body("statement must be a string")
    except SqlError as exc:
        return _failure(exc, None)
    outcome = Outcome(str(uuid.uuid4()), request_id, int(time.time() * 1000), nullable=nullable)
    try:
        outcome.result = execute(
            emu.state, text, bindings=body.get("bindings"), database=body.get("database"),
            schema=body.get("schema"),
        )
    except SqlError as exc:
        if exc.status == 400:  # refused before it became a statement: no handle
            return _failure(exc, None)
        outcome.error = exc
    emu.statements.add(outcome)
    return _answer(emu, outcome, run_async=run_async)


async def status(request: Request, emu: Emulator) -> Response:
    """GET /api/v2/statements/{handle}[?partition=N]: the statement's result (or a partition)."""
    require_sql_auth(request, emu)
    handle = request.path_params["handle"]
    outcome = emu.statements.get(handle)
    if outcome is None:
        return _failure(
            SqlError(
                400, "000709", "02000", f"Statement {handle} not found",
                reason="unknown handle (the emulator keeps the latest 1000 statements, and none "
                "survive a restart)",
            ),
            handle,
        )
    partition = request.query_params.get("partition")
    if partition is None or outcome.error is not None:
        return _answer(emu, outcome, run_async=False)
    parts = _partitions(emu, outcome)
    if not partition.isdigit() or int(partition) >= len(parts):
        return _failure(
            SqlError(
                400, "391922", "22000",
                f"Invalid partition number {partition}. The valid range is [0, {len(parts) - 1}].",
            ),
            handle,
        )
    data = gzip.compress(orjson.dumps({"data": parts[int(partition)]}))
    return Response(data, media_type="application/json", headers={"Content-Encoding": "gzip"})


def _answer(emu: Emulator, outcome: Outcome, *, run_async: bool) -> Response:
    url = f"/api/v2/statements/{outcome.handle}"
    if run_async:
        return JSONResponse(
            {
                "code": "333334", "message": ASYNC_MESSAGE, "statementHandle": outcome.handle,
                "statementStatusUrl": url,
            },
            status_code=202,
        )
    if outcome.error is not None:
        return _failure(outcome.error, outcome.handle)
    assert outcome.result is not None
    return _result_set(emu, outcome)


def _failure(exc: SqlError, handle: str | None) -> Response:
    """Snowflake's QueryFailureStatus; the emulator's reason in X-Emulator-Reason."""
    log.info("SQL API -> %d %s: %s", exc.status, exc.code, exc.reason)
    reason = exc.reason.encode("ascii", "replace").decode("ascii").replace("\n", " ")
    return JSONResponse(
        {
            "code": exc.code, "message": exc.message, "sqlState": exc.sql_state,
            "statementHandle": handle,
        },
        status_code=exc.status,
        headers={"X-Emulator-Reason": reason},
    )


def _rows(outcome: Outcome) -> list[list[str | None]]:
    assert outcome.result is not None
    rows = outcome.result.rows
    if outcome.nullable:
        return rows
    return [["null" if v is None else v for v in row] for row in rows]


def _partitions(emu: Emulator, outcome: Outcome) -> list[list[list[str | None]]]:
    rows = _rows(outcome)
    size = max(1, emu.config.sql_partition_rows)
    return [rows[i : i + size] for i in range(0, len(rows), size)] or [[]]


_TYPE_FIELDS: dict[str, dict[str, Any]] = {
    TEXT: {"length": 16777216, "byteLength": 16777216},
    FIXED: {"precision": 38, "scale": 0},
    TIMESTAMP: {"precision": 0, "scale": 9},
}


def _row_type(column: ResultColumn) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": column.name, "database": "", "schema": "", "table": "", "collation": None,
        "byteLength": None, "nullable": column.name != "COUNT(*)", "scale": None,
        "precision": None, "length": None, "type": column.type,
    }
    entry.update(_TYPE_FIELDS.get(column.type, {}))
    return entry


def _result_set(emu: Emulator, outcome: Outcome) -> Response:
    result: Result | None = outcome.result
    assert result is not None
    parts = _partitions(emu, outcome)
    info = []
    for i, part in enumerate(parts):
        encoded = orjson.dumps(part)
        entry = {"rowCount": len(part), "uncompressedSize": len(encoded)}
        if i:
            entry["compressedSize"] = len(gzip.compress(encoded))
        info.append(entry)
    base = f"/api/v2/statements/{outcome.handle}"
    body: dict[str, Any] = {
        "resultSetMetaData": {
            "numRows": len(result.rows), "format": "jsonv2", "partitionInfo": info,
            "rowType": [_row_type(c) for c in result.columns],
        },
        "data": parts[0],
        "code": "090001",
        "statementStatusUrl": f"{base}?requestId={outcome.request_id}",
        "requestId": outcome.request_id,
        "sqlState": "00000",
        "statementHandle": outcome.handle,
        "message": "Statement executed successfully.",
        "createdOn": outcome.created_on_ms,
    }
    if result.stats is not None:
        body["stats"] = result.stats
    links = [f'<{base}?requestId={outcome.request_id}&partition=0>; rel="first"']
    if len(parts) > 1:
        links.append(f'<{base}?requestId={outcome.request_id}&partition=1>; rel="next"')
    links.append(f'<{base}?requestId={outcome.request_id}&partition={len(parts) - 1}>; rel="last"')
    return JSONResponse(body, headers={"Link": ",".join(links)})
