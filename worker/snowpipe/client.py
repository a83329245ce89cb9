"""SnowpipeClient: every Snowpipe Streaming endpoint, each call through the TokenGuard and the
RetryPolicy, over one keep-alive `httpx.Client` per process.

    hostname       GET    {account}/v2/streaming/hostname                       key-pair JWT
    token          POST   {account}/oauth/token                                 key-pair JWT
    open_channel   PUT    {ingest}/v2/streaming/databases/D/schemas/S/pipes/P/channels/C
    append_rows    POST   {ingest}/v2/streaming/data/databases/D/schemas/S/pipes/P/channels/C/rows
    channel status POST   {ingest}/v2/streaming/databases/D/schemas/S/pipes/P:bulk-channel-status
    drop_channel   DELETE {ingest}/v2/streaming/databases/D/schemas/S/pipes/P/channels/C

How a call runs (`_call`): the RetryPolicy runs attempts; each attempt reads the token from its
guard afresh (a retry never reuses a token that expired meanwhile), sends, and on 401/403
invalidates that token and resends once with a new one; a second 401/403 is an `AuthError`, never
a loop. Error responses become the typed errors of `worker.snowpipe.errors`. One `requestId` per
logical call, the same on each retry (Snowflake asks for that, docs/protocol.md#headers).

The two hostname/token calls are made on behalf of the scoped-token guard (single flight); they
are retried as calls of their own (`own_layer`), bounded by the guard's wait timeout.

Processes: `get_client(settings)` gives the process's client. After `fork()` the child drops the
inherited `httpx.Client` without closing it (closing would tear down connections the parent
still uses) and opens its own on first use; the token guards reset their locks themselves.
"""

from __future__ import annotations

import copy
import os
import platform
import ssl
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar
from urllib.parse import quote, urlsplit

import httpx
import orjson

from worker.auth.guard import Adopt, Publish, TokenGuard, TokenUnavailableError
from worker.auth.keypair import KeyPairJWT, normalize_account
from worker.observability import get_logger
from worker.retry import RetryPolicy
from worker.snowpipe.auth import GRANT_TYPE, SnowflakeAuth, ingest_base_url, parse_hostname
from worker.snowpipe.encoding import EncodedRows
from worker.snowpipe.errors import (
    AppendOutcomeUnknownError,
    AuthError,
    InvalidJWTError,
    ProtocolError,
    RequestTimeoutError,
    SnowpipeError,
    TokenRefreshError,
    TransportError,
    error_from_response,
)

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = [
    "ChannelStatus",
    "OpenChannelResult",
    "SnowpipeClient",
    "get_client",
    "reset_client",
]

T = TypeVar("T")
log = get_logger("worker.snowpipe.client")

try:
    from importlib.metadata import version as _pkg_version

    _VERSION = _pkg_version("snowpipe-worker")
except Exception:  # noqa: BLE001 - running from a checkout without metadata
    _VERSION = "0.0.0"

# Format recommended by Snowflake (docs/protocol.md#headers), with our own product name.
USER_AGENT: Final = (
    f"snowpipe-worker/{_VERSION} ({platform.system().lower()} {platform.machine()}) "
    f"PYTHON/{platform.python_version()}"
)
TOKEN_TYPE_HEADER: Final = "X-Snowflake-Authorization-Token-Type"  # noqa: S105 - a header name
OffsetTokenForm = Literal["start_end", "legacy"]
_AUTH_STATUSES: Final = frozenset({401, 403})
# The pipe failed over to another ingest host (docs/protocol.md#pipe-failover).
_FAILOVER_STATUS: Final = 410


