"""The node: the pump side of one worker node, wired at start (the composition root).

`Node(settings, name)` builds everything the node's main process needs to deliver channel logs:
the state Redis, the channel logs, the lease table, one SnowpipeClient (one TokenGuard), the
error-table attribution, the commit poller and, for every channel it holds a lease on, a
`ChannelPump`. The Celery layer starts it (`worker.bootsteps.PumpStep`, a bootstep in the
worker's main process, the same under prefork and threads, after the pool) and stops it on
shutdown (pumps stop, leases are released, the node unregisters, so the other nodes take its
channels over at once). Nothing here imports Celery or the per-process runtime of tasks.

The `Balancer` thread keeps the node's share of the channels: on every tick (a third of the
lease TTL, at most 3 s) it registers the node as live, renews its leases (a pump whose lease was
not renewed stops), and compares what it holds with its target: with T channels and L live
nodes sorted by name, the node ranked r holds T // L channels, plus one if r < T % L, so shares
differ by at most one. Above its target it releases the channels with the least in their logs;
below it, it takes free ones (in an order of its own, so two nodes rarely race for the same).
A node that died stops renewing: its leases expire after one TTL and the others take them.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis

from worker.deadletter import DeadLetters
from worker.delivery.channels import ChannelRef
from worker.delivery.lease import Lease, LeaseTable
from worker.delivery.log import ChannelLog, Depth
from worker.delivery.poller import CommitPoller
from worker.delivery.pump import ChannelPump, PumpConfig
from worker.delivery.stats import BufferedCounters
from worker.observability import get_logger, record_lease_event
from worker.rejections import ErrorTableAttribution
from worker.retry import RetryPolicy
from worker.settings import Settings
from worker.snowpipe.client import SnowpipeClient
from worker.statestore import state_redis
from worker.tokenstore import token_hooks

MAX_TICK_SECONDS = 3.0
PUMP_STOP_SECONDS = 10.0

_log = get_logger("worker.delivery.node")


class Node:
    """The node's delivery machinery (see the module docstring)."""

    def __init__(self, settings: Settings, name: str, *, client: Any = None) -> None:
        self.settings = settings
        self.name = name
        self.redis = state_redis(settings)
        self.log = ChannelLog(self.redis, dedup_ttl_seconds=settings.dedup_ttl_seconds)
        self.leases = LeaseTable(self.redis, name, ttl_seconds=settings.lease_ttl_seconds)
        self.dead_letters = DeadLetters(self.redis)
        self.stats = BufferedCounters(self.redis)
        if client is None:
            store = token_hooks(self.redis, settings)
            client = SnowpipeClient.from_settings(
                settings, adopt=store.adopt, publish=store.publish
            )
        self.client = client
        # Rows Snowflake rejects, to the row, from its error tables (None: off, or a client
        # without the SQL API, as in some tests): the pumps attribute coarsely then.
        self.exact_row_errors: Any = None
        if hasattr(client, "sql"):
            self.exact_row_errors = ErrorTableAttribution.from_settings(settings, client)
        policy = RetryPolicy.from_settings(settings)
        self.config = PumpConfig(
            compression=settings.compression,
            max_request_bytes=settings.max_request_bytes,
            coalesce_max_bytes=settings.coalesce_max_bytes,
            requests_per_second=settings.channel_requests_per_second,
            bytes_per_second=settings.channel_bytes_per_second,
            commit_timeout_seconds=settings.commit_timeout_seconds,
            linger_seconds=settings.append_linger_seconds,
            countdown=policy.countdown,
            replicas=settings.state_min_replicas,
            replica_timeout_ms=settings.state_replica_timeout_ms,
        )
        self._lock = threading.Lock()
        self._pumps: dict[ChannelRef, ChannelPump] = {}
        self.poller = CommitPoller(
            self.client, self.pumps, poll_seconds=settings.commit_poll_seconds
        )
        self.balancer = Balancer(self)
        # For the metrics endpoint (worker/metrics.py): sampled on the balancer's tick.
        self.sample_depths = settings.metrics_port > 0
        self.depths: dict[ChannelRef, Depth] = {}
        self.live_nodes = 0

    def pumps(self) -> list[ChannelPump]:
        """The pumps running now."""
        with self._lock:
            return list(self._pumps.values())

    def held(self) -> list[Lease]:
        """The leases this node holds."""
        with self._lock:
            return [pump.lease for pump in self._pumps.values()]

    def start(self) -> None:
        """Check the state store, then start balancing and polling."""
        check_persistence(self.redis)
        check_incarnation(self.log)
        self.poller.start()
        self.balancer.start()
        _log.info("node.started", node=self.name, channels_per_pipe=self.settings.channels_per_pipe)

    def stop(self) -> None:
        """Stop the pumps, give the leases back, leave (the others take over at once)."""
        self.balancer.stop()
        pumps = self.pumps()
        for pump in pumps:
            pump.stop(timeout=0)
        for pump in pumps:
            pump.stop(timeout=PUMP_STOP_SECONDS)
            with contextlib.suppress(redis.RedisError):
                self.leases.release(pump.lease)
        with self._lock:
            self._pumps.clear()
        self.poller.stop()
        self.stats.flush()
        with contextlib.suppress(redis.RedisError):
            self.leases.leave()
        _log.info("node.stopped", node=self.name)

    # --- Used by the balancer -------------------------------------------------------------------

    def run_pump(self, lease: Lease) -> None:
        """Start pumping a channel we just leased."""
        pump = ChannelPump(
            lease,
            leases=self.leases,
            log=self.log,
            client=self.client,
            config=self.config,
            stats=self.stats,
            dead_letters=self.dead_letters,
            exact_row_errors=self.exact_row_errors,
        )
        with self._lock:
            self._pumps[lease.ref] = pump
        pump.start()
        record_lease_event("acquired")
        _log.info("lease.acquired", channel=str(lease.ref), node=self.name, lease=lease.generation)

    def drop_pump(self, ref: ChannelRef, *, release: bool) -> None:
        """Stop pumping a channel (its lease was lost, or we give it up)."""
        with self._lock:
            pump = self._pumps.pop(ref, None)
        if pump is None:
            return
        pump.stop(timeout=PUMP_STOP_SECONDS)
        if release:
            self.leases.release(pump.lease)
            record_lease_event("released")
            _log.info("lease.released", channel=str(ref), node=self.name)
        else:
            record_lease_event("lost")
            _log.info("lease.lost", channel=str(ref), node=self.name)


