"""What the live service does that the emulator once did differently (issue 10), one test each,
plus every switch that brings back the other behaviour. Each runs over HTTP and over HTTPS
(tests/contract/conftest.py).

The tutorial test follows Snowflake's REST tutorial step by step as written: a key-pair JWT from
the connector's generator (24 h lifetime), then hostname, token, open, append, status, bulk
status, drop and an elastic append, with URLs built as `https://${INGEST_HOST}/...` from the
hostname answer.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import orjson
import pytest

from tests.contract.refclient import GRANT_TYPE, RefClient, segment, spki_fingerprint
from tests.support.emulator import RunningEmulator, Starter
from tests.support.keys import key_pair

ACCOUNT, USER = "FIDACCT", "LOADER"
DB, SCHEMA, PIPE = "DB", "PUBLIC", "FID-STREAMING"


@pytest.fixture(scope="module")
def registered(shared_emulator: RunningEmulator) -> RunningEmulator:
    shared_emulator.register_key(ACCOUNT, USER, key_pair().public_pem)
    return shared_emulator


@pytest.fixture
def client(registered: RunningEmulator) -> Iterator[RefClient]:
    c = RefClient(registered.url, ACCOUNT, USER, key_pair().private_key).connect()
    yield c
    c.close()


@contextlib.contextmanager
def switched(start: Starter, *args: str) -> Iterator[tuple[RunningEmulator, RefClient]]:
    with start(*args) as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        try:
            yield emu, c
        finally:
            c.close()


def connector_jwt(account: str, user: str, lifetime: float = 86400) -> str:
    """A JWT as Snowflake's connector generator mints it: seconds, exp = iat + 24 h, RS256."""
    now = int(time.time())
    sub = f"{account}.{user}".upper()
    claims = {
        "iss": f"{sub}.{spki_fingerprint(key_pair().private_key)}",
        "sub": sub,
        "iat": now,
        "exp": now + int(lifetime),
    }
    return jwt.encode(claims, key_pair().private_key, algorithm="RS256")


def status_of(c: RefClient, channel: str, pipe: str = PIPE) -> dict[str, Any]:
    response = c.status(DB, SCHEMA, pipe, [channel])
    assert response.status_code == 200, response.text
    return dict(response.json()["channel_statuses"][channel])


# --- 1. JWTs longer than an hour -----------------------------------------------------------------


def test_1_a_24_hour_connector_jwt_is_accepted(client: RefClient) -> None:
    token = connector_jwt(ACCOUNT, USER)
    assert client.get_hostname(token=token).status_code == 200
    assert client.request_token(token=token, scope="127.0.0.1").status_code == 200


# --- 2, 3. One error counter; an RFC 3339 timestamp ----------------------------------------------


def test_2_3_status_has_one_error_counter_and_an_rfc3339_error_timestamp(
    client: RefClient,
) -> None:
    opened = client.open(DB, SCHEMA, PIPE, "counters")
    assert "rows_errors" not in opened["channel_status"]
    assert opened["channel_status"]["last_error_timestamp"] is None
    token = opened["next_continuation_token"]
    client.append(DB, SCHEMA, PIPE, "counters", b"oops\n", continuation_token=token, end="1")
    status = client.wait_committed(DB, SCHEMA, PIPE, "counters", "1")
    assert status["rows_error_count"] == 1 and "rows_errors" not in status
    stamp = status["last_error_timestamp"]
    assert isinstance(stamp, str) and stamp.endswith("Z"), stamp
    parsed = datetime.datetime.fromisoformat(stamp)
    assert parsed.tzinfo is not None and abs(parsed.timestamp() - time.time()) < 60


# --- 4. Channel not found ------------------------------------------------------------------------


def test_4_missing_channel_is_400_is_spelling(client: RefClient) -> None:
    response = client.append(DB, SCHEMA, PIPE, "nothere", [{"a": 1}], continuation_token="0_0")
    assert response.status_code == 400
    assert response.json()["code"] == "ERR_CHANNEL_DOES_NOT_EXIST_OR_IS_NOT_AUTHORIZED"
    assert response.json()["message"] == ""