# --- Results -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelStatus:
    """A channel's state as Snowflake reports it (open response or bulk status)."""

    database_name: str
    schema_name: str
    pipe_name: str
    channel_name: str
    channel_status_code: str
    last_committed_offset_token: str | None
    rows_inserted: int
    rows_parsed: int
    rows_error_count: int
    last_error_offset_upper_bound: str | None
    last_error_message: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, channel: str = "") -> ChannelStatus:
        """Parse a status object; `rows_errors` (bulk status docs) and `rows_error_count` both
        count errors (docs/protocol.md#bulk-channel-status); missing counters read as 0."""
        errors = data.get("rows_error_count")
        if errors is None:
            errors = data.get("rows_errors")
        return cls(
            database_name=_str(data.get("database_name")) or "",
            schema_name=_str(data.get("schema_name")) or "",
            pipe_name=_str(data.get("pipe_name")) or "",
            channel_name=_str(data.get("channel_name")) or channel,
            channel_status_code=_str(data.get("channel_status_code")) or "",
            last_committed_offset_token=_str(data.get("last_committed_offset_token")),
            rows_inserted=_int(data.get("rows_inserted")),
            rows_parsed=_int(data.get("rows_parsed")),
            rows_error_count=_int(errors),
            last_error_offset_upper_bound=_str(data.get("last_error_offset_upper_bound")),
            last_error_message=_str(data.get("last_error_message")),
        )


@dataclass(frozen=True, slots=True)
class OpenChannelResult:
    """What opening a channel gives: the first continuation token and the channel's status."""

    continuation_token: str
    status: ChannelStatus


def _str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return 0


def _seg(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"{what} name is empty")
    # Every path segment encoded: default pipe names like "T-STREAMING" may carry quotes/spaces.
    return quote(value, safe="")


# --- SSL and HTTP client -------------------------------------------------------------------------

_ssl_contexts: dict[str | None, ssl.SSLContext] = {}
_ssl_lock = threading.Lock()


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """One SSL context per CA file per process tree (building one costs ~20 ms)."""
    key = str(ca_file) if ca_file is not None else None
    ctx = _ssl_contexts.get(key)
    if ctx is None:
        with _ssl_lock:
            ctx = _ssl_contexts.get(key)
            if ctx is None:
                ctx = _ssl_contexts[key] = ssl.create_default_context(cafile=key)
    return ctx


# Clients inherited across fork(): kept referenced so nothing in the child ever closes them.
_abandoned: list[httpx.Client] = []
_clients: weakref.WeakSet[SnowpipeClient] = weakref.WeakSet()


