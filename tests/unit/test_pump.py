"""ChannelPump and CommitPoller with a fake clock, an in-memory Redis and a fake Snowflake.

The pump's loop (`run`) is driven a step at a time here, the way `run` calls them: `_open`,
`_send_some` (after `_wait_for_work` filled an empty buffer), `on_commit` and
`_check_commit_timeout`, and for a refusal the handler `run` calls. Time only moves when the
test moves the clock (spacing, linger and commit timeouts are on the pump's clock); the few real
waits are bounded by the spacing of a test (at most 50 ms).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import orjson
import pytest

from tests.support.clock import FakeClock
from tests.support.delivery import mark_settled
from tests.support.fake_redis import RedisClock
from worker.deadletter import DeadLetters
from worker.delivery import pump as pump_module
from worker.delivery.channels import ChannelRef
from worker.delivery.lease import LeaseTable
from worker.delivery.log import (
    ChannelLog,
    ChannelRefused,
    Logged,
    Piece,
    StateNotReplicatedError,
    StoreChanged,
)
from worker.delivery.offsets import EXPECT_SHARE, recent_latency
from worker.delivery.poller import CommitPoller
from worker.delivery.pump import ChannelPump, OpenRefused, PumpConfig, RequestRefused
from worker.snowpipe.errors import error_from_response

A = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_0")
B = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_1")
C = ChannelRef("DB", "PUBLIC", "P2", "snowpipe_0")
LEASE_TTL = 30.0


@dataclass
class Status:
    """The fields of a channel status the pump and the poller read."""

    channel_status_code: str = "SUCCESS"
    last_committed_offset_token: str | None = None
    rows_error_count: int = 0
    last_error_offset_upper_bound: str | None = None
    last_error_message: str | None = None


@dataclass
class Opened:
    continuation_token: str
    status: Status


@dataclass
class FakeSnowflake:
    """One channel's side of Snowflake: opens, appends (recorded), statuses; faults on demand."""

    status: Status = field(default_factory=Status)
    opens: int = 0
    appends: list[tuple[str, str | None, str, int]] = field(default_factory=list)
    refuse_rows_with: bytes | None = None  # an append whose body holds this is refused (400)
    refuse_open: Exception | None = None

    def open_channel(self, database: str, schema: str, pipe: str, channel: str, **_: Any) -> Opened:
        if self.refuse_open is not None:
            raise self.refuse_open
        self.opens += 1
        return Opened(f"ct{self.opens}.0", Status(**vars(self.status)))

    def append_rows(
        self, database: str, schema: str, pipe: str, channel: str, *, continuation_token: str,
        payload: Any, start_offset_token: str | None, end_offset_token: str,
    ) -> str:
        if self.refuse_rows_with is not None and self.refuse_rows_with in payload.body:
            raise error_from_response(400, '{"code":"ERR_ROW_TOO_BIG","message":"too big"}')
        self.appends.append(
            (continuation_token, start_offset_token, end_offset_token, payload.row_count)
        )
        return f"{continuation_token}+"

    def bulk_channel_status(
        self, database: str, schema: str, pipe: str, channel_names: Sequence[str]
    ) -> dict[str, Status]:
        return {name: Status(**vars(self.status)) for name in channel_names}

    def commit(self, offset: int) -> Status:
        self.status.last_committed_offset_token = str(offset)
        return Status(**vars(self.status))


class Stats:
    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def count(self, name: str, amount: int = 1) -> None:
        self.counts[name] += amount


def config(**kw: Any) -> PumpConfig:
    defaults: dict[str, Any] = {
        "compression": "none",
        "max_request_bytes": 4 * 1024 * 1024,
        "coalesce_max_bytes": 1024 * 1024,
        "requests_per_second": 1000.0,
        "bytes_per_second": 1e12,
        "countdown": lambda failures, exc: 0.0,
        "commit_timeout_seconds": 30.0,
        "linger_seconds": 0.0,
    }
    return PumpConfig(**{**defaults, **kw})


