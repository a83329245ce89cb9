"""Request plumbing shared by every route: the endpoint wrapper, JSON responses, auth headers.

`endpoint(name, handler)` gives every API route the same behaviour: fault injection, the strict
Accept check, ApiError → JSON error response, and per-endpoint request counting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from emulator.context import Emulator
from emulator.errors import RATE_LIMIT_BODY, ApiError, coded, jwt_invalid, with_error_code
from emulator.faults import FaultRule

log = logging.getLogger("emulator")

Handler = Callable[[Request, Emulator], Awaitable[Response]]


class JSONResponse(Response):
    """A JSON response rendered with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """orjson bytes."""
        return orjson.dumps(content)


def text(content: str) -> Response:
    """A plain-text response (hostname, scoped token)."""
    return Response(content, media_type="text/plain")


def error_response(exc: ApiError) -> Response:
    """The JSON error response for an ApiError, with the reason in a debugging header."""
    headers = dict(exc.headers)
    if exc.reason:
        # Header values must be latin-1; reasons are ASCII by construction.
        headers["X-Emulator-Reason"] = exc.reason.encode("ascii", "replace").decode("ascii")
    return JSONResponse(with_error_code(exc.body), status_code=exc.status, headers=headers)


class ResponseDropped(Exception):
    """Raised after the response head is sent: uvicorn then closes the connection."""


class DroppedResponse(Response):
    """Sends the head of `inner`, then aborts: the client sees the connection close mid-body."""

    def __init__(self, inner: Response) -> None:
        super().__init__(status_code=inner.status_code)
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the head only, then abort the connection."""
        await send(
            {
                "type": "http.response.start",
                "status": self.inner.status_code,
                "headers": self.inner.raw_headers,
            }
        )
        raise ResponseDropped


class _QuietDrops(logging.Filter):
    """Keep the intentional drops out of uvicorn's error log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ResponseDropped)


def install_log_filter() -> None:
    """Silence uvicorn's traceback for intentionally dropped responses."""
    logging.getLogger("uvicorn.error").addFilter(_QuietDrops())


def fault_response(rule: FaultRule) -> Response:
    """The response an injected fault answers with (a fitting default body per status)."""
    assert rule.status is not None
    if rule.has_body:
        body: Any = rule.body
    elif rule.status == 429:
        body = RATE_LIMIT_BODY
    elif rule.status == 401:
        body = jwt_invalid("injected").body
    elif rule.status >= 500:
        body = {
            "code": "ERR_GENERAL_EXCEPTION_RETRY_REQUEST",
            "message": "Internal error, please retry the request.",
        }
    else:
        body = {"code": "ERR_INJECTED_FAULT", "message": "Fault injected by the emulator."}
    if not rule.has_body:
        body = with_error_code(body)
    headers = {"X-Emulator-Fault": rule.id}
    if rule.retry_after is not None:
        ra = rule.retry_after
        headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
    return JSONResponse(body, status_code=rule.status, headers=headers)


def endpoint(name: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint running `handler` with faults, strict checks and counting."""

    async def run(request: Request) -> Response:
        emu: Emulator = request.app.state.emulator
        rule = emu.faults.take(name)
        response: Response | None = None
        if rule is not None:
            if rule.delay_ms:
                await asyncio.sleep(rule.delay_ms / 1000.0)
            if rule.mode == "respond" and rule.status is not None:
                response = fault_response(rule)
        if response is None:
            try:
                if emu.config.require_accept and "accept" not in request.headers:
                    raise coded(
                        406,
                        "391902",
                        "Unsupported Accept header null is specified",
                        reason=(
                            "send Accept: application/json, as the service requires (or start "
                            "the emulator with --allow-missing-accept)"
                        ),
                    )
                response = await handler(request, emu)
            except ApiError as exc:
                if exc.reason:
                    log.info("%s %s -> %d: %s", request.method, name, exc.status, exc.reason)
                response = error_response(exc)
        emu.state.stats.count(name, response.status_code)
        if rule is not None and rule.mode == "drop":
            return DroppedResponse(response)
        return response

    run.__name__ = f"{name}_endpoint"
    return run


def bearer(request: Request) -> str | None:
    """The token of an `Authorization: Bearer` header, if any."""
    value = request.headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def request_port(request: Request) -> int | None:
    """The port the client addressed (from Host, else the server socket's)."""
    host = request.headers.get("host", "")
    tail = host.rsplit("]", 1)[-1]
    if ":" in tail and tail.rsplit(":", 1)[1].isdigit():
        return int(tail.rsplit(":", 1)[1])
    server = request.scope.get("server")
    return int(server[1]) if server and server[1] else None


def request_host(request: Request) -> str:
    """The host the client addressed, without the port (what the hostname endpoint returns)."""
    host = request.headers.get("host", "")
    if host.startswith("["):  # [::1]:8087
        return host[: host.find("]") + 1] if "]" in host else host
    if ":" in host:
        host = host.rsplit(":", 1)[0]
    if host:
        return host
    server = request.scope.get("server")
    return str(server[0]) if server else "127.0.0.1"


async def read_body(request: Request, limit: int) -> bytes:
    """The raw request body; 413 ApiError when it is over `limit` bytes on the wire."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = await request.body()
    if len(body) > limit:
        raise _too_large(len(body), limit)
    return body


def _too_large(size: int, limit: int) -> ApiError:
    return coded(
        413,
        "ERR_PAYLOAD_TOO_LARGE",
        f"Request body of {size} bytes exceeds the limit of {limit} bytes.",
        reason="split the batch: the limit applies to the body on the wire, after compression",
    )


async def json_body(request: Request, limit: int) -> dict[str, Any]:
    """The JSON object body (an empty body counts as `{}`); 400 ApiError otherwise."""
    body = await read_body(request, limit)
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise coded(400, "ERR_INVALID_REQUEST_BODY", "Request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise coded(400, "ERR_INVALID_REQUEST_BODY", "Request body must be a JSON object.")
    return data
