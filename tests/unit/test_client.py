"""SnowpipeClient request shapes, response parsing and auth/retry behaviour, with respx."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
import respx
import zstandard

from tests.support.keys import key_pair
from worker.auth.keypair import public_key_fingerprint
from worker.retry import RetryBudget, RetryPolicy
from worker.settings import Settings
from worker.snowpipe import errors as e
from worker.snowpipe import http as http_module
from worker.snowpipe.client import ChannelStatus, SnowpipeClient
from worker.snowpipe.encoding import encode_rows
from worker.snowpipe.tokens import ingest_base_url, parse_hostname, token_scope

ACCOUNT_URL = "https://acme-prod.snowflakecomputing.com"
INGEST_HOST = "acme-prod.us-east-1.ingest.snowflakecomputing.com"
INGEST = f"https://{INGEST_HOST}"
CH_PATH = "/v2/streaming/databases/DB/schemas/SC/pipes/T-STREAMING/channels/ch1"
ROWS_PATH = "/v2/streaming/data/databases/DB/schemas/SC/pipes/T-STREAMING/channels/ch1/rows"
STATUS_PATH = "/v2/streaming/databases/DB/schemas/SC/pipes/T-STREAMING:bulk-channel-status"


def scoped_token(ttl: float = 3600, *, n: int = 0) -> str:
    now = int(time.time())
    return jwt.encode({"iat": now, "exp": now + int(ttl), "n": n}, "k" * 32, algorithm="HS256")


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "account": "acme_prod",
        "user": "loader",
        "private_key": key_pair().private_pem.decode(),
        "account_url": ACCOUNT_URL,
    }
    base.update(overrides)
    return Settings(**base)


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def make_client(sleeps: Sleeps, **overrides: Any) -> SnowpipeClient:
    policy = RetryPolicy(sleep=sleeps, rng=lambda: 1.0, budget=RetryBudget(100))
    return SnowpipeClient(settings(**overrides), policy=policy)


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


@pytest.fixture
def control(mock: respx.MockRouter) -> dict[str, respx.Route]:
    """Hostname and token endpoints answering like the live service (plain text)."""
    # Each token expires a second after the previous one: a refresh must extend the expiry.
    tokens = iter(scoped_token(ttl=3600 + i, n=i) for i in range(100))
    return {
        "hostname": mock.get(f"{ACCOUNT_URL}/v2/streaming/hostname").mock(
            return_value=httpx.Response(200, text=INGEST_HOST.replace("-", "_", 1))
        ),
        "token": mock.post(f"{ACCOUNT_URL}/oauth/token").mock(
            side_effect=lambda request: httpx.Response(200, text=next(tokens))
        ),
    }


def status_json(name: str = "ch1", **extra: Any) -> dict[str, Any]:
    base = {
        "database_name": "DB",
        "schema_name": "SC",
        "pipe_name": "T-STREAMING",
        "channel_name": name,
        "channel_status_code": "SUCCESS",
        "last_committed_offset_token": None,
        "rows_inserted": 0,
        "rows_parsed": 0,
        "rows_error_count": 0,
        "last_error_offset_upper_bound": None,
        "last_error_message": None,
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None or k not in extra}


def open_ok(token: str = "0_0") -> httpx.Response:
    return httpx.Response(
        200, json={"next_continuation_token": token, "channel_status": status_json()}
    )


def bearer(request: httpx.Request) -> str:
    return request.headers["authorization"].removeprefix("Bearer ")


# --- request shapes ------------------------------------------------------------------------------


def test_full_sequence_sends_the_documented_requests(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    open_route = mock.put(INGEST + CH_PATH).mock(return_value=open_ok("0_0"))
    rows_route = mock.post(INGEST + ROWS_PATH).mock(
        return_value=httpx.Response(
            200, json={"next_continuation_token": "0_1", "status_code": 0, "message": None}
        )
    )
    status_route = mock.post(INGEST + STATUS_PATH).mock(
        return_value=httpx.Response(
            200,
            json={
                "channel_statuses": {
                    "ch1": status_json(
                        last_committed_offset_token="5", rows_errors=2, rows_error_count=None
                    )
                }
            },
        )
    )
    drop_route = mock.delete(INGEST + CH_PATH).mock(return_value=httpx.Response(204))
    client = make_client(sleeps, role="LOADER_ROLE")

    opened = client.open_channel("DB", "SC", "T-STREAMING", "ch1", offset_token="4")
    [payload] = encode_rows([{"a": 1}, {"a": 2}], compression="zstd")
    next_ct = client.append_rows(
        "DB",
        "SC",
        "T-STREAMING",
        "ch1",
        continuation_token=opened.continuation_token,
        payload=payload,
        start_offset_token="5",
        end_offset_token="6",
    )
    statuses = client.bulk_channel_status("DB", "SC", "T-STREAMING", ["ch1", "gone"])
    client.drop_channel("DB", "SC", "T-STREAMING", "ch1")

    # Hostname: GET with the key-pair JWT, typed as such; JSON accepted.
    hostname_req = control["hostname"].calls.last.request
    assert hostname_req.headers["accept"] == "application/json"
    assert hostname_req.headers["x-snowflake-authorization-token-type"] == "KEYPAIR_JWT"
    assert hostname_req.headers["user-agent"].startswith("snowpipe-worker/")
    claims = jwt.decode(bearer(hostname_req), options={"verify_signature": False})
    fp = public_key_fingerprint(key_pair().private_key)
    assert claims["iss"] == f"ACME_PROD.LOADER.{fp}"
    assert claims["sub"] == "ACME_PROD.LOADER"

    # Token: form grant + scope = dash-normalised host + role; no token-type header.
    token_req = control["token"].calls.last.request
    assert token_req.headers["content-type"] == "application/x-www-form-urlencoded"
    assert "x-snowflake-authorization-token-type" not in token_req.headers
    assert token_req.headers["accept"] == "application/json"
    form = parse_qs(token_req.content.decode())
    assert form == {
        "grant_type": ["urn:ietf:params:oauth:grant-type:jwt-bearer"],
        "scope": [f"{INGEST_HOST} session:role:LOADER_ROLE"],
    }
    assert bearer(token_req) == bearer(hostname_req)  # the cached JWT

    # Open: PUT JSON body with the scoped token, typed OAUTH.
    open_req = open_route.calls.last.request
    assert json.loads(open_req.content) == {"fail_on_uncommitted_rows": False, "offset_token": "4"}
    assert open_req.headers["content-type"] == "application/json"
    assert open_req.headers["x-snowflake-authorization-token-type"] == "OAUTH"
    assert open_req.headers["accept"] == "application/json"
    scoped = bearer(open_req)
    assert scoped != bearer(hostname_req)
    uuid.UUID(open_req.url.params["requestId"])
    assert opened.continuation_token == "0_0"
    assert opened.status.channel_status_code == "SUCCESS"

    # Append: query in R1's order, NDJSON headers, zstd body.
    rows_req = rows_route.calls.last.request
    keys = [k for k, _ in rows_req.url.params.multi_items()]
    assert keys == ["startOffsetToken", "endOffsetToken", "continuationToken", "requestId"]
    assert rows_req.url.params["startOffsetToken"] == "5"
    assert rows_req.url.params["endOffsetToken"] == "6"
    assert rows_req.url.params["continuationToken"] == "0_0"
    assert rows_req.headers["content-type"] == "application/x-ndjson"
    assert rows_req.headers["content-encoding"] == "zstd"
    raw = zstandard.ZstdDecompressor().decompress(rows_req.content)
    assert raw == b'{"a":1}\n{"a":2}\n'
    assert rows_req.headers["x-snowflake-uncompressed-content-length"] == str(len(raw))
    assert bearer(rows_req) == scoped
    assert next_ct == "0_1"

    # Status: rows_errors read as the error count; absent channels absent.
    assert json.loads(status_route.calls.last.request.content) == {"channel_names": ["ch1", "gone"]}
    assert set(statuses) == {"ch1"}
    assert statuses["ch1"].last_committed_offset_token == "5"
    assert statuses["ch1"].rows_error_count == 2

    # Drop: any 2xx is success; no body unless asked.
    assert drop_route.calls.last.request.content == b""
    assert control["hostname"].call_count == 1
    assert control["token"].call_count == 1


def test_path_segments_are_url_encoded(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    route = mock.put(url__regex=r".*/channels/.*").mock(return_value=open_ok())
    make_client(sleeps).open_channel("my db", "s/c", '"My Table"-STREAMING', "ch #1?")
    raw_path = route.calls.last.request.url.raw_path.split(b"?")[0]
    assert raw_path == (
        b"/v2/streaming/databases/my%20db/schemas/s%2Fc/pipes/%22My%20Table%22-STREAMING"
        b"/channels/ch%20%231%3F"
    )


def test_legacy_offset_token_form(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    route = mock.post(INGEST + ROWS_PATH).mock(
        return_value=httpx.Response(200, json={"next_continuation_token": "0_2"})
    )
    client = make_client(sleeps)
    client.offset_token_form = "legacy"
    [payload] = encode_rows([{"a": 1}], compression="none")
    client.append_rows(
        "DB",
        "SC",
        "T-STREAMING",
        "ch1",
        continuation_token="0_1",
        payload=payload,
        start_offset_token="7",
        end_offset_token="7",
    )
    request = route.calls.last.request
    assert dict(request.url.params) == {
        "offsetToken": "7",
        "continuationToken": "0_1",
        "requestId": request.url.params["requestId"],
    }
    assert "content-encoding" not in request.headers


def test_drop_with_fail_on_uncommitted_rows_sends_a_body(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    route = mock.delete(INGEST + CH_PATH).mock(return_value=httpx.Response(200))
    make_client(sleeps).drop_channel(
        "DB", "SC", "T-STREAMING", "ch1", fail_on_uncommitted_rows=True
    )
    assert json.loads(route.calls.last.request.content) == {"fail_on_uncommitted_rows": True}


# --- hostname and token parsing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "host"),
    [
        (
            b"my_acct.region.ingest.snowflakecomputing.com",
            "my-acct.region.ingest.snowflakecomputing.com",
        ),
        (b"  host.example\n", "host.example"),
        (b'"host_a.example"', "host-a.example"),
        (b'{"hostname": "host.example", "status_code": 0}', "host.example"),
        (b"127.0.0.1:8443", "127.0.0.1:8443"),
        (b"https://host.example/", "host.example"),
    ],
)
def test_hostname_answers_of_every_shape(body: bytes, host: str) -> None:
    assert parse_hostname(body) == host


@pytest.mark.parametrize("body", [b"", b"{}", b'{"hostname": 5}', b"<html>no</html>", b"a b"])
def test_hostname_answer_without_a_host_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(e.ProtocolError, match="hostname endpoint"):
        parse_hostname(body)


def test_ingest_url_keeps_the_account_urls_scheme_and_port() -> None:
    assert ingest_base_url("https://a.snowflakecomputing.com", "i.example") == "https://i.example"
    assert ingest_base_url("http://127.0.0.1:8087", "127.0.0.1") == "http://127.0.0.1:8087"
    assert ingest_base_url("https://localhost:9443", "h:1234") == "https://h:1234"
    assert token_scope("h", None) == "h"
    assert token_scope("h", "R") == "h session:role:R"


def test_scoped_token_lifetime_comes_from_its_exp(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    control["token"].mock(return_value=httpx.Response(200, text=scoped_token(ttl=300)))
    client = make_client(sleeps)
    client.tokens.scoped.get()
    token = client.tokens.scoped.current()
    assert token is not None
    # exp - iat, or less when iat's whole-second truncation would overstate what is left.
    assert 298 <= token.lifetime <= 300  # a loaded machine may take a second to parse it
    assert token.expires_at == pytest.approx(time.time() + 300, abs=2)


def test_scoped_token_without_exp_lives_55_minutes(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    control["token"].mock(return_value=httpx.Response(200, text="opaque-token-value"))
    client = make_client(sleeps)
    assert client.tokens.scoped.get() == "opaque-token-value"
    token = client.tokens.scoped.current()
    assert token is not None and token.lifetime == 55 * 60


def test_token_endpoint_json_shape_is_accepted(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    value = scoped_token()
    control["token"].mock(return_value=httpx.Response(200, json={"token": value}))
    assert make_client(sleeps).tokens.scoped.get() == value


# --- 401 handling --------------------------------------------------------------------------------


def test_401_refreshes_the_token_and_resends_once(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    route = mock.put(INGEST + CH_PATH).mock(
        side_effect=[httpx.Response(401, json={"code": "390144", "message": "expired"}), open_ok()]
    )
    client = make_client(sleeps)
    client.open_channel("DB", "SC", "T-STREAMING", "ch1")
    first, second = (bearer(c.request) for c in route.calls)
    assert first != second
    assert control["token"].call_count == 2  # one forced refresh
    assert control["hostname"].call_count == 1  # the host stays cached
    assert sleeps.calls == []  # a resend, not a retry
    ids = {c.request.url.params["requestId"] for c in route.calls}
    assert len(ids) == 1


def test_second_401_is_an_auth_error_not_a_loop(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    route = mock.put(INGEST + CH_PATH).mock(
        return_value=httpx.Response(
            401, json={"code": "390144", "message": "JWT token is invalid."}
        )
    )
    client = make_client(sleeps)
    with pytest.raises(e.AuthError) as info:
        client.open_channel("DB", "SC", "T-STREAMING", "ch1")
    assert route.call_count == 2
    assert control["token"].call_count == 2
    assert sleeps.calls == []
    assert "SNOWPIPE_ROLE" in str(info.value)


def test_403_gets_one_refresh_then_a_forbidden_error(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    route = mock.post(INGEST + STATUS_PATH).mock(return_value=httpx.Response(403, text=""))
    with pytest.raises(e.ForbiddenError):
        make_client(sleeps).bulk_channel_status("DB", "SC", "T-STREAMING", ["ch1"])
    assert route.call_count == 2


def test_rejected_key_pair_jwt_names_key_account_and_user(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    control["hostname"].mock(
        return_value=httpx.Response(
            401, json={"code": "390144", "message": "JWT token is invalid. [abc]"}
        )
    )
    route = mock.put(INGEST + CH_PATH).mock(return_value=open_ok())
    client = make_client(sleeps)
    with pytest.raises(e.InvalidJWTError) as info:
        client.open_channel("DB", "SC", "T-STREAMING", "ch1")
    text = str(info.value)
    fp = public_key_fingerprint(key_pair().private_key)
    assert fp in text
    assert "SNOWPIPE_ACCOUNT='acme_prod'" in text
    assert "'ACME_PROD'" in text
    assert "SNOWPIPE_USER='loader'" in text
    assert "JWT token is invalid" in text
    assert control["hostname"].call_count == 2  # re-minted once, then gave up
    assert route.call_count == 0
    assert isinstance(info.value, e.AuthError)


# --- retries through the policy ------------------------------------------------------------------


def test_transient_errors_are_retried_with_one_request_id(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    route = mock.put(INGEST + CH_PATH).mock(
        side_effect=[
            httpx.Response(503, json="ERR_GENERAL_EXCEPTION_RETRY_REQUEST"),
            httpx.Response(429, json={"code": "390701"}, headers={"Retry-After": "2"}),
            httpx.ConnectError("refused"),
            open_ok(),
        ]
    )
    make_client(sleeps).open_channel("DB", "SC", "T-STREAMING", "ch1")
    assert route.call_count == 4
    assert sleeps.calls == pytest.approx([0.2, 2.0, 0.648])
    assert len({c.request.url.params["requestId"] for c in route.calls}) == 1


def test_open_in_progress_is_retried(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    route = mock.put(INGEST + CH_PATH).mock(
        side_effect=[httpx.Response(409, json={"code": "ERR_OPEN_CHANNEL_IN_PROGRESS"}), open_ok()]
    )
    make_client(sleeps).open_channel("DB", "SC", "T-STREAMING", "ch1")
    assert route.call_count == 2


def test_stale_continuation_token_is_its_own_error_and_not_retried(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    route = mock.post(INGEST + ROWS_PATH).mock(
        return_value=httpx.Response(
            400,
            json={
                "code": "STALE_CONTINUATION_TOKEN_SEQUENCER",
                "message": "Channel sequencer in the continuation token is stale.",
            },
        )
    )
    with pytest.raises(e.StaleContinuationTokenError) as info:
        _append_once(make_client(sleeps))
    assert route.call_count == 1
    assert info.value.request_id == route.calls.last.request.url.params["requestId"]


def _append_once(client: SnowpipeClient) -> str:
    [payload] = encode_rows([{"a": 1}])
    return client.append_rows(
        "DB",
        "SC",
        "T-STREAMING",
        "ch1",
        continuation_token="0_1",
        payload=payload,
        start_offset_token="1",
        end_offset_token="1",
    )


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ReadTimeout("slow"),
        httpx.WriteTimeout("slow"),
        httpx.RemoteProtocolError("server disconnected"),
        httpx.ReadError("reset"),
    ],
)
def test_append_whose_answer_was_lost_is_not_resent_but_needs_a_reopen(
    mock: respx.MockRouter,
    control: dict[str, respx.Route],
    sleeps: Sleeps,
    failure: httpx.TransportError,
) -> None:
    # Resending with the same continuation token could commit the rows twice if the first copy
    # landed; only a reopen (which commits or discards it) can settle the outcome.
    route = mock.post(INGEST + ROWS_PATH).mock(side_effect=failure)
    with pytest.raises(e.AppendOutcomeUnknownError) as info:
        _append_once(make_client(sleeps))
    assert isinstance(info.value, e.ChannelReopenRequired)
    assert route.call_count == 1
    assert sleeps.calls == []


def test_append_that_never_connected_is_resent(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    route = mock.post(INGEST + ROWS_PATH).mock(
        side_effect=[
            httpx.ConnectError("refused"),
            httpx.ConnectTimeout("no route"),
            httpx.Response(200, json={"next_continuation_token": "0_2"}),
        ]
    )
    assert _append_once(make_client(sleeps)) == "0_2"
    assert route.call_count == 3


def test_timeouts_become_retryable_timeout_errors(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    route = mock.put(INGEST + CH_PATH).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(e.RequestTimeoutError):
        make_client(sleeps).open_channel("DB", "SC", "T-STREAMING", "ch1")
    assert route.call_count == 4


def test_every_attempt_reads_the_token_again(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    client = make_client(sleeps)
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(bearer(request))
        if len(seen) == 1:
            # The token is replaced while this attempt fails (beat refreshed it meanwhile).
            client.tokens.refresh("beat")
            return httpx.Response(503, text="busy")
        return open_ok()

    mock.put(INGEST + CH_PATH).mock(side_effect=answer)
    client.open_channel("DB", "SC", "T-STREAMING", "ch1")
    assert len(seen) == 2 and seen[0] != seen[1]
    assert seen[1] == client.tokens.scoped.get()


def test_token_endpoint_outage_is_retried_as_its_own_call(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    value = scoped_token()
    control["token"].mock(
        side_effect=[httpx.Response(503, text="down"), httpx.Response(200, text=value)]
    )
    route = mock.put(INGEST + CH_PATH).mock(return_value=open_ok())
    make_client(sleeps).open_channel("DB", "SC", "T-STREAMING", "ch1")
    assert control["token"].call_count == 2
    assert bearer(route.calls.last.request) == value


# --- responses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="not json"),
        httpx.Response(200, json=["a"]),
        httpx.Response(200, json={"status_code": 0}),
        httpx.Response(
            200, json={"next_continuation_token": "x", "status_code": 7, "message": "m"}
        ),
    ],
)
def test_unusable_append_answers_are_protocol_errors(
    mock: respx.MockRouter,
    control: dict[str, respx.Route],
    sleeps: Sleeps,
    response: httpx.Response,
) -> None:
    mock.post(INGEST + ROWS_PATH).mock(return_value=response)
    [payload] = encode_rows([{"a": 1}])
    with pytest.raises(e.ProtocolError):
        make_client(sleeps).append_rows(
            "DB",
            "SC",
            "T-STREAMING",
            "ch1",
            continuation_token="0_1",
            payload=payload,
            start_offset_token=None,
            end_offset_token="1",
        )


def test_channel_status_tolerates_missing_and_odd_fields() -> None:
    status = ChannelStatus.from_json(
        {"channel_status_code": "SUCCESS", "last_committed_offset_token": 12, "rows_inserted": "4"},
        channel="c",
    )
    assert status.channel_name == "c"
    assert status.last_committed_offset_token == "12"
    assert (status.rows_inserted, status.rows_parsed, status.rows_error_count) == (4, 0, 0)


# --- process handling ----------------------------------------------------------------------------


def test_forked_child_drops_the_inherited_http_client_without_closing_it(
    mock: respx.MockRouter, control: dict[str, respx.Route], sleeps: Sleeps
) -> None:
    client = make_client(sleeps)
    parent_http = client.http
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            fresh = client.http
            ok = (
                fresh is not parent_http
                and not parent_http.is_closed
                and parent_http in http_module._abandoned
            )
            os.write(write_fd, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(write_fd)
    verdict = os.read(read_fd, 16)
    os.close(read_fd)
    os.waitpid(pid, 0)
    assert verdict == b"ok"
    assert client.http is parent_http
    assert not parent_http.is_closed


def test_account_that_disagrees_with_the_url_is_named_first(
    mock: respx.MockRouter, sleeps: Sleeps
) -> None:
    url = "https://othercorp-main.snowflakecomputing.com"
    mock.get(f"{url}/v2/streaming/hostname").mock(
        return_value=httpx.Response(
            401, json={"code": "390144", "message": "JWT token is invalid."}
        )
    )
    client = make_client(sleeps, account_url=url)
    with pytest.raises(e.InvalidJWTError) as info:
        client.tokens.refresh("test")
    assert (
        str(info.value)
        .split(" -> ", 1)[1]
        .startswith(
            "the account is the likely culprit: SNOWPIPE_ACCOUNT gives 'ACME_PROD' but "
            "SNOWPIPE_ACCOUNT_URL names 'OTHERCORP-MAIN'"
        )
    )


def test_emulator_reasons_are_kept_in_error_messages() -> None:
    err = e.error_from_response(
        401,
        '{"code":"390144","message":"JWT token is invalid."}',
        headers={"X-Emulator-Reason": "JWT expired 3 s ago"},
    )
    assert "[emulator: JWT expired 3 s ago]" in str(err)
