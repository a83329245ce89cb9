"""Channel misuse gets the documented errors: stale tokens, uncommitted data, invalidation, pipes,
row errors, compression and the size limit."""

from __future__ import annotations

import datetime
import gzip
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.contract.refclient import RefClient
from tests.support.emulator import RunningEmulator
from tests.support.keys import key_pair

ACCOUNT, USER = "CHANACCT", "LOADER"
DB, SCHEMA, PIPE = "DB", "PUBLIC", "CHAN-STREAMING"


@pytest.fixture(scope="module")
def registered(shared_emulator: RunningEmulator) -> RunningEmulator:
    shared_emulator.register_key(ACCOUNT, USER, key_pair().public_pem)
    return shared_emulator


@pytest.fixture
def client(registered: RunningEmulator) -> Iterator[RefClient]:
    c = RefClient(registered.url, ACCOUNT, USER, key_pair().private_key).connect()
    yield c
    c.close()


def code(response: httpx.Response) -> str:
    return str(response.json()["code"])


def test_second_open_makes_the_first_token_stale(client: RefClient) -> None:
    first = client.open(DB, SCHEMA, PIPE, "stale")["next_continuation_token"]
    second = client.open(DB, SCHEMA, PIPE, "stale")["next_continuation_token"]
    response = client.append(DB, SCHEMA, PIPE, "stale", [{"a": 1}], continuation_token=first)
    assert response.status_code == 400
    assert response.json() == {
        "code": "STALE_CONTINUATION_TOKEN_SEQUENCER",
        "error_code": "STALE_CONTINUATION_TOKEN_SEQUENCER",
        "message": (
            "Channel sequencer in the continuation token is stale. Please reopen the channel"
        ),
    }
    ok = client.append(DB, SCHEMA, PIPE, "stale", [{"a": 1}], continuation_token=second)
    assert ok.status_code == 200


def test_reusing_a_spent_continuation_token_is_an_invalid_row_sequencer(
    client: RefClient,
) -> None:
    token = client.open(DB, SCHEMA, PIPE, "reuse")["next_continuation_token"]
    assert client.append(
        DB, SCHEMA, PIPE, "reuse", [{"a": 1}], continuation_token=token
    ).status_code == 200
    again = client.append(DB, SCHEMA, PIPE, "reuse", [{"a": 1}], continuation_token=token)
    assert again.status_code == 400
    assert code(again) == "ERR_CHANNEL_HAS_INVALID_ROW_SEQUENCER"


def test_missing_continuation_token_is_a_400(client: RefClient) -> None:
    client.open(DB, SCHEMA, PIPE, "nocont")
    response = client.append(DB, SCHEMA, PIPE, "nocont", [{"a": 1}], continuation_token=None)
    assert response.status_code == 400


def test_append_to_a_channel_never_opened_is_a_400_with_the_is_spelling(
    client: RefClient,
) -> None:
    # As the live service was recorded answering (and Snowflake's error-handling page spells it).
    response = client.append(DB, SCHEMA, PIPE, "never", [{"a": 1}], continuation_token="0_0")
    assert response.status_code == 400
    assert response.json() == {
        "code": "ERR_CHANNEL_DOES_NOT_EXIST_OR_IS_NOT_AUTHORIZED",
        "error_code": "ERR_CHANNEL_DOES_NOT_EXIST_OR_IS_NOT_AUTHORIZED",
        "message": "",
    }


def test_unknown_pipe_is_a_404(client: RefClient) -> None:
    response = client.open_channel(DB, SCHEMA, "NO_SUCH_PIPE", "c")
    assert response.status_code == 404
    body = response.json()
    assert body["code"] == body["error_code"] == "ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED"


def test_registered_pipe_can_be_used(client: RefClient, registered: RunningEmulator) -> None:
    registered.add_pipe(DB, SCHEMA, "my_pipe")
    assert client.open_channel(DB, SCHEMA, "MY_PIPE", "c").status_code == 200


