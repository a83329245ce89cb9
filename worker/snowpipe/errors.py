"""The errors the Snowpipe client raises: one hierarchy, each error saying what to do about it.

Everything derives from `SnowpipeError`. The worker branches on the four second-level classes;
the leaves exist so that callers and logs can be precise.

    SnowpipeError                       status, code, message, request_id, op
    ├── RetryableError                  transient: the RetryPolicy retries it with backoff
    │   ├── TransportError              no response: connection refused/reset, TLS, DNS
    │   ├── RequestTimeoutError         client-side timeout, or HTTP 408
    │   ├── RateLimitedError            429, 390701, backpressure codes; carries retry_after
    │   ├── ServerError                 5xx without a more specific code
    │   ├── RetryRequestError           ERR_GENERAL_EXCEPTION_RETRY_REQUEST (any status)
    │   ├── OpenChannelInProgressError  409 ERR_OPEN_CHANNEL_IN_PROGRESS
    │   └── TokenRefreshError           no valid token: the refresh failed for a transient reason
    ├── ChannelReopenRequired           reopen the channel, replay from its committed offset
    │   ├── StaleContinuationTokenError STALE_CONTINUATION_TOKEN_SEQUENCER (someone reopened it)
    │   ├── ChannelInvalidatedError     ERR_CHANNEL_MUST_BE_REOPENED[_DUE_TO_ROW_SEQ_GAP],
    │   │                               ERR_CHANNEL_HAS_INVALID_{ROW,CLIENT}_SEQUENCER,
    │   │                               STALE_PIPE_CACHE
    │   ├── ChannelNotFoundError        ERR_CHANNEL_DOES_NOT_EXIST_OR_IS_NOT_AUTHORIZED
    │   ├── PipeFailoverError           410: the pipe moved to another ingest host; the client
    │   │                               has forgotten the host and the scoped token already
    │   └── AppendOutcomeUnknownError   an append was sent but no answer came back (read timeout,
    │                                   reset): only a reopen tells whether its rows landed
    ├── AuthError                       401/403 after the one forced token refresh
    │   ├── InvalidJWTError             390144 / 401 from the account host: key, fingerprint,
    │   │                               account or user is wrong (the message says which to check)
    │   └── ForbiddenError              403: the role lacks a grant
    └── PermanentError                  will never succeed as sent: dead-letter it
        ├── BadRequestError             400 without a more specific code (schema, bad query)
        ├── PipeNotFoundError           404 / ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED (and the
        │                               database/table variants)
        ├── PayloadTooLargeError        413: the request is over the size cap; split it
        ├── UncommittedDataError        409 ERR_CHANNEL_HAS_UNCOMMITTED_DATA
        ├── RequestRejectedError        any other 4xx
        ├── ProtocolError               a 2xx response the client cannot understand
        └── EncodingError               rows that cannot be sent (not JSON-serialisable)
            └── RowTooLargeError        one row alone exceeds the request size cap

`error_from_response()` turns an HTTP error response into the right leaf. It reads every body
shape Snowflake has been seen to send (docs/protocol.md#error-bodies): `{"code","message"}`,
`{"error_code","message"}`, a bare JSON string, numeric codes, extra fields, and non-JSON text.
A Snowflake code decides the class when it is known (a 400 with STALE_CONTINUATION_TOKEN_SEQUENCER
is a reopen, a 409 with ERR_OPEN_CHANNEL_IN_PROGRESS is retryable); otherwise the HTTP status does.

No error ever holds a token: messages from the server are scrubbed of anything shaped like a JWT
or a bearer credential, and the client never passes URLs with query strings in.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

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
    "StaleContinuationTokenError",
    "TokenRefreshError",
    "TransportError",
    "UncommittedDataError",
    "error_from_response",
    "parse_error_body",
    "parse_retry_after",
    "scrub",
]

# Longest server text kept in an error (a proxy may answer with a whole HTML page).
MAX_MESSAGE_CHARS = 500


class SnowpipeError(Exception):
    """Base of every error the Snowpipe client raises; carries what the server said."""

    hint: str = "see the message and the request id in Snowflake's logs"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        op: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = scrub(message)
        self.status = status
        self.code = code
        self.request_id = request_id
        self.op = op
        if hint is not None:
            self.hint = hint
        super().__init__(self.message)

    def __str__(self) -> str:
        where = f"{self.op}: " if self.op else ""
        parts = []
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.code:
            parts.append(self.code)
        head = " ".join(parts)
        text = f"{where}{head}: {self.message}" if head else f"{where}{self.message}"
        if self.hint:
            text += f" -> {self.hint}"
        if self.request_id:
            text += f" (requestId {self.request_id})"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r}, request_id={self.request_id!r}, op={self.op!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor: rebuild explicitly so errors survive pickling (Celery).
        return (
            _rebuild,
            (type(self), self.message, self.__dict__.copy()),
        )


def _rebuild(cls: type[SnowpipeError], message: str, state: dict[str, Any]) -> SnowpipeError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


# --- Retryable -------------------------------------------------------------------------------


class RetryableError(SnowpipeError):
    """Transient failure: the same request may succeed later (the RetryPolicy retries it)."""

    hint = "transient; retried with backoff, and later by the task if retries run out"
    retry_after: float | None = None


class TransportError(RetryableError):
    """No HTTP response: the connection failed, was reset, or TLS/DNS failed."""

    hint = (
        "check that SNOWPIPE_ACCOUNT_URL is reachable from this host (and SNOWPIPE_CA_FILE for a "
        "private CA); retried with backoff"
    )


class RequestTimeoutError(RetryableError):
    """The request timed out (client-side timeout, or HTTP 408 from the server)."""

    hint = (
        "the server or network is slow; retried with backoff (raise "
        "SNOWPIPE_HTTP_TIMEOUT_SECONDS if it persists)"
    )


class RateLimitedError(RetryableError):
    """Snowflake is throttling (429, 390701 or a backpressure code); wait and retry."""

    hint = "rate limited; retried after Retry-After or backoff (reduce request rate per channel)"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(RetryableError):
    """Snowflake answered with a 5xx: its side failed; retry later."""

    hint = "server-side failure; retried with backoff"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class RetryRequestError(ServerError):
    """ERR_GENERAL_EXCEPTION_RETRY_REQUEST: Snowflake asks for the request to be retried."""

    hint = "Snowflake asked for a retry (e.g. pipe not yet owned by a node); retried with backoff"


class OpenChannelInProgressError(RetryableError):
    """ERR_OPEN_CHANNEL_IN_PROGRESS: another open of this channel is running; retry the open."""

    hint = "a concurrent open of this channel is in progress; retried with backoff"


class TokenRefreshError(RetryableError):
    """No valid token could be obtained and the cause looks transient (endpoint down, slow)."""

    hint = (
        "the token endpoint on SNOWPIPE_ACCOUNT_URL failed or was slow; retried with backoff "
        "(the token guard backs off between refreshes)"
    )


# --- Reopen ------------------------------------------------------------------------------------


class ChannelReopenRequired(SnowpipeError):
    """The channel's continuation chain is broken: reopen it, replay from its committed offset."""

    hint = "reopen the channel and replay the batches above its last committed offset token"


