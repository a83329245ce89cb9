"""Every error of snowpipe-worker, in one tree; each class says what to do about it.

The tree (the module that raises it, or re-exports it for its callers, in brackets):

    SnowpipeWorkerError                 the root: `except SnowpipeWorkerError` catches any of ours
    ├── SettingsError (ValueError)      the configuration is invalid; the message lists each fix
    │                                   [worker.settings]
    ├── KeyPairError (ValueError)       the private key cannot be used (wrong passphrase, not a
    │                                   key); no key material in the message [worker.auth.keypair]
    ├── StackError (RuntimeError)       a part of the local stack did not start [worker.devstack]
    ├── NdjsonError (ValueError)        a line of a `publish` input is not a JSON object
    │                                   [worker.cli]
    ├── InvalidBatchError (ValueError)  the batch itself is wrong: fix it, never retry it
    │   │                               [worker.publish: raised before anything is sent]
    │   ├── EmptyBatchError             a batch without rows (published around publish_batch)
    │   ├── InvalidNameError            a database, schema or pipe name Snowflake or the worker
    │   │                               cannot take [worker.identifiers]
    │   ├── MalformedMessageError       a message on the queue that is not a valid batch: its
    │   │                               dead letter (kind malformed) keeps the raw body
    │   │                               [worker.messages, worker.intake]
    │   │   └── NdjsonBatchError        a batch in the NDJSON form with a line that is not a
    │   │                               non-empty JSON object within the cap; `line` names it
    │   │                               [worker.batchbytes, worker.tasks]
    │   ├── PipeNotServedError          a batch for a pipe outside SNOWPIPE_PIPES: list the
    │   │                               pipe, then requeue its dead letter [worker.tasks]
    │   └── EncodingError               a row that cannot be encoded (see `SnowpipeError` below:
    │                                   it is also a PermanentError)
    ├── DeadLettered                    the task stored the batch as a dead letter (Celery shows
    │                                   the task as FAILURE; nothing to retry) [worker.tasks]
    ├── UnreachableError (ConnectionError)  the broker or the state store did not answer
    │   ├── BrokerUnavailableError      start the broker or fix SNOWPIPE_BROKER_URL
    │   └── StateStoreUnavailableError  start Redis or fix SNOWPIPE_STATE_URL [worker.connectivity]
    ├── StateNotReplicatedError (redis.RedisError)  a write reached too few replicas: tasks
    │                                   ride it out like any state-store outage, pumps send
    │                                   nothing until a WAIT succeeds [defined in
    │                                   worker.delivery.log; re-exported by worker.tasks]
    ├── TokenUnavailableError (RuntimeError)  no valid token: it expired or was rejected and the
    │                                   refresh failed; `cause` is the refresh's error
    ├── TokenNotExtendedError (RuntimeError)  a refresh returned no later expiry (counted as a
    │                                   failed refresh) [both: worker.auth.guard]
    ├── LeaseLost                       internal: the pump lost its channel's lease and stops
    │                                   [defined in worker.delivery.log]
    ├── StoreChanged                    internal: the state store restarted or failed over since
    │                                   the pump settled its channel: reopen and settle again
    │                                   [defined in worker.delivery.log]
    ├── MaybeSent                       internal: an entry to dead-letter without a settle may
    │                                   have been sent; it waits for an open [worker.delivery.log]
    ├── RequestRefused                  internal: an append refused for good, with its log
    │                                   entries [defined in worker.delivery.pump]
    ├── OpenRefused                     internal: an open refused for good (an unknown pipe)
    │                                   [defined in worker.delivery.pump]
    ├── PipeTableUnknownError (ValueError)  the table a pipe loads cannot be found: name it
    │                                   in SNOWPIPE_PIPE_TABLES [worker.snowpipe.errortable]
    ├── ErrorTableUnavailableError      no error table can name the rejected rows (off, no
    │                                   table, not readable): attribute them coarsely
    │                                   [worker.rejections]
    └── SnowpipeError                   what Snowflake (or the way to it) answered: status, code,
        │                               message, request_id, op [worker.snowpipe.errors]
        ├── RetryableError              transient: the RetryPolicy retries it with backoff
        │   ├── TransportError          no response: connection refused/reset, TLS, DNS
        │   ├── RequestTimeoutError     client-side timeout, or HTTP 408
        │   ├── RateLimitedError        429, 390701, backpressure codes; carries retry_after
        │   ├── ServerError             5xx without a more specific code
        │   │   └── RetryRequestError   ERR_GENERAL_EXCEPTION_RETRY_REQUEST (any status)
        │   ├── OpenChannelInProgressError  409 ERR_OPEN_CHANNEL_IN_PROGRESS
        │   └── TokenRefreshError       no valid token: the refresh failed for a transient reason
        ├── ChannelReopenRequired       reopen the channel, replay from its committed offset
        │   ├── StaleContinuationTokenError  STALE_CONTINUATION_TOKEN_SEQUENCER (reopened
        │   │                           elsewhere)
        │   ├── ChannelInvalidatedError ERR_CHANNEL_MUST_BE_REOPENED[_DUE_TO_ROW_SEQ_GAP],
        │   │                           ERR_CHANNEL_HAS_INVALID_{ROW,CLIENT}_SEQUENCER,
        │   │                           STALE_PIPE_CACHE
        │   ├── ChannelNotFoundError    ERR_CHANNEL_DOES_NOT_EXIST_OR_IS_NOT_AUTHORIZED
        │   ├── PipeFailoverError       410: the pipe moved to another ingest host; the client
        │   │                           has forgotten the host and the scoped token already
        │   └── AppendOutcomeUnknownError  an append was sent but no answer came back (read
        │                               timeout, reset): only a reopen tells whether it landed
        ├── AuthError                   401/403 after the one forced token refresh
        │   ├── InvalidJWTError         390144 / 401 from the account host: key, fingerprint,
        │   │                           account or user is wrong (the message says which)
        │   └── ForbiddenError          403: the role lacks a grant
        └── PermanentError              will never succeed as sent: dead-letter it
            ├── BadRequestError         400 without a more specific code (schema, bad query)
            ├── PipeNotFoundError       404 / ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED (and the
            │                           database/table variants)
            ├── PayloadTooLargeError    413: the request is over the size cap; split it
            ├── UncommittedDataError    409 ERR_CHANNEL_HAS_UNCOMMITTED_DATA
            ├── RequestRejectedError    any other 4xx
            ├── ProtocolError           a 2xx response the client cannot understand
            ├── SqlStatementError       422 from the SQL API: the statement failed (code,
            │   │                       sql_state, statement_handle) [worker.snowpipe.sql]
            │   ├── SqlObjectNotFoundError  002003 / 42S02: the table or its error table does not
            │   │                       exist, or the role may not see it
            │   ├── SqlNoWarehouseError 000606 / 57P03: no warehouse to run the query
            │   └── SqlUnsupportedError 391911: a statement the SQL API does not run
            └── EncodingError           a row that cannot be sent (also an InvalidBatchError)
                └── RowTooLargeError    one row alone exceeds the request size cap

Where a class also derives from a built-in or library exception (in parentheses), code that
catches that one keeps working: a `StateNotReplicatedError` is ridden out by `except
redis.RedisError`, an `InvalidBatchError` is a `ValueError`.

Some classes are defined next to their only users, still under the root: `StateNotReplicatedError`
(its second base is redis's, and this module stays free of third-party imports), and the
internal signals of the delivery core (`LeaseLost`, `StoreChanged`, `MaybeSent`,
`RequestRefused`, `OpenRefused`), which carry its types.

One classification decides what to do about an exception: `worker.retry.classify()` (retry,
reopen, auth, permanent) and `worker.retry.is_retryable()`, read from this tree; the RetryPolicy
and every caller that branches on transient-or-not use them. What the task dead-letters is what
`InvalidBatchError` covers (an empty batch, a row that cannot be encoded). `token_cause()` is the
one place a `TokenUnavailableError` is unwrapped to the refresh's own error.

This module imports nothing (only the standard library): every other module may import it. How
HTTP answers become these errors is `worker.snowpipe.errors` (the Snowpipe client's mappings).

No error ever holds a token: messages from the server are scrubbed of anything shaped like a JWT
or a bearer credential, and the client never passes URLs with query strings in.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "AppendOutcomeUnknownError",
    "AuthError",
    "BadRequestError",
    "BrokerUnavailableError",
    "ChannelInvalidatedError",
    "ChannelNotFoundError",
    "ChannelReopenRequired",
    "DeadLettered",
    "EmptyBatchError",
    "EncodingError",
    "ErrorTableUnavailableError",
    "ForbiddenError",
    "InvalidBatchError",
    "InvalidJWTError",
    "InvalidNameError",
    "KeyPairError",
    "MalformedMessageError",
    "NdjsonError",
    "OpenChannelInProgressError",
    "PayloadTooLargeError",
    "PermanentError",
    "PipeFailoverError",
    "PipeNotFoundError",
    "PipeNotServedError",
    "PipeTableUnknownError",
    "ProtocolError",
    "RateLimitedError",
    "RequestRejectedError",
    "RequestTimeoutError",
    "RetryRequestError",
    "RetryableError",
    "RowTooLargeError",
    "ServerError",
    "SettingsError",
    "SnowpipeError",
    "SnowpipeWorkerError",
    "SqlNoWarehouseError",
    "SqlObjectNotFoundError",
    "SqlStatementError",
    "SqlUnsupportedError",
    "StackError",
    "StaleContinuationTokenError",
    "StateStoreUnavailableError",
    "TokenNotExtendedError",
    "TokenRefreshError",
    "TokenUnavailableError",
    "TransportError",
    "UncommittedDataError",
    "UnreachableError",
    "scrub",
    "token_cause",
]


class SnowpipeWorkerError(Exception):
    """The root of every error snowpipe-worker raises (see the tree in the module docstring)."""


# --- Configuration and the local stack ------------------------------------------------------


class SettingsError(SnowpipeWorkerError, ValueError):
    """The configuration is invalid; the message lists each problem and its fix."""


class KeyPairError(SnowpipeWorkerError, ValueError):
    """The private key cannot be used; the message says why and how to fix it (no key material)."""


class StackError(SnowpipeWorkerError, RuntimeError):
    """A part of the local stack did not start; the message says which and where its log is."""


class NdjsonError(SnowpipeWorkerError, ValueError):
    """A line of the input is not a JSON object."""


# --- The batch -------------------------------------------------------------------------------


class InvalidBatchError(SnowpipeWorkerError, ValueError):
    """The batch cannot be published as given; the message names the problem and the fix."""


class EmptyBatchError(InvalidBatchError):
    """A batch without rows (published by something other than publish_batch)."""


class InvalidNameError(InvalidBatchError):
    """A database, schema or pipe name that breaks Snowflake's identifier rules or the worker's
    (no `|`, no `.`); the message names the rule and the fix (worker/identifiers.py)."""


class PipeNotServedError(InvalidBatchError):
    """A batch for a pipe that SNOWPIPE_PIPES does not list: dead-lettered (kind failed); list
    the pipe in the setting on every worker node, then requeue it."""


class MalformedMessageError(InvalidBatchError):
    """A message on the queue that the worker cannot turn into a valid batch (not Celery's
    message shape, not JSON, wrong or missing keyword arguments, wrong types, an unknown task):
    it becomes a dead letter of kind "malformed" with its raw body (docs/message-format.md)."""


class NdjsonBatchError(MalformedMessageError):
    """A batch in the NDJSON form that cannot be sent as it is (a line that is not a non-empty
    JSON object, not UTF-8, over the request cap; a wrong row_count): `line` is the first bad
    line, from 1 (worker/batchbytes.py)."""

    def __init__(self, message: str, *, line: int) -> None:
        super().__init__(message)
        self.line = line


class DeadLettered(SnowpipeWorkerError):
    """The batch was stored as a dead letter (`snowpipe-worker dead-letters list` shows it)."""


# --- The broker and the state store ------------------------------------------------------------


class UnreachableError(SnowpipeWorkerError, ConnectionError):
    """The broker or the state store did not answer; the message names the setting and the fix."""


class BrokerUnavailableError(UnreachableError):
    """The Celery broker (SNOWPIPE_BROKER_URL) did not answer or refused the message."""


class StateStoreUnavailableError(UnreachableError):
    """The state Redis (SNOWPIPE_STATE_URL) did not answer."""


# --- Tokens ------------------------------------------------------------------------------------


class TokenUnavailableError(SnowpipeWorkerError, RuntimeError):
    """No valid token can be given: the token expired (or was rejected) and refreshing failed.

    `cause` is the last refresh error (also the exception's `__cause__`), e.g. the client's
    AuthError for a wrong key, so a caller can tell a bad key from an unreachable endpoint;
    `token_cause()` unwraps it.
    """

    def __init__(self, message: str, *, name: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.cause = cause


class TokenNotExtendedError(SnowpipeWorkerError, RuntimeError):
    """A refresh returned a token expiring no later than the current one (counts as a failure)."""


def token_cause(exc: BaseException) -> BaseException:
    """The error behind `exc`: for a `TokenUnavailableError`, the refresh's own error (through
    nested ones, when there is one); any other exception is its own cause."""
    while isinstance(exc, TokenUnavailableError) and exc.cause is not None:
        exc = exc.cause
    return exc


# --- What Snowflake answered -------------------------------------------------------------------


class SnowpipeError(SnowpipeWorkerError):
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


class SqlStatementError(PermanentError):
    """422 from Snowflake's SQL API: the statement failed (compilation error, missing object,
    no privilege, no warehouse). `sql_state` and `statement_handle` are Snowflake's."""

    hint = "the statement failed in Snowflake; see the message (and the statement handle)"

    def __init__(
        self,
        message: str,
        *,
        sql_state: str | None = None,
        statement_handle: str | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(message, **kw)
        self.sql_state = sql_state
        self.statement_handle = statement_handle


class SqlObjectNotFoundError(SqlStatementError):
    """002003 / 42S02: the table (or its error table) does not exist, or the role cannot see it."""

    hint = (
        "check the table name (SNOWPIPE_PIPE_TABLES), that error logging is on "
        "(ALTER TABLE <table> SET ERROR_LOGGING = TRUE) and that the role owns the table or has "
        "SELECT ERROR TABLE on it"
    )


class SqlNoWarehouseError(SqlStatementError):
    """000606 / 57P03: no warehouse is active for the query."""

    hint = (
        "set SNOWPIPE_SQL_WAREHOUSE to a warehouse the role may use, or give the user a "
        "default warehouse"
    )


class SqlUnsupportedError(SqlStatementError):
    """391911: the SQL API does not run this kind of statement."""

    hint = "the SQL API refuses this statement type (USE, PUT, GET, a lone BEGIN, ...)"


class EncodingError(PermanentError, InvalidBatchError):
    """Rows that cannot be encoded as NDJSON (not JSON-serialisable)."""

    hint = (
        "make every row a non-empty dict with str keys of JSON values (str, int, float, bool, "
        "None, list, dict) or Decimal, datetime, date, time, UUID"
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


# --- Error tables ------------------------------------------------------------------------------


class ErrorTableUnavailableError(SnowpipeWorkerError):
    """No error table can name the rows Snowflake rejected (SNOWPIPE_ERROR_TABLE=off, no table
    known for the pipe, error logging off, no privilege): the message says why, in one line."""


class PipeTableUnknownError(SnowpipeWorkerError, ValueError):
    """The table a pipe loads cannot be found (not a default pipe, and DESCRIBE PIPE did not
    tell); the message names the pipe (`what`) and the setting that fixes it (`fix`)."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what}: {fix}")
        self.what = what
        self.fix = fix

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.what, self.fix))


# --- Scrubbing ---------------------------------------------------------------------------------

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

