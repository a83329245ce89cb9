"""ChannelLog's scripts on an in-memory Redis with a clock the test moves: offsets, dedup,
backpressure, trims, dead letters, the floor, depths (tests/integration/test_delivery_scripts.py
runs the same scripts on the real Redis)."""

from __future__ import annotations

import fakeredis
import orjson
import pytest

from tests.support.fake_redis import RedisClock
from worker.deadletter import DeadLetters
from worker.delivery.channels import STATS_KEY, ChannelRef
from worker.delivery.lease import Lease, LeaseTable
from worker.delivery.log import (
    AlreadyLogged,
    ChannelLog,
    LeaseLost,
    LogFull,
    Logged,
    Piece,
)

A = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_0")
B = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_1")


@pytest.fixture
def log(fredis: fakeredis.FakeRedis) -> ChannelLog:
    return ChannelLog(fredis, dedup_ttl_seconds=3600)


@pytest.fixture
def lease(fredis: fakeredis.FakeRedis) -> Lease:
    taken = LeaseTable(fredis, "n1@test", ttl_seconds=30).acquire(A)
    assert taken is not None
    return taken


def piece(*ids: int) -> Piece:
    return Piece(len(ids), b"".join(orjson.dumps({"id": i}) + b"\n" for i in ids))


def logged(result: object) -> Logged:
    assert isinstance(result, Logged), result
    return result


def stats(client: fakeredis.FakeRedis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(STATS_KEY).items()}


def test_offsets_are_the_redis_clock_in_microseconds_when_it_is_ahead_of_the_counter(
    log: ChannelLog, redis_clock: RedisClock
) -> None:
    before = redis_clock.now_us()
    first = logged(log.append(A, "b1", [piece(1), piece(2), piece(3)]))
    assert before <= first.first <= redis_clock.now_us()
    assert first.last == first.first + 2
    redis_clock.advance(60)  # a minute later: the offsets jump with the clock
    second = logged(log.append(A, "b2", [piece(4)]))
    assert second.first >= first.last + 60 * 10**6
    assert log.last_offset(A) == second.last


def test_a_clock_that_went_back_still_gets_the_next_offset_after_the_last(
    log: ChannelLog, redis_clock: RedisClock
) -> None:
    first = logged(log.append(A, "b1", [piece(1)]))
    redis_clock.advance(-3600)  # the Redis clock an hour behind (a failover to a skewed host)
    second = logged(log.append(A, "b2", [piece(2)]))
    assert second.first == first.last + 1


def test_a_counter_that_went_back_still_gets_offsets_above_everything_issued(
    log: ChannelLog, fredis: fakeredis.FakeRedis, redis_clock: RedisClock
) -> None:
    first = logged(log.append(A, "b1", [piece(1)]))
    fredis.set("snowpipe:next:" + A.key, "5")  # a state Redis that lost its last writes
    redis_clock.advance(0.001)
    second = logged(log.append(A, "b2", [piece(2)]))
    assert second.first > first.last


def test_channels_count_offsets_independently(log: ChannelLog) -> None:
    a = logged(log.append(A, "a1", [piece(1)]))
    b = logged(log.append(B, "b1", [piece(1)]))
    a2 = logged(log.append(A, "a2", [piece(2)]))
    assert a2.first > a.last
    assert [e.batch_id for e in log.read(A, 0, 10)] == ["a1", "a2"]
    assert [e.offset for e in log.read(B, 0, 10)] == [b.first]
    assert log.channels() == [A, B]


def test_a_batch_id_is_logged_once_on_any_channel_and_outcomes_are_counted(
    log: ChannelLog, fredis: fakeredis.FakeRedis
) -> None:
    first = logged(log.append(A, "b1", [piece(1, 2), piece(3)]))
    again = log.append(A, "b1", [piece(1, 2), piece(3)])
    assert again == AlreadyLogged(f"{A.key}\t{first.first}\t{first.last}")
    assert isinstance(log.append(B, "b1", [piece(1)]), AlreadyLogged)
    assert stats(fredis) == {"logged": 1, "already_logged": 2, "rows_logged": 3}
    assert fredis.ttl("snowpipe:batch:b1") == 3600


def test_the_dedup_record_expires_after_its_ttl_and_the_id_is_logged_again(
    log: ChannelLog, redis_clock: RedisClock
) -> None:
    logged(log.append(A, "b1", [piece(1)]))
    redis_clock.advance(3601)
    logged(log.append(A, "b1", [piece(1)]))
    assert [e.batch_id for e in log.read(A, 0, 10)] == ["b1", "b1"]


def test_entries_carry_the_batch_rows_data_and_the_redis_time_written(
    log: ChannelLog, redis_clock: RedisClock
) -> None:
    redis_clock.advance(100)
    at_ms = redis_clock.now_us() // 1000
    logged(log.append(A, "b1", [piece(1, 2)]))
    (entry,) = log.read(A, 0, 10)
    assert (entry.batch_id, entry.rows, entry.data) == ("b1", 2, piece(1, 2).data)
    assert at_ms <= entry.written_ms <= at_ms + 1000
    assert entry.entry_id == f"{entry.offset}-0"


def test_a_batch_needs_a_piece(log: ChannelLog) -> None:
    with pytest.raises(ValueError, match="at least one piece"):
        log.append(A, "b1", [])


