"""Snowflake's own SDK (`snowpipe-streaming`, unmodified) commits rows into the emulator over HTTPS.

The SDK is a client nobody here wrote: when it runs end to end, the emulator's wire behaviour is
checked by Snowflake's code rather than by our reading of the docs. Each test runs the SDK in a
subprocess (its native core starts threads and process-wide state) and checks the committed rows
through the admin API: every id exactly once, in order.

Deselect offline with `-m 'not sdk'`.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.contract.refclient import RefClient
from tests.support.emulator import RunningEmulator, start_emulator
from tests.support.keys import key_pair
from tests.support.official_sdk import SdkRun, run_official_sdk

pytestmark = pytest.mark.sdk

ACCOUNT, USER = "SDKACCT", "SDK_LOADER"
DB, SCHEMA, PIPE = "SDK_DB", "PUBLIC", "EVENTS_PIPE"
# Well above the SDK's 300 s refresh buffer: a shorter TTL makes it refresh every ~3 s.
LONG_SCOPED_TOKEN_TTL = "3600"
# Refresh happens at exp - 300 s, so with 303 s the SDK refreshes about every 3 s.
SHORT_SCOPED_TOKEN_TTL = "303"
# A few hundred small rows per flush keeps the SDK in inline (rowset) mode: ~8 KB per flush.
ROWS_PER_BATCH = 200


@contextlib.contextmanager
def _start(workdir: Path, ttl: str) -> Iterator[RunningEmulator]:
    with start_emulator(
        "--scoped-token-ttl", ttl, "--commit-delay", "0.2", tls=True, workdir=workdir
    ) as emu:
        emu.register_key(ACCOUNT, USER, key_pair("official-sdk").public_pem)
        emu.add_pipe(DB, SCHEMA, PIPE)
        yield emu


@pytest.fixture(scope="module")
def sdk_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    """One HTTPS emulator for the module (tests use distinct channels, faults are cleared)."""
    with _start(tmp_path_factory.mktemp("sdk-emulator"), LONG_SCOPED_TOKEN_TTL) as emu:
        yield emu


@pytest.fixture
def emu(sdk_emulator: RunningEmulator) -> Iterator[RunningEmulator]:
    """The shared emulator, with no fault rule left over from a previous test."""
    sdk_emulator.clear_faults()
    yield sdk_emulator
    sdk_emulator.clear_faults()


def _run(
    emu: RunningEmulator, tmp_path: Path, channel: str, batches: int, pipe: str = PIPE,
    **extra: Any,
) -> SdkRun:
    run = run_official_sdk(
        emu,
        tmp_path,
        key=key_pair("official-sdk"),
        account=ACCOUNT,
        user=USER,
        database=DB,
        schema=SCHEMA,
        pipe=pipe,
        channel=channel,
        batches=batches,
        rows_per_batch=ROWS_PER_BATCH,
        **extra,
    )
    assert run.ok, f"{run.describe()}\n--- emulator stderr ---\n{emu.stderr()[-3000:]}"
    return run


def _assert_every_row_exactly_once(
    emu: RunningEmulator, channel: str, count: int, pipe: str = PIPE
) -> None:
    committed = [r for r in emu.rows(DB, SCHEMA, pipe) if r["channel"] == channel]
    ids = [r["row"]["id"] for r in committed]
    assert ids == list(range(count)), (
        f"channel {channel}: {len(ids)} rows committed, {len(set(ids))} distinct, "
        f"expected ids 0..{count - 1} once each, in order"
    )


def _count(stats: dict[str, Any], endpoint: str, status: int) -> int:
    return int(stats["requests"].get(endpoint, {}).get(str(status), 0))


def test_official_sdk_commits_every_row_exactly_once_over_https(
    emu: RunningEmulator, tmp_path: Path
) -> None:
    before = emu.stats()
    # With a role, the SDK's key-pair JWT carries an `scp` claim.
    run = _run(emu, tmp_path, "happy", batches=5, role="LOADER_ROLE")

    assert run.result["open_status"]["latest_committed_offset_token"] is None, run.result
    assert run.result["final_status"]["latest_committed_offset_token"] == "999", run.result
    assert run.result["final_status"]["rows_inserted"] == 1000, run.result
    _assert_every_row_exactly_once(emu, "happy", 1000)
    after = emu.stats()
    context = f"stats before={before}\nafter={after}\n{run.describe()}"
    # The SDK-only endpoints were served, and nothing it sent was refused.
    assert _count(after, "pipe-info", 200) > _count(before, "pipe-info", 200), context
    for endpoint, by_status in after["requests"].items():
        refused = {
            s: n - _count(before, endpoint, int(s))
            for s, n in by_status.items()
            if not s.startswith("2") and n > _count(before, endpoint, int(s))
        }
        assert not refused, f"{endpoint} answered {refused}\n{context}"
    # With a one-hour scoped token the SDK asks for exactly one (no refresh loop).
    assert after["tokens_issued"] - before["tokens_issued"] == 1, context


def test_official_sdk_retries_an_injected_401_with_a_fresh_scoped_token(
    emu: RunningEmulator, tmp_path: Path
) -> None:
    before = emu.stats()
    emu.fault(endpoint="append", status=401, count=2)

    _run(emu, tmp_path, "after-401", batches=3)

    _assert_every_row_exactly_once(emu, "after-401", 600)
    after = emu.stats()
    assert _count(after, "append", 401) - _count(before, "append", 401) == 2
    # Each 401 "kicks" a scoped-token refresh: one token at start plus one per 401.
    assert after["tokens_issued"] - before["tokens_issued"] >= 3


@pytest.mark.parametrize(("status", "count"), [(429, 3), (503, 2)])
def test_official_sdk_rides_out_a_burst_of_retryable_errors(
    emu: RunningEmulator, tmp_path: Path, status: int, count: int
) -> None:
    before = emu.stats()
    emu.fault(endpoint="append", status=status, count=count)

    _run(emu, tmp_path, f"burst-{status}", batches=3)

    _assert_every_row_exactly_once(emu, f"burst-{status}", 600)
    after = emu.stats()
    assert _count(after, "append", status) - _count(before, "append", status) == count


def test_official_sdk_recovers_when_the_emulator_expires_its_scoped_tokens(
    emu: RunningEmulator, tmp_path: Path
) -> None:
    before = emu.stats()

    # After the first flush every scoped token is refused: a real 401, not an injected one.
    _run(emu, tmp_path, "expired", batches=3, admin_after_batch={"0": "/_emulator/expire-tokens"})

    _assert_every_row_exactly_once(emu, "expired", 600)
    after = emu.stats()
    assert _count(after, "append", 401) > _count(before, "append", 401)
    assert after["tokens_issued"] - before["tokens_issued"] >= 2


def test_official_sdk_refreshes_its_scoped_token_five_minutes_before_expiry(
    tmp_path: Path,
) -> None:
    with _start(tmp_path / "emulator", SHORT_SCOPED_TOKEN_TTL) as emu:
        _run(emu, tmp_path / "sdk", "short-ttl", batches=1, linger_seconds=7)

        _assert_every_row_exactly_once(emu, "short-ttl", ROWS_PER_BATCH)
        # Issued at t=0, refreshed around t=3 s and t=6 s while the client stays open.
        assert emu.stats()["tokens_issued"] >= 3


def test_official_sdk_reopens_a_closed_channel_at_its_committed_offset(
    emu: RunningEmulator, tmp_path: Path
) -> None:
    _run(emu, tmp_path / "first", "resumed", batches=2)

    # A new client process: close() kept the channel, so open returns its offset token.
    second = _run(emu, tmp_path / "second", "resumed", batches=2, first_offset=400)

    assert second.result["open_status"]["latest_committed_offset_token"] == "399"
    assert second.result["final_status"]["latest_committed_offset_token"] == "799"
    _assert_every_row_exactly_once(emu, "resumed", 800)


def test_official_sdk_in_table_mode_writes_to_the_implicit_streaming_pipe(
    emu: RunningEmulator, tmp_path: Path
) -> None:
    # from_table("EVENTS") uses the pipe EVENTS-STREAMING, which needs no registration.
    _run(emu, tmp_path, "table-mode", batches=2, table="EVENTS")

    _assert_every_row_exactly_once(emu, "table-mode", 400, pipe="EVENTS-STREAMING")


def test_official_sdk_commits_rows_through_the_elastic_channel(
    emu: RunningEmulator, tmp_path: Path
) -> None:
    # get_elastic_channel() only asks bulk status for ELASTIC (every pipe has one, appended to or
    # not), and each append's answer must carry next_continuation_token for the SDK to ack it.
    run = _run(emu, tmp_path, "ELASTIC", batches=2, elastic=True)

    assert run.result["channel_name"] == "ELASTIC", run.result
    assert run.result["final_status"]["status_code"] == "SUCCESS", run.result
    # At least once and unordered by design: every id, each at least once (an acknowledged
    # append commits after the emulator's commit delay).
    expected = set(range(2 * ROWS_PER_BATCH))
    deadline = time.monotonic() + 5
    while True:
        ids = {r["row"]["id"] for r in emu.rows(DB, SCHEMA, PIPE) if r["channel"] == "ELASTIC"}
        if ids == expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert ids == expected, f"{len(expected - ids)} ids never committed"


def test_rows_the_sdk_sends_that_the_table_rejects_land_in_its_error_table(
    emu: RunningEmulator, tmp_path: Path
) -> None:
    # The SDK only appends: it has no SQL client. The error table is read over the SQL API.
    emu.add_pipe(DB, SCHEMA, "CHECKED_PIPE", table="CHECKED", error_logging=True, columns=[
        {"name": "ID", "type": "NUMBER", "nullable": False},
        {"name": "NOTE", "type": "VARCHAR", "nullable": False},
    ])
    rejected = [3, 250, 399]

    run = _run(emu, tmp_path, "checked", batches=2, pipe="CHECKED_PIPE", null_note_ids=rejected)

    assert run.result["final_status"]["rows_error_count"] == len(rejected), run.result
    with contextlib.closing(
        RefClient(emu.url, ACCOUNT, USER, key_pair("official-sdk").private_key,
                  verify=ssl.create_default_context(cafile=emu.ca_file))
    ) as sql:
        result = sql.query(
            "SELECT error_data:\"$1\"::STRING, "
            "error_metadata:details:offset_token_lower_bound::STRING, "
            "error_metadata:details:offset_token_upper_bound::STRING, "
            "error_metadata:error_source::STRING "
            "FROM ERROR_TABLE(SDK_DB.PUBLIC.CHECKED) "
            "WHERE error_metadata:details:channel_name = ? ORDER BY timestamp",
            bindings={"1": {"type": "TEXT", "value": "checked"}},
        )
    rows = [(json.loads(raw), lower, upper, source) for raw, lower, upper, source in result["data"]]
    assert [payload for payload, *_ in rows] == [
        {"id": i, "batch": i // ROWS_PER_BATCH, "note": None} for i in rejected
    ]
    # Each row carries the offset tokens of the SDK request that sent it (one flush per batch).
    for payload, lower, upper, source in rows:
        first = payload["batch"] * ROWS_PER_BATCH
        assert (lower, upper, source) == (str(first), str(first + ROWS_PER_BATCH - 1), "NOTE")