def test_open_with_fail_on_uncommitted_rows_and_pending_data_is_a_409(
    client: RefClient, registered: RunningEmulator
) -> None:
    token = client.open(DB, SCHEMA, PIPE, "unc")["next_continuation_token"]
    registered.pause_commits()
    try:
        client.append(DB, SCHEMA, PIPE, "unc", [{"a": 1}], continuation_token=token, end="1")
        response = client.open_channel(
            DB, SCHEMA, PIPE, "unc", {"fail_on_uncommitted_rows": True}
        )
        assert response.status_code == 409
        assert code(response) == "ERR_CHANNEL_HAS_UNCOMMITTED_DATA"
        dropped = client.drop(DB, SCHEMA, PIPE, "unc", {"fail_on_uncommitted_rows": True})
        assert dropped.status_code == 409
        assert code(dropped) == "ERR_CHANNEL_HAS_UNCOMMITTED_DATA"
        # Without the flag the open succeeds and discards the in-flight rows.
        reopened = client.open(DB, SCHEMA, PIPE, "unc")
        assert reopened["channel_status"]["last_committed_offset_token"] is None
    finally:
        registered.pause_commits(False)
    status = client.status(DB, SCHEMA, PIPE, ["unc"]).json()["channel_statuses"]["unc"]
    assert status["rows_inserted"] == 0


def test_invalidated_channel_refuses_appends_until_reopened(
    client: RefClient, registered: RunningEmulator
) -> None:
    token = client.open(DB, SCHEMA, PIPE, "inv")["next_continuation_token"]
    registered.invalidate(DB, SCHEMA, PIPE, "inv")
    status = client.status(DB, SCHEMA, PIPE, ["inv"]).json()["channel_statuses"]["inv"]
    assert status["channel_status_code"] == "ERR_CHANNEL_MUST_BE_REOPENED"
    response = client.append(DB, SCHEMA, PIPE, "inv", [{"a": 1}], continuation_token=token)
    assert response.status_code == 409
    assert code(response) == "ERR_CHANNEL_MUST_BE_REOPENED"
    reopened = client.open(DB, SCHEMA, PIPE, "inv")
    assert reopened["channel_status"]["channel_status_code"] == "SUCCESS"
    ok = client.append(
        DB, SCHEMA, PIPE, "inv", [{"a": 1}],
        continuation_token=reopened["next_continuation_token"], end="1",
    )
    assert ok.status_code == 200
    client.wait_committed(DB, SCHEMA, PIPE, "inv", "1")


def test_bad_lines_are_row_errors_not_a_failed_request(
    client: RefClient, registered: RunningEmulator
) -> None:
    token = client.open(DB, SCHEMA, PIPE, "bad")["next_continuation_token"]
    body = b'{"ok":1}\r\nnot json\n[1,2]\n{"ok":2}\n'
    response = client.append(DB, SCHEMA, PIPE, "bad", body, continuation_token=token, end="9")
    assert response.status_code == 200, response.text
    status = client.wait_committed(DB, SCHEMA, PIPE, "bad", "9")
    assert status["rows_error_count"] == 2 and "rows_errors" not in status
    assert status["rows_inserted"] == 2
    assert status["last_error_offset_upper_bound"] == "9"
    assert status["last_error_message"]
    stamp = status["last_error_timestamp"]
    assert isinstance(stamp, str) and stamp.endswith("Z"), stamp
    assert abs(datetime.datetime.fromisoformat(stamp).timestamp() - time.time()) < 60
    assert "last_error_timestamp_ms" not in status
    rows = [r["row"] for r in registered.rows(DB, SCHEMA, PIPE) if r["channel"] == "bad"]
    assert rows == [{"ok": 1}, {"ok": 2}]


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_compressed_bodies_are_accepted(
    client: RefClient, registered: RunningEmulator, encoding: str
) -> None:
    channel = f"enc-{encoding}"
    token = client.open(DB, SCHEMA, PIPE, channel)["next_continuation_token"]
    rows = [{"enc": encoding, "i": i} for i in range(50)]
    response = client.append(
        DB, SCHEMA, PIPE, channel, rows, continuation_token=token, start="0", end="49",
        encoding=encoding,
    )
    assert response.status_code == 200, response.text
    client.wait_committed(DB, SCHEMA, PIPE, channel, "49")
    got = [r["row"] for r in registered.rows(DB, SCHEMA, PIPE) if r["channel"] == channel]
    assert got == rows


