"""ChannelLog's scripts on an in-memory Redis with a clock the test moves: offsets, dedup,
backpressure, trims, dead letters, the floor, depths (tests/integration/test_delivery_scripts.py
runs the same scripts on the real Redis)."""

from __future__ import annotations

import fakeredis
import orjson
import pytest

from tests.support.delivery import mark_settled
from tests.support.fake_redis import RedisClock
from worker.deadletter import DeadLetter, DeadLetters
from worker.delivery.channels import STATS_KEY, ChannelRef
from worker.delivery.lease import Lease, LeaseTable
from worker.delivery.log import (
    AlreadyLogged,
    ChannelLog,
    ChannelRefused,
    InDeadLetters,
    LeaseLost,
    LogFull,
    Logged,
    MaybeSent,
    Piece,
    StoreChanged,
    Unsettled,
)

A = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_0")
B = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_1")


@pytest.fixture
def log(fredis: fakeredis.FakeRedis) -> ChannelLog:
    channel_log = ChannelLog(fredis, dedup_ttl_seconds=3600)
    for ref in (A, B):
        mark_settled(channel_log, ref)  # as a pump's first settle of a new channel does
    return channel_log


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
    assert log.trim(A, lease.value, one.first).trimmed == 1  # half of b1
    assert log.trim(A, lease.value, one.first).trimmed == 0  # again: nothing left to trim
    assert log.trim(A, lease.value, one.last).trimmed == 1
    assert log.depth(A).entries == 1
    assert log.depth(A).bytes == len(piece(3).data)
    assert log.committed_offset(A) == one.last


