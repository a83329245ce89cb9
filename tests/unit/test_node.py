"""The node's Balancer (fair shares of channel leases) and BufferedCounters, on an in-memory
Redis whose clock the test moves: nodes join, leave, die and lose leases without any waiting.

The balancer is driven one `tick()` at a time over stand-in nodes (`Nodelet`) that hold the
real ChannelLog and LeaseTable and record the pumps they would run.
"""

from __future__ import annotations

import collections
from types import SimpleNamespace

import fakeredis
import orjson
import pytest

from tests.support.delivery import mark_settled
from tests.support.fake_redis import RedisClock
from worker.delivery.channels import STATS_KEY, ChannelRef
from worker.delivery.lease import Lease, LeaseTable
from worker.delivery.log import ChannelLog, Piece
from worker.delivery.node import MAX_TICK_SECONDS, Balancer, target_share
from worker.delivery.stats import BufferedCounters

TTL = 9.0


def channel(n: int) -> ChannelRef:
    return ChannelRef("DB", "PUBLIC", "P1", f"snowpipe_{n}")


class Pumplet:
    """What the balancer sees of a pump."""

    def __init__(self, lease: Lease) -> None:
        self.lease, self.ref = lease, lease.ref
        self.lost, self.alive = False, True
        self.incarnations: list[str] = []

    def store_changed(self, incarnation: str) -> None:
        self.incarnations.append(incarnation)


class Nodelet:
    """A node as the Balancer uses it: real log, leases and counters; pumps only recorded."""

    def __init__(self, client: fakeredis.FakeRedis, name: str) -> None:
        self.name = name
        self.settings = SimpleNamespace(lease_ttl_seconds=TTL)
        self.log = ChannelLog(client, dedup_ttl_seconds=3600)
        self.leases = LeaseTable(client, name, ttl_seconds=TTL)
        self.stats = BufferedCounters(client)
        self.sample_depths = False
        self.depths: dict[ChannelRef, object] = {}
        self.live_nodes = 0
        self.running: dict[ChannelRef, Pumplet] = {}
        self.dropped: list[tuple[ChannelRef, bool]] = []
        self.balancer = Balancer(self)  # type: ignore[arg-type]

    def pumps(self) -> list[Pumplet]:
        return list(self.running.values())

    def held(self) -> list[Lease]:
        return [p.lease for p in self.running.values()]

    def run_pump(self, lease: Lease) -> None:
        self.running[lease.ref] = Pumplet(lease)

    def drop_pump(self, ref: ChannelRef, *, release: bool) -> None:
        pump = self.running.pop(ref)
        self.dropped.append((ref, release))
        if release:
            self.leases.release(pump.lease)

    def channels(self) -> set[ChannelRef]:
        return set(self.running)


@pytest.fixture
def nodes(fredis: fakeredis.FakeRedis) -> dict[str, Nodelet]:
    return {name: Nodelet(fredis, f"{name}@host") for name in ("a", "b", "c")}


def log_channels(log: ChannelLog, count: int, *, entries: dict[int, int] | None = None) -> None:
    """Give `count` channels a log (so they exist), with `entries[n]` entries on channel n."""
    for n in range(count):
        mark_settled(log, channel(n))
        for i in range((entries or {}).get(n, 1)):
            log.append(channel(n), f"b{n}-{i}", [Piece(1, orjson.dumps({"n": n}) + b"\n")])


def tick(*nodes: Nodelet) -> None:
    for node in nodes:
        node.balancer.tick()


def assert_each_channel_held_once(nodes: list[Nodelet], total: int) -> None:
    held = [ref for node in nodes for ref in node.channels()]
    assert sorted(held) == sorted(channel(n) for n in range(total))


@pytest.mark.parametrize(
    ("channels", "live"), [(40, 1), (40, 2), (40, 3), (7, 4), (3, 5), (0, 2)]
)
def test_target_shares_add_up_and_differ_by_at_most_one(channels: int, live: int) -> None:
    names = [f"n{i}@h" for i in range(live)]
    shares = [target_share(node, names, channels) for node in names]
    assert sum(shares) == channels
    assert max(shares) - min(shares) <= 1


def test_a_node_missing_from_the_live_list_counts_itself() -> None:
    assert target_share("z@h", ["a@h"], 4) == 2


def test_the_tick_is_a_third_of_the_lease_ttl_at_most_three_seconds(
    nodes: dict[str, Nodelet], fredis: fakeredis.FakeRedis
) -> None:
    assert nodes["a"].balancer.tick_seconds == TTL / 3
    slow = Nodelet(fredis, "slow@host")
    slow.settings.lease_ttl_seconds = 60.0
    assert Balancer(slow).tick_seconds == MAX_TICK_SECONDS  # type: ignore[arg-type]


