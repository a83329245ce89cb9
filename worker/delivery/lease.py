"""Channel leases and the live-node registry on the state Redis.

A pump appends a channel only while it holds the channel's lease: a key
`snowpipe:lease:{chan}` whose value is `node TAB token TAB generation`, set with a TTL and
renewed well inside it. The token is random per acquisition and the generation comes from a
per-channel counter (`leasegen:{chan}`), so the value a pump holds is never held by anyone else,
even after the state Redis lost its last writes. Every log script that changes a log on a pump's
behalf compares this value first (worker/delivery/log.py), and a pump reopens a channel only
right after `holds()` confirmed it still holds it.

Nodes register in `snowpipe:nodes` (a sorted set: node -> expiry on the Redis clock) on every
tick; the balancer shares the channels out over the live ones (worker/delivery/node.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.delivery.channels import NODES_KEY, ChannelRef, channel_key

# KEYS: lease, leasegen.  ARGV: node, token, ttl ms.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local gen = redis.call('INCR', KEYS[2])
local value = ARGV[1] .. '\\t' .. ARGV[2] .. '\\t' .. gen
redis.call('SET', KEYS[1], value, 'PX', tonumber(ARGV[3]))
return value
"""

# KEYS: leases.  ARGV: ttl ms, then one value per key. Returns 1/0 per key.
_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, tonumber(ARGV[1]))
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: lease.  ARGV: value.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: nodes.  ARGV: node, ttl ms. Registers the node, drops expired ones, returns the live.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease this node holds on one channel."""

    ref: ChannelRef
    value: str  # node TAB token TAB generation: what the log scripts compare

    @property
    def generation(self) -> int:
        """The lease's fencing generation (increases with every acquisition of the channel)."""
        return int(self.value.rsplit("\t", 1)[1])


def holder(value: str | None) -> str | None:
    """The node named by a lease value (None for no lease)."""
    return value.split("\t", 1)[0] if value else None


class LeaseTable:
    """Acquire, renew, check and release channel leases; register this node as live."""

    def __init__(self, client: redis.Redis, node: str, *, ttl_seconds: float) -> None:
        if "\t" in node:
            raise ValueError(f"node name {node!r} must not contain a tab")
        self._redis = client
        self.node = node
        self.ttl_ms = int(ttl_seconds * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._heartbeat = client.register_script(_HEARTBEAT)

    def heartbeat(self) -> list[str]:
        """Register this node as live for one TTL; every live node, sorted."""
        live = self._heartbeat(keys=[NODES_KEY], args=[self.node, self.ttl_ms])
        return sorted(_text(n) for n in live)

    def leave(self) -> None:
        """Unregister this node (a clean shutdown: the others rebalance at once)."""
        self._redis.zrem(NODES_KEY, self.node)

    def holders(self, refs: Sequence[ChannelRef]) -> list[str | None]:
        """The node holding each channel's lease (None where nobody does)."""
        if not refs:
            return []
        values = self._redis.mget([channel_key("lease", ref) for ref in refs])
        return [holder(_text(v)) if v is not None else None for v in values]

    def acquire(self, ref: ChannelRef) -> Lease | None:
        """Take the channel's lease if nobody holds it."""
        token = secrets.token_hex(8)
        value = self._acquire(
            keys=[channel_key("lease", ref), channel_key("leasegen", ref)],
            args=[self.node, token, self.ttl_ms],
        )
        return Lease(ref, _text(value)) if value else None

    def renew(self, leases: Sequence[Lease]) -> list[bool]:
        """Extend each lease by one TTL; False where it is no longer ours."""
        if not leases:
            return []
        result = self._renew(
            keys=[channel_key("lease", lease.ref) for lease in leases],
            args=[self.ttl_ms, *(lease.value for lease in leases)],
        )
        return [bool(int(r)) for r in result]

    def holds(self, lease: Lease) -> bool:
        """Whether `lease` is still the channel's lease (checked right before an open)."""
        value = self._redis.get(channel_key("lease", lease.ref))
        return value is not None and _text(value) == lease.value

    def release(self, lease: Lease) -> None:
        """Give the lease up (only if it is still ours)."""
        self._release(keys=[channel_key("lease", lease.ref)], args=[lease.value])