def test_dead_letter_takes_one_batch_marks_its_record_and_needs_the_lease(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    logged(log.append(A, "b1", [piece(1)]))
    logged(log.append(A, "b2", [piece(2)]))
    both = log.read(A, 0, 10)
    with pytest.raises(ValueError, match="one batch"):
        log.dead_letter(A, lease.value, both, "L", b"{}")
    assert log.dead_letter(A, lease.value, [], "L", b"{}") == 0
    with pytest.raises(LeaseLost):
        log.dead_letter(A, "someone\telse\t9", both[:1], "L", b"{}")
    letter = DeadLetter("b1", "DB", "PUBLIC", "P1", "refused", [{"id": 1}], letter_id="b1@x")
    assert log.dead_letter(A, lease.value, both[:1], "b1@x", letter.dumps()) == 1
    assert [s.letter.letter_id for s in DeadLetters(fredis).entries()] == ["b1@x"]
    record = fredis.get("snowpipe:batch:b1")
    assert record is not None and record.decode().endswith("\tD\tb1@x")
    assert 0 < fredis.ttl("snowpipe:batch:b1") <= 3600  # the record keeps its expiry
    assert log.depth(A).bytes == len(piece(2).data)


def test_a_late_copy_of_a_dead_lettered_batch_is_not_logged_but_its_requeue_is_once(
    log: ChannelLog, lease: Lease
) -> None:
    logged(log.append(A, "b1", [piece(1)]))
    log.dead_letter(A, lease.value, log.read(A, 0, 10), "b1@x", b"{}")
    assert log.append(A, "b1", [piece(1)]) == InDeadLetters("b1@x")  # the original, again
    assert log.append(A, "b1", [piece(1)], requeue_of="other") == InDeadLetters("b1@x")
    again = logged(log.append(A, "b1", [piece(1)], requeue_of="b1@x"))
    assert isinstance(log.append(A, "b1", [piece(1)], requeue_of="b1@x"), AlreadyLogged)
    assert [e.offset for e in log.read(A, 0, 10)] == [again.first]


def test_an_unsettled_channel_takes_nothing_and_a_refused_one_says_why(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    fredis.delete("snowpipe:settled:" + A.key)  # as after a restart of the store
    assert log.append(A, "b1", [piece(1)]) == Unsettled()
    assert fredis.get("snowpipe:batch:b1") is None
    assert fredis.sismember("snowpipe:channels", A.key)  # so that a pump settles it
    log.refuse(A, lease.value, "no such pipe", 60)
    assert log.append(A, "b1", [piece(1)]) == ChannelRefused("no such pipe")
    log.settle(A, lease.value, 0)
    assert isinstance(log.append(A, "b1", [piece(1)]), Logged)


def test_settle_trims_what_snowflake_committed_and_raises_the_counter_never_moving_entries(
    log: ChannelLog, lease: Lease
) -> None:
    one = logged(log.append(A, "b1", [piece(1), piece(2)]))
    two = logged(log.append(A, "b2", [piece(3)]))
    committed = 10**17 + 1  # beyond every offset issued; doubles cannot tell it from 10**17
    settled = log.settle(A, lease.value, committed)
    assert (settled.raised, settled.trimmed, settled.held) == (True, 3, 0)
    assert log.read(A, 0, 10) == [] and log.depth(A).bytes == 0
    assert log.last_offset(A) == committed
    assert logged(log.append(A, "b3", [piece(4)])).first == committed + 1
    assert one.last < two.first
    with pytest.raises(LeaseLost):
        log.settle(A, "x\ty\t0", committed)


def test_session_scripts_need_a_settle_in_the_current_incarnation(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    one = logged(log.append(A, "b1", [piece(1)]))
    log.settle(A, lease.value, 0)
    fredis.set("snowpipe:settled:" + A.key, "an-older-run:replid")  # the store restarted
    with pytest.raises(StoreChanged):
        log.trim(A, lease.value, one.last)
    with pytest.raises(StoreChanged):
        log.mark_sent(A, lease.value, one.last)
    with pytest.raises(StoreChanged):
        log.dead_letter(A, lease.value, log.read(A, 0, 10), "L", b"{}")


def test_the_sent_mark_only_rises_and_guards_dead_letters_without_a_settle(
    log: ChannelLog, lease: Lease
) -> None:
    one = logged(log.append(A, "b1", [piece(1)]))
    two = logged(log.append(A, "b2", [piece(2)]))
    assert log.mark_sent(A, lease.value, one.last) == one.last
    assert log.mark_sent(A, lease.value, one.first - 5) == one.last
    first, second = log.read(A, 0, 10)
    with pytest.raises(MaybeSent):
        log.dead_letter(A, lease.value, [first], "L1", b"{}", settled=False)
    assert log.dead_letter(A, lease.value, [second], "L2", b"{}", settled=False) == 1
    assert two.first == second.offset


def test_after_the_store_came_back_older_a_refused_open_trusts_no_sent_mark_until_a_settle(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    # Found by the model check. Checked to fail: without the markinc check of DEAD_LETTER's
    # "unsent" mode, the entry is dead-lettered although its append went out (the write that
    # raised the mark over it was lost) and may commit: the letter's requeue commits it again.
    one = logged(log.append(A, "b1", [piece(1)]))
    log.settle(A, lease.value, 0)
    # The store comes back older: the mark over b1 is lost, the appends were sent anyway.
    fredis.set("snowpipe:markinc:" + A.key, "an-older-run:replid")
    log.refuse(A, lease.value, "no such pipe", 60)
    with pytest.raises(MaybeSent):
        log.dead_letter(A, lease.value, log.read(A, 0, 10), "L1", b"{}", settled=False)
    # Once an open succeeds (the settle), the mark is complete again.
    log.settle(A, lease.value, 0)
    log.refuse(A, lease.value, "no such pipe", 60)
    assert log.dead_letter(A, lease.value, log.read(A, 0, 10), "L1", b"{}", settled=False) == 1
    assert one.first > log.sent_mark(A)


def test_errors_that_rose_hold_the_entries_committed_since_the_last_confirmation(
    log: ChannelLog, lease: Lease
) -> None:
    log.settle(A, lease.value, 0, errors=0)
    one = logged(log.append(A, "b1", [piece(1)]))
    two = logged(log.append(A, "b2", [piece(2), piece(3)]))
    confirmed = log.trim(A, lease.value, one.last, errors=0)
    assert (confirmed.trimmed, confirmed.held) == (1, 0)
    confirmed = log.trim(A, lease.value, two.last, errors=2, upper_bound=str(two.last),
                         message="NULL result\tin a non-nullable column")  # fmt: skip
    assert (confirmed.trimmed, confirmed.held) == (2, 2)
    [window] = log.held_windows(A)
    assert (window.after, window.upto, window.errors, window.total) == (one.last, two.last, 2, 2)
    assert window.message == "NULL result in a non-nullable column"
    held = log.held_entries(A, window)
    assert [(e.batch_id, e.piece, e.pieces, e.first_row) for e in held] == [
        ("b2", 0, 2, 0), ("b2", 1, 2, 1),
    ]  # fmt: skip
    letter = DeadLetter("b2", "DB", "PUBLIC", "P1", "row errors", [], kind="row_errors",
                        letter_id="b2@rows")  # fmt: skip
    for _ in range(2):  # attributing a window twice stores one letter
        log.release_held(A, lease.value, window, held, [("b2@rows", letter.dumps())], now_ms=1)
    assert log.held_windows(A) == [] and log.held_entries(A, window) == []
    assert [s.letter.letter_id for s in DeadLetters(log.redis).entries()] == ["b2@rows"]


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
