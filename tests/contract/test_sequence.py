"""The whole happy path, hostname → token → open → append x N → committed → rows, over HTTP."""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator

import pytest

from tests.contract.refclient import RefClient
from tests.support.emulator import RunningEmulator
from tests.support.keys import key_pair

ACCOUNT, USER = "MYORG-ACCT", "LOADER"
DB, SCHEMA, PIPE = "DB", "PUBLIC", "EVENTS-STREAMING"


@pytest.fixture
def client(emulator: RunningEmulator) -> Iterator[RefClient]:
    kp = key_pair()
    emulator.register_key(ACCOUNT, USER, kp.public_pem)
    c = RefClient(emulator.url, ACCOUNT, USER, kp.private_key).connect()
    yield c
    c.close()


def test_hostname_is_plain_text_host_without_port(emulator: RunningEmulator) -> None:
    kp = key_pair()
    emulator.register_key(ACCOUNT, USER, kp.public_pem)
    c = RefClient(emulator.url, ACCOUNT, USER, kp.private_key)
    response = c.get_hostname()
    c.close()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "127.0.0.1"


def test_scoped_token_is_a_jwt_with_exp_in_seconds(client: RefClient) -> None:
    import jwt

    assert client.scoped_token is not None
    claims = jwt.decode(client.scoped_token, options={"verify_signature": False})
    assert jwt.get_unverified_header(client.scoped_token)["alg"] == "HS256"
    assert isinstance(claims["exp"], int)
    assert 3500 < claims["exp"] - time.time() <= 3600


