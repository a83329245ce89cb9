"""The wait API on an in-memory Redis: each batch's state from its dedup record, the channel's
committed offset (raised by the trim script) and the dead letters; waiting, timeouts, round trips.
"""

from __future__ import annotations

from typing import Any

import fakeredis
import orjson
import pytest

from tests.support.clock import FakeClock
from tests.support.delivery import mark_settled
from worker.deadletter import DeadLetter, DeadLetters
from worker.delivery.channels import ChannelRef
from worker.delivery.lease import Lease, LeaseTable
from worker.delivery.log import ChannelLog, LeaseLost, Logged, Piece
from worker.waiting import (
    RESCAN_POLLS,
    BatchWatcher,
    WaitResult,
    committed_key,
    wait_on,
)

A = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_0")
B = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_1")


@pytest.fixture
def log(fredis: fakeredis.FakeRedis) -> ChannelLog:
    channel_log = ChannelLog(fredis, dedup_ttl_seconds=3600)
    for ref in (A, B):
        mark_settled(channel_log, ref)
    return channel_log


@pytest.fixture
def lease(fredis: fakeredis.FakeRedis) -> Lease:
    taken = LeaseTable(fredis, "n1@test", ttl_seconds=30).acquire(A)
    assert taken is not None
    return taken


def piece(*ids: int) -> Piece:
    return Piece(len(ids), b"".join(orjson.dumps({"id": i}) + b"\n" for i in ids))


def append(log: ChannelLog, ref: ChannelRef, batch_id: str, pieces: int = 1) -> Logged:
    result = log.append(ref, batch_id, [piece(i) for i in range(pieces)])
    assert isinstance(result, Logged), result
    return result


def states(client: fakeredis.FakeRedis, *ids: str) -> WaitResult:
    return wait_on(client, ids, timeout=0)


def letter(batch_id: str, reason: str, kind: Any = "failed") -> DeadLetter:
    return DeadLetter(batch_id, "DB", "PUBLIC", "P1", reason, [{"id": 1}], kind=kind)


# --- The committed offset the trim script keeps ---------------------------------------------------


