"""SnowpipeClient against the emulator over real HTTP: the sequence, faults, auth errors, TLS."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.support.emulator import RunningEmulator, start_emulator
from tests.support.keys import key_pair
from worker.auth.keypair import public_key_fingerprint
from worker.retry import RetryBudget, RetryPolicy
from worker.settings import Settings
from worker.snowpipe import errors as e
from worker.snowpipe.client import ChannelStatus, SnowpipeClient
from worker.snowpipe.encoding import encode_rows

ACCOUNT = "ACME"
USER = "LOADER"
DB, SCHEMA, PIPE = "DB", "PUBLIC", "EVENTS-STREAMING"
_names = itertools.count()


def channel_name(prefix: str = "ch") -> str:
    """A channel name no other test of the shared emulator uses."""
    return f"{prefix}-{next(_names)}-{time.monotonic_ns()}"


def make_settings(emu: RunningEmulator, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "account": ACCOUNT.lower(),
        "user": USER.lower(),
        "private_key": key_pair().private_pem.decode(),
        "account_url": emu.url,
        "retry_deadline_seconds": 10.0,
    }
    base.update(overrides)
    return Settings(**base)


def make_client(emu: RunningEmulator, **overrides: Any) -> SnowpipeClient:
    s = make_settings(emu, **overrides)
    # Own budget: tests that drain it must not starve the others.
    return SnowpipeClient(s, policy=RetryPolicy.from_settings(s, budget=RetryBudget(100)))


@pytest.fixture(scope="module")
def emu(shared_emulator: RunningEmulator) -> RunningEmulator:
    shared_emulator.register_key(ACCOUNT, USER, key_pair().public_pem)
    return shared_emulator


@pytest.fixture
def client(emu: RunningEmulator) -> Iterator[SnowpipeClient]:
    emu.clear_faults()
    with make_client(emu) as c:
        yield c
    emu.clear_faults()


def wait_committed(
    client: SnowpipeClient, channel: str, offset: str, timeout: float = 10.0
) -> ChannelStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = client.bulk_channel_status(DB, SCHEMA, PIPE, [channel])[channel]
        if status.last_committed_offset_token == offset:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"offset {offset} not committed: {status}")
        time.sleep(0.05)


def append(
    client: SnowpipeClient, channel: str, ct: str, rows: list[dict[str, Any]], end: int
) -> str:
    [payload] = encode_rows(rows, compression="zstd")
    return client.append_rows(
        DB,
        SCHEMA,
        PIPE,
        channel,
        continuation_token=ct,
        payload=payload,
        start_offset_token=str(end - len(rows) + 1),
        end_offset_token=str(end),
    )


def requests(emu: RunningEmulator, endpoint: str, status: int) -> int:
    return int(emu.stats()["requests"].get(endpoint, {}).get(str(status), 0))


# --- the happy path ------------------------------------------------------------------------------


def test_full_sequence_commits_every_row(emu: RunningEmulator, client: SnowpipeClient) -> None:
    ch = channel_name()
    opened = client.open_channel(DB, SCHEMA, PIPE, ch)
    assert opened.status.last_committed_offset_token is None
    assert opened.status.channel_status_code == "SUCCESS"

    rows = [{"id": i, "text": f"row {i}", "when": "2026-01-01T00:00:00Z"} for i in range(1_000)]
    pieces = encode_rows(rows, compression="gzip", max_request_bytes=4096)
    assert len(pieces) > 1  # several requests, consecutive offsets
    ct = opened.continuation_token
    for piece in pieces:
        ct = client.append_rows(
            DB,
            SCHEMA,
            PIPE,
            ch,
            continuation_token=ct,
            payload=piece,
            start_offset_token=str(piece.first_row),
            end_offset_token=str(piece.last_row),
        )
    status = wait_committed(client, ch, str(len(rows) - 1))
    assert status.rows_error_count == 0

    committed = [r["row"] for r in emu.rows(DB, SCHEMA, PIPE) if r["channel"] == ch]
    assert committed == rows  # every row once, in order

    # Reopening returns the committed offset; dropping forgets it.
    again = client.open_channel(DB, SCHEMA, PIPE, ch)
    assert again.status.last_committed_offset_token == str(len(rows) - 1)
    client.drop_channel(DB, SCHEMA, PIPE, ch)
    assert client.bulk_channel_status(DB, SCHEMA, PIPE, [ch]) == {}


def test_legacy_offset_token_form_commits(emu: RunningEmulator, client: SnowpipeClient) -> None:
    client.offset_token_form = "legacy"
    ch = channel_name()
    ct = client.open_channel(DB, SCHEMA, PIPE, ch).continuation_token
    append(client, ch, ct, [{"a": 1}, {"a": 2}], end=9)
    assert wait_committed(client, ch, "9").rows_inserted == 2


# --- faults recovered through the policy -------------------------------------------------------


def test_503_burst_is_recovered_by_retries(emu: RunningEmulator, client: SnowpipeClient) -> None:
    ch = channel_name()
    ct = client.open_channel(DB, SCHEMA, PIPE, ch).continuation_token
    before = requests(emu, "append", 503)
    emu.fault(endpoint="append", status=503, body="ERR_GENERAL_EXCEPTION_RETRY_REQUEST", count=3)
    append(client, ch, ct, [{"n": 1}], end=0)
    assert requests(emu, "append", 503) - before == 3
    wait_committed(client, ch, "0")
    assert [r["row"] for r in emu.rows(DB, SCHEMA, PIPE) if r["channel"] == ch] == [{"n": 1}]


def test_429_burst_waits_for_retry_after(emu: RunningEmulator, client: SnowpipeClient) -> None:
    before = requests(emu, "open", 429)
    emu.fault(
        endpoint="open",
        status=429,
        body={"code": "390701", "message": "Request rate exceeds max. Try later."},
        count=2,
        retry_after=0.3,
    )
    started = time.monotonic()
    client.open_channel(DB, SCHEMA, PIPE, channel_name())
    assert time.monotonic() - started >= 0.6  # both Retry-After waits honoured
    assert requests(emu, "open", 429) - before == 2


def test_persistent_503_gives_up_with_a_retryable_error(
    emu: RunningEmulator, client: SnowpipeClient
) -> None:
    emu.fault(endpoint="status", status=503, body="boom")
    before = requests(emu, "status", 503)
    with pytest.raises(e.ServerError) as info:
        client.bulk_channel_status(DB, SCHEMA, PIPE, ["x"])
    assert requests(emu, "status", 503) - before == 4  # the policy's 4 attempts
    assert info.value.status == 503


def test_injected_401_is_recovered_with_one_refresh(
    emu: RunningEmulator, client: SnowpipeClient
) -> None:
    ch = channel_name()
    ct = client.open_channel(DB, SCHEMA, PIPE, ch).continuation_token
    tokens_before = requests(emu, "token", 200)
    emu.fault(
        endpoint="append",
        status=401,
        body={"code": "390144", "message": "JWT token is invalid."},
        count=1,
    )
    append(client, ch, ct, [{"n": 1}], end=0)
    assert requests(emu, "token", 200) - tokens_before == 1
    wait_committed(client, ch, "0")


def test_expired_scoped_tokens_are_replaced_transparently(
    emu: RunningEmulator, client: SnowpipeClient
) -> None:
    ch = channel_name()
    ct = client.open_channel(DB, SCHEMA, PIPE, ch).continuation_token
    tokens_before = requests(emu, "token", 200)
    emu.expire_tokens()
    append(client, ch, ct, [{"n": 1}], end=0)
    assert requests(emu, "token", 200) - tokens_before == 1


def test_persistent_401_is_an_auth_error_after_one_refresh(
    emu: RunningEmulator, client: SnowpipeClient
) -> None:
    client.tokens.scoped.get()
    tokens_before = requests(emu, "token", 200)
    opens_before = requests(emu, "open", 401)
    emu.fault(
        endpoint="open", status=401, body={"code": "390144", "message": "JWT token is invalid."}
    )
    with pytest.raises(e.AuthError):
        client.open_channel(DB, SCHEMA, PIPE, channel_name())
    assert requests(emu, "open", 401) - opens_before == 2  # sent, resent once, stopped
    assert requests(emu, "token", 200) - tokens_before == 1


# --- errors of their own type ------------------------------------------------------------------


def test_stale_continuation_token_raises_its_own_error(
    emu: RunningEmulator, client: SnowpipeClient
) -> None:
    ch = channel_name()
    first = client.open_channel(DB, SCHEMA, PIPE, ch).continuation_token
    client.open_channel(DB, SCHEMA, PIPE, ch)  # another writer reopens: sequencer bumped
    appends_before = requests(emu, "append", 400)
    with pytest.raises(e.StaleContinuationTokenError) as info:
        append(client, ch, first, [{"n": 1}], end=0)
    assert isinstance(info.value, e.ChannelReopenRequired)
    assert info.value.code == "STALE_CONTINUATION_TOKEN_SEQUENCER"
    assert requests(emu, "append", 400) - appends_before == 1  # not retried


def test_invalidated_channel_asks_for_a_reopen(
    emu: RunningEmulator, client: SnowpipeClient
) -> None:
    ch = channel_name()
    ct = client.open_channel(DB, SCHEMA, PIPE, ch).continuation_token
    emu.invalidate(DB, SCHEMA, PIPE, ch)
    with pytest.raises(e.ChannelReopenRequired):
        append(client, ch, ct, [{"n": 1}], end=0)
    reopened = client.open_channel(DB, SCHEMA, PIPE, ch)
    append(client, ch, reopened.continuation_token, [{"n": 1}], end=0)
    wait_committed(client, ch, "0")


def test_unknown_pipe_is_a_permanent_error(emu: RunningEmulator, client: SnowpipeClient) -> None:
    with pytest.raises(e.PipeNotFoundError) as info:
        client.open_channel(DB, SCHEMA, "NO_SUCH_PIPE", channel_name())
    assert isinstance(info.value, e.PermanentError)
    assert "pipe" in str(info.value).lower()


def test_open_with_uncommitted_rows_can_refuse(
    emu: RunningEmulator, client: SnowpipeClient
) -> None:
    ch = channel_name()
    ct = client.open_channel(DB, SCHEMA, PIPE, ch).continuation_token
    emu.pause_commits(True)
    try:
        append(client, ch, ct, [{"n": 1}], end=0)
        with pytest.raises(e.UncommittedDataError):
            client.open_channel(DB, SCHEMA, PIPE, ch, fail_on_uncommitted_rows=True)
    finally:
        emu.pause_commits(False)


def test_wrong_key_error_names_the_fingerprint(emu: RunningEmulator) -> None:
    other = key_pair("not-registered")
    client = make_client(emu, private_key=other.private_pem.decode())
    with client, pytest.raises(e.InvalidJWTError) as info:
        client.open_channel(DB, SCHEMA, PIPE, channel_name())
    text = str(info.value)
    fp = public_key_fingerprint(other.private_key)
    assert f"fingerprint {fp} in iss matches no key registered for {ACCOUNT}.{USER}" in text
    assert "check the key" in text
    assert f"fingerprint {fp} must be registered for user {USER}" in text


def test_wrong_account_error_names_the_account(emu: RunningEmulator) -> None:
    client = make_client(emu, account="acme_typo")
    with client, pytest.raises(e.InvalidJWTError) as info:
        client.open_channel(DB, SCHEMA, PIPE, channel_name())
    text = str(info.value)
    assert f"no public key registered for ACME_TYPO.{USER}" in text
    assert "SNOWPIPE_ACCOUNT='acme_typo'" in text


# --- TLS -----------------------------------------------------------------------------------------


def test_https_with_the_ca_file(tmp_path: Path) -> None:
    with start_emulator("--commit-delay", "0.1", tls=True, workdir=tmp_path) as tls_emu:
        assert tls_emu.url.startswith("https://")
        assert tls_emu.ca_file is not None
        tls_emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        with make_client(tls_emu, ca_file=tls_emu.ca_file) as client:
            ch = channel_name()
            ct = client.open_channel(DB, SCHEMA, PIPE, ch).continuation_token
            append(client, ch, ct, [{"secure": True}], end=0)
            wait_committed(client, ch, "0")

        # Without the CA the certificate is refused, and the error says where to look.
        untrusting = make_client(tls_emu, retry_attempts=1)
        with untrusting, pytest.raises(e.TransportError) as info:
            untrusting.open_channel(DB, SCHEMA, PIPE, channel_name())
        assert "SNOWPIPE_CA_FILE" in str(info.value)


def test_threads_share_one_client_and_one_token_fetch(emu: RunningEmulator) -> None:
    import threading

    tokens_before = requests(emu, "token", 200)
    hostnames_before = requests(emu, "hostname", 200)
    failures: list[BaseException] = []
    with make_client(emu) as client:
        barrier = threading.Barrier(8)

        def writer(i: int) -> None:
            try:
                barrier.wait()
                ch = channel_name(f"thread{i}")
                ct = client.open_channel(DB, SCHEMA, PIPE, ch).continuation_token
                for n in range(5):
                    ct = append(client, ch, ct, [{"thread": i, "n": n}], end=n)
                wait_committed(client, ch, "4")
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert failures == []
    # Eight threads arriving together with no token: one hostname call, one exchange.
    assert requests(emu, "token", 200) - tokens_before == 1
    assert requests(emu, "hostname", 200) - hostnames_before == 1


def test_big_integers_and_decimals_read_back_exactly(
    emu: RunningEmulator, client: SnowpipeClient
) -> None:
    ch = channel_name("exact")
    ct = client.open_channel(DB, SCHEMA, PIPE, ch).continuation_token
    rows: list[dict[str, Any]] = [
        {"id": 1, "big": 2**70, "price": Decimal("1.10")},
        {"id": 2, "big": -(2**64), "price": Decimal("-0.000000000000000000001")},
    ]
    append(client, ch, ct, rows, end=1)
    wait_committed(client, ch, "1")

    committed = [r["row"] for r in emu.rows(DB, SCHEMA, PIPE) if r["channel"] == ch]

    assert committed == rows  # Decimal("1.10") == Decimal("1.1"): the text shows the digits
    assert str(committed[0]["price"]) == "1.10"
    assert committed[0]["big"] == 1180591620717411303424
