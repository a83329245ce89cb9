"""Over HTTPS, the emulator answers exactly what Snowflake's SDK sends and requires (no SDK needed).

These pin, with a reference client, the wire details that `test_official_sdk.py` exercises through
the real SDK (docs/protocol.md#snowflakes-sdk): plain-text hostname without a port,
JWT-shaped scoped token, millisecond key-pair JWTs with an `scp` claim, `:pipe-info` with complete
stage locations and in-range parameters, sessionless telemetry, and the SDK's append request
(`requestId`/`retryCount`, zstd with `x-snowflake-uncompressed-content-length`, trailing blank
line). They run in the normal suite even where the SDK cannot.
"""

from __future__ import annotations

import base64
import ssl
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import orjson
import pytest
import zstandard

from tests.contract.refclient import RefClient, spki_fingerprint
from tests.support.emulator import RunningEmulator, start_emulator
from tests.support.keys import key_pair

ACCOUNT, USER = "TLSACCT", "TLS_LOADER"
DB, SCHEMA, PIPE = "TLS_DB", "PUBLIC", "EVENTS_PIPE"
U8_MAX, U16_MAX = 255, 65535
STAGE_FIELDS = {
    "expiry_time_ms", "location_type", "location", "region", "use_s3_regional_url",
    "bucket_name", "path_prefix", "creds", "parameters",
}
SDK_PARAMETERS = {
    "max_client_lag_seconds", "rowset_flush_threshold_kb", "max_buffered_kb_for_rowset_mode",
    "rowset_threshold_lookback_seconds", "rowset_threshold_ewma_weight",
    "target_file_size_compressed_mb", "cpu_throttle_high_watermark_percent",
    "cpu_throttle_low_watermark_percent", "mem_throttle_high_watermark_percent",
    "mem_throttle_low_watermark_percent",
}


@pytest.fixture(scope="module")
def tls_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    """One HTTPS emulator (--tls, CA via --ca-out) for the module."""
    with start_emulator(
        "--commit-delay", "0.2", tls=True, workdir=tmp_path_factory.mktemp("tls-emulator")
    ) as emu:
        emu.register_key(ACCOUNT, USER, key_pair("tls").public_pem)
        emu.add_pipe(DB, SCHEMA, PIPE)
        yield emu


@pytest.fixture
def client(tls_emulator: RunningEmulator) -> Iterator[RefClient]:
    """A reference client that trusts only the emulator's CA, connected (hostname + token)."""
    assert tls_emulator.ca_file is not None
    ctx = ssl.create_default_context(cafile=str(tls_emulator.ca_file))
    c = RefClient(tls_emulator.url, ACCOUNT, USER, key_pair("tls").private_key, verify=ctx)
    yield c.connect()
    c.close()


def _sdk_jwt(*, role: str | None = "INGEST_ROLE") -> str:
    """A key-pair JWT shaped like the SDK's: iat/exp in milliseconds, 59 min, `scp` role claim."""
    kp = key_pair("tls")
    now_ms = int(time.time() * 1000)
    sub = f"{ACCOUNT}.{USER}"
    claims: dict[str, Any] = {
        "iss": f"{sub}.{spki_fingerprint(kp.private_key)}",
        "sub": sub,
        "iat": now_ms,
        "exp": now_ms + 3_540_000,
    }
    if role:
        claims["scp"] = f"session:role:{role}"
    return jwt.encode(claims, kp.private_key, algorithm="RS256", headers={"typ": "JWT"})


def _sdk_query() -> dict[str, str]:
    return {"requestId": str(uuid.uuid4()), "retryCount": "0"}


def _pipe_info(client: RefClient, pipe: str = PIPE, token: str | None = None) -> httpx.Response:
    return client.http.post(
        f"{client.ingest_url}/v2/streaming/databases/{DB}/schemas/{SCHEMA}/pipes/{pipe}:pipe-info",
        params=_sdk_query(),
        json={"generate_new_token": True, "encryption_version": "AES-CTR-128.1"},
        headers={
            "Authorization": f"Bearer {token or client.scoped_token}",
            "X-Snowflake-Authorization-Token-Type": "OAUTH",
            "Accept": "application/json",
        },
    )


def test_start_line_announces_https_and_plain_http_is_refused(
    tls_emulator: RunningEmulator,
) -> None:
    assert tls_emulator.url.startswith("https://127.0.0.1:")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_emulator.port}/v2/streaming/hostname", timeout=5)


def test_sdk_shaped_key_pair_jwt_gets_plain_hostname_and_jwt_scoped_token(
    client: RefClient,
) -> None:
    hostname = client.get_hostname(_sdk_jwt())
    assert hostname.status_code == 200, hostname.text
    # Plain text, no port, no quotes: the SDK appends the account URL's port itself.
    assert hostname.text == "127.0.0.1"

    response = client.http.post(
        f"{client.url}/oauth/token",
        params=_sdk_query(),
        data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "scope": "127.0.0.1"},
        headers={
            "Authorization": f"Bearer {_sdk_jwt()}",
            "X-Snowflake-Authorization-Token-Type": "KEYPAIR_JWT",
            "Accept": "application/json",
        },
    )
    assert response.status_code == 200, response.text
    token = response.text
    assert jwt.get_unverified_header(token)["alg"] not in ("none", None)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    # Seconds, and more than the SDK's 300 s refresh buffer away (default TTL one hour).
    assert isinstance(exp, int)
    assert time.time() + 300 < exp < 1e11