@dataclass
class Rig:
    pump: ChannelPump
    log: ChannelLog
    leases: LeaseTable
    snowflake: FakeSnowflake
    stats: Stats
    dead: DeadLetters
    clock: FakeClock

    def batch(self, batch_id: str, *ids: int, pieces: int = 1) -> Logged:
        """Log a batch of rows `ids` (split into `pieces` entries)."""
        rows = [orjson.dumps({"id": i, "batch": batch_id}) + b"\n" for i in ids]
        size = -(-len(rows) // pieces)
        parts = [rows[i : i + size] for i in range(0, len(rows), size)]
        mark_settled(self.log, A)
        result = self.log.append(A, batch_id, [Piece(len(p), b"".join(p)) for p in parts])
        assert isinstance(result, Logged)
        return result

    def send(self, *, later: float = 1.0) -> bool:
        """The loop's send step `later` seconds on (past the rate's spacing by default): fill an
        empty buffer (the tests call it when entries are waiting), then send."""
        self.clock.advance(later)
        if not self.pump.offsets.buffer:
            self.pump._wait_for_work()
        return self.pump._send_some()


@pytest.fixture
def make_rig(
    fredis: fakeredis.FakeRedis, clock: FakeClock
) -> Any:
    def make(**kw: Any) -> Rig:
        leases = LeaseTable(fredis, "n1@test", ttl_seconds=LEASE_TTL)
        lease = leases.acquire(A)
        assert lease is not None
        log = ChannelLog(fredis, dedup_ttl_seconds=3600)
        snowflake, stats, dead = FakeSnowflake(), Stats(), DeadLetters(fredis)
        pump = ChannelPump(
            lease, leases=leases, log=log, client=snowflake, config=config(**kw), stats=stats,
            dead_letters=dead, clock=clock,
        )
        return Rig(pump, log, leases, snowflake, stats, dead, clock)

    return make


@pytest.fixture
def rig(make_rig: Any) -> Rig:
    r: Rig = make_rig()
    return r


def test_open_resumes_after_snowflakes_committed_offset_and_trims_below_it(rig: Rig) -> None:
    first = rig.batch("b1", 1, 2, pieces=2)
    second = rig.batch("b2", 3)
    rig.snowflake.status.last_committed_offset_token = str(first.last)
    rig.pump._open()
    assert rig.pump.opened and rig.pump.committed == rig.pump.sent_upto == first.last
    assert [e.batch_id for e in rig.log.read(A, 0, 10)] == ["b2"]
    assert rig.send()
    assert rig.snowflake.appends == [("ct1.0", str(second.first), str(second.last), 1)]
    assert rig.stats.counts["channel_opens"] == 1


def test_consecutive_entries_go_out_in_one_request_and_a_commit_trims_them(rig: Rig) -> None:
    one, _, three = rig.batch("b1", 1, 2), rig.batch("b2", 3), rig.batch("b3", 4, 5, 6)
    rig.pump._open()
    assert rig.send()
    assert rig.snowflake.appends == [("ct1.0", str(one.first), str(three.last), 6)]
    assert rig.pump.in_flight == 1 and rig.pump.wants_status()
    rig.pump.on_commit(rig.snowflake.commit(three.last - 1))  # not all of it yet
    assert rig.pump.in_flight == 1
    rig.pump.on_commit(rig.snowflake.commit(three.last))
    assert rig.pump.in_flight == 0 and not rig.pump.wants_status()
    assert rig.log.read(A, 0, 10) == []
    assert rig.stats.counts["rows_committed"] == 6
    assert rig.stats.counts["entries_committed"] == 3


def test_requests_are_cut_at_the_coalescing_limit(make_rig: Any) -> None:
    rig: Rig = make_rig(coalesce_max_bytes=40)  # one 27-byte row per request
    for n in range(3):
        rig.batch(f"b{n}", n)
    rig.pump._open()
    for _ in range(3):
        assert rig.send()
    assert [a[3] for a in rig.snowflake.appends] == [1, 1, 1]
    # Each request continues the chain from the last answer.
    assert [a[0] for a in rig.snowflake.appends] == ["ct1.0", "ct1.0+", "ct1.0++"]


def test_appends_are_spaced_by_the_channel_rate_on_the_pumps_clock(make_rig: Any) -> None:
    rig: Rig = make_rig(requests_per_second=16.0, coalesce_max_bytes=40)  # 1/16 s apart
    rig.batch("b1", 1)
    rig.batch("b2", 2)
    rig.pump._open()
    assert rig.send()
    assert rig.send(later=0.046875)  # waits (for real) the 1/64 s left, and sends nothing
    assert len(rig.snowflake.appends) == 1
    assert rig.send(later=0.015625)
    assert len(rig.snowflake.appends) == 2


def test_the_first_batch_lingers_for_others_to_join_its_request(make_rig: Any) -> None:
    rig: Rig = make_rig(linger_seconds=0.05)
    rig.batch("b1", 1)
    rig.pump._open()
    rig.pump._wait_for_work()
    rig.batch("b2", 2)
    assert rig.send(later=0.0)  # still lingering: sends nothing
    assert rig.snowflake.appends == []
    assert rig.send(later=0.05)  # b2 joined meanwhile: read once, one request for both
    assert [a[3] for a in rig.snowflake.appends] == [2]


def test_a_status_that_is_not_success_reopens_and_replays_from_the_committed_offset(
    rig: Rig,
) -> None:
    one = rig.batch("b1", 1)
    rig.pump._open()
    assert rig.send()
    rig.pump.on_commit(Status(channel_status_code="ERR_CHANNEL_MUST_BE_REOPENED"))
    assert not rig.pump.opened
    rig.pump._open()
    assert rig.send()
    assert rig.snowflake.appends[-1] == ("ct2.0", str(one.first), str(one.last), 1)


def test_statuses_fetched_before_the_latest_open_are_ignored(rig: Rig) -> None:
    one = rig.batch("b1", 1)
    rig.pump._open()
    stale_epoch = rig.pump.epoch
    rig.pump._open()
    assert rig.send()
    rig.pump.on_status(rig.snowflake.commit(one.last), stale_epoch)
    rig.pump._take_status()
    assert rig.pump.in_flight == 1
    rig.pump.on_status(rig.snowflake.commit(one.last), rig.pump.epoch)
    rig.pump._take_status()
    assert rig.pump.in_flight == 0


def test_an_append_not_committed_within_the_commit_timeout_reopens(rig: Rig) -> None:
    rig.batch("b1", 1)
    rig.pump._open()
    assert rig.send()
    rig.clock.advance(29.9)
    rig.pump._check_commit_timeout()
    assert rig.pump.opened
    rig.clock.advance(0.1)
    rig.pump._check_commit_timeout()
    assert not rig.pump.opened
    assert rig.stats.counts["commit_timeouts"] == 1


def test_row_errors_dead_letter_the_batches_of_the_request_that_holds_the_bound(
    rig: Rig,
) -> None:
    rig.batch("b0", 0)
    rig.pump._open()
    assert rig.send()  # request 1: b0
    one, two = rig.batch("b1", 1), rig.batch("b2", 2)
    assert rig.send()  # request 2: b1 and b2
    rig.snowflake.status.rows_error_count = 1
    rig.snowflake.status.last_error_offset_upper_bound = str(one.first)
    rig.snowflake.status.last_error_message = "NULL result in a non-nullable column"
    rig.pump.on_commit(rig.snowflake.commit(two.last))
    letters = [s.letter for s in rig.dead.entries()]
    assert sorted(letter.batch_id for letter in letters) == ["b1", "b2"]
    assert {letter.kind for letter in letters} == {"row_errors"}
    assert all("non-nullable" in letter.reason for letter in letters)
    assert rig.log.held_windows(A) == []  # attributed: the held entries are gone
    rig.pump.on_commit(rig.snowflake.commit(two.last))  # the same count again: nothing new
    assert rig.dead.count() == 2


def test_row_errors_a_previous_owner_never_saw_are_attributed_by_the_next_one(
    make_rig: Any, fredis: fakeredis.FakeRedis, redis_clock: RedisClock
) -> None:
    rig: Rig = make_rig()
    rig.pump._open()
    one = rig.batch("b1", 1)
    assert rig.send()
    # The request commits with a row error, and the owner dies before it polls the status.
    rig.snowflake.status.rows_error_count = 1
    rig.snowflake.status.last_error_offset_upper_bound = str(one.last)
    rig.snowflake.commit(one.last)
    redis_clock.advance(LEASE_TTL + 1)
    leases = LeaseTable(fredis, "n2@test", ttl_seconds=LEASE_TTL)
    lease = leases.acquire(A)
    assert lease is not None
    successor = ChannelPump(
        lease, leases=leases, log=rig.log, client=rig.snowflake, config=config(),
        stats=rig.stats, clock=rig.clock,
    )  # fmt: skip
    successor._open()
    assert [s.letter.batch_id for s in rig.dead.entries()] == ["b1"]
    assert rig.log.read(A, 0, 10) == []


def test_a_refused_request_is_split_until_the_batch_at_fault_is_dead_lettered(
    rig: Rig,
) -> None:
    good = rig.batch("good", 1)
    bad = rig.batch("bad", 2, 3, pieces=2)
    after = rig.batch("after", 4)
    rig.snowflake.refuse_rows_with = b'"batch":"bad"'
    rig.pump._open()
    for _ in range(6):  # what run() does, turn by turn
        if not rig.pump.opened:
            rig.pump._open()
        try:
            if not rig.send():
                break
        except RequestRefused as exc:
            rig.pump._refused_request(exc, pump_module._log)
    letters = [s.letter for s in rig.dead.entries()]
    assert [letter.batch_id for letter in letters] == ["bad"]
    assert [r["id"] for r in letters[0].rows] == [2, 3]  # both pieces of the batch
    assert letters[0].detail["offsets"] == [bad.first, bad.last]
    # One entry per request while isolating; the batch is dead-lettered after the reopen that
    # follows its refusal, which replays from the committed offset (nothing committed here).
    sent = [(int(a[1] or 0), a[3]) for a in rig.snowflake.appends]
    assert sent == [(good.first, 1), (good.first, 1), (after.first, 1)]
    assert rig.stats.counts["dead_letter"] == 1


def test_with_replicas_a_new_session_waits_for_them_before_sending_under_the_stored_mark(
    make_rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by the model check. Checked to fail: without the barrier after the open, b1 goes
    # out under the stored mark with no WAIT; a failover to a replica without b1 (its task was
    # never acknowledged) then has the retried task log and commit it a second time.
    rig: Rig = make_rig(replicas=1)
    one = rig.batch("b1", 1)
    # An earlier pump raised the mark past b1 and died before its WAIT returned.
    rig.log.mark_sent(A, rig.pump.lease.value, one.last)
    waited: list[tuple[int, int]] = []
    real = rig.log.mark_sent

    def mark_sent(ref: ChannelRef, lease: str, offset: int, **kw: Any) -> int:
        waited.append((offset, kw.get("replicas", 0)))
        return real(ref, lease, offset)  # fakeredis has no WAIT: taken as acknowledged

    monkeypatch.setattr(rig.log, "mark_sent", mark_sent)
    rig.pump._open()
    rig.pump.step()  # the barrier first, then it reads and sends
    assert rig.send()
    assert waited and waited[0] == (one.last, 1)
    assert [a[1] for a in rig.snowflake.appends] == [str(one.first)]


def test_held_row_errors_are_attributed_when_the_refused_batchs_dead_letter_missed_its_replicas(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by the model check. Checked to fail: without `_held_left` set before the refusal
    # is handled in `_open`, the window waits for the next open, which may never come.
    rig.pump._open()
    one = rig.batch("b1", 1)
    assert rig.send()
    rig.snowflake.status.rows_error_count = 1
    rig.snowflake.status.last_error_offset_upper_bound = str(one.last)
    rig.snowflake.commit(one.last)  # the status is not polled: the next open sees it
    rig.batch("bad", 2)
    rig.snowflake.refuse_rows_with = b'"batch":"bad"'
    with pytest.raises(RequestRefused) as refused:
        rig.send()
    rig.pump._refused_request(refused.value, pump_module._log)
    real = rig.log.dead_letter

    def dead_letter_then_miss_the_replicas(*args: Any, **kwargs: Any) -> int:
        real(*args, **kwargs)
        raise StateNotReplicatedError("a dead letter reached 0 of 1 replicas")

    monkeypatch.setattr(rig.log, "dead_letter", dead_letter_then_miss_the_replicas)
    with pytest.raises(StateNotReplicatedError):
        rig.pump._open()  # the settle held b1's window; the refusal's WAIT failed
    assert rig.pump.opened
    rig.pump._unreplicated = True  # what run() does with the error
    rig.pump.step()
    assert [(s.letter.batch_id, s.letter.kind) for s in rig.dead.entries()] == [
        ("bad", "failed"), ("b1", "row_errors"),
    ]  # fmt: skip
    assert rig.log.held_windows(A) == []


def test_a_refused_open_dead_letters_only_what_no_pump_ever_sent(rig: Rig) -> None:
    rig.pump._open()
    sent = rig.batch("sent", 1)
    assert rig.send()  # accepted, not committed: it may still commit
    rig.batch("b1", 2)
    rig.batch("b2", 3, 4, pieces=2)
    rig.snowflake.refuse_open = error_from_response(
        404, '{"code":"ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED","message":"no such pipe"}'
    )
    rig.pump.stop(timeout=0)  # so the pause after the refusal returns at once
    with pytest.raises(OpenRefused) as refused:
        rig.pump._open()
    rig.pump._refused_open(refused.value.cause, pump_module._log)  # what run() does with it
    assert sorted(s.letter.batch_id for s in rig.dead.entries()) == ["b1", "b2"]
    assert [e.offset for e in rig.log.read(A, 0, 10)] == [sent.first]
    # New batches for the channel are refused with the reason until an open succeeds.
    result = rig.log.append(A, "b3", [Piece(1, b'{"id":5}\n')])
    assert isinstance(result, ChannelRefused) and "no such pipe" in result.reason


def test_an_open_that_straddles_a_store_restart_is_not_settled_but_opened_again(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by the model check. Checked to fail: a settle that ignores the incarnation seen
    # before the lease check takes a committed offset from an open that another pump's later
    # open superseded (a store that came back older handed this pump its old lease back); new
    # offsets then sit under what that pump still appends and commits, and are trimmed unsent.
    rig.batch("b1", 1)
    real = rig.log.incarnation
    monkeypatch.setattr(rig.log, "incarnation", lambda: "an-older-run:replid")
    with pytest.raises(StoreChanged):
        rig.pump._open()  # the lease check saw the old incarnation; the settle the new one
    assert not rig.pump.opened
    monkeypatch.setattr(rig.log, "incarnation", real)
    rig.pump._open()
    assert rig.pump.opened and rig.snowflake.opens == 2


def test_a_pump_whose_lease_was_taken_stops_without_opening(
    rig: Rig, fredis: fakeredis.FakeRedis, redis_clock: RedisClock
) -> None:
    redis_clock.advance(LEASE_TTL + 1)  # the node paused past its TTL
    assert LeaseTable(fredis, "n2@test", ttl_seconds=LEASE_TTL).acquire(A) is not None
    rig.pump.run()  # returns at once
    assert rig.pump.lost
    assert rig.snowflake.opens == 0


# --- CommitPoller ---------------------------------------------------------------------------------


class Waiting:
    """What the poller sees of a pump."""

    def __init__(
        self, ref: ChannelRef, *, committed: int = 0, wants: bool = True, expected_in: float = 0.0,
        latency: float = 0.0,
    ) -> None:  # fmt: skip
        self.ref, self.committed, self.wants, self.epoch = ref, committed, wants, 7
        self.expected_in = expected_in
        self.latency = latency
        self.got: list[tuple[Status, int]] = []

    def wants_status(self) -> bool:
        return self.wants

    def commit_expected_in(self) -> float:
        return self.expected_in

    def commit_latency(self) -> float:
        return self.latency

    def on_status(self, status: Status, epoch: int) -> None:
        self.got.append((status, epoch))


class Bulk:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.committed: dict[str, str] = {}
        self.fail: Exception | None = None

    def bulk_channel_status(
        self, database: str, schema: str, pipe: str, names: Sequence[str]
    ) -> dict[str, Status]:
        self.calls.append((pipe, list(names)))
        if self.fail is not None:
            raise self.fail
        return {n: Status(last_committed_offset_token=self.committed.get(n)) for n in names}


def poller(pumps: list[Waiting], bulk: Bulk, clock: FakeClock) -> CommitPoller:
    return CommitPoller(
        bulk, lambda: pumps, poll_seconds=0.125, max_poll_seconds=1.0, clock=clock  # type: ignore[arg-type]
    )


def test_one_bulk_status_per_pipe_for_the_channels_that_wait(clock: FakeClock) -> None:
    pumps = [Waiting(A), Waiting(B), Waiting(C), Waiting(ChannelRef("DB", "PUBLIC", "P1", "x"),
                                                         wants=False)]
    bulk = Bulk()
    poller(pumps, bulk, clock).poll_once()
    assert sorted(bulk.calls) == [("P1", ["snowpipe_0", "snowpipe_1"]), ("P2", ["snowpipe_0"])]
    assert [epoch for p in pumps[:3] for _, epoch in p.got] == [7, 7, 7]
    assert pumps[3].got == []


def test_a_pipe_whose_commits_do_not_move_is_polled_less_often_up_to_the_maximum(
    clock: FakeClock,
) -> None:
    pumps, bulk = [Waiting(A, committed=5)], Bulk()
    p = poller(pumps, bulk, clock)
    polled_at = []
    for _ in range(32):  # 4 s in steps of 1/8 s (exact in binary)
        before = len(bulk.calls)
        p.poll_once(scheduled=True)
        if len(bulk.calls) > before:
            polled_at.append(clock())
        clock.advance(0.125)
    # Intervals 1/8, 1/4, 1/2, then the maximum of 1 s.
    assert polled_at == [0.0, 0.125, 0.375, 0.875, 1.875, 2.875, 3.875]
    bulk.committed["snowpipe_0"] = "6"  # a commit: back to every 1/8 s
    clock.advance(1.0)
    p.poll_once(scheduled=True)
    clock.advance(0.125)
    p.poll_once(scheduled=True)
    assert len(bulk.calls) == len(polled_at) + 2


def test_an_unscheduled_poll_asks_at_once_and_a_failed_poll_is_only_logged(
    clock: FakeClock,
) -> None:
    pumps, bulk = [Waiting(A)], Bulk()
    p = poller(pumps, bulk, clock)
    p.poll_once(scheduled=True)
    p.poll_once()  # not due yet, asked anyway
    assert len(bulk.calls) == 2
    bulk.fail = ConnectionError("down")
    p.poll_once()
    assert len(pumps[0].got) == 2


def test_a_pipe_with_a_long_commit_latency_is_polled_by_a_tenth_of_it(clock: FakeClock) -> None:
    """At a 6 s latency a pipe is polled every 0.6 s while commits advance (at 1 s, as without
    a latency: every 1/8 s); while they do not, at most every second either way."""
    for latency, moving, idle in ((6.0, 0.625, 1.0), (1.0, 0.125, 1.0)):
        pumps, bulk = [Waiting(A, committed=5, latency=latency)], Bulk()
        p = poller(pumps, bulk, clock)
        polled_at = []
        start = clock()
        for _ in range(80):  # 10 s in steps of 1/8 s; a commit at every poll of the first 2 s
            before = len(bulk.calls)
            p.poll_once(scheduled=True)
            if len(bulk.calls) > before:
                polled_at.append(clock() - start)
                pumps[0].committed = int(bulk.committed.get("snowpipe_0") or 5)  # confirmed
                if clock() - start < 2.0:
                    bulk.committed["snowpipe_0"] = str(pumps[0].committed + 1)
            clock.advance(0.125)
        gaps = [b - a for a, b in itertools.pairwise(polled_at)]
        assert min(gaps) == pytest.approx(moving), latency
        assert max(gaps) == pytest.approx(idle), latency


def test_a_pipe_whose_channels_expect_no_commit_yet_is_not_polled(clock: FakeClock) -> None:
    early = [Waiting(A, expected_in=2.0), Waiting(B, expected_in=3.0)]
    due = [Waiting(C)]
    bulk = Bulk()
    poller([*early, *due], bulk, clock).poll_once(scheduled=True)
    assert [pipe for pipe, _ in bulk.calls] == ["P2"]


def test_one_channel_expecting_a_commit_gets_its_pipe_polled_for_all_that_wait(
    clock: FakeClock,
) -> None:
    bulk = Bulk()
    poller([Waiting(A, expected_in=2.0), Waiting(B)], bulk, clock).poll_once(scheduled=True)
    assert bulk.calls == [("P1", ["snowpipe_0", "snowpipe_1"])]


def test_an_unscheduled_poll_ignores_the_expectation(clock: FakeClock) -> None:
    bulk = Bulk()
    poller([Waiting(A, expected_in=4.0)], bulk, clock).poll_once()
    assert len(bulk.calls) == 1


def test_a_pump_expects_its_next_commit_after_most_of_the_latency_it_has_seen(rig: Rig) -> None:
    rig.pump._open()
    one = rig.batch("b1", 1)
    assert rig.send()
    assert rig.pump.commit_expected_in() == 0.0  # no latency seen yet: any moment
    rig.clock.advance(6.0)
    rig.pump.on_commit(rig.snowflake.commit(one.last))  # 6 s: the first latency, as seen
    two = rig.batch("b2", 2)
    assert rig.send(later=0.0)
    assert rig.pump.commit_expected_in() == pytest.approx(EXPECT_SHARE * 6.0)
    rig.clock.advance(EXPECT_SHARE * 6.0)
    assert rig.pump.commit_expected_in() == 0.0  # due: the poller asks
    rig.pump.on_commit(rig.snowflake.commit(two.last))
    assert rig.pump.commit_expected_in() == 0.0  # nothing in flight


def test_the_recent_latency_falls_at_once_and_rises_by_a_tenth() -> None:
    assert recent_latency(0.0, 6.0) == 6.0  # the first is taken as seen
    assert recent_latency(6.0, 5.0) == 5.0
    assert recent_latency(5.0, 15.0) == pytest.approx(6.0)


# --- Round trips (issue 18) -------------------------------------------------------------------


def test_a_pump_reads_the_log_only_when_it_builds_a_request(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No read before a rate wait (nothing to decide yet); the one before a request tops the
    buffer up with what was logged meanwhile."""
    rig.pump._config = config(requests_per_second=1.0)
    rig.pump._open()
    rig.batch("b1", 1)
    assert rig.send()  # the first request
    rig.batch("b2", 2)
    rig.pump._wait_for_work()  # b2 read into the buffer
    rig.batch("b3", 3)
    reads: list[int] = []
    real_read = rig.log.read
    monkeypatch.setattr(rig.log, "read", lambda *a: reads.append(1) or real_read(*a))
    monkeypatch.setattr(rig.pump._wake, "wait", lambda timeout=None: True)
    assert rig.pump._send_some()  # held back by the rate: waits, reads nothing
    assert reads == [] and len(rig.snowflake.appends) == 1
    rig.clock.advance(1.0)
    assert rig.pump._send_some()  # due: one read, and b2 and b3 go out together
    assert reads == [1]
    assert rig.snowflake.appends[-1][3] == 2


def test_a_pump_waiting_for_a_commit_blocks_until_it_is_expected(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks: list[int] = []
    monkeypatch.setattr(rig.log, "wait", lambda _r, _a, _c, block: blocks.append(block) or [])
    rig.pump._open()
    rig.pump._wait_for_work()
    assert blocks[-1] == pump_module.IDLE_BLOCK_MS  # nothing in flight: idle
    rig.batch("b1", 1)
    rig.pump._extend(rig.log.read(A, 0, 10))
    assert rig.pump._send_some()  # in flight now
    rig.pump._wait_for_work()
    assert blocks[-1] == pump_module.WAIT_BLOCK_MS  # no latency seen yet: a commit any moment
    rig.pump.offsets.latency = 6.0  # commits take 6 s here: not expected for 5.4 s
    rig.pump._wait_for_work()
    assert blocks[-1] == pump_module.IDLE_BLOCK_MS
    rig.clock.advance(5.0)  # expected in 0.4 s
    rig.pump._wait_for_work()
    assert blocks[-1] == 400
    rig.clock.advance(1.0)  # due
    rig.pump._wait_for_work()
    assert blocks[-1] == pump_module.WAIT_BLOCK_MS


def test_a_lingering_pump_reads_the_log_once_for_its_request(
    make_rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig: Rig = make_rig(linger_seconds=1.0)
    rig.pump._open()
    rig.batch("b1", 1)
    rig.pump._wait_for_work()  # b1 starts a request: it lingers
    calls: list[str] = []
    real_read, real_wait = rig.log.read, rig.log.wait
    monkeypatch.setattr(rig.log, "read", lambda *a: calls.append("read") or real_read(*a))
    monkeypatch.setattr(rig.log, "wait", lambda *a: calls.append("wait") or real_wait(*a))
    monkeypatch.setattr(rig.pump._wake, "wait", lambda timeout=None: True)
    for i in range(2, 6):  # four more batches join while it lingers
        rig.batch(f"b{i}", i)
        assert rig.send(later=0.2)
    assert rig.snowflake.appends == [] and calls == []
    assert rig.send(later=0.2)  # the linger is over: one read, one request of five
    assert calls == ["read"]
    assert [a[3] for a in rig.snowflake.appends] == [5]