def check_persistence(client: redis.Redis) -> None:
    """Warn at start when the state Redis keeps nothing on disk, or may lose its last second."""
    try:
        config = client.config_get("appendonly") | client.config_get("appendfsync")
        config |= client.config_get("save")
    except redis.exceptions.ResponseError as exc:
        if "unknown command" in str(exc).lower():
            # The embedded store of the local stack (fakeredis): in memory by design.
            _log.info("state.persistence.embedded", detail="the local stack's embedded store "
                      "keeps nothing on disk (for local runs only)")  # fmt: skip
            return
        _log.warning(
            "state.persistence.unknown",
            detail=f"CONFIG GET is not allowed ({exc}); make sure the state Redis uses AOF",
        )
        return
    except redis.RedisError as exc:
        _log.warning(
            "state.persistence.unknown",
            detail=f"CONFIG GET is not allowed ({exc}); make sure the state Redis uses AOF",
        )
        return
    appendonly = str(config.get("appendonly", "")).lower()
    fsync = str(config.get("appendfsync", "")).lower()
    save = str(config.get("save", "")).strip()
    if appendonly != "yes" and not save:
        _log.error(
            "state.persistence.none",
            detail=(
                "the state Redis keeps nothing on disk: acknowledged batches waiting in the "
                "channel logs are lost if it restarts; run it with appendonly yes and "
                "appendfsync always (see README, Production deployment)"
            ),
        )
    elif appendonly != "yes":
        _log.warning(
            "state.persistence.snapshots_only",
            detail="RDB snapshots only: a restart loses what was logged since the last one; "
            "use appendonly yes",
        )
    elif fsync != "always":
        _log.warning(
            "state.persistence.everysec",
            detail=f"appendfsync {fsync}: a crash of the state Redis may lose about the last "
            "second of acknowledged batches; appendfsync always closes that window",
        )