def test_pipe_info_has_everything_the_sdk_deserializes(client: RefClient) -> None:
    response = _pipe_info(client)

    assert response.status_code == 200, response.text
    info = response.json()
    for name in ("rowset_stage_location", "durable_stage_location"):
        stage = info[name]
        assert set(stage) >= STAGE_FIELDS, f"{name} lacks {STAGE_FIELDS - set(stage)}"
        assert stage["location_type"] == "S3"
        assert stage["expiry_time_ms"] > time.time() * 1000 + 300_000
        creds = stage["creds"]
        assert all(creds.get(k) for k in ("AWS_KEY_ID", "AWS_SECRET_KEY", "AWS_TOKEN"))
        params = stage["parameters"]
        assert set(params) == SDK_PARAMETERS
        assert all(isinstance(v, int) and 0 <= v <= U16_MAX for v in params.values()), params
        assert params["rowset_threshold_ewma_weight"] <= U8_MAX
        # The flush cadence: small, so flushes stay small (inline mode) and tests quick.
        assert 1 <= params["max_client_lag_seconds"] <= 5
    key = base64.b64decode(info["encryption_info"]["pipe_key"])
    assert len(key) == 16  # AES-128
    assert {"pipe_key_id", "diversifier"} <= set(info["encryption_info"])
    assert isinstance(info["parameter_overrides"], dict)
    # Refreshing pipe info must not rotate the key under the SDK.
    again = _pipe_info(client).json()["encryption_info"]["pipe_key"]
    assert again == info["encryption_info"]["pipe_key"]


def test_pipe_info_refuses_unknown_pipes_and_non_scoped_tokens(client: RefClient) -> None:
    missing = _pipe_info(client, pipe="NO_SUCH_PIPE")
    assert missing.status_code == 404, missing.text
    assert missing.json()["code"] == "ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED"

    keypair = _pipe_info(client, token=_sdk_jwt())
    assert keypair.status_code == 401, keypair.text


def test_sessionless_telemetry_is_answered_with_success_and_data(client: RefClient) -> None:
    url = f"{client.url}/telemetry/send/sessionless"
    body = {"logs": [{"timestamp": str(int(time.time() * 1000)), "message": {"type": "x"}}]}
    headers = {
        "Authorization": f"Bearer {_sdk_jwt()}",
        "X-Snowflake-Authorization-Token-Type": "KEYPAIR_JWT",
        "Accept": "application/json",
    }

    ok = client.http.post(url, params=_sdk_query(), json=body, headers=headers)
    assert ok.status_code == 200, ok.text
    assert ok.json()["success"] is True
    assert isinstance(ok.json()["data"], str)

    unauthenticated = client.http.post(url, json=body)
    assert unauthenticated.status_code == 401
    malformed = client.http.post(url, content=b"[1, 2]", headers=headers)
    assert malformed.status_code == 400
    assert malformed.json()["success"] is False


def test_sdk_shaped_append_commits_every_row_and_the_blank_last_line_is_no_error(
    client: RefClient, tls_emulator: RunningEmulator
) -> None:
    opened = client.open(DB, SCHEMA, PIPE, "sdk-shaped", fail_on_uncommitted_rows=True)
    status = opened["channel_status"]
    assert status["last_committed_offset_token"] is None
    assert status["last_error_timestamp"] is None
    rows = [{"id": i} for i in range(50)]
    # The SDK's NDJSON ends with an extra "\n" (an empty last line).
    raw = b"".join(orjson.dumps(r) + b"\n" for r in rows) + b"\n"
    url = (
        f"{client.ingest_url}/v2/streaming/data/databases/{DB}/schemas/{SCHEMA}"
        f"/pipes/{PIPE}/channels/sdk-shaped/rows"
    )
    response = client.http.post(
        url,
        params={
            "startOffsetToken": "0",
            "endOffsetToken": "49",
            "continuationToken": opened["next_continuation_token"],
            **_sdk_query(),
        },
        content=zstandard.ZstdCompressor().compress(raw),
        headers={
            "Authorization": f"Bearer {client.scoped_token}",
            "X-Snowflake-Authorization-Token-Type": "OAUTH",
            "Accept": "application/json",
            "Content-Type": "application/x-ndjson",
            "Content-Encoding": "zstd",
            "x-snowflake-uncompressed-content-length": str(len(raw)),
            "x-snowflake-min-append-timestamp-ms": str(int(time.time() * 1000)),
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["next_continuation_token"]

    final = client.wait_committed(DB, SCHEMA, PIPE, "sdk-shaped", "49")
    assert final["rows_error_count"] == 0
    assert final["last_error_timestamp"] is None
    committed = tls_emulator.rows(DB, SCHEMA, PIPE)
    ids = [r["row"]["id"] for r in committed if r["channel"] == "sdk-shaped"]
    assert ids == list(range(50))