class SnowpipeClient:
    """Calls Snowpipe Streaming endpoints for one account; one per process (`get_client`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        minter: KeyPairJWT | None = None,
        policy: RetryPolicy | None = None,
        adopt: Adopt | None = None,
        publish: Publish | None = None,
        transport: httpx.BaseTransport | None = None,
        offset_token_form: OffsetTokenForm = "start_end",  # noqa: S107 - not a secret
        guard_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.account_url = settings.account_url.rstrip("/")
        self.policy = policy if policy is not None else RetryPolicy.from_settings(settings)
        self.offset_token_form: OffsetTokenForm = offset_token_form
        self._transport = transport
        self._timeout = httpx.Timeout(
            settings.http_timeout_seconds, connect=settings.http_connect_timeout_seconds
        )
        # Token fetches run under the guard's single flight; their retries must end before the
        # guard's waiters give up.
        self._token_deadline = settings.refresh_wait_timeout_seconds
        self._http_client: httpx.Client | None = None
        self._http_lock = threading.Lock()
        self._pid = os.getpid()
        self.tokens = SnowflakeAuth(
            settings,
            minter=minter if minter is not None else KeyPairJWT.from_settings(settings),
            fetch_hostname=self._fetch_hostname,
            exchange=self._exchange_token,
            adopt=adopt,
            publish=publish,
            **dict(guard_overrides or {}),
        )
        _clients.add(self)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        adopt: Adopt | None = None,
        publish: Publish | None = None,
        **kwargs: Any,
    ) -> SnowpipeClient:
        """A client for the configured account (loads the key: ~36 ms; create one per process)."""
        return cls(settings, adopt=adopt, publish=publish, **kwargs)

    # -- HTTP client lifecycle ---------------------------------------------------------------------

    @property
    def http(self) -> httpx.Client:
        """This process's `httpx.Client` (created on first use, and again after a fork)."""
        client = self._http_client
        if client is None or self._pid != os.getpid():
            with self._http_lock:
                if self._pid != os.getpid():
                    self._after_fork_in_child()
                client = self._http_client
                if client is None:
                    client = self._http_client = self._new_http()
        return client

    def _new_http(self) -> httpx.Client:
        verify: ssl.SSLContext | bool = True
        if self.account_url.startswith("https:"):
            verify = _ssl_context(self.settings.ca_file)
        return httpx.Client(
            timeout=self._timeout,
            verify=verify,
            transport=self._transport,
            headers={"Accept": "application/json", "User-Agent": USER_AGENT},
            follow_redirects=False,
        )

    def _after_fork_in_child(self) -> None:
        # Drop, never close: the parent still uses those sockets.
        if self._http_client is not None:
            _abandoned.append(self._http_client)
        self._http_client = None
        self._http_lock = threading.Lock()
        self._pid = os.getpid()

    def close(self) -> None:
        """Close this process's HTTP connections (the client can still be used afterwards)."""
        with self._http_lock:
            client, self._http_client = self._http_client, None
        if client is not None and self._pid == os.getpid():
            client.close()

    def __enter__(self) -> SnowpipeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Endpoints ------------------------------------------------------------------------------

    def ingest_url(self) -> str:
        """The ingest host's base URL (asks the account host once per process)."""
        return ingest_base_url(self.account_url, self.tokens.ingest_host())

    def open_channel(
        self,
        database: str,
        schema: str,
        pipe: str,
        channel: str,
        *,
        offset_token: str | None = None,
        fail_on_uncommitted_rows: bool = False,
    ) -> OpenChannelResult:
        """Open (or reopen: bumps the sequencer) a channel; its continuation token and status."""
        body: dict[str, Any] = {"fail_on_uncommitted_rows": fail_on_uncommitted_rows}
        if offset_token is not None:
            body["offset_token"] = offset_token
        path = self._channel_path(database, schema, pipe, channel)
        data = self._json_call(
            "open_channel", "PUT", path, content=orjson.dumps(body), json_body=True
        )
        token = data.get("next_continuation_token")
        status = data.get("channel_status")
        if not isinstance(token, str) or not token or not isinstance(status, Mapping):
            raise ProtocolError(
                "open channel answered without next_continuation_token/channel_status",
                op="open_channel",
            )
        return OpenChannelResult(token, ChannelStatus.from_json(status, channel=channel))

    def append_rows(
        self,
        database: str,
        schema: str,
        pipe: str,
        channel: str,
        *,
        continuation_token: str,
        payload: EncodedRows,
        start_offset_token: str | None,
        end_offset_token: str,
    ) -> str:
        """Send one encoded request of rows; the next continuation token.

        A 200 means "received", not "committed": confirm with `bulk_channel_status`.
        """
        if not continuation_token:
            raise ValueError("append_rows needs the continuation token from open_channel")
        params: dict[str, str] = {}
        if self.offset_token_form == "legacy":  # noqa: S105 - not a secret
            params["offsetToken"] = end_offset_token
        else:
            if start_offset_token is not None:
                params["startOffsetToken"] = start_offset_token
            params["endOffsetToken"] = end_offset_token
        params["continuationToken"] = continuation_token
        path = (
            f"/v2/streaming/data/databases/{_seg(database, 'database')}"
            f"/schemas/{_seg(schema, 'schema')}/pipes/{_seg(pipe, 'pipe')}"
            f"/channels/{_seg(channel, 'channel')}/rows"
        )
        data = self._json_call(
            "append_rows",
            "POST",
            path,
            params=params,
            content=payload.body,
            headers=payload.headers(),
            idempotent=False,
        )
        code = data.get("status_code")
        if code not in (None, 0, "0"):
            raise ProtocolError(
                f"append answered status_code {code!r}: {data.get('message')!r}",
                op="append_rows",
            )
        token = data.get("next_continuation_token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("append answered without next_continuation_token", op="append_rows")
        return token

    def bulk_channel_status(
        self, database: str, schema: str, pipe: str, channel_names: Sequence[str]
    ) -> dict[str, ChannelStatus]:
        """Status of each named channel that exists (names are case-sensitive here)."""
        if isinstance(channel_names, str):
            raise TypeError("channel_names must be a sequence of names, not one string")
        path = (
            f"/v2/streaming/databases/{_seg(database, 'database')}"
            f"/schemas/{_seg(schema, 'schema')}/pipes/{_seg(pipe, 'pipe')}:bulk-channel-status"
        )
        body = orjson.dumps({"channel_names": list(channel_names)})
        data = self._json_call("bulk_channel_status", "POST", path, content=body, json_body=True)
        statuses = data.get("channel_statuses")
        if statuses is None:
            return {}
        if not isinstance(statuses, Mapping):
            raise ProtocolError(
                "bulk channel status answered a non-object channel_statuses",
                op="bulk_channel_status",
            )
        return {
            name: ChannelStatus.from_json(value, channel=name)
            for name, value in statuses.items()
            if isinstance(value, Mapping)
        }

    def drop_channel(
        self,
        database: str,
        schema: str,
        pipe: str,
        channel: str,
        *,
        fail_on_uncommitted_rows: bool | None = None,
    ) -> None:
        """Drop the channel and its offset metadata (only when it will never be resumed)."""
        content = None
        if fail_on_uncommitted_rows is not None:
            content = orjson.dumps({"fail_on_uncommitted_rows": fail_on_uncommitted_rows})
        path = self._channel_path(database, schema, pipe, channel)
        self._call(
            "drop_channel",
            self._ingest_guard,
            lambda: self.ingest_url() + path,
            "DELETE",
            content=content,
            json_body=content is not None,
        )

    # -- Control plane (called by the scoped-token guard) ----------------------------------------

    def _fetch_hostname(self, jwt_guard: TokenGuard) -> str:
        response = self._call(
            "hostname",
            jwt_guard,
            lambda: self.account_url + "/v2/streaming/hostname",
            "GET",
            token_type="KEYPAIR_JWT",  # noqa: S106 - a token type name, not a token
            own_layer=True,
        )
        host = parse_hostname(response.content)
        log.info("snowpipe.ingest_host", host=host)
        return host

    def _exchange_token(self, jwt_guard: TokenGuard, scope: str) -> str:
        form = httpx.QueryParams({"grant_type": GRANT_TYPE, "scope": scope})
        response = self._call(
            "token",
            jwt_guard,
            lambda: self.account_url + "/oauth/token",
            "POST",
            content=str(form).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            # No token-type header here: tutorials omit it and a live client asserts it must be
            # absent (docs/protocol.md#token-exchange).
            token_type=None,
            own_layer=True,
        )
        value = response.text.strip()
        if value.startswith("{"):
            # The docs' {"token": ...} shape; the live service answers with the raw token.
            try:
                data = orjson.loads(value)
            except orjson.JSONDecodeError:
                data = None
            if isinstance(data, dict) and isinstance(data.get("token"), str):
                value = data["token"].strip()
        value = value.strip('"')
        if not value or any(c.isspace() for c in value):
            raise ProtocolError("the token endpoint answered without a usable token", op="token")
        return value

    # -- Plumbing ---------------------------------------------------------------------------------

    @property
    def _ingest_guard(self) -> TokenGuard:
        return self.tokens.scoped

    @staticmethod
    def _channel_path(database: str, schema: str, pipe: str, channel: str) -> str:
        return (
            f"/v2/streaming/databases/{_seg(database, 'database')}"
            f"/schemas/{_seg(schema, 'schema')}/pipes/{_seg(pipe, 'pipe')}"
            f"/channels/{_seg(channel, 'channel')}"
        )

    def _json_call(
        self,
        op: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        json_body: bool = False,
        idempotent: bool = True,
    ) -> dict[str, Any]:
        response = self._call(
            op,
            self._ingest_guard,
            lambda: self.ingest_url() + path,
            method,
            params=params,
            content=content,
            headers=headers,
            json_body=json_body,
            idempotent=idempotent,
        )
        try:
            data = orjson.loads(response.content) if response.content else {}
        except orjson.JSONDecodeError:
            raise ProtocolError(
                f"{op} answered HTTP {response.status_code} with a body that is not JSON",
                op=op,
                status=response.status_code,
            ) from None
        if not isinstance(data, dict):
            raise ProtocolError(
                f"{op} answered HTTP {response.status_code} with JSON that is not an object",
                op=op,
                status=response.status_code,
            )
        return data

    def _call(
        self,
        op: str,
        guard: TokenGuard,
        url: Callable[[], str],
        method: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        json_body: bool = False,
        token_type: str | None = "OAUTH",  # noqa: S107 - a token type name, not a token
        own_layer: bool = False,
        idempotent: bool = True,
    ) -> httpx.Response:
        """The 2xx response of one logical call: retries by the policy, one resend on 401/403.

        A call that is not `idempotent` (an append) is not resent after a transport failure that
        may have happened after the request left: that raises `AppendOutcomeUnknownError`, and
        the channel writer settles it with a reopen instead. Failures to connect are resent.
        """
        request_id = str(uuid.uuid4())
        query = {**(params or {}), "requestId": request_id}
        base_headers: dict[str, str] = dict(headers or {})
        if json_body:
            base_headers.setdefault("Content-Type", "application/json")
        if token_type is not None:
            base_headers[TOKEN_TYPE_HEADER] = token_type

        def send(token: str) -> httpx.Response:
            request_headers = {**base_headers, "Authorization": f"Bearer {token}"}
            started = time.perf_counter()
            try:
                response = self.http.request(
                    method, url(), params=query, content=content, headers=request_headers
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                # Never sent: safe to resend, whatever the call.
                raise TransportError(
                    f"{type(exc).__name__}: {exc}", op=op, request_id=request_id
                ) from None
            except httpx.TransportError as exc:
                if not idempotent:
                    raise AppendOutcomeUnknownError(
                        f"{type(exc).__name__} after the request was sent: its outcome is unknown",
                        op=op,
                        request_id=request_id,
                    ) from None
                if isinstance(exc, httpx.TimeoutException):
                    raise RequestTimeoutError(
                        f"{type(exc).__name__}: no answer in time", op=op, request_id=request_id
                    ) from None
                raise TransportError(
                    f"{type(exc).__name__}: {exc}", op=op, request_id=request_id
                ) from None
            log.debug(
                "snowpipe.request",
                op=op,
                method=method,
                status=response.status_code,
                elapsed_ms=round((time.perf_counter() - started) * 1000, 2),
                request_id=request_id,
            )
            return response

        def attempt() -> httpx.Response:
            token = self._token(guard, op)
            response = send(token)
            if response.status_code in _AUTH_STATUSES:
                # Rejected: if that token is still current the guard fetches a new one; resend
                # once. A second rejection is the caller's AuthError (never a loop).
                guard.invalidate(token)
                log.info(
                    "snowpipe.unauthorized", op=op, status=response.status_code, guard=guard.name
                )
                token = self._token(guard, op)
                response = send(token)
                if response.status_code in _AUTH_STATUSES:
                    raise self._auth_error(op, guard, response, request_id)
            if response.is_success:
                return response
            if response.status_code == _FAILOVER_STATUS and guard is self._ingest_guard:
                self._failed_over(op, token)
            raise error_from_response(
                response.status_code,
                response.content,
                headers=response.headers,
                request_id=request_id,
                op=op,
            )

        deadline = self._token_deadline if own_layer else None
        return self.policy.call(attempt, op=op, deadline=deadline, own_layer=own_layer)

    def _failed_over(self, op: str, token: str) -> None:
        """A 410: forget the ingest host and the scoped token that went with it, so the next
        ingest call (the channel's reopen) rediscovers the host and exchanges a new token.

        Only the token the 410 came with is invalidated: when several calls see it at once, the
        first invalidation refreshes and the later ones are no-ops (no refresh storm, no loop).
        """
        log.warning("snowpipe.pipe_failover", op=op)
        self.tokens.forget_ingest_host()
        self._ingest_guard.invalidate(token)

    def _token(self, guard: TokenGuard, op: str) -> str:
        """A valid token from `guard`; a refresh failure becomes the cause's own error type."""
        try:
            return guard.get()
        except TokenUnavailableError as exc:
            cause = exc.cause
            if isinstance(cause, SnowpipeError):
                # A fresh copy: the original may be raised in other threads at the same time.
                err = copy.copy(cause)
                err.__traceback__ = None
                raise err from exc
            raise TokenRefreshError(str(exc), op=op) from exc

    def _jwt_hint(self) -> str:
        """What to check when the key-pair JWT is refused, with the values actually sent."""
        tokens = self.tokens
        sent_account, sent_user = tokens.identity.split(".", 1)
        checks = [
            f"check the key: the public key with fingerprint {tokens.fingerprint} must be "
            f"registered for user {sent_user} (DESCRIBE USER shows RSA_PUBLIC_KEY_FP; "
            "SNOWPIPE_PRIVATE_KEY_PATH must hold its private key)",
            f"check the account: SNOWPIPE_ACCOUNT={self.settings.account!r} is sent as "
            f"{sent_account!r} and must be the account of "
            f"SNOWPIPE_ACCOUNT_URL={self.account_url!r}",
            f"check the user: SNOWPIPE_USER={self.settings.user!r}",
        ]
        url_account = _account_in_url(self.account_url)
        if url_account is not None and url_account != sent_account.replace("_", "-"):
            # The likeliest cause comes first.
            checks.insert(
                0,
                f"the account is the likely culprit: SNOWPIPE_ACCOUNT gives {sent_account!r} "
                f"but SNOWPIPE_ACCOUNT_URL names {url_account!r}",
            )
        return "; ".join(checks)

    def _auth_error(
        self, op: str, guard: TokenGuard, response: httpx.Response, request_id: str
    ) -> SnowpipeError:
        err = error_from_response(
            response.status_code,
            response.content,
            headers=response.headers,
            request_id=request_id,
            op=op,
        )
        tokens = self.tokens
        if guard is tokens.jwt:
            return InvalidJWTError(
                f"Snowflake rejected the key-pair JWT for {tokens.identity}: {err.message}",
                status=err.status,
                code=err.code,
                request_id=request_id,
                op=op,
                hint=self._jwt_hint(),
            )
        if isinstance(err, AuthError):
            err.hint = (
                "the ingest host rejected a freshly exchanged scoped token: check SNOWPIPE_ROLE "
                "and the role's grants on the pipe"
                if response.status_code == 401
                else err.hint
            )
            return err
        return AuthError(
            err.message, status=err.status, code=err.code, request_id=request_id, op=op
        )


def _account_in_url(url: str) -> str | None:
    """The account named by a `<account>[.region].snowflakecomputing.com` URL, normalised."""
    host = (urlsplit(url).hostname or "").lower()
    if not host.endswith((".snowflakecomputing.com", ".snowflakecomputing.cn")):
        return None
    try:
        return normalize_account(host.split(".", 1)[0]).replace("_", "-")
    except ValueError:
        return None


# --- One client per process ----------------------------------------------------------------------

_process_client: SnowpipeClient | None = None
_process_pid: int | None = None
_process_lock = threading.Lock()


def get_client(
    settings: Settings,
    *,
    adopt: Adopt | None = None,
    publish: Publish | None = None,
    **kwargs: Any,
) -> SnowpipeClient:
    """This process's `SnowpipeClient` (created on first call; the arguments of later calls are
    ignored). Safe to call from every task: cheap after the first call, and per PID."""
    client = _process_client
    if client is not None and _process_pid == os.getpid():
        return client
    return _create_process_client(settings, adopt=adopt, publish=publish, **kwargs)


def _create_process_client(settings: Settings, **kwargs: Any) -> SnowpipeClient:
    global _process_client, _process_pid  # noqa: PLW0603 - the per-process singleton
    with _process_lock:
        if _process_client is None or _process_pid != os.getpid():
            _process_client = SnowpipeClient.from_settings(settings, **kwargs)
            _process_pid = os.getpid()
        return _process_client


def reset_client() -> None:
    """Forget (and close) this process's client; the next `get_client()` builds a new one."""
    global _process_client, _process_pid
    with _process_lock:
        client, _process_client, _process_pid = _process_client, None, None
    if client is not None:
        client.close()


def _after_fork_in_child() -> None:
    global _process_lock  # noqa: PLW0603 - a lock held at fork() stays held in the child
    _process_lock = threading.Lock()
    _ssl_lock_reset()
    for client in list(_clients):
        client._after_fork_in_child()


def _ssl_lock_reset() -> None:
    global _ssl_lock  # noqa: PLW0603 - a lock held at fork() stays held in the child
    _ssl_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