def test_4_switch_legacy_channel_not_found(emulator_starter: Starter) -> None:
    with switched(emulator_starter, "--legacy-channel-not-found") as (_, c):
        response = c.append(DB, SCHEMA, PIPE, "nothere", [{"a": 1}], continuation_token="0_0")
        assert response.status_code == 404
        assert response.json()["code"] == "ERR_CHANNEL_DOES_NOT_EXIST_OR_NOT_AUTHORIZED"


# --- 5. The implicit ELASTIC channel -------------------------------------------------------------


def test_5_every_pipe_has_an_elastic_channel_and_elastic_answers_carry_a_token(
    client: RefClient,
) -> None:
    pipe = "FRESH-STREAMING"
    status = status_of(client, "ELASTIC", pipe)  # before any elastic append
    assert status["channel_status_code"] == "SUCCESS"
    url = (
        f"{client.ingest_url}/v2/streaming/data/databases/{DB}/schemas/{SCHEMA}"
        f"/pipes/{pipe}/channels/ELASTIC/rows"
    )
    response = client.http.post(url, content=b'{"e":1}\n', headers=client._scoped_headers())
    assert response.status_code == 200, response.text
    assert response.json()["next_continuation_token"]


# --- 6. error_code next to code ------------------------------------------------------------------


def test_6_every_coded_error_body_carries_error_code_too(
    client: RefClient, registered: RunningEmulator
) -> None:
    token = client.open(DB, SCHEMA, PIPE, "uncommitted")["next_continuation_token"]
    registered.pause_commits()
    try:
        client.append(DB, SCHEMA, PIPE, "uncommitted", [{"a": 1}], continuation_token=token)
        conflict = client.open_channel(
            DB, SCHEMA, PIPE, "uncommitted", {"fail_on_uncommitted_rows": True}
        )
    finally:
        registered.pause_commits(False)
    assert conflict.status_code == 409
    body = conflict.json()
    assert body["code"] == body["error_code"] == "ERR_CHANNEL_HAS_UNCOMMITTED_DATA"
    unauthorized = client.get_hostname(token="not-a-jwt")
    assert unauthorized.json()["error_code"] == unauthorized.json()["code"] == "390144"


# --- 7. Rows the table rejects -------------------------------------------------------------------


def test_7_rows_the_table_rejects_are_row_errors_and_the_offset_moves_past_them(
    client: RefClient, registered: RunningEmulator
) -> None:
    registered.admin.post("/_emulator/pipes", json={
        "database": DB, "schema": SCHEMA, "pipe": "TYPED",
        "columns": [
            {"name": "id", "type": "NUMBER", "nullable": False},
            {"name": "name", "type": "VARCHAR"},
            {"name": "ok", "type": "BOOLEAN"},
        ],
    }).raise_for_status()
    token = client.open(DB, SCHEMA, "TYPED", "t")["next_continuation_token"]
    rows = [
        {"id": 1, "name": "a"},
        {"id": None, "name": "null id"},
        {"ID": "2", "ok": "yes"},
        {"id": "two"},
        {"id": 3, "name": {"not": "text"}},
    ]
    response = client.append(
        DB, SCHEMA, "TYPED", "t", rows, continuation_token=token, start="1", end="5"
    )
    assert response.status_code == 200, response.text
    status = client.wait_committed(DB, SCHEMA, "TYPED", "t", "5")
    assert status["rows_error_count"] == 3
    assert status["rows_inserted"] == 2
    assert status["last_error_message"] == "NULL result in a non-nullable column"
    assert status["last_error_offset_upper_bound"] == "5"
    committed = [r["row"] for r in registered.rows(DB, SCHEMA, "TYPED")]
    assert committed == [{"id": 1, "name": "a"}, {"ID": "2", "ok": "yes"}]