def test_two_nodes_share_the_channels_and_a_third_takes_its_share_from_them(
    nodes: dict[str, Nodelet],
) -> None:
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    log_channels(a.log, 5)
    tick(a, b)  # a was alone at its first tick: it took all five
    tick(a, b)  # a sees b: releases two; b takes them
    assert (len(a.channels()), len(b.channels())) == (3, 2)
    assert not a.channels() & b.channels()
    tick(c, a, b, c)
    assert sorted(len(n.channels()) for n in (a, b, c)) == [1, 2, 2]
    assert_each_channel_held_once([a, b, c], 5)
    assert a.live_nodes == 3


def test_a_node_that_leaves_hands_its_channels_over_at_the_next_tick(
    nodes: dict[str, Nodelet],
) -> None:
    a, b = nodes["a"], nodes["b"]
    log_channels(a.log, 4)
    tick(a, b, a, b)
    for ref in list(b.channels()):
        b.drop_pump(ref, release=True)
    b.leases.leave()
    tick(a)
    assert len(a.channels()) == 4


def test_a_dead_nodes_channels_are_taken_once_its_leases_expire(
    nodes: dict[str, Nodelet], redis_clock: RedisClock
) -> None:
    a, b = nodes["a"], nodes["b"]
    log_channels(a.log, 4)
    tick(a, b, a, b)
    assert len(a.channels()) == 2
    # b stops ticking (killed). Within one TTL nothing moves: its leases still hold.
    redis_clock.advance(TTL * 0.5)
    tick(a)
    assert len(a.channels()) == 2
    redis_clock.advance(TTL * 0.6)  # past b's last renewal + TTL, and its heartbeat's
    tick(a)
    assert len(a.channels()) == 4
    assert a.live_nodes == 1


def test_a_lost_or_dead_pump_is_dropped_and_its_channel_leased_again(
    nodes: dict[str, Nodelet],
) -> None:
    a = nodes["a"]
    log_channels(a.log, 2)
    tick(a)
    first = a.running[channel(0)].lease
    a.running[channel(0)].lost = True
    a.running[channel(1)].alive = False
    tick(a)
    assert (channel(0), True) in a.dropped and (channel(1), True) in a.dropped
    assert a.running[channel(0)].lease.generation == first.generation + 1


def test_a_lease_that_could_not_be_renewed_stops_its_pump_without_a_release(
    nodes: dict[str, Nodelet], fredis: fakeredis.FakeRedis
) -> None:
    a, b = nodes["a"], nodes["b"]
    log_channels(a.log, 1)
    tick(a)
    fredis.delete("snowpipe:lease:" + channel(0).key)  # expired while a was paused
    stolen = b.leases.acquire(channel(0))
    assert stolen is not None
    tick(a)
    assert a.dropped == [(channel(0), False)]
    assert b.leases.holds(stolen)  # a did not release b's lease


def test_above_its_share_a_node_gives_up_the_channels_with_the_least_waiting(
    nodes: dict[str, Nodelet],
) -> None:
    a, b = nodes["a"], nodes["b"]
    log_channels(a.log, 4, entries={0: 5, 1: 1, 2: 4, 3: 2})
    tick(a)
    b.leases.heartbeat()  # b is live before a's next tick
    tick(a)
    assert a.channels() == {channel(0), channel(2)}


def test_a_tick_flushes_the_counters_and_samples_depths_when_metrics_are_on(
    nodes: dict[str, Nodelet], fredis: fakeredis.FakeRedis
) -> None:
    a = nodes["a"]
    a.sample_depths = True
    log_channels(a.log, 2, entries={0: 3})
    a.stats.count("appends", 2)
    tick(a)
    assert fredis.hget(STATS_KEY, "appends") == b"2"
    assert {ref: d.entries for ref, d in a.depths.items()} == {channel(0): 3, channel(1): 1}  # type: ignore[attr-defined]


# --- BufferedCounters -----------------------------------------------------------------------------


def test_counters_stay_in_memory_until_a_flush_writes_them_in_one_round_trip(
    fredis: fakeredis.FakeRedis,
) -> None:
    counters = BufferedCounters(fredis)
    counters.count("appends")
    counters.count("appends", 4)
    counters.count("rows_committed", 10)
    assert fredis.hgetall(STATS_KEY) == {}
    counters.flush()
    counters.flush()  # nothing pending: no write
    stored = {k.decode(): int(v) for k, v in fredis.hgetall(STATS_KEY).items()}
    assert stored == {"appends": 5, "rows_committed": 10}


def test_counts_a_failed_flush_could_not_write_are_kept_for_the_next(
    fredis: fakeredis.FakeRedis,
) -> None:
    server = fredis.connection_pool.connection_kwargs["server"]
    counters = BufferedCounters(fredis)
    counters.count("appends", 3)
    server.connected = False  # the state Redis is down
    counters.flush()  # swallowed: the pump must not fail on its counters
    counters.count("appends", 1)
    server.connected = True
    counters.flush()
    assert collections.Counter(
        {k.decode(): int(v) for k, v in fredis.hgetall(STATS_KEY).items()}
    ) == {"appends": 4}