def check_incarnation(log: ChannelLog) -> bool:
    """Whether the state store tells scripts its incarnation (an error when a Redis refuses the
    worker's scripts INFO: its restarts then look alike and the settle gate cannot close after
    one). The embedded store of the local stack has no INFO and keeps nothing: no error."""
    if log.incarnation() != "-":
        return True
    try:
        log.redis.info("server")
    except redis.exceptions.NoPermissionError:
        _log.error(
            "state.incarnation.unavailable",
            detail="the state Redis refuses INFO to the worker's user: grant it (+info) so that "
            "a restart or failover of the store is seen by the delivery core (docs/delivery.md)",
        )
        return False
    except redis.RedisError:
        return True  # no INFO at all: the embedded store (fakeredis), which keeps nothing
    _log.error(
        "state.incarnation.unavailable",
        detail="the state Redis answers INFO but not inside scripts: the delivery core cannot "
        "see its restarts; use Redis 6.2 or newer",
    )
    return False


def _rank(node: str, ref: ChannelRef) -> bytes:
    """A node's own order over channels (so that nodes race for different free ones first)."""
    return hashlib.blake2b(f"{node}|{ref.key}".encode(), digest_size=8).digest()


def target_share(node: str, live: Sequence[str], channels: int) -> int:
    """How many of `channels` the node should hold among the `live` nodes (shares differ by 1)."""
    nodes = sorted(set(live) | {node})
    base, extra = divmod(channels, len(nodes))
    return base + (1 if nodes.index(node) < extra else 0)


class Balancer:
    """Keeps the node's fair share of channel leases (see the module docstring)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.tick_seconds = min(MAX_TICK_SECONDS, node.settings.lease_ttl_seconds / 3)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # When the loop last went round (monotonic): the heartbeat's proof that it is not stuck.
        self.progress = time.monotonic()

    def start(self) -> None:
        """Balance in a thread of its own (first tick at once)."""
        self._thread = threading.Thread(target=self._run, name="lease balancer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop balancing (the held leases stay until Node.stop releases them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(PUMP_STOP_SECONDS)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 (the next tick tries again)
                _log.warning("lease.tick.failed", error=type(exc).__name__, detail=str(exc))
            self.progress = time.monotonic()
            self._stop.wait(self.tick_seconds)

    def tick(self) -> None:
        """One round: heartbeat, renew, then release or acquire toward the target share."""
        node = self._node
        node.stats.flush()
        live = node.leases.heartbeat()
        node.live_nodes = len(set(live) | {node.name})
        incarnation = node.log.incarnation()
        for pump in node.pumps():
            pump.store_changed(incarnation)  # a restart or failover: settle again
        for pump in node.pumps():
            if pump.lost or not pump.alive:
                node.drop_pump(pump.ref, release=True)
        held = node.held()
        for lease, ok in zip(held, node.leases.renew(held), strict=True):
            if not ok:
                node.drop_pump(lease.ref, release=False)
        channels = node.log.channels()
        target = target_share(node.name, live, len(channels))
        held = node.held()
        if len(held) > target:
            self._release(held, len(held) - target)
        elif len(held) < target:
            self._acquire(channels, target - len(held))
        if node.sample_depths:
            self._sample_depths()

    def _sample_depths(self) -> None:
        """The log depth of every held channel, for the metrics endpoint (one round trip)."""
        node = self._node
        refs = [lease.ref for lease in node.held()]
        node.depths = dict(zip(refs, node.log.depths(refs), strict=True))

    def _release(self, held: Sequence[Lease], count: int) -> None:
        node = self._node
        # Give up the channels with the least waiting in their logs first.
        by_depth = sorted(held, key=lambda lease: node.log.depth(lease.ref).entries)
        for lease in by_depth[:count]:
            node.drop_pump(lease.ref, release=True)

    def _acquire(self, channels: Sequence[ChannelRef], count: int) -> None:
        node = self._node
        mine = {lease.ref for lease in node.held()}
        holders = node.leases.holders(channels)
        free = [
            ref for ref, h in zip(channels, holders, strict=True) if h is None and ref not in mine
        ]
        free.sort(key=lambda ref: _rank(node.name, ref))
        for ref in free:
            if count <= 0 or self._stop.is_set():
                return
            lease = node.leases.acquire(ref)
            if lease is not None:
                node.run_pump(lease)
                count -= 1
