"""The admin API under /_emulator/ (tests, benchmarks, first run); loopback clients only."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from emulator.context import Emulator
from emulator.errors import ApiError, coded
from emulator.http import JSONResponse, error_response, json_body
from emulator.schema import columns_from_json
from emulator.state import pipe_key
from emulator.storage import CommittedRow

_MAX_ADMIN_BODY = 1024 * 1024
# Rows are streamed in chunks of this many to keep memory flat for big tables.
_ROWS_CHUNK = 1000


def _is_loopback(request: Request) -> bool:
    client = request.client
    if client is None:
        return False
    try:
        return ipaddress.ip_address(client.host).is_loopback
    except ValueError:
        return False


def admin(
    handler: Callable[[Request, Emulator], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """An admin endpoint: loopback only, ApiError → JSON error."""

    async def run(request: Request) -> Response:
        if not _is_loopback(request):
            return JSONResponse(
                {"code": "ERR_FORBIDDEN", "message": "The admin API answers loopback only."},
                status_code=403,
            )
        try:
            return await handler(request, request.app.state.emulator)
        except ApiError as exc:
            return error_response(exc)
        except ValueError as exc:
            return JSONResponse({"code": "ERR_INVALID_REQUEST", "message": str(exc)}, 400)

    run.__name__ = handler.__name__
    return run


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    return value


async def register_key(request: Request, emu: Emulator) -> Response:
    """POST /_emulator/keys {"account","user","public_key_pem"} → {"fingerprint"}."""
    body = await json_body(request, _MAX_ADMIN_BODY)
    fp = emu.keys.register(
        _field(body, "account"), _field(body, "user"),
        _field(body, "public_key_pem").encode("utf-8"),
    )
    return JSONResponse({"fingerprint": fp, "user": f"{body['account']}.{body['user']}".upper()})


async def add_pipe(request: Request, emu: Emulator) -> Response:
    """POST /_emulator/pipes {"database","schema","pipe"[,"columns","table","error_logging"]}.

    `columns` ([{"name","type","nullable"}]) gives its table a schema: rows that violate it
    become row errors, as on the service. `table` names the table the pipe loads (default: `T`
    for a pipe `T-STREAMING`, else the pipe's own name); `error_logging: true` turns on that
    table's error logging (rejected rows go to its error table), `false` turns it off.
    """
    body = await json_body(request, _MAX_ADMIN_BODY)
    unknown = set(body) - {"database", "schema", "pipe", "columns", "table", "error_logging"}
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(sorted(unknown))}: a pipe takes database, schema, "
            "pipe, columns, table and error_logging"
        )
    columns = columns_from_json(body["columns"]) if body.get("columns") is not None else None
    table = body.get("table")
    if table is not None and not isinstance(table, str):
        raise ValueError("table must be a string (the table the pipe loads)")
    logging_on = body.get("error_logging")
    if logging_on is not None and not isinstance(logging_on, bool):
        raise ValueError("error_logging must be true or false")
    key = emu.state.add_pipe(
        _field(body, "database"), _field(body, "schema"), _field(body, "pipe"), columns=columns,
        table=table, error_logging=logging_on,
    )
    out = _pipe_json(emu, key)
    if key in emu.state.columns:
        out["columns"] = [c.as_json() for c in emu.state.columns[key]]
    return JSONResponse(out)


def _pipe_json(emu: Emulator, key: tuple[str, str, str]) -> dict[str, Any]:
    table = emu.state.table_of(key)
    return {
        "database": key[0], "schema": key[1], "pipe": key[2], "table": table[2],
        "error_logging": table in emu.state.error_logging,
    }


async def list_pipes(request: Request, emu: Emulator) -> Response:
    """GET /_emulator/pipes: the known pipes, the table each loads and its error logging."""
    return JSONResponse([_pipe_json(emu, key) for key in sorted(emu.state.pipes)])


async def stats(request: Request, emu: Emulator) -> Response:
    """GET /_emulator/stats: request counts, tokens, appends, commits, errors, channels."""
    s = emu.state.stats
    state = emu.state
    return JSONResponse(
        {
            "requests": s.requests,
            "tokens_issued": emu.scoped.issued,
            "appends": s.appends,
            "append_bytes": s.append_bytes,
            "rows_appended": s.rows_appended,
            "rows_committed": s.rows_committed,
            "rows_in_error": s.rows_in_error,
            "batches_committed": s.batches_committed,
            "batches_discarded": s.batches_discarded,
            "batches_pending": state.pending_batches(),
            "open_channels": len(state.channels),
            "commit_lag_avg_ms": (
                round(1000 * s.commit_lag_total / s.batches_committed, 1)
                if s.batches_committed else None
            ),
            "commit_lag_max_ms": round(1000 * s.commit_lag_max, 1),
            "commits_paused": state.commits_paused,
            "faults_active": len(emu.faults.rules()),
            "faults_fired": emu.faults.fired,
            "keys_registered": emu.keys.count(),
        }
    )


async def rows(request: Request, emu: Emulator) -> Response:
    """GET /_emulator/rows?database=&schema=&pipe= committed rows as NDJSON."""
    q = request.query_params
    missing = [k for k in ("database", "schema", "pipe") if not q.get(k)]
    if missing:
        raise ValueError(f"query parameters required: {', '.join(missing)}")
    key = pipe_key(q["database"], q["schema"], q["pipe"])
    committed = list(emu.state.storage.iter_rows(*key))

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(committed), _ROWS_CHUNK):
            yield b"".join(_row_line(r) for r in committed[i : i + _ROWS_CHUNK])

    return StreamingResponse(chunks(), media_type="application/x-ndjson")


def _row_line(row: CommittedRow) -> bytes:
    return (
        b'{"channel":' + orjson.dumps(row.channel)
        + b',"offset_token":' + orjson.dumps(row.offset_token)
        + b',"committed_at_ms":' + str(row.committed_at_ms).encode()
        + b',"row":' + row.row + b"}\n"
    )


async def add_fault(request: Request, emu: Emulator) -> Response:
    """POST /_emulator/faults: add a rule; returns its id."""
    rule = emu.faults.add(await json_body(request, _MAX_ADMIN_BODY))
    return JSONResponse({"id": rule.id, "fault": rule.as_json()})


async def list_faults(request: Request, emu: Emulator) -> Response:
    """GET /_emulator/faults: the active rules."""
    return JSONResponse([r.as_json() for r in emu.faults.rules()])


async def clear_faults(request: Request, emu: Emulator) -> Response:
    """DELETE /_emulator/faults: remove every rule."""
    return JSONResponse({"cleared": emu.faults.clear()})


async def expire_tokens(request: Request, emu: Emulator) -> Response:
    """POST /_emulator/expire-tokens: every scoped token issued so far is expired now."""
    emu.scoped.expire_all()
    return JSONResponse({"expired": True})


async def invalidate(request: Request, emu: Emulator) -> Response:
    """POST /_emulator/invalidate: the channel must be reopened (in-flight rows are lost)."""
    body = await json_body(request, _MAX_ADMIN_BODY)
    ch = emu.state.invalidate(
        _field(body, "database"), _field(body, "schema"), _field(body, "pipe"),
        _field(body, "channel"),
    )
    return JSONResponse({"channel_status": ch.status()})


async def issue_pat(request: Request, emu: Emulator) -> Response:
    """POST /_emulator/pats {"account","user"[,"role"]} → {"token"}: a programmatic access token.

    The token is a secret: it authenticates as the user on every endpoint, sent as
    `Authorization: Bearer` (no key pair, no token exchange needed).
    """
    body = await json_body(request, _MAX_ADMIN_BODY)
    role = body.get("role")
    token = emu.pats.issue(
        _field(body, "account"), _field(body, "user"), role if isinstance(role, str) else None
    )
    return JSONResponse({"token": token, "user": f"{body['account']}.{body['user']}".upper()})


async def failover(request: Request, emu: Emulator) -> Response:
    """POST /_emulator/failover [{"database","schema","pipe"}]: the pipe (or, with no body,
    every pipe) fails over. Ingest calls answer 410 until the client asks for the hostname again
    and exchanges a new scoped token; in-flight rows are lost and channels must be reopened."""
    body = await json_body(request, _MAX_ADMIN_BODY)
    key = None
    if body:
        key = pipe_key(_field(body, "database"), _field(body, "schema"), _field(body, "pipe"))
    epoch = emu.scoped.fail_over(key)
    channels = emu.state.fail_over(key)
    return JSONResponse(
        {"pipe": None if key is None else ".".join(key), "epoch": epoch, "channels": channels}
    )


async def commits(request: Request, emu: Emulator) -> Response:
    """POST /_emulator/commits {"paused": bool}: hold or release the commit pump."""
    body = await json_body(request, _MAX_ADMIN_BODY)
    paused = body.get("paused")
    if not isinstance(paused, bool):
        raise coded(400, "ERR_INVALID_REQUEST", 'body must be {"paused": true|false}')
    emu.state.set_paused(paused)
    return JSONResponse({"paused": paused})
