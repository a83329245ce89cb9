"""Ingest-host endpoints: open, append, bulk status, drop, elastic appends.

See docs/protocol.md#endpoints (one section per endpoint).
"""

from __future__ import annotations

import time
from typing import Any

import jwt
from starlette.requests import Request
from starlette.responses import Response

from emulator import schema
from emulator.auth import ScopedClaims, verify_keypair_jwt
from emulator.context import Emulator
from emulator.errors import ApiError, bad_request, jwt_invalid, pipe_failed_over
from emulator.http import JSONResponse, bearer, json_body, read_body, request_host
from emulator.ndjson import ParsedRows, decode_body, parse_rows
from emulator.state import ELASTIC_CHANNEL, PipeKey, default_pipe, pipe_key

# Open/drop/status bodies are small JSON documents.
_MAX_CONTROL_BODY = 1024 * 1024


def require_scoped_token(request: Request, emu: Emulator, pipe: PipeKey | None = None) -> None:
    """Pass when the request carries a valid, unexpired scoped token (or a registered PAT);
    401 otherwise, 410 when `pipe` failed over since the token's host discovery."""
    token = bearer(request)
    if token is None:
        raise jwt_invalid("missing Authorization: Bearer <scoped token from POST /oauth/token>")
    pat = emu.pats.lookup(token)
    if pat is not None:
        claims = ScopedClaims(
            pat.subject, request_host(request), 0, 0, emu.scoped.epoch_of(pat.subject)
        )
    else:
        claims = emu.scoped.verify(token, request_host(request))
    if pipe is not None and emu.scoped.failed_over_for(claims, pipe):
        raise pipe_failed_over(".".join(pipe))


def _key(request: Request) -> PipeKey:
    return pipe_key(*_path(request))


def _apply_schema(emu: Emulator, key: PipeKey, rows: ParsedRows) -> ParsedRows:
    columns = emu.state.columns.get(key)
    return rows if columns is None else schema.apply(rows, columns)


def _decode(request: Request, emu: Emulator, raw: bytes) -> bytes:
    return decode_body(
        raw, request.headers.get("content-encoding"),
        strict=emu.config.strict_content_encoding,
    )


def _path(request: Request) -> tuple[str, str, str]:
    p = request.path_params
    return p["database"], p["schema"], p["pipe"]


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise bad_request("ERR_INVALID_REQUEST_BODY", f"{name} must be a string or null")


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request("ERR_INVALID_REQUEST_BODY", f"{name} must be true or false")
    return value


async def open_channel(request: Request, emu: Emulator) -> Response:
    """PUT .../channels/{channel}: create or reopen; returns the continuation token and status."""
    require_scoped_token(request, emu, _key(request))
    body = await json_body(request, _MAX_CONTROL_BODY)
    ch = emu.state.open_channel(
        *_path(request),
        request.path_params["channel"],
        offset_token=_optional_str(body, "offset_token"),
        fail_on_uncommitted_rows=_flag(body, "fail_on_uncommitted_rows"),
    )
    return JSONResponse(
        {"next_continuation_token": ch.continuation_token, "channel_status": ch.status()}
    )


async def drop_channel(request: Request, emu: Emulator) -> Response:
    """DELETE .../channels/{channel}: forget the channel and its offset token."""
    require_scoped_token(request, emu, _key(request))
    body = await json_body(request, _MAX_CONTROL_BODY)
    ch = emu.state.drop_channel(
        *_path(request),
        request.path_params["channel"],
        fail_on_uncommitted_rows=_flag(body, "fail_on_uncommitted_rows"),
    )
    return JSONResponse({"last_committed_offset_token": ch.last_committed_offset_token})


async def append_rows(request: Request, emu: Emulator) -> Response:
    """POST .../channels/{channel}/rows: queue NDJSON rows for commit after the commit delay."""
    require_scoped_token(request, emu, _key(request))
    q = request.query_params
    database, schema, pipe = _path(request)
    channel = request.path_params["channel"]
    if channel.upper() == ELASTIC_CHANNEL and "continuationToken" not in q:
        return await _elastic_append(request, emu, database, schema, pipe)
    limit = emu.config.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await read_body(request, limit)  # raises the 413
    state = emu.state
    ch = state.channel(database, schema, pipe, channel)
    now = time.monotonic()
    if ch.status_code == "SUCCESS":
        state.check_rate(ch, now)
    state.check_continuation(ch, q.get("continuationToken"))
    end = q.get("endOffsetToken") or q.get("offsetToken") or None
    start = q.get("startOffsetToken") or None
    raw = await read_body(request, limit)
    body = _decode(request, emu, raw)
    state.check_byte_rate(ch, len(body), time.monotonic())
    rows = _apply_schema(emu, _key(request), parse_rows(body))
    if start is None and rows.total == 1:
        start = end
    # Re-check: the body read awaited, and another request may have reopened the channel.
    state.check_continuation(ch, q.get("continuationToken"))
    state.append(
        ch, rows, start_offset_token=start, end_offset_token=end, now=now, wire_bytes=len(raw)
    )
    return JSONResponse(
        {"next_continuation_token": ch.continuation_token, "status_code": 0, "message": None},
        headers={"x-snowflake-session": ch.session},
    )


async def append_table_rows(request: Request, emu: Emulator) -> Response:
    """POST .../tables/{table}/rows: an elastic append through the table's default pipe."""
    p = request.path_params
    pipe = default_pipe(p["table"])
    require_scoped_token(request, emu, pipe_key(p["database"], p["schema"], pipe))
    return await _elastic_append(request, emu, p["database"], p["schema"], pipe)


async def _elastic_append(
    request: Request, emu: Emulator, database: str, schema: str, pipe: str
) -> Response:
    q = request.query_params
    forbidden = [
        k for k in ("continuationToken", "offsetToken", "startOffsetToken", "endOffsetToken")
        if k in q
    ]
    if forbidden:
        raise bad_request(
            "ERR_INVALID_REQUEST",
            f"Elastic channel appends must not carry {', '.join(forbidden)}",
        )
    ch = emu.state.elastic_channel(database, schema, pipe)
    raw = await read_body(request, emu.config.max_request_bytes)
    rows = _apply_schema(
        emu, pipe_key(database, schema, pipe), parse_rows(_decode(request, emu, raw))
    )
    emu.state.append(
        ch, rows, start_offset_token=None, end_offset_token=None,
        now=time.monotonic(), advance=False, wire_bytes=len(raw),
    )
    # Snowflake's SDK requires a continuation token in every append answer, elastic ones too
    # (it is never checked on the way back in: elastic appends carry none).
    return JSONResponse({"message": "OK", "next_continuation_token": ch.continuation_token})


async def bulk_channel_status(request: Request, emu: Emulator) -> Response:
    """POST .../pipes/{pipe}:bulk-channel-status: statuses keyed by the requested names."""
    token = bearer(request)
    if token is None:
        raise jwt_invalid("missing Authorization: Bearer <scoped token or key-pair JWT>")
    try:
        require_scoped_token(request, emu, _key(request))
    except ApiError as exc:
        if exc.status == 410:
            raise
        # Some clients call this on the account host with the key-pair JWT (docs/protocol.md#hosts).
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            alg = None
        if alg != "RS256":
            raise
        verify_keypair_jwt(token, emu.keys)
    body = await json_body(request, _MAX_CONTROL_BODY)
    names = body.get("channel_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad_request(
            "ERR_INVALID_REQUEST_BODY", 'body must be {"channel_names": ["name", ...]}'
        )
    return JSONResponse({"channel_statuses": emu.state.statuses(*_path(request), names)})
