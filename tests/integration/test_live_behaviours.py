"""The worker against what the live service does (issue 10), each through the emulator over HTTP
with the real delivery core (ChannelLog, pump, poller, Redis): a missing channel answered 400,
a pipe failover (410), the byte-rate 429 and rows the table rejects."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from tests.support.delivery import (
    ACCOUNT,
    DATABASE,
    EMULATOR_ARGS,
    KEY_NAME,
    SCHEMA,
    USER,
    Rig,
    delivery_rig,
    wait_until,
)
from tests.support.emulator import RunningEmulator, start_emulator
from tests.support.keys import key_pair
from worker.delivery.channels import ChannelRef
from worker.delivery.log import Logged, Piece

# 100 kB/s of uncompressed rows per channel: small enough to reach in a test in a second.
BYTE_LIMIT = 100_000
TYPED = "TYPED"


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    with start_emulator(
        *EMULATOR_ARGS,
        "--max-bytes-per-second", str(BYTE_LIMIT),
        "--pipe", f"{DATABASE}.{SCHEMA}.{TYPED}(ID NUMBER NOT NULL, NAME VARCHAR)",
        workdir=tmp_path_factory.mktemp("emulator"),
    ) as e:
        e.register_key(ACCOUNT, USER, key_pair(KEY_NAME).public_pem)
        yield e


@pytest.fixture
def rig(emu: RunningEmulator) -> Iterator[Rig]:
    emu.clear_faults()
    with delivery_rig(emu) as r:
        yield r


def ids_of(batch: int, rows: int = 10) -> range:
    return range(batch * rows, (batch + 1) * rows)


def count(emu: RunningEmulator, endpoint: str, status: int) -> int:
    return int(emu.stats()["requests"].get(endpoint, {}).get(str(status), 0))


def log_padded(rig: Rig, ref: ChannelRef, batch: int, pad: int) -> None:
    ids = ids_of(batch)
    data = b"".join(orjson.dumps({"id": i, "name": "x" * pad}) + b"\n" for i in ids)
    assert isinstance(rig.append(ref, f"b{batch}", [Piece(len(ids), data)]), Logged)


def test_a_channel_dropped_behind_the_pump_is_reopened_on_the_400_is_code(rig: Rig) -> None:
    # Checked to fail: with ERR_CHANNEL_DOES_NOT_EXIST_OR_IS_NOT_AUTHORIZED removed from
    # CHANNEL_NOT_FOUND_CODES the 400 is a BadRequestError: the batches are dead-lettered.
    ref = rig.ref()
    pump = rig.start_pump(ref)
    rig.log_batch(ref, "b0", ids_of(0))
    rig.wait_exactly_once(set(ids_of(0)))
    before = count(rig.emu, "append", 400)
    rig.snowpipe.drop_channel(*ref.target, ref.channel)
    for b in range(1, 3):
        rig.log_batch(ref, f"b{b}", ids_of(b))
    rig.wait_exactly_once({i for b in range(3) for i in ids_of(b)})
    assert count(rig.emu, "append", 400) > before
    assert pump.reopens >= 2 and rig.dead_letters.count() == 0


def test_after_a_failover_the_pump_rediscovers_the_host_takes_a_token_and_reopens(
    rig: Rig,
) -> None:
    # Checked to fail: with the 410 branch removed from GuardAuth.auth_flow (snowpipe/http.py) the
    # reopen keeps the old token, every call answers 410 and nothing after the failover commits.
    ref = rig.ref()
    rig.start_pump(ref)
    rig.log_batch(ref, "b0", ids_of(0))
    rig.wait_exactly_once(set(ids_of(0)))
    before = rig.emu.stats()
    rig.emu.admin.post(
        "/_emulator/failover", json={"database": DATABASE, "schema": SCHEMA, "pipe": ref.pipe}
    ).raise_for_status()
    for b in range(1, 4):
        rig.log_batch(ref, f"b{b}", ids_of(b))
    rig.wait_exactly_once({i for b in range(4) for i in ids_of(b)})
    after = rig.emu.stats()
    gone = sum(
        int(after["requests"].get(e, {}).get("410", 0)) for e in ("append", "open", "status")
    )
    # One 410 per call in flight at the failover, then the new host and token: no loop.
    assert 1 <= gone <= 3, after["requests"]
    assert after["requests"]["hostname"]["200"] > before["requests"]["hostname"]["200"]
    assert after["tokens_issued"] > before["tokens_issued"]


def test_byte_rate_429s_are_retried_after_retry_after_and_every_row_lands_once(
    rig: Rig,
) -> None:
    # Checked to fail: with RateLimitedError made a PermanentError the 429 batches are
    # dead-lettered (rows missing).
    ref = rig.ref()
    before = count(rig.emu, "append", 429)
    # No pump-side byte pacing and small requests: the emulator's byte limit has to answer.
    rig.start_pump(ref, config=rig.config(bytes_per_second=1e12, coalesce_max_bytes=12_500))
    for b in range(10):
        log_padded(rig, ref, b, pad=2000)  # ~20 kB per batch, 200 kB in all
    rig.wait_exactly_once({i for b in range(10) for i in ids_of(b)}, timeout=20)
    assert count(rig.emu, "append", 429) > before
    assert rig.dead_letters.count() == 0


def test_a_pump_paced_under_the_byte_limit_gets_no_429(rig: Rig) -> None:
    # Checked to fail: with the byte term removed from the pump's spacing, 429s appear.
    ref = rig.ref()
    before = count(rig.emu, "append", 429)
    rig.start_pump(ref, config=rig.config(bytes_per_second=80_000, coalesce_max_bytes=12_500))
    for b in range(10):
        log_padded(rig, ref, b, pad=2000)
    rig.wait_exactly_once({i for b in range(10) for i in ids_of(b)}, timeout=20)
    assert count(rig.emu, "append", 429) == before


def test_rows_the_table_rejects_are_dead_lettered_to_their_batch_with_snowflakes_message(
    rig: Rig,
) -> None:
    # Checked to fail: with the schema check removed from the emulator's append, no row error
    # is reported and no dead letter appears.
    ref = rig.ref(TYPED)
    rig.start_pump(ref)
    bad = b'{"id": 1000, "name": "ok"}\n{"id": null, "name": "no id"}\n'
    assert isinstance(rig.append(ref, "b-null", [Piece(2, bad)]), Logged)
    wait_until(
        lambda: 1000 in rig.committed_ids(TYPED), timeout=10, what=lambda: "b-null committed"
    )
    for b in range(2):
        rig.log_batch(ref, f"b{b}", ids_of(b))
    rig.wait_exactly_once({1000} | set(ids_of(0)) | set(ids_of(1)), pipe=TYPED)
    letters = [s.letter for s in rig.dead_letters.entries()]
    assert [(x.batch_id, x.kind) for x in letters] == [("b-null", "row_errors")], letters
    assert "NULL result in a non-nullable column" in letters[0].reason, letters[0].reason
    assert rig.stat("row_errors") == 1