def test_a_log_at_its_byte_cap_refuses_and_does_not_remember_the_id(
    log: ChannelLog, fredis: fakeredis.FakeRedis
) -> None:
    size = len(piece(1, 2, 3).data)
    logged(log.append(A, "b1", [piece(1, 2, 3)], cap_bytes=size + 1))  # under the cap: taken
    full = log.append(A, "b2", [piece(4)], cap_bytes=size)
    assert full == LogFull(size)
    assert stats(fredis)["log_full"] == 1
    assert logged(log.append(A, "b2", [piece(4)]))  # no cap (0): taken when it comes back
    assert log.depth(A).bytes == size + len(piece(4).data)


def test_read_wait_and_entries_of_select_by_offset(log: ChannelLog) -> None:
    one = logged(log.append(A, "b1", [piece(1), piece(2)]))
    two = logged(log.append(A, "b2", [piece(3)]))
    assert [e.offset for e in log.read(A, one.first, 10)] == [one.last, two.first]
    assert [e.offset for e in log.read(A, 0, 1)] == [one.first]
    assert [e.offset for e in log.wait(A, one.last, 10, 10)] == [two.first]
    assert log.wait(A, two.last, 10, 10) == []  # nothing after the last: waits, then empty
    assert [e.batch_id for e in log.entries_of(A, one.first, one.last)] == ["b1", "b1"]


def test_trim_is_refused_without_the_lease_and_keeps_the_bytes_count_exact(
    log: ChannelLog, lease: Lease
) -> None:
    one = logged(log.append(A, "b1", [piece(1), piece(2)]))
    logged(log.append(A, "b2", [piece(3)]))
    with pytest.raises(LeaseLost):
        log.trim(A, lease.value.replace("n1@test", "n2@test"), one.last)
    assert log.trim(A, lease.value, one.first) == 1  # half of b1
    assert log.trim(A, lease.value, one.first) == 0  # again: nothing left to trim
    assert log.trim(A, lease.value, one.last) == 1
    assert log.depth(A).entries == 1
    assert log.depth(A).bytes == len(piece(3).data)


def test_dead_letter_takes_one_batch_and_needs_the_lease(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    logged(log.append(A, "b1", [piece(1)]))
    logged(log.append(A, "b2", [piece(2)]))
    both = log.read(A, 0, 10)
    with pytest.raises(ValueError, match="one batch"):
        log.dead_letter(A, lease.value, both, b"{}")
    assert log.dead_letter(A, lease.value, [], b"{}") == 0
    with pytest.raises(LeaseLost):
        log.dead_letter(A, "someone\telse\t9", both[:1], b"{}")
    assert log.dead_letter(A, lease.value, both[:1], b'{"batch_id":"b1"}') == 1
    assert DeadLetters(fredis).count() == 1
    assert fredis.get("snowpipe:batch:b1") is None  # forgotten: a requeue is logged again
    assert fredis.get("snowpipe:batch:b2") is not None
    assert log.depth(A).bytes == len(piece(2).data)


def test_raise_floor_is_exact_above_two_to_the_53(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    logged(log.append(A, "b1", [piece(1), piece(2)]))
    committed = 10**17 + 1  # doubles cannot tell it from its neighbours
    result = log.raise_floor(A, lease.value, committed)
    assert (result.raised, result.moved) == (True, 2)
    moved = log.read(A, 0, 10)
    assert [e.offset for e in moved] == [committed + 1, committed + 2]
    assert [e.data for e in moved] == [piece(1).data, piece(2).data]
    assert log.last_offset(A) == committed + 2
    record = fredis.get("snowpipe:batch:b1")
    assert record is not None and record.decode().split("\t")[1] == str(committed + 2)
    assert 0 < fredis.ttl("snowpipe:batch:b1") <= 3600  # the record keeps its expiry
    assert not log.raise_floor(A, lease.value, committed).raised  # done once
    with pytest.raises(LeaseLost):
        log.raise_floor(A, "x\ty\t0", committed + 10)


def test_depths_report_entries_bytes_and_the_oldest_write(
    log: ChannelLog, redis_clock: RedisClock
) -> None:
    assert log.depth(A).oldest_ms is None and log.depths([]) == []
    at_ms = redis_clock.now_us() // 1000
    logged(log.append(A, "b1", [piece(1)]))
    redis_clock.advance(5)
    logged(log.append(A, "b2", [piece(2, 3)]))
    a, b = log.depths([A, B])
    assert a == log.depth(A)
    assert (a.entries, a.bytes) == (2, len(piece(1).data) + len(piece(2, 3).data))
    assert a.oldest_ms is not None and at_ms <= a.oldest_ms < at_ms + 5000
    assert (b.entries, b.bytes, b.oldest_ms) == (0, 0, None)


def test_a_member_that_is_no_channel_key_is_skipped_not_fatal(
    log: ChannelLog, fredis: fakeredis.FakeRedis
) -> None:
    # Left over from before names were checked: a pipe named `X|Y` made a five-part key.
    log.append(A, "b1", [piece(1)], cap_bytes=0)
    fredis.sadd("snowpipe:channels", "DB|PUBLIC|X|Y|snowpipe_0", "DB||P|snowpipe_0")
    assert log.channels() == [A]
    assert log.channels() == [A]  # every tick: the bad members never stop the others