class StaleContinuationTokenError(ChannelReopenRequired):
    """STALE_CONTINUATION_TOKEN_SEQUENCER: the channel was reopened by someone else."""

    hint = (
        "the channel was reopened elsewhere (two writers on one channel?); reopen it and replay "
        "from its committed offset"
    )


class ChannelInvalidatedError(ChannelReopenRequired):
    """Snowflake invalidated the channel (ERR_CHANNEL_MUST_BE_REOPENED and related codes)."""


class ChannelNotFoundError(ChannelReopenRequired):
    """The channel does not exist (dropped, or never opened): open it again."""

    hint = "open the channel again (it was dropped or never opened) and replay"


class PipeFailoverError(ChannelReopenRequired):
    """410: the pipe failed over to another ingest host.

    Reopening on the same host with the same scoped token would get 410 again (a loop): the
    client forgets the ingest host and invalidates the token when it sees the 410, so the reopen
    rediscovers the host (GET /v2/streaming/hostname) and exchanges a new scoped token first.
    """

    hint = (
        "the pipe failed over: the ingest host is looked up again and a new scoped token taken, "
        "then the channel is reopened and replayed from its committed offset"
    )


class AppendOutcomeUnknownError(ChannelReopenRequired):
    """An append may have reached Snowflake, but its answer was lost (read timeout, reset).

    Resending it with the same continuation token could commit its rows twice if the first copy
    landed (docs/protocol.md#open-questions, question 2), so it is never retried blindly:
    reopening the channel settles it (the rows are either committed or discarded by the open),
    then the writer replays.
    """

    hint = "reopen the channel (which commits or discards the lost append), then replay from it"


