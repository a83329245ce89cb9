"""The channel log's and the lease table's Lua scripts against the real Redis (a claimed DB).

tests/unit/test_channel_log.py and test_lease.py run them on fakeredis with a clock the test moves
(offsets against the clock, expiry); these check that the real server agrees."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import redis

from tests.support.delivery import mark_settled
from tests.support.redis import REDIS_HOST, RedisDB, private_redis
from worker.deadletter import DeadLetter, DeadLetters
from worker.delivery.channels import ChannelRef
from worker.delivery.lease import LeaseTable
from worker.delivery.log import (
    AlreadyLogged,
    ChannelLog,
    InDeadLetters,
    LeaseLost,
    LogFull,
    Logged,
    Piece,
    StoreChanged,
    Unsettled,
)

A = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_0")
B = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_1")


@pytest.fixture
def log(db: RedisDB) -> ChannelLog:
    channel_log = ChannelLog(db.client, dedup_ttl_seconds=3600)
    for ref in (A, B):
        mark_settled(channel_log, ref)
    return channel_log


@pytest.fixture
def leases(db: RedisDB) -> LeaseTable:
    return LeaseTable(db.client, "n1@test", ttl_seconds=5)


def piece(*ids: int) -> Piece:
    return Piece(len(ids), b"".join(orjson.dumps({"id": i}) + b"\n" for i in ids))


def test_a_batch_gets_consecutive_offsets_once_and_a_second_append_is_deduped(
    log: ChannelLog,
) -> None:
    first = log.append(A, "b1", [piece(1, 2), piece(3)])
    assert isinstance(first, Logged)
    assert first.last == first.first + 1
    again = log.append(A, "b1", [piece(1, 2), piece(3)])
    assert isinstance(again, AlreadyLogged)
    # The same id on another channel (channels per pipe changed) is still a duplicate.
    assert isinstance(log.append(B, "b1", [piece(1)]), AlreadyLogged)
    entries = log.read(A, 0, 10)
    assert [e.offset for e in entries] == [first.first, first.last]
    assert [e.batch_id for e in entries] == ["b1", "b1"]
    assert entries[0].rows == 2
    assert log.channels() == [A]


def test_offsets_increase_and_stay_above_the_clock_even_when_the_counter_went_back(
    log: ChannelLog, db: RedisDB
) -> None:
    first = log.append(A, "b1", [piece(1)])
    assert isinstance(first, Logged)
    # A state Redis that lost its last writes: the counter is older than what was issued.
    db.client.set("snowpipe:next:" + A.key, "5")
    second = log.append(A, "b2", [piece(2)])
    assert isinstance(second, Logged)
    assert second.first > first.last


def test_a_log_over_its_cap_takes_nothing(log: ChannelLog) -> None:
    assert isinstance(log.append(A, "b1", [piece(1, 2, 3)], cap_bytes=10), Logged)
    full = log.append(A, "b2", [piece(4)], cap_bytes=10)
    assert isinstance(full, LogFull)
    assert full.used_bytes > 10
    assert [e.batch_id for e in log.read(A, 0, 10)] == ["b1"]
    # Not recorded as seen: the batch is logged when it comes back.
    assert isinstance(log.append(A, "b2", [piece(4)]), Logged)


def test_trim_removes_committed_entries_and_their_bytes_only_for_the_lease_holder(
    log: ChannelLog, leases: LeaseTable, db: RedisDB
) -> None:
    one = log.append(A, "b1", [piece(1)])
    two = log.append(A, "b2", [piece(2)])
    assert isinstance(one, Logged) and isinstance(two, Logged)
    lease = leases.acquire(A)
    assert lease is not None
    with pytest.raises(LeaseLost):
        log.trim(A, lease.value + "x", one.last)
    assert log.trim(A, lease.value, one.last).trimmed == 1
    assert [e.batch_id for e in log.read(A, 0, 10)] == ["b2"]
    assert log.depth(A).bytes == len(piece(2).data)
    assert log.depth(A).entries == 1


def test_dead_letter_moves_a_batch_out_of_the_log_and_only_its_requeue_logs_it_again(
    log: ChannelLog, leases: LeaseTable, db: RedisDB
) -> None:
    log.append(A, "b1", [piece(1)])
    lease = leases.acquire(A)
    assert lease is not None
    entries = log.read(A, 0, 10)
    letter = DeadLetter("b1", "DB", "PUBLIC", "P1", "refused", [{"id": 1}], letter_id="b1@1")
    assert log.dead_letter(A, lease.value, entries, "b1@1", letter.dumps()) == 1
    assert log.read(A, 0, 10) == []
    assert DeadLetters(db.client).count() == 1
    assert log.depth(A).bytes == 0
    assert log.append(A, "b1", [piece(1)]) == InDeadLetters("b1@1")  # a late copy
    assert isinstance(log.append(A, "b1", [piece(1)], requeue_of="b1@1"), Logged)
    # Twice is a no-op (already gone): no second dead letter.
    assert log.dead_letter(A, lease.value, entries, "b1@1", letter.dumps()) == 0
    assert DeadLetters(db.client).count() == 1


def test_the_real_store_has_an_incarnation_and_a_restart_unsettles_every_channel(
    log: ChannelLog, leases: LeaseTable, db: RedisDB
) -> None:
    run_id = db.client.info("server")["run_id"]
    incarnation = log.incarnation()
    assert incarnation.startswith(f"{run_id}:") and len(incarnation) == 81
    lease = leases.acquire(A)
    assert lease is not None
    log.settle(A, lease.value, 0)
    assert isinstance(log.append(A, "b1", [piece(1)]), Logged)
    # What a store that restarted (a new run_id) looks like to the scripts: settled elsewhere.
    db.client.set("snowpipe:settled:" + A.key, "0" * 40 + ":" + "0" * 40)
    assert isinstance(log.append(A, "b2", [piece(2)]), Unsettled)
    with pytest.raises(StoreChanged):
        log.trim(A, lease.value, 0)
    settled = log.settle(A, lease.value, 0)
    assert settled.incarnation == incarnation
    assert isinstance(log.append(A, "b2", [piece(2)]), Logged)


def test_settle_after_the_store_came_back_older_trims_committed_entries_never_moves_them(
    log: ChannelLog, leases: LeaseTable, db: RedisDB
) -> None:
    logged = log.append(A, "b1", [piece(1)])
    assert isinstance(logged, Logged)
    lease = leases.acquire(A)
    assert lease is not None
    # Snowflake committed b1 and later batches this store forgot (their writes were lost).
    committed = logged.last + 1000
    settled = log.settle(A, lease.value, committed)
    assert settled.raised and settled.trimmed == 1
    assert log.read(A, 0, 10) == []
    after = log.append(A, "b2", [piece(2)])
    assert isinstance(after, Logged) and after.first > committed


def test_a_lease_is_held_by_one_node_until_it_expires_or_is_released(
    db: RedisDB, leases: LeaseTable
) -> None:
    other = LeaseTable(db.client, "n2@test", ttl_seconds=5)
    mine = leases.acquire(A)
    assert mine is not None and mine.generation == 1
    assert other.acquire(A) is None
    assert leases.holds(mine)
    assert leases.renew([mine]) == [True]
    assert other.holders([A, B]) == ["n1@test", None]
    leases.release(mine)
    theirs = other.acquire(A)
    assert theirs is not None and theirs.generation == 2
    assert not leases.holds(mine)
    assert leases.renew([mine]) == [False]
    leases.release(mine)  # not ours any more: left alone
    assert other.holds(theirs)


def test_heartbeats_list_the_live_nodes(db: RedisDB, leases: LeaseTable) -> None:
    other = LeaseTable(db.client, "n2@test", ttl_seconds=5)
    other.heartbeat()
    assert leases.heartbeat() == ["n1@test", "n2@test"]
    other.leave()
    assert leases.heartbeat() == ["n1@test"]


def test_a_store_that_refuses_info_to_the_worker_is_reported_at_start(tmp_path: Path) -> None:
    # Without INFO in scripts every incarnation looks alike: the settle gate could not close after
    # a restart. The node says so at start instead of running blind.
    from worker.delivery.node import check_incarnation

    with private_redis(tmp_path / "acl") as server:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "worker", "on", ">pw", "~*", "+@all", "-info")
        restricted = ChannelLog(
            redis.Redis(host=REDIS_HOST, port=server.port, username="worker", password="pw"),
            dedup_ttl_seconds=60,
        )
        assert restricted.incarnation() == "-"
        assert not check_incarnation(restricted)
        assert check_incarnation(ChannelLog(admin, dedup_ttl_seconds=60))