def test_whole_sequence_commits_rows_after_the_delay(
    client: RefClient, emulator: RunningEmulator
) -> None:
    opened = client.open(DB, SCHEMA, PIPE, "ch-1")
    status = opened["channel_status"]
    assert status["channel_status_code"] == "SUCCESS"
    assert status["last_committed_offset_token"] is None
    assert status["last_error_timestamp"] is None
    token = opened["next_continuation_token"]
    for batch in range(5):
        rows = [{"batch": batch, "i": i} for i in range(3)]
        start, end = str(batch * 3), str(batch * 3 + 2)
        response = client.append(
            DB, SCHEMA, PIPE, "ch-1", rows, continuation_token=token, start=start, end=end
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["next_continuation_token"] != token
        token = body["next_continuation_token"]
    # Not committed at once: the commit delay (0.2 s) has not passed yet.
    pending = client.status(DB, SCHEMA, PIPE, ["ch-1"]).json()["channel_statuses"]["ch-1"]
    assert pending["last_committed_offset_token"] != "14"
    final = client.wait_committed(DB, SCHEMA, PIPE, "ch-1", "14")
    assert final["rows_inserted"] == 15
    assert final["rows_error_count"] == 0 and "rows_errors" not in final
    rows = emulator.rows(DB, SCHEMA, PIPE)
    assert [r["row"] for r in rows] == [{"batch": b, "i": i} for b in range(5) for i in range(3)]
    assert [r["offset_token"] for r in rows] == [str(n) for n in range(15)]
    assert {r["channel"] for r in rows} == {"ch-1"}


def test_old_style_offset_token_parameter_is_accepted(client: RefClient) -> None:
    token = client.open(DB, SCHEMA, PIPE, "old")["next_continuation_token"]
    response = client.append(
        DB, SCHEMA, PIPE, "old", [{"a": 1}], continuation_token=token, offset_token="7"
    )
    assert response.status_code == 200, response.text
    client.wait_committed(DB, SCHEMA, PIPE, "old", "7")


def test_reopen_returns_committed_offset_token(client: RefClient) -> None:
    token = client.open(DB, SCHEMA, PIPE, "re")["next_continuation_token"]
    client.append(DB, SCHEMA, PIPE, "re", [{"a": 1}], continuation_token=token, end="41")
    client.wait_committed(DB, SCHEMA, PIPE, "re", "41")
    again = client.open(DB, SCHEMA, PIPE, "re")
    assert again["channel_status"]["last_committed_offset_token"] == "41"
    assert again["next_continuation_token"] != token


def test_open_with_offset_token_sets_committed_offset(client: RefClient) -> None:
    opened = client.open(DB, SCHEMA, PIPE, "preset", offset_token="100")
    assert opened["channel_status"]["last_committed_offset_token"] == "100"


def test_bulk_status_omits_unknown_channels_and_names_are_case_sensitive(
    client: RefClient,
) -> None:
    client.open(DB, SCHEMA, PIPE, "MixedCase")
    response = client.status(DB, SCHEMA, PIPE, ["MixedCase", "mixedcase", "never-opened"])
    assert response.status_code == 200
    statuses = response.json()["channel_statuses"]
    # As documented: only the exact name matches (--case-insensitive-status matches both).
    assert list(statuses) == ["MixedCase"]
    assert statuses["MixedCase"]["channel_status_code"] == "SUCCESS"


def test_identifiers_in_paths_are_case_insensitive(client: RefClient) -> None:
    token = client.open("db", "public", "events-streaming", "case")["next_continuation_token"]
    response = client.append(
        DB, SCHEMA, PIPE, "CASE", [{"a": 1}], continuation_token=token, end="1"
    )
    assert response.status_code == 200, response.text


def test_bulk_status_accepts_the_key_pair_jwt(client: RefClient) -> None:
    client.open(DB, SCHEMA, PIPE, "jwt-status")
    response = client.status(DB, SCHEMA, PIPE, ["jwt-status"], token=client.jwt())
    assert response.status_code == 200, response.text
    assert "jwt-status" in response.json()["channel_statuses"]


def test_drop_channel_forgets_its_offset(client: RefClient) -> None:
    token = client.open(DB, SCHEMA, PIPE, "gone")["next_continuation_token"]
    client.append(DB, SCHEMA, PIPE, "gone", [{"a": 1}], continuation_token=token, end="5")
    client.wait_committed(DB, SCHEMA, PIPE, "gone", "5")
    assert client.drop(DB, SCHEMA, PIPE, "gone").status_code == 200
    assert client.status(DB, SCHEMA, PIPE, ["gone"]).json()["channel_statuses"] == {}
    reopened = client.open(DB, SCHEMA, PIPE, "gone")
    assert reopened["channel_status"]["last_committed_offset_token"] is None


def test_rows_of_each_channel_commit_in_append_order(
    client: RefClient, emulator: RunningEmulator
) -> None:
    tokens = {ch: client.open(DB, SCHEMA, PIPE, ch)["next_continuation_token"] for ch in "ab"}
    for n in range(4):
        for ch in "ab":
            r = client.append(
                DB, SCHEMA, PIPE, ch, [{"ch": ch, "n": n}], continuation_token=tokens[ch],
                end=str(n),
            )
            tokens[ch] = r.json()["next_continuation_token"]
    for ch in "ab":
        client.wait_committed(DB, SCHEMA, PIPE, ch, "3")
    rows = emulator.rows(DB, SCHEMA, PIPE)
    for ch in "ab":
        assert [r["row"]["n"] for r in rows if r["channel"] == ch] == [0, 1, 2, 3]


def test_stats_count_requests_tokens_appends_and_commits(
    client: RefClient, emulator: RunningEmulator
) -> None:
    token = client.open(DB, SCHEMA, PIPE, "st")["next_continuation_token"]
    client.append(DB, SCHEMA, PIPE, "st", [{"a": 1}, {"a": 2}], continuation_token=token, end="1")
    client.wait_committed(DB, SCHEMA, PIPE, "st", "1")
    stats = emulator.stats()
    assert stats["tokens_issued"] == 1
    assert stats["appends"] == 1
    assert stats["rows_committed"] == 2
    assert stats["open_channels"] == 1
    assert stats["requests"]["append"] == {"200": 1}
    assert stats["requests"]["hostname"]["200"] >= 1


def test_stats_count_append_bytes_as_sent_on_the_wire(
    client: RefClient, emulator: RunningEmulator
) -> None:
    token = client.open(DB, SCHEMA, PIPE, "bytes")["next_continuation_token"]
    plain = b'{"a":1}\n{"a":2}\n'
    repeated = b'{"a":3}\n' * 200
    before = emulator.stats()["append_bytes"]
    r = client.append(DB, SCHEMA, PIPE, "bytes", plain, continuation_token=token, end="1")
    token = r.json()["next_continuation_token"]
    r = client.append(
        DB, SCHEMA, PIPE, "bytes", repeated, continuation_token=token, end="2", encoding="gzip"
    )
    assert r.status_code == 200, r.text
    # Compressed bodies count as received, not as decompressed; refused appends do not count.
    spent = client.append(DB, SCHEMA, PIPE, "bytes", plain, continuation_token=token, end="3")
    assert spent.status_code == 400
    packed = len(gzip.compress(repeated))  # the client's gzip: same size, header included
    assert packed < len(repeated)
    assert emulator.stats()["append_bytes"] - before == len(plain) + packed


def test_rows_carry_their_commit_time(client: RefClient, emulator: RunningEmulator) -> None:
    token = client.open(DB, SCHEMA, PIPE, "when")["next_continuation_token"]
    sent_ms = time.time() * 1000
    client.append(DB, SCHEMA, PIPE, "when", [{"w": 1}], continuation_token=token, end="0")
    client.wait_committed(DB, SCHEMA, PIPE, "when", "0")
    (row,) = [r for r in emulator.rows(DB, SCHEMA, PIPE) if r["channel"] == "when"]
    assert row["row"] == {"w": 1}
    assert isinstance(row["committed_at_ms"], int)
    assert sent_ms - 1000 <= row["committed_at_ms"] <= time.time() * 1000 + 1000