def test_7_pipe_schema_from_the_command_line(emulator_starter: Starter) -> None:
    schema = "DB.PUBLIC.CLI(ID NUMBER(38,0) NOT NULL, T VARCHAR)"
    with switched(emulator_starter, "--pipe", schema) as (emu, c):
        token = c.open(DB, SCHEMA, "CLI", "c")["next_continuation_token"]
        c.append(DB, SCHEMA, "CLI", "c", [{"t": "x"}], continuation_token=token, end="1")
        status = c.wait_committed(DB, SCHEMA, "CLI", "c", "1")
        assert status["rows_error_count"] == 1
        assert status["last_error_message"] == "NULL result in a non-nullable column"
        assert emu.admin.get("/_emulator/pipes").status_code == 200


# --- 8. Byte-rate limit --------------------------------------------------------------------------


def test_8_byte_rate_limit_answers_429_390701_with_retry_after(emulator_starter: Starter) -> None:
    with switched(emulator_starter, "--rate-limit", "0", "--max-bytes-per-second", "20000") as (
        _, c
    ):
        token = c.open(DB, SCHEMA, PIPE, "bytes")["next_continuation_token"]
        big = [{"pad": "x" * 1000, "i": i} for i in range(25)]  # ~26 KB uncompressed
        first = c.append(DB, SCHEMA, PIPE, "bytes", big, continuation_token=token, encoding="zstd")
        assert first.status_code == 200, first.text
        second = c.append(
            DB, SCHEMA, PIPE, "bytes", big, continuation_token=first.json()[
                "next_continuation_token"
            ], encoding="zstd",
        )
        assert second.status_code == 429
        assert second.json()["code"] == "390701"
        assert int(second.headers["retry-after"]) >= 1


# --- 9. Pipe failover ----------------------------------------------------------------------------


def test_9_failover_answers_410_until_the_client_rediscovers_the_host(
    emulator_starter: Starter,
) -> None:
    with switched(emulator_starter) as (emu, c):
        c.open(DB, SCHEMA, PIPE, "fo")
        emu.admin.post(
            "/_emulator/failover", json={"database": DB, "schema": SCHEMA, "pipe": PIPE}
        ).raise_for_status()
        assert c.open_channel(DB, SCHEMA, PIPE, "fo").status_code == 410
        assert c.status(DB, SCHEMA, PIPE, ["fo"]).status_code == 410
        # A new token without a new hostname lookup is still on the old host.
        c.scoped_token = c.request_token(scope="127.0.0.1").text.strip()
        assert c.open_channel(DB, SCHEMA, PIPE, "fo").status_code == 410
        # Other pipes are not affected.
        assert c.open_channel(DB, SCHEMA, "OTHER-STREAMING", "x").status_code == 200
        c.connect()  # hostname, then token
        reopened = c.open(DB, SCHEMA, PIPE, "fo")
        assert reopened["channel_status"]["channel_status_code"] == "SUCCESS"


# --- 10. Smaller ones ----------------------------------------------------------------------------


def test_10_pretty_printed_json_rows_are_rows(client: RefClient) -> None:
    token = client.open(DB, SCHEMA, PIPE, "pretty")["next_continuation_token"]
    body = b'{\n  "id": 1,\n  "v": "a"\n}\n{\n  "id": 2\n}\n'
    response = client.append(DB, SCHEMA, PIPE, "pretty", body, continuation_token=token, end="2")
    assert response.status_code == 200
    status = client.wait_committed(DB, SCHEMA, PIPE, "pretty", "2")
    assert status["rows_inserted"] == 2 and status["rows_error_count"] == 0


def test_10_content_encoding_zstd_on_a_plain_body_is_read_as_is(client: RefClient) -> None:
    token = client.open(DB, SCHEMA, PIPE, "plainzstd")["next_continuation_token"]
    response = client.append(
        DB, SCHEMA, PIPE, "plainzstd", b'{"a":1}\n', continuation_token=token, end="1",
        headers={"Content-Encoding": "zstd"},
    )
    assert response.status_code == 200, response.text
    assert client.wait_committed(DB, SCHEMA, PIPE, "plainzstd", "1")["rows_inserted"] == 1