# --- Auth --------------------------------------------------------------------------------------


class AuthError(SnowpipeError):
    """Snowflake refused the credentials even after one forced token refresh."""

    hint = "check the key pair, SNOWPIPE_ACCOUNT, SNOWPIPE_USER and SNOWPIPE_ROLE"


class InvalidJWTError(AuthError):
    """The key-pair JWT was rejected (390144): the key, fingerprint, account or user is wrong."""


class ForbiddenError(AuthError):
    """403: authenticated, but the role may not use this database, schema or pipe."""

    hint = "grant the role (SNOWPIPE_ROLE or the user's default) access to the pipe"


# --- Permanent ---------------------------------------------------------------------------------


class PermanentError(SnowpipeError):
    """The request will never succeed as sent: do not retry; dead-letter the batch."""

    hint = "not retryable; fix the request or the Snowflake objects, then resend"


class BadRequestError(PermanentError):
    """400: Snowflake rejected the request as malformed."""

    hint = "the request is malformed (bad names, schema mismatch or query); fix it, do not retry"


class PipeNotFoundError(PermanentError):
    """The database, schema, table or pipe does not exist, or the role cannot see it."""

    hint = (
        "check the database/schema/pipe names and that the role has USAGE/OPERATE on them "
        "(a table T has the default pipe T-STREAMING)"
    )


class PayloadTooLargeError(PermanentError):
    """413: the request body is over Snowflake's size cap; send smaller requests."""

    hint = "split the rows into requests under SNOWPIPE_MAX_REQUEST_BYTES (4 MB on the wire)"


class UncommittedDataError(PermanentError):
    """409 ERR_CHANNEL_HAS_UNCOMMITTED_DATA: open/drop with fail_on_uncommitted_rows=true."""

    hint = (
        "the channel still has rows in flight; wait for them to commit, or reopen with "
        "fail_on_uncommitted_rows=false to discard them"
    )


class RequestRejectedError(PermanentError):
    """Any other 4xx: Snowflake refused the request."""


class ProtocolError(PermanentError):
    """A success response whose body the client cannot understand."""

    hint = (
        "the server answered in an unexpected shape; check that SNOWPIPE_ACCOUNT_URL points at "
        "Snowflake"
    )


class EncodingError(PermanentError):
    """Rows that cannot be encoded as NDJSON (not JSON-serialisable)."""

    hint = (
        "make every row a dict of JSON values (str keys; int, float, str, bool, None, list, dict)"
    )


class RowTooLargeError(EncodingError):
    """One row alone exceeds the request size cap, so it cannot be sent at all."""

    def __init__(self, message: str, *, row_index: int, row_bytes: int, limit: int) -> None:
        super().__init__(
            message,
            hint=(
                f"row {row_index} is {row_bytes} bytes on the wire, over the {limit}-byte cap; "
                "shrink the row or raise SNOWPIPE_MAX_REQUEST_BYTES (Snowflake's cap is 4 MB)"
            ),
        )
        self.row_index = row_index
        self.row_bytes = row_bytes
        self.limit = limit


# --- Mapping responses to errors ---------------------------------------------------------------

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

_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_WS_RE = re.compile(r"\s+")


def scrub(text: str) -> str:
    """`text` with anything shaped like a JWT or a bearer credential replaced by a marker."""
    if "eyJ" in text:
        text = _JWT_RE.sub("[redacted-token]", text)
    if "earer" in text:
        text = _BEARER_RE.sub(r"\1[redacted]", text)
    return text


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
