"""Fault injection through POST /_emulator/faults: count, status, body, retry_after, delay, drop."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.contract.refclient import RefClient
from tests.support.emulator import RunningEmulator
from tests.support.keys import key_pair

ACCOUNT, USER = "FAULTACCT", "LOADER"
DB, SCHEMA, PIPE = "DB", "PUBLIC", "FAULT-STREAMING"


@pytest.fixture
def client(emulator: RunningEmulator) -> Iterator[RefClient]:
    emulator.register_key(ACCOUNT, USER, key_pair().public_pem)
    c = RefClient(emulator.url, ACCOUNT, USER, key_pair().private_key).connect()
    yield c
    c.close()


def test_fault_fires_count_times_then_stops(client: RefClient, emulator: RunningEmulator) -> None:
    fault_id = emulator.fault(endpoint="open", status=503, count=2)
    assert fault_id
    first = client.open_channel(DB, SCHEMA, PIPE, "f")
    second = client.open_channel(DB, SCHEMA, PIPE, "f")
    third = client.open_channel(DB, SCHEMA, PIPE, "f")
    assert [first.status_code, second.status_code, third.status_code] == [503, 503, 200]
    assert first.json()["code"] == "ERR_GENERAL_EXCEPTION_RETRY_REQUEST"
    assert emulator.stats()["requests"]["open"] == {"503": 2, "200": 1}


def test_fault_body_and_retry_after_are_sent_as_given(
    client: RefClient, emulator: RunningEmulator
) -> None:
    token = client.open(DB, SCHEMA, PIPE, "f")["next_continuation_token"]
    emulator.fault(endpoint="append", status=429, retry_after=2, count=1)
    emulator.fault(endpoint="status", status=503, body="ERR_GENERAL_EXCEPTION_RETRY_REQUEST")
    limited = client.append(DB, SCHEMA, PIPE, "f", [{"a": 1}], continuation_token=token)
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"
    assert limited.json() == {
        "code": "390701", "error_code": "390701", "message": "Request rate exceeds max. Try later."
    }
    status = client.status(DB, SCHEMA, PIPE, ["f"])
    assert status.status_code == 503
    assert status.json() == "ERR_GENERAL_EXCEPTION_RETRY_REQUEST"
    # The fault answered instead of the handler: the token was not consumed.
    ok = client.append(DB, SCHEMA, PIPE, "f", [{"a": 1}], continuation_token=token)
    assert ok.status_code == 200


def test_clearing_faults_restores_normal_answers(
    client: RefClient, emulator: RunningEmulator
) -> None:
    emulator.fault(endpoint="any", status=500)
    assert client.get_hostname().status_code == 500
    emulator.clear_faults()
    assert client.get_hostname().status_code == 200


def test_token_fault_with_401_body(client: RefClient, emulator: RunningEmulator) -> None:
    emulator.fault(endpoint="token", status=401, count=1)
    response = client.request_token(scope="127.0.0.1")
    assert response.status_code == 401
    assert response.json()["code"] == "390144"


def test_probability_zero_never_fires(client: RefClient, emulator: RunningEmulator) -> None:
    emulator.fault(endpoint="hostname", status=500, probability=0.0)
    assert all(client.get_hostname().status_code == 200 for _ in range(5))


def test_delay_without_status_only_adds_latency(
    client: RefClient, emulator: RunningEmulator
) -> None:
    emulator.fault(endpoint="hostname", delay_ms=300, count=1)
    started = time.monotonic()
    response = client.get_hostname()
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.29


def test_drop_mode_processes_the_append_but_loses_the_response(
    client: RefClient, emulator: RunningEmulator
) -> None:
    token = client.open(DB, SCHEMA, PIPE, "drop")["next_continuation_token"]
    emulator.fault(endpoint="append", mode="drop", count=1)
    with pytest.raises(httpx.TransportError):
        client.append(DB, SCHEMA, PIPE, "drop", [{"a": 1}], continuation_token=token, end="1")
    # The append did land: it commits, and a blind retry with the same token is refused.
    client.wait_committed(DB, SCHEMA, PIPE, "drop", "1")
    retry = client.append(DB, SCHEMA, PIPE, "drop", [{"a": 1}], continuation_token=token, end="1")
    assert retry.status_code == 400
    assert retry.json()["code"] == "ERR_CHANNEL_HAS_INVALID_ROW_SEQUENCER"


def test_bad_fault_definitions_are_refused_with_a_reason(emulator: RunningEmulator) -> None:
    response = emulator.admin.post("/_emulator/faults", json={"endpoint": "nowhere", "status": 500})
    assert response.status_code == 400
    assert "endpoint must be one of" in response.json()["message"]
    response = emulator.admin.post("/_emulator/faults", json={"endpoint": "append", "count": 0})
    assert response.status_code == 400
