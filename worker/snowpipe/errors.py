"""How the Snowpipe client's HTTP outcomes become errors of the one tree (`worker.errors`).

Three small mappings, each used in one place by the client (`SnowpipeClient._call`):

- `error_from_transport(exc, ...)`: an httpx transport failure (no response). A failure to
  connect was never sent, so it is a `TransportError` (resent by the RetryPolicy whatever the
  call); any other failure of a call that is not idempotent (an append) is an
  `AppendOutcomeUnknownError` (only a reopen tells whether its rows landed); a timeout is a
  `RequestTimeoutError`.
- `error_from_response(status, body, ...)`: an HTTP error response. It reads every body shape
  Snowflake has been seen to send (docs/protocol.md#error-bodies): `{"code","message"}`,
  `{"error_code","message"}`, a bare JSON string, numeric codes, extra fields, and non-JSON
  text. A Snowflake code decides the class when it is known (a 400 with
  STALE_CONTINUATION_TOKEN_SEQUENCER is a reopen, a 409 with ERR_OPEN_CHANNEL_IN_PROGRESS is
  retryable); otherwise the HTTP status does.
- `error_from_token(exc, ...)`: a `TokenUnavailableError` from a guard becomes the refresh's own
  error (a fresh copy), or a `TokenRefreshError` when the cause is not one of the client's.
- `error_from_sql_response(status, body, ...)`: an error answer of the SQL API
  (`worker.snowpipe.sql`). A 422 is a QueryFailureStatus `{"code","message","sqlState",
  "statementHandle"}`: a `SqlStatementError`, of a subclass when the code is known; any other
  status is mapped like the Snowpipe endpoints' answers.

The Snowpipe error classes are re-exported here for the client's callers; they are defined, with
the rest of the tree and its documentation, in `worker.errors`.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson

from worker.errors import (
    AppendOutcomeUnknownError,
    AuthError,
    BadRequestError,
    ChannelInvalidatedError,
    ChannelNotFoundError,
    ChannelReopenRequired,
    EncodingError,
    ForbiddenError,
    InvalidJWTError,
    OpenChannelInProgressError,
    PayloadTooLargeError,
    PermanentError,
    PipeFailoverError,
    PipeNotFoundError,
    ProtocolError,
    RateLimitedError,
    RequestRejectedError,
    RequestTimeoutError,
    RetryableError,
    RetryRequestError,
    RowTooLargeError,
    ServerError,
    SnowpipeError,
    SqlNoWarehouseError,
    SqlObjectNotFoundError,
    SqlStatementError,
    SqlUnsupportedError,
    StaleContinuationTokenError,
    TokenRefreshError,
    TokenUnavailableError,
    TransportError,
    UncommittedDataError,
    scrub,
    token_cause,
)

__all__ = [
    "AppendOutcomeUnknownError",
    "AuthError",
    "BadRequestError",
    "ChannelInvalidatedError",
    "ChannelNotFoundError",
    "ChannelReopenRequired",
    "EncodingError",
    "ForbiddenError",
    "InvalidJWTError",
    "OpenChannelInProgressError",
    "PayloadTooLargeError",
    "PermanentError",
    "PipeFailoverError",
    "PipeNotFoundError",
    "ProtocolError",
    "RateLimitedError",
    "RequestRejectedError",
    "RequestTimeoutError",
    "RetryRequestError",
    "RetryableError",
    "RowTooLargeError",
    "ServerError",
    "SnowpipeError",
    "SqlNoWarehouseError",
    "SqlObjectNotFoundError",
    "SqlStatementError",
    "SqlUnsupportedError",
    "StaleContinuationTokenError",
    "TokenRefreshError",
    "TransportError",
    "UncommittedDataError",
    "error_from_response",
    "error_from_sql_response",
    "error_from_token",
    "error_from_transport",
    "parse_error_body",
    "parse_retry_after",
    "scrub",
]


# --- Transport failures -----------------------------------------------------------------------

# Raised before the request left: safe to resend, whatever the call.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def error_from_transport(
    exc: httpx.TransportError, *, op: str, request_id: str, idempotent: bool
) -> SnowpipeError:
    """The error for a request that got no response (see the module docstring)."""
    if isinstance(exc, _NOT_SENT):
        return TransportError(f"{type(exc).__name__}: {exc}", op=op, request_id=request_id)
    if not idempotent:
        return AppendOutcomeUnknownError(
            f"{type(exc).__name__} after the request was sent: its outcome is unknown",
            op=op,
            request_id=request_id,
        )
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimeoutError(
            f"{type(exc).__name__}: no answer in time", op=op, request_id=request_id
        )
    return TransportError(f"{type(exc).__name__}: {exc}", op=op, request_id=request_id)


# --- No token ---------------------------------------------------------------------------------


def error_from_token(exc: TokenUnavailableError, *, op: str) -> SnowpipeError:
    """The error for a guard that could not give a token: the refresh's own error when it is one
    of the client's (a fresh copy: the original may be raised in other threads at the same
    time), else a `TokenRefreshError` (transient)."""
    cause = token_cause(exc)
    if isinstance(cause, SnowpipeError):
        err = copy.copy(cause)
        err.__traceback__ = None
        return err
    return TokenRefreshError(str(exc), op=op)


# --- Error responses --------------------------------------------------------------------------

# Longest server text kept in an error (a proxy may answer with a whole HTML page).
MAX_MESSAGE_CHARS = 500

RETRY_REQUEST_CODES = frozenset({"ERR_GENERAL_EXCEPTION_RETRY_REQUEST"})
OPEN_IN_PROGRESS_CODES = frozenset({"ERR_OPEN_CHANNEL_IN_PROGRESS"})
# 390701 is the documented rate-limit code; the others are backpressure names
# (docs/protocol.md#error-codes).
RATE_LIMIT_CODES = frozenset(
    {
        "390701",
        "ReceiverSaturated",
        "MemoryThresholdExceeded",
        "MemoryThresholdExceededInContainer",
        "HttpRetryableClientError",
    }
)
STALE_CODES = frozenset({"STALE_CONTINUATION_TOKEN_SEQUENCER"})
INVALIDATED_CODES = frozenset(
    {
        "ERR_CHANNEL_MUST_BE_REOPENED",
        "ERR_CHANNEL_MUST_BE_REOPENED_DUE_TO_ROW_SEQ_GAP",
        "ERR_CHANNEL_HAS_INVALID_ROW_SEQUENCER",
        "ERR_CHANNEL_HAS_INVALID_CLIENT_SEQUENCER",
        "STALE_PIPE_CACHE",
    }
)
# Both spellings: Snowflake's error-handling page and the live service use `_IS_` (the service
# answers it with HTTP 400), its SDK and older answers the other (404). A missing channel is
# reopened, never taken for a missing pipe or a bad request: the code decides, not the status.
CHANNEL_NOT_FOUND_CODES = frozenset(
    {
        "ERR_CHANNEL_DOES_NOT_EXIST_OR_IS_NOT_AUTHORIZED",
        "ERR_CHANNEL_DOES_NOT_EXIST_OR_NOT_AUTHORIZED",
    }
)
PIPE_NOT_FOUND_CODES = frozenset(
    {
        "ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED",
        "ERR_TABLE_DOES_NOT_EXIST_NOT_AUTHORIZED",
        "ERR_DATABASE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED",
        "ERR_SCHEMA_DOES_NOT_EXIST_OR_NOT_AUTHORIZED",
    }
)
UNCOMMITTED_CODES = frozenset({"ERR_CHANNEL_HAS_UNCOMMITTED_DATA"})
INVALID_JWT_CODES = frozenset({"390144"})

_CODE_CLASSES: tuple[tuple[frozenset[str], type[SnowpipeError]], ...] = (
    (STALE_CODES, StaleContinuationTokenError),
    (INVALIDATED_CODES, ChannelInvalidatedError),
    (CHANNEL_NOT_FOUND_CODES, ChannelNotFoundError),
    (RETRY_REQUEST_CODES, RetryRequestError),
    (OPEN_IN_PROGRESS_CODES, OpenChannelInProgressError),
    (RATE_LIMIT_CODES, RateLimitedError),
    (PIPE_NOT_FOUND_CODES, PipeNotFoundError),
    (UNCOMMITTED_CODES, UncommittedDataError),
    (INVALID_JWT_CODES, InvalidJWTError),
)

_STATUS_CLASSES: dict[int, type[SnowpipeError]] = {
    400: BadRequestError,
    401: AuthError,
    403: ForbiddenError,
    404: PipeNotFoundError,
    408: RequestTimeoutError,
    410: PipeFailoverError,
    413: PayloadTooLargeError,
    429: RateLimitedError,
}

_WS_RE = re.compile(r"\s+")


def _as_code(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def parse_error_body(body: bytes | str) -> tuple[str | None, str]:
    """The Snowflake code (or None) and a one-line message from any error body shape."""
    raw = body.encode() if isinstance(body, str) else body
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        return None, "(empty response body)"
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, _shorten(text)
    return _parse_json_error(data, text)


def _parse_json_error(data: Any, text: str) -> tuple[str | None, str]:
    if isinstance(data, str):
        # A bare JSON string is the code itself ("ERR_GENERAL_EXCEPTION_RETRY_REQUEST").
        value = data.strip()
        if re.fullmatch(r"[A-Za-z0-9_]+", value):
            return value, value
        return None, _shorten(value)
    if isinstance(data, int | float) and not isinstance(data, bool):
        return str(int(data)), str(data)
    if isinstance(data, Mapping):
        code = _as_code(data.get("code"))
        if code is None:
            code = _as_code(data.get("error_code"))
        message = data.get("message")
        if not isinstance(message, str) or not message.strip():
            message = data.get("error") or data.get("error_description")
        if not isinstance(message, str) or not message.strip():
            message = code or _shorten(text)
        return code, _shorten(message)
    return None, _shorten(text)


def _shorten(text: str) -> str:
    text = _WS_RE.sub(" ", text).strip()
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS] + "..."
    return scrub(text)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate
    return value


def json_object(response: httpx.Response, *, op: str, what: str) -> dict[str, Any]:
    """The JSON object a 2xx `response` carries ({} for an empty body); ProtocolError, naming
    `what` answered, for a body that is not JSON or not an object."""
    try:
        data = orjson.loads(response.content) if response.content else {}
    except orjson.JSONDecodeError:
        raise ProtocolError(
            f"{what} answered HTTP {response.status_code} with a body that is not JSON",
            op=op,
            status=response.status_code,
        ) from None
    if not isinstance(data, dict):
        raise ProtocolError(
            f"{what} answered HTTP {response.status_code} with JSON that is not an object",
            op=op,
            status=response.status_code,
        )
    return data


def error_from_response(
    status: int,
    body: bytes | str,
    *,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
    op: str | None = None,
    now: float | None = None,
) -> SnowpipeError:
    """The error for an HTTP error response: the class picked by Snowflake code, then status."""
    code, message = parse_error_body(body)
    if headers is not None:
        # The local emulator explains each refusal in this header (Snowflake says less).
        reason = _header(headers, "x-emulator-reason")
        if reason:
            message = f"{message} [emulator: {_shorten(reason)}]"
    cls: type[SnowpipeError] | None = None
    if code is not None:
        for codes, candidate in _CODE_CLASSES:
            if code in codes:
                cls = candidate
                break
    if cls is None:
        cls = _STATUS_CLASSES.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else RequestRejectedError
    kwargs: dict[str, Any] = {
        "status": status,
        "code": code,
        "request_id": request_id,
        "op": op,
    }
    if issubclass(cls, RateLimitedError | ServerError):
        retry_after = None
        if headers is not None:
            retry_after = parse_retry_after(_header(headers, "retry-after"), now=now)
        kwargs["retry_after"] = retry_after
    if cls is ChannelInvalidatedError and code:
        kwargs["hint"] = (
            f"Snowflake invalidated the channel ({code}); reopen it and replay from its "
            "committed offset"
        )
    return cls(message, **kwargs)


# --- The SQL API ----------------------------------------------------------------------------------

# The SQL API answers a failed statement with 422 and a QueryFailureStatus.
SQL_FAILURE_STATUS = 422
SQL_NOT_FOUND_CODES = frozenset({"002003"})
SQL_NOT_FOUND_STATES = frozenset({"42S02"})
SQL_NO_WAREHOUSE_CODES = frozenset({"000606"})
SQL_NO_WAREHOUSE_STATES = frozenset({"57P03"})
SQL_UNSUPPORTED_CODES = frozenset({"391911"})
# 400 390186: the role named in the request is not granted to the user.
SQL_ROLE_NOT_GRANTED_CODES = frozenset({"390186"})


def error_from_sql_response(
    status: int,
    body: bytes | str,
    *,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
    op: str | None = None,
    now: float | None = None,
) -> SnowpipeError:
    """The error for an error answer of the SQL API (see the module docstring)."""
    code, message = parse_error_body(body)
    if status != SQL_FAILURE_STATUS:
        if code in SQL_ROLE_NOT_GRANTED_CODES:
            return ForbiddenError(
                message,
                status=status,
                code=code,
                request_id=request_id,
                op=op,
                hint="grant SNOWPIPE_ROLE to SNOWPIPE_USER, or unset it to use the user's "
                "default role",
            )
        return error_from_response(
            status, body, headers=headers, request_id=request_id, op=op, now=now
        )
    sql_state = handle = None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, Mapping):
        state_value = data.get("sqlState")
        sql_state = state_value if isinstance(state_value, str) and state_value else None
        handle_value = data.get("statementHandle")
        handle = handle_value if isinstance(handle_value, str) and handle_value else None
    cls: type[SqlStatementError] = SqlStatementError
    if code in SQL_NOT_FOUND_CODES or sql_state in SQL_NOT_FOUND_STATES:
        cls = SqlObjectNotFoundError
    elif code in SQL_NO_WAREHOUSE_CODES or sql_state in SQL_NO_WAREHOUSE_STATES:
        cls = SqlNoWarehouseError
    elif code in SQL_UNSUPPORTED_CODES:
        cls = SqlUnsupportedError
    return cls(
        message,
        status=status,
        code=code,
        request_id=request_id,
        op=op,
        sql_state=sql_state,
        statement_handle=handle,
    )
