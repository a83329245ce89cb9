"""LeaseTable on an in-memory Redis with a clock the test moves: one holder per channel,
fencing generations, renewal inside the TTL, expiry, and the live-node registry."""

from __future__ import annotations

import fakeredis
import pytest

from tests.support.fake_redis import RedisClock
from worker.delivery.channels import NODES_KEY, ChannelRef
from worker.delivery.lease import Lease, LeaseTable, holder

A = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_0")
B = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_1")
TTL = 10.0


@pytest.fixture
def n1(fredis: fakeredis.FakeRedis) -> LeaseTable:
    return LeaseTable(fredis, "n1@test", ttl_seconds=TTL)


@pytest.fixture
def n2(fredis: fakeredis.FakeRedis) -> LeaseTable:
    return LeaseTable(fredis, "n2@test", ttl_seconds=TTL)


def take(table: LeaseTable, ref: ChannelRef = A) -> Lease:
    lease = table.acquire(ref)
    assert lease is not None, f"{table.node} could not take {ref}"
    return lease


def test_a_lease_has_one_holder_and_names_it(n1: LeaseTable, n2: LeaseTable) -> None:
    mine = take(n1)
    assert n2.acquire(A) is None
    assert holder(mine.value) == "n1@test" and holder(None) is None
    assert n2.holders([A, B]) == ["n1@test", None]
    assert n2.holders([]) == []


def test_the_lease_lasts_one_ttl_on_the_redis_clock_and_a_renewal_restarts_it(
    n1: LeaseTable, n2: LeaseTable, fredis: fakeredis.FakeRedis, redis_clock: RedisClock
) -> None:
    mine = take(n1)
    assert 0 < fredis.pttl("snowpipe:lease:" + A.key) <= TTL * 1000
    redis_clock.advance(TTL * 0.8)
    assert n1.renew([mine]) == [True]
    redis_clock.advance(TTL * 0.8)  # 1.6 TTL after the acquisition, 0.8 after the renewal
    assert n1.holds(mine)
    assert n2.acquire(A) is None
    redis_clock.advance(TTL * 0.3)  # past the renewed TTL: expired
    assert not n1.holds(mine)
    assert n1.renew([mine]) == [False]


def test_every_acquisition_gets_a_higher_generation_and_the_old_value_is_fenced_off(
    n1: LeaseTable, n2: LeaseTable, redis_clock: RedisClock
) -> None:
    first = take(n1)
    redis_clock.advance(TTL + 1)  # n1 paused past its TTL
    second = take(n2)
    assert second.generation == first.generation + 1
    assert not n1.holds(first)
    n1.release(first)  # not n1's any more: a no-op
    assert n2.holds(second)
    n2.release(second)
    third = take(n1)
    assert third.generation == second.generation + 1
    assert third.value != first.value  # a fresh token too


def test_renew_answers_per_lease(n1: LeaseTable, n2: LeaseTable) -> None:
    a, b = take(n1, A), take(n1, B)
    n1.release(b)
    assert n1.renew([a, b]) == [True, False]
    assert n1.renew([]) == []


def test_node_names_with_a_tab_are_refused(fredis: fakeredis.FakeRedis) -> None:
    with pytest.raises(ValueError, match="tab"):
        LeaseTable(fredis, "bad\tname", ttl_seconds=TTL)


def test_heartbeats_list_live_nodes_until_their_ttl_passes_or_they_leave(
    n1: LeaseTable, n2: LeaseTable, fredis: fakeredis.FakeRedis, redis_clock: RedisClock
) -> None:
    assert n2.heartbeat() == ["n2@test"]
    assert n1.heartbeat() == ["n1@test", "n2@test"]
    redis_clock.advance(TTL * 0.6)
    assert n1.heartbeat() == ["n1@test", "n2@test"]
    redis_clock.advance(TTL * 0.6)  # n2 silent for 1.2 TTL: gone, and removed from the set
    assert n1.heartbeat() == ["n1@test"]
    assert fredis.zrange(NODES_KEY, 0, -1) == [b"n1@test"]
    n2.heartbeat()
    n2.leave()
    assert n1.heartbeat() == ["n1@test"]