def test_corrupt_gzip_is_a_400(client: RefClient) -> None:
    token = client.open(DB, SCHEMA, PIPE, "corrupt")["next_continuation_token"]
    response = client.append(
        DB, SCHEMA, PIPE, "corrupt", b"\x1f\x8bdefinitely not gzip", continuation_token=token,
        headers={"Content-Encoding": "gzip"},
    )
    assert response.status_code == 400


def test_oversized_body_is_a_413(client: RefClient) -> None:
    token = client.open(DB, SCHEMA, PIPE, "big")["next_continuation_token"]
    row = b'{"pad":"' + b"x" * 1000 + b'"}\n'
    body = row * (4 * 1024 * 1024 // len(row) + 1)
    response = client.append(DB, SCHEMA, PIPE, "big", body, continuation_token=token)
    assert response.status_code == 413
    # The limit is on the wire: the same rows gzip-compressed are fine.
    ok = client.append(
        DB, SCHEMA, PIPE, "big", gzip.compress(body), continuation_token=token,
        headers={"Content-Encoding": "gzip"}, end="1",
    )
    assert ok.status_code == 200, ok.text


def test_elastic_table_append_commits_rows(
    client: RefClient, registered: RunningEmulator
) -> None:
    url = f"{client.ingest_url}/v2/streaming/data/databases/{DB}/schemas/{SCHEMA}/tables/ELT/rows"
    response = client.http.post(
        url, content=b'{"e":1}\n', params={"requestId": "r1", "retryCount": "0"},
        headers={"Authorization": f"Bearer {client.scoped_token}", "Accept": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["message"] == "OK"
    assert response.json()["next_continuation_token"]
    # Elastic channels carry no offset tokens: poll the committed rows instead.
    deadline = time.monotonic() + 5
    while not (rows := registered.rows(DB, SCHEMA, "ELT-STREAMING")):
        assert time.monotonic() < deadline, "elastic rows never committed"
        time.sleep(0.05)
    assert [r["row"] for r in rows] == [{"e": 1}]
    assert rows[0]["channel"] == "ELASTIC"


def test_request_id_and_retry_count_query_params_are_accepted(client: RefClient) -> None:
    url = (
        f"{client.ingest_url}/v2/streaming/databases/{DB}/schemas/{SCHEMA}/pipes/{PIPE}"
        "/channels/reqid"
    )
    response = client.http.put(
        url, json={}, params={"requestId": "5f0c6c0e-0000-4000-8000-000000000000",
                              "retryCount": "0"},
        headers={"Authorization": f"Bearer {client.scoped_token}", "Accept": "application/json"},
    )
    assert response.status_code == 200, response.text


def test_drop_without_the_flag_discards_in_flight_rows(
    client: RefClient, registered: RunningEmulator
) -> None:
    token = client.open(DB, SCHEMA, PIPE, "dropfly")["next_continuation_token"]
    registered.pause_commits()
    try:
        client.append(DB, SCHEMA, PIPE, "dropfly", [{"a": 1}], continuation_token=token, end="1")
        assert client.drop(DB, SCHEMA, PIPE, "dropfly").status_code == 200
    finally:
        registered.pause_commits(False)
    time.sleep(0.3)  # past the commit delay: nothing may commit for the dropped channel
    assert [r for r in registered.rows(DB, SCHEMA, PIPE) if r["channel"] == "dropfly"] == []


def test_status_body_without_channel_names_is_a_400(client: RefClient) -> None:
    response = client.http.post(
        f"{client.ingest_url}/v2/streaming/databases/{DB}/schemas/{SCHEMA}/pipes/{PIPE}"
        ":bulk-channel-status",
        json={"names": ["x"]},
        headers={"Authorization": f"Bearer {client.scoped_token}", "Accept": "application/json"},
    )
    assert response.status_code == 400
    assert "channel_names" in response.json()["message"]


def test_rows_endpoint_names_missing_query_parameters(registered: RunningEmulator) -> None:
    response = registered.admin.get("/_emulator/rows", params={"database": DB})
    assert response.status_code == 400
    assert "schema" in response.json()["message"] and "pipe" in response.json()["message"]
