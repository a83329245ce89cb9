"""The deployment's running worker nodes, registered in the state store.

Every node (with pumps or without) registers its name in `snowpipe:workers`, a sorted set of
node name -> expiry (milliseconds on the Redis clock), renewed by its heartbeat
(worker/heartbeat.py) every `SNOWPIPE_HEARTBEAT_SECONDS` and valid for three periods. Two uses:

- `snowpipe-worker health` asks exactly the registered nodes, so it answers as soon as they
  have, and names a registered node that did not answer;
- a node refuses to start under a name a live node already uses (`claim`). A live entry may be
  the node's own predecessor that crashed within the last three periods: the newcomer waits one
  period and a bit, and refuses only if the entry was renewed meanwhile, by somebody else.

The state store is one deployment's (its channel logs, leases and token), so this registry is
scoped to the deployment too. (The pumps' own registry, `snowpipe:nodes`, lists the nodes that
run pumps and decides the channel shares: worker/delivery/lease.py.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from worker.delivery.channels import KEY_PREFIX

WORKERS_KEY = KEY_PREFIX + "workers"
# An entry lives this many heartbeat periods: one or two missed renewals do not drop a node.
TTL_PERIODS = 3
# How often a newcomer looks again at a live entry of its name while it waits for a renewal.
CLAIM_POLL_SECONDS = 0.25

# KEYS: workers. ARGV: node, ttl ms. Registers the node unless a live entry has its name;
# returns false when it registered, else the live entry's expiry (ms).
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) > now then return score end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return false
"""

# KEYS: workers. ARGV: node, ttl ms. Renews the node's entry, drops expired ones.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return 1
"""

# KEYS: workers. Returns the live nodes.
_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Claim:
    """The outcome of `WorkerRegistry.claim`: `duplicate` when a live node holds the name."""

    duplicate: bool
    waited_seconds: float = 0.0


class WorkerRegistry:
    """Register, renew, list and unregister worker nodes (see the module docstring)."""

    def __init__(self, client: redis.Redis, *, period_seconds: float) -> None:
        self._redis = client
        self.period_seconds = period_seconds
        self.ttl_ms = int(period_seconds * TTL_PERIODS * 1000)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._live = client.register_script(_LIVE)

    def claim(self, node: str, *, sleep: Callable[[float], None] = time.sleep) -> Claim:
        """Register `node`, unless a live node renews an entry of that name meanwhile."""
        started = time.monotonic()
        first = self._claim(keys=[WORKERS_KEY], args=[node, self.ttl_ms])
        if not first:
            return Claim(duplicate=False)
        # A live entry: ours from before a crash, or another node's. Only a live node renews it.
        deadline = started + self.period_seconds + 1.0
        while time.monotonic() < deadline:
            sleep(CLAIM_POLL_SECONDS)
            score = self._redis.zscore(WORKERS_KEY, node)
            if score is not None and float(score) > float(first):
                return Claim(duplicate=True, waited_seconds=time.monotonic() - started)
        self.renew(node)
        return Claim(duplicate=False, waited_seconds=time.monotonic() - started)

    def renew(self, node: str) -> None:
        """Extend `node`'s entry by three periods (and forget expired nodes)."""
        self._renew(keys=[WORKERS_KEY], args=[node, self.ttl_ms])

    def live(self) -> list[str]:
        """The names of the live nodes, sorted."""
        return sorted(_text(n) for n in self._live(keys=[WORKERS_KEY]))

    def leave(self, node: str) -> None:
        """Unregister `node` (a clean shutdown)."""
        self._redis.zrem(WORKERS_KEY, node)