def test_10_switch_strict_content_encoding(emulator_starter: Starter) -> None:
    with switched(emulator_starter, "--strict-content-encoding") as (_, c):
        token = c.open(DB, SCHEMA, PIPE, "z")["next_continuation_token"]
        response = c.append(
            DB, SCHEMA, PIPE, "z", b'{"a":1}\n', continuation_token=token,
            headers={"Content-Encoding": "zstd"},
        )
        assert response.status_code == 400
        ok = c.append(
            DB, SCHEMA, PIPE, "z", gzip.compress(b'{"a":1}\n'), continuation_token=token,
            headers={"Content-Encoding": "gzip"},
        )
        assert ok.status_code == 200


def _without_accept(c: RefClient, url: str) -> httpx.Response:
    request = c.http.build_request("GET", url, headers={"Authorization": f"Bearer {c.jwt()}"})
    del request.headers["accept"]
    return c.http.send(request)


def test_10_missing_accept_is_391902_by_default(client: RefClient) -> None:
    response = _without_accept(client, f"{client.url}/v2/streaming/hostname")
    assert response.status_code == 406
    assert response.json()["code"] == "391902"


def test_10_switch_allow_missing_accept(emulator_starter: Starter) -> None:
    with switched(emulator_starter, "--allow-missing-accept") as (emu, c):
        assert _without_accept(c, f"{emu.url}/v2/streaming/hostname").status_code == 200


def test_10_quoted_identifiers_in_paths_keep_their_case(
    client: RefClient, registered: RunningEmulator
) -> None:
    pipe = '"My Table-STREAMING"'
    token = client.open(DB, SCHEMA, pipe, "q")["next_continuation_token"]
    client.append(DB, SCHEMA, pipe, "q", [{"a": 1}], continuation_token=token, end="1")
    client.wait_committed(DB, SCHEMA, pipe, "q", "1")
    # The elastic table route derives the same quoted default pipe.
    url = (
        f"{client.ingest_url}/v2/streaming/data/databases/{DB}/schemas/{SCHEMA}"
        f"/tables/{segment(chr(34) + 'My Table' + chr(34))}/rows"
    )
    assert client.http.post(
        url, content=b'{"a":2}\n', headers=client._scoped_headers()
    ).status_code == 200
    rows = registered.rows(DB, SCHEMA, pipe)
    assert [r["row"] for r in rows][:1] == [{"a": 1}]
    assert registered.rows(DB, SCHEMA, "My Table-STREAMING") == []  # unquoted: upper case


def test_10_switch_case_insensitive_status(emulator_starter: Starter) -> None:
    with switched(emulator_starter, "--case-insensitive-status") as (_, c):
        c.open(DB, SCHEMA, PIPE, "Mixed")
        statuses = c.status(DB, SCHEMA, PIPE, ["mixed", "MIXED"]).json()["channel_statuses"]
        assert sorted(statuses) == ["MIXED", "mixed"]


def test_10_a_pat_works_straight_on_hostname_and_ingest_calls(
    client: RefClient, registered: RunningEmulator
) -> None:
    pat = registered.admin.post(
        "/_emulator/pats", json={"account": ACCOUNT, "user": USER}
    ).json()["token"]
    headers = {"Authorization": f"Bearer {pat}", "Accept": "application/json"}
    host = client.http.get(f"{client.url}/v2/streaming/hostname", headers=headers)
    assert host.status_code == 200
    opened = client.http.put(
        f"{client.ingest_url}/v2/streaming/databases/{DB}/schemas/{SCHEMA}/pipes/{PIPE}"
        "/channels/pat", json={}, headers=headers,
    )
    assert opened.status_code == 200, opened.text
    wrong = {**headers, "Authorization": "Bearer emupat_not-issued"}
    assert client.http.get(f"{client.url}/v2/streaming/hostname", headers=wrong).status_code == 401


# --- The tutorial, step by step ------------------------------------------------------------------