def test_trim_records_the_committed_offset_of_the_channel_and_it_only_rises(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    one = append(log, A, "b1")
    two = append(log, A, "b2")
    assert fredis.get(committed_key(A.key)) is None
    log.trim(A, lease.value, one.last)
    assert fredis.get(committed_key(A.key)) == str(one.last).encode()
    log.trim(A, lease.value, two.last)
    log.trim(A, lease.value, one.last)  # an older confirmation never lowers it
    assert fredis.get(committed_key(A.key)) == str(two.last).encode()
    assert fredis.get(committed_key(B.key)) is None  # per channel


def test_the_committed_offset_is_exact_above_two_to_the_53_and_needs_the_lease(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    big = 10**17 + 1  # doubles cannot tell it from its neighbours
    log.trim(A, lease.value, big)
    assert fredis.get(committed_key(A.key)) == str(big).encode()
    log.trim(A, lease.value, big - 1)
    assert fredis.get(committed_key(A.key)) == str(big).encode()
    with pytest.raises(LeaseLost):
        log.trim(A, "someone\telse\t9", big + 5)
    assert fredis.get(committed_key(A.key)) == str(big).encode()


# --- States ---------------------------------------------------------------------------------------


def test_an_id_the_state_store_never_saw_is_unknown(fredis: fakeredis.FakeRedis) -> None:
    result = states(fredis, "never-published")
    assert result.states == {"never-published": "unknown"}
    assert result.timed_out and not result.done and not result.ok


def test_a_logged_batch_is_pending_until_its_channel_committed_its_last_offset(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    batch = append(log, A, "b1", pieces=3)
    assert states(fredis, "b1").states == {"b1": "pending"}  # no committed offset yet
    log.trim(A, lease.value, batch.last - 1)  # two of its three entries committed
    assert states(fredis, "b1").states == {"b1": "pending"}
    log.trim(A, lease.value, batch.last)
    result = states(fredis, "b1")
    assert result.states == {"b1": "committed"}
    assert result.ok and result.done and not result.timed_out


def test_each_batch_is_judged_by_its_own_channel(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    a = append(log, A, "on-a")
    append(log, B, "on-b")
    log.trim(A, lease.value, a.last)
    fredis.set(committed_key(B.key), "1")  # B committed something older than its batch
    assert states(fredis, "on-a", "on-b").states == {"on-a": "committed", "on-b": "pending"}


def test_a_batch_dead_lettered_from_its_log_is_dead_lettered_with_the_letters_reason(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    append(log, A, "b1")
    entries = log.read(A, 0, 10)
    dead = letter("b1", "Snowflake refused the channel: pipe P1 does not exist")
    # The record is marked with the letter's id (chan TAB first TAB last TAB D TAB letter id).
    assert log.dead_letter(A, lease.value, entries, dead.letter_id, dead.dumps()) == 1
    result = states(fredis, "b1")
    assert result.states == {"b1": "dead_lettered"}
    assert result.reasons == {"b1": "Snowflake refused the channel: pipe P1 does not exist"}
    assert result.done and not result.ok and not result.timed_out


def test_a_record_marked_dead_lettered_is_dead_lettered(fredis: fakeredis.FakeRedis) -> None:
    # The record a dead-lettered batch keeps: chan TAB first TAB last TAB D TAB letter id.
    fredis.set("snowpipe:batch:b1", f"{A.key}\t5\t6\tD\tletter-1")
    fredis.set(committed_key(A.key), "9")  # committed past it: the D still wins
    DeadLetters(fredis).add(letter("b1", "Snowflake refused the batch: bad rows"))
    result = states(fredis, "b1")
    assert result.states == {"b1": "dead_lettered"}
    assert result.reasons == {"b1": "Snowflake refused the batch: bad rows"}


def test_a_batch_the_task_dead_lettered_has_no_record_and_is_found_among_the_letters(
    fredis: fakeredis.FakeRedis,
) -> None:
    DeadLetters(fredis).add(letter("other", "not ours"))
    DeadLetters(fredis).add(letter("b1", "row 0 is empty:\nevery row needs a column"))
    result = states(fredis, "b1", "b2")
    assert result.states == {"b1": "dead_lettered", "b2": "unknown"}
    assert result.reasons == {"b1": "row 0 is empty: every row needs a column"}  # one line


def test_a_committed_batch_with_a_row_errors_letter_reports_its_rejected_rows(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    one = append(log, A, "b1")
    two = append(log, A, "b2")
    DeadLetters(fredis).add(letter("b1", "Snowflake reported 1 row error(s)", kind="row_errors"))
    log.trim(A, lease.value, two.last)
    assert one.last < two.last
    result = states(fredis, "b1", "b2")
    assert result.states == {"b1": "committed", "b2": "committed"}
    assert result.rows_rejected == {"b1": "Snowflake reported 1 row error(s)"}
    assert result.done and not result.ok
    assert result.counts == {"committed": 2, "dead_lettered": 0, "pending": 0, "unknown": 0}


def test_ids_keep_their_order_and_duplicates_count_once(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    append(log, A, "b2")
    result = states(fredis, "b2", "b1", "b2")
    assert list(result.states) == ["b2", "b1"]
    assert result.ids("pending") == ["b2"] and result.ids("unknown") == ["b1"]


def test_bad_arguments_are_refused(fredis: fakeredis.FakeRedis) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        wait_on(fredis, ["b1", ""], timeout=0)
    with pytest.raises(ValueError, match="timeout"):
        wait_on(fredis, ["b1"], timeout=-1)


# --- Waiting --------------------------------------------------------------------------------------


def test_waiting_returns_as_soon_as_every_batch_is_committed_or_dead_lettered(
    log: ChannelLog, lease: Lease, fredis: fakeredis.FakeRedis
) -> None:
    clock = FakeClock()
    batch = append(log, A, "b1")
    seen: list[dict[str, str]] = []

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if len(clock.sleeps) == 3:  # the pump confirms the commit during the third pause
            log.trim(A, lease.value, batch.last)
            DeadLetters(fredis).add(letter("b2", "refused"))

    result = wait_on(
        fredis, ["b1", "b2"], timeout=60, poll_seconds=0.5, clock=clock, sleep=sleep,
        on_progress=lambda r: seen.append(dict(r.states)),
    )  # fmt: skip
    assert result.states == {"b1": "committed", "b2": "dead_lettered"}
    assert not result.timed_out and result.elapsed_seconds == 1.5
    assert clock.sleeps == [0.5, 0.5, 0.5]
    assert seen[0] == {"b1": "pending", "b2": "unknown"}
    assert seen[-1] == result.states  # the final result is reported too


def test_waiting_stops_at_the_timeout_with_what_is_still_pending(
    log: ChannelLog, fredis: fakeredis.FakeRedis
) -> None:
    clock = FakeClock()
    append(log, A, "b1")
    result = wait_on(
        fredis, ["b1", "b2"], timeout=2, poll_seconds=0.5, clock=clock, sleep=clock.sleep
    )
    assert result.timed_out and not result.done
    assert result.states == {"b1": "pending", "b2": "unknown"}
    assert clock.now == 2 and sum(clock.sleeps) == 2


# --- Cost -----------------------------------------------------------------------------------------


class Counting:
    """A Redis client that counts round trips: direct commands and executed pipelines."""

    def __init__(self, client: fakeredis.FakeRedis) -> None:
        self._client = client
        self.round_trips = 0
        self.scans = 0  # reads of the dead letters' order

    def pipeline(self, **kwargs: Any) -> Any:
        pipe = self._client.pipeline(**kwargs)
        execute = pipe.execute

        def counted() -> Any:
            self.round_trips += 1
            return execute()

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    def zrange(self, *args: Any) -> Any:
        self.round_trips += 1
        self.scans += 1
        return self._client.zrange(*args)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if callable(attr):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.round_trips += 1
                return attr(*args, **kwargs)

            return counted
        return attr


def test_a_poll_of_thousands_of_ids_takes_a_few_pipelined_round_trips(
    fredis: fakeredis.FakeRedis,
) -> None:
    ids = [f"b{i}" for i in range(2500)]
    records = fredis.pipeline()
    for n, batch_id in enumerate(ids[:2000]):  # 2,000 logged on two channels, 500 never seen
        records.set(f"snowpipe:batch:{batch_id}", f"{(A, B)[n % 2].key}\t{n}\t{n}")
    records.execute()
    fredis.set(committed_key(A.key), "999")
    client = Counting(fredis)
    watcher = BatchWatcher(client, ids)  # type: ignore[arg-type]
    watcher.poll()
    # The records (3 MGETs of up to 1,000 in one pipeline), the committed offsets, the number of
    # dead letters (and, once per store object, the move of letters kept in the old list form),
    # and one read of the (empty) dead letters for the 500 without a record.
    assert client.round_trips == 5
    result = watcher.result(timed_out=False, elapsed_seconds=0)
    assert result.counts == {"committed": 500, "pending": 1500, "dead_lettered": 0, "unknown": 500}


def test_the_dead_letters_are_read_again_only_when_their_number_changes(
    fredis: fakeredis.FakeRedis,
) -> None:
    DeadLetters(fredis).add(letter("other", "not ours"))
    client = Counting(fredis)
    watcher = BatchWatcher(client, ["b1"])  # type: ignore[arg-type]
    watcher.poll()
    assert client.scans == 1
    for _ in range(RESCAN_POLLS - 2):
        watcher.poll()
    assert client.scans == 1  # same number of letters: not read again
    DeadLetters(fredis).add(letter("b1", "refused"))
    watcher.poll()
    assert client.scans == 2
    assert watcher.result(timed_out=False, elapsed_seconds=0).states == {"b1": "dead_lettered"}


def test_the_dead_letters_are_read_again_after_rescan_polls_anyway(
    fredis: fakeredis.FakeRedis,
) -> None:
    client = Counting(fredis)
    watcher = BatchWatcher(client, ["b1"])  # type: ignore[arg-type]
    for _ in range(RESCAN_POLLS + 1):
        watcher.poll()
    assert client.scans == 2
