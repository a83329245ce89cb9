"""SnowpipeClient: every Snowpipe Streaming endpoint, each call through the RetryPolicy and a
`GuardAuth`, over one keep-alive `httpx.Client` per process.

    hostname       GET    {account}/v2/streaming/hostname                       key-pair JWT
    token          POST   {account}/oauth/token                                 key-pair JWT
    open_channel   PUT    {ingest}/v2/streaming/databases/D/schemas/S/pipes/P/channels/C
    append_rows    POST   {ingest}/v2/streaming/data/databases/D/schemas/S/pipes/P/channels/C/rows
    channel status POST   {ingest}/v2/streaming/databases/D/schemas/S/pipes/P:bulk-channel-status
    drop_channel   DELETE {ingest}/v2/streaming/databases/D/schemas/S/pipes/P/channels/C
    sql()          POST   {account}/api/v2/statements (and its polls)          key-pair JWT
                   the SQL API (worker.snowpipe.sql), on the same HTTP client and policy

The layers of one call (`_call`), top down:

    RetryPolicy.call        attempts, backoff, deadline, budget (worker.retry)
    httpx.Client.request    this process's client (worker.snowpipe.http.ProcessHttp)
    GuardAuth.auth_flow     token from the guard; 401/403 -> invalidate, resend once; 410 ->
                            forget the ingest host (worker.snowpipe.http)
    error mapping           transport failure, error response, no token -> the typed errors of
                            the one tree (worker.snowpipe.errors)

One `requestId` per logical call, the same on each retry (Snowflake asks for that,
docs/protocol.md#headers). Results are the dataclasses of `worker.snowpipe.models`.

The two hostname/token calls are made on behalf of the scoped-token guard (single flight); they
are retried as calls of their own (`own_layer`), bounded by the guard's wait timeout.

One client per process: the worker's node and runtime each build theirs; after `fork()` the
child opens its own HTTP connections (worker.snowpipe.http) and the token guards reset their
locks themselves.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

import httpx
import orjson

from worker.auth.guard import Adopt, Publish
from worker.auth.keypair import KeyPairJWT
from worker.errors import ProtocolError, SnowpipeError, TokenUnavailableError
from worker.observability import get_logger
from worker.retry import RetryPolicy
from worker.snowpipe.encoding import EncodedRows
from worker.snowpipe.errors import (
    error_from_response,
    error_from_token,
    error_from_transport,
    json_object,
)
from worker.snowpipe.http import (
    AUTH_STATUSES,
    OP_EXTENSION,
    TOKEN_TYPE_HEADER,
    USER_AGENT,
    GuardAuth,
    ProcessHttp,
    ssl_context,
)
from worker.snowpipe.models import ChannelStatus, OffsetTokenForm, OpenChannelResult
from worker.snowpipe.sql import SqlApi
from worker.snowpipe.tokens import GRANT_TYPE, SnowflakeTokens, ingest_base_url, parse_hostname

if TYPE_CHECKING:
    import ssl

    from worker.settings import Settings

__all__ = ["ChannelStatus", "OffsetTokenForm", "OpenChannelResult", "SnowpipeClient"]

log = get_logger("worker.snowpipe.client")
# The stdlib logger under `log` (structlog's filter_by_level asks it too): a request's debug
# event is built only when it would be written, not on every call of the hot path.
_stdlib_log = logging.getLogger("worker.snowpipe.client")

_OAUTH: Final = {TOKEN_TYPE_HEADER: "OAUTH"}
_OAUTH_JSON: Final = {TOKEN_TYPE_HEADER: "OAUTH", "Content-Type": "application/json"}


def _seg(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"{what} name is empty")
    # Every path segment encoded: default pipe names like "T-STREAMING" may carry quotes/spaces.
    return quote(value, safe="")


# The paths of the hot endpoints, built once per channel (or pipe), not on every call.
_PATHS_CACHED = 4096


@functools.lru_cache(maxsize=_PATHS_CACHED)
def _channel_path(database: str, schema: str, pipe: str, channel: str) -> str:
    return (
        f"/v2/streaming/databases/{_seg(database, 'database')}"
        f"/schemas/{_seg(schema, 'schema')}/pipes/{_seg(pipe, 'pipe')}"
        f"/channels/{_seg(channel, 'channel')}"
    )


@functools.lru_cache(maxsize=_PATHS_CACHED)
def _rows_path(database: str, schema: str, pipe: str, channel: str) -> str:
    return (
        f"/v2/streaming/data/databases/{_seg(database, 'database')}"
        f"/schemas/{_seg(schema, 'schema')}/pipes/{_seg(pipe, 'pipe')}"
        f"/channels/{_seg(channel, 'channel')}/rows"
    )


@functools.lru_cache(maxsize=_PATHS_CACHED)
def _status_path(database: str, schema: str, pipe: str) -> str:
    return (
        f"/v2/streaming/databases/{_seg(database, 'database')}"
        f"/schemas/{_seg(schema, 'schema')}/pipes/{_seg(pipe, 'pipe')}:bulk-channel-status"
    )


class SnowpipeClient:
    """Calls Snowpipe Streaming endpoints for one account; create one per process."""

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
        self._http = ProcessHttp(self._new_http)
        self.tokens = SnowflakeTokens(
            settings,
            minter=minter if minter is not None else KeyPairJWT.from_settings(settings),
            fetch_hostname=self._fetch_hostname,
            exchange=self._exchange_token,
            adopt=adopt,
            publish=publish,
            **dict(guard_overrides or {}),
        )
        self._jwt_auth = GuardAuth(self.tokens.jwt)
        self._ingest_auth = GuardAuth(
            self.tokens.scoped, on_failover=self.tokens.forget_ingest_host
        )
        self._sql: SqlApi | None = None
        self._ingest_base: tuple[str, str] | None = None  # (host, its base URL)

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
        return self._http.get()

    def _new_http(self) -> httpx.Client:
        verify: ssl.SSLContext | bool = True
        if self.account_url.startswith("https:"):
            verify = ssl_context(self.settings.ca_file)
        return httpx.Client(
            timeout=self._timeout,
            verify=verify,
            transport=self._transport,
            headers={"Accept": "application/json", "User-Agent": USER_AGENT},
            follow_redirects=False,
        )

    def sql(self) -> SqlApi:
        """The SQL API of this account: the same HTTP client, RetryPolicy and JWT guard (one
        per client; SNOWPIPE_SQL_WAREHOUSE, SNOWPIPE_ROLE and SNOWPIPE_SQL_TIMEOUT_SECONDS)."""
        if self._sql is None:
            s = self.settings
            self._sql = SqlApi(
                self.account_url,
                http=self._http.get,
                auth=self._jwt_auth,
                policy=self.policy,
                rejected=self.tokens.rejected,
                warehouse=s.sql_warehouse,
                role=s.role,
                timeout_seconds=s.sql_timeout_seconds,
                sleep=self.policy.sleep,
                clock=self.policy.clock,
            )
        return self._sql

    def close(self) -> None:
        """Close this process's HTTP connections (the client can still be used afterwards)."""
        self._http.close()

    def __enter__(self) -> SnowpipeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Endpoints ------------------------------------------------------------------------------

    def ingest_url(self) -> str:
        """The ingest host's base URL (asks the account host once per process).

        While the host is unknown (the first call, or after a failover) the scoped token is
        taken first: its refresh discovers the host, so a hostname failure counts as the
        refresh's (guard backoff and health), as it did when the token came before the URL.
        """
        tokens = self.tokens
        if tokens.known_host is None:
            tokens.scoped.get()
        host = tokens.ingest_host()
        cached = self._ingest_base
        if cached is None or cached[0] != host:  # the first call, or a failover moved the host
            cached = self._ingest_base = (host, ingest_base_url(self.account_url, host))
        return cached[1]

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
            "open_channel", "PUT", path, content=orjson.dumps(body), headers=_OAUTH_JSON
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
        data = self._json_call(
            "append_rows",
            "POST",
            _rows_path(database, schema, pipe, channel),
            params=params,
            content=payload.body,
            headers={**payload.headers(), TOKEN_TYPE_HEADER: "OAUTH"},
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
        body = orjson.dumps({"channel_names": list(channel_names)})
        data = self._json_call(
            "bulk_channel_status", "POST", _status_path(database, schema, pipe), content=body,
            headers=_OAUTH_JSON,
        )  # fmt: skip
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
            self._ingest_auth,
            lambda: self.ingest_url() + path,
            "DELETE",
            content=content,
            headers=_OAUTH_JSON if content is not None else _OAUTH,
        )

    # -- Control plane (called by the scoped-token guard) ----------------------------------------

    def _fetch_hostname(self) -> str:
        response = self._call(
            "hostname",
            self._jwt_auth,
            lambda: self.account_url + "/v2/streaming/hostname",
            "GET",
            headers={TOKEN_TYPE_HEADER: "KEYPAIR_JWT"},
            own_layer=True,
        )
        host = parse_hostname(response.content)
        log.info("snowpipe.ingest_host", host=host)
        return host

    def _exchange_token(self, scope: str) -> str:
        form = httpx.QueryParams({"grant_type": GRANT_TYPE, "scope": scope})
        response = self._call(
            "token",
            self._jwt_auth,
            lambda: self.account_url + "/oauth/token",
            "POST",
            content=str(form).encode(),
            # No token-type header here: tutorials omit it and a live client asserts it must be
            # absent (docs/protocol.md#token-exchange).
            headers={"Content-Type": "application/x-www-form-urlencoded"},
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

    @staticmethod
    def _channel_path(database: str, schema: str, pipe: str, channel: str) -> str:
        return _channel_path(database, schema, pipe, channel)

    def _json_call(
        self,
        op: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] = _OAUTH,
        idempotent: bool = True,
    ) -> dict[str, Any]:
        """`_call` on the ingest host; the answer's JSON object (`ProtocolError` otherwise)."""
        response = self._call(
            op,
            self._ingest_auth,
            lambda: self.ingest_url() + path,
            method,
            params=params,
            content=content,
            headers=headers,
            idempotent=idempotent,
        )
        return json_object(response, op=op, what=op)

    def _call(
        self,
        op: str,
        auth: GuardAuth,
        url: Callable[[], str],
        method: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        own_layer: bool = False,
        idempotent: bool = True,
    ) -> httpx.Response:
        """The 2xx response of one logical call (the layers are in the module docstring).

        A call that is not `idempotent` (an append) is not resent after a transport failure that
        may have happened after the request left: that raises `AppendOutcomeUnknownError`, and
        the channel pump settles it with a reopen instead. Failures to connect are resent.
        """
        request_id = str(uuid.uuid4())
        query = {**(params or {}), "requestId": request_id}
        extensions = {OP_EXTENSION: op}

        def attempt() -> httpx.Response:
            started = time.perf_counter()
            try:
                response = self.http.request(
                    method, url(), params=query, content=content, headers=headers, auth=auth,
                    extensions=extensions,
                )  # fmt: skip
            except httpx.TransportError as exc:
                raise error_from_transport(
                    exc, op=op, request_id=request_id, idempotent=idempotent
                ) from None
            except TokenUnavailableError as exc:
                raise error_from_token(exc, op=op) from exc
            if _stdlib_log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "snowpipe.request",
                    op=op,
                    method=method,
                    status=response.status_code,
                    elapsed_ms=round((time.perf_counter() - started) * 1000, 2),
                    request_id=request_id,
                )
            if response.is_success:
                return response
            raise self._status_error(op, auth, response, request_id)

        deadline = self._token_deadline if own_layer else None
        return self.policy.call(attempt, op=op, deadline=deadline, own_layer=own_layer)

    def _status_error(
        self, op: str, auth: GuardAuth, response: httpx.Response, request_id: str
    ) -> SnowpipeError:
        """The typed error for an error response; a 401/403 here survived the one resend."""
        err = error_from_response(
            response.status_code,
            response.content,
            headers=response.headers,
            request_id=request_id,
            op=op,
        )
        if response.status_code in AUTH_STATUSES:
            return self.tokens.rejected(err, auth.guard)
        return err