def test_tutorial_flow_with_hostname_with_port(emulator_starter: Starter) -> None:
    with emulator_starter("--hostname-with-port") as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        scheme = emu.url.split("://", 1)[0]
        http = httpx.Client(timeout=10)
        try:
            _tutorial(emu, http, scheme)
        finally:
            http.close()


def _tutorial(emu: RunningEmulator, http: httpx.Client, scheme: str) -> None:
    jwt_token = connector_jwt(ACCOUNT, USER)  # step 1: 24 h lifetime, as generated
    auth = {"Authorization": f"Bearer {jwt_token}", "Accept": "application/json",
            "X-Snowflake-Authorization-Token-Type": "KEYPAIR_JWT"}
    # Step 2: the ingest host (with the switch: host:port, so https://${INGEST_HOST}/ works).
    hostname = http.get(f"{emu.url}/v2/streaming/hostname", headers=auth)
    assert hostname.status_code == 200, hostname.text
    ingest_host = hostname.text.strip().replace("_", "-")
    assert ingest_host == f"{emu.host}:{emu.port}"
    # Step 3: the scoped token, scope = the hostname answer as it came.
    token = http.post(
        f"{emu.url}/oauth/token",
        data={"grant_type": GRANT_TYPE, "scope": ingest_host},
        headers={"Authorization": f"Bearer {jwt_token}", "Accept": "application/json"},
    )
    assert token.status_code == 200, token.text
    scoped = {"Authorization": f"Bearer {token.text.strip()}", "Accept": "application/json"}
    base = f"{scheme}://{ingest_host}/v2/streaming"
    pipe_path = f"databases/{DB}/schemas/{SCHEMA}/pipes/{PIPE}"
    # Step 4: open.
    opened = http.put(f"{base}/{pipe_path}/channels/tutorial", json={}, headers=scoped)
    assert opened.status_code == 200, opened.text
    assert opened.json()["channel_status"]["last_committed_offset_token"] is None
    # Step 5: append a pretty-printed row with the legacy offsetToken.
    appended = http.post(
        f"{base}/data/{pipe_path}/channels/tutorial/rows",
        params={"continuationToken": opened.json()["next_continuation_token"], "offsetToken": "1"},
        content=b'{\n  "id": 1,\n  "c1": "hello"\n}\n',
        headers={**scoped, "Content-Type": "application/x-ndjson"},
    )
    assert appended.status_code == 200, appended.text
    assert appended.json()["next_continuation_token"]
    # Steps 6-7: status, then bulk status, until committed.
    deadline = time.monotonic() + 5
    while True:
        bulk = http.post(
            f"{base}/{pipe_path}:bulk-channel-status",
            json={"channel_names": ["tutorial"]}, headers=scoped,
        )
        assert bulk.status_code == 200, bulk.text
        status = bulk.json()["channel_statuses"]["tutorial"]
        if status["last_committed_offset_token"] == "1" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status["last_committed_offset_token"] == "1"
    assert status["rows_inserted"] == 1 and status["rows_error_count"] == 0
    # Step 8: drop.
    dropped = http.request("DELETE", f"{base}/{pipe_path}/channels/tutorial", headers=scoped)
    assert dropped.status_code == 200, dropped.text
    gone = http.post(
        f"{base}/{pipe_path}:bulk-channel-status",
        json={"channel_names": ["tutorial"]}, headers=scoped,
    )
    assert gone.json()["channel_statuses"] == {}
    # Step 9: an elastic append to the table's default pipe.
    elastic = http.post(
        f"{base}/data/databases/{DB}/schemas/{SCHEMA}/tables/FID/rows",
        params={"requestId": "tutorial-1"}, content=orjson.dumps({"id": 2}) + b"\n",
        headers={**scoped, "Content-Type": "application/x-ndjson"},
    )
    assert elastic.status_code == 200, elastic.text
    assert elastic.json()["message"] == "OK"


def test_without_the_switch_the_hostname_has_no_port(client: RefClient) -> None:
    # Snowflake's SDK needs this; tutorials then need the emulator on 443 (docs/emulator.md).
    assert ":" not in client.get_hostname().text

