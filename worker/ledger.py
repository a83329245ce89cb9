"""The Redis ledger that makes ingestion exactly once: offsets, fences and batch records.

`Ledger(redis)` gives the atomic operations of the exactly-once algorithm (see README.md
"Guarantees and their limits"): every channel has an offset counter that never goes back (an
offset is never reused, not even after a reopen discarded uncommitted rows), a writer generation
bumped by every fence, and a sorted set of offset ranges known to be discarded. Every batch has a
ledger entry that says on which channel, generation and offset each of its chunks was appended.

Keys (prefix `snowpipe:`; channel key = database|schema|pipe|channel):
    offset:{chan}   highest offset ever allocated on the channel
    gen:{chan}      writer generation (INCR on every fence)
    lost:{chan}     discarded ranges: member "start:end", score = end
    ledger:{batch}  one line per chunk: database TAB schema TAB pipe TAB channel TAB gen TAB offset

Multi-key updates are Lua scripts, so they are atomic (the keys of one call must live on one
Redis node: the state Redis is a single instance or a primary, not a cluster).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

KEY_PREFIX = "snowpipe:"
# Long enough to outlive any redelivery (visibility timeout, broker outage, a dead letter that is
# requeued days later); short enough that the ledger does not grow without bound.
LEDGER_TTL_SECONDS = 7 * 24 * 3600
# Marker in an allocation template: "allocate a new offset for this chunk".
NEW_CHUNK = "?"

_FENCE = """
local c = tonumber(ARGV[1])
local h = tonumber(redis.call('GET', KEYS[1]) or '0')
if h > c then
  redis.call('ZADD', KEYS[3], h, string.format('%d:%d', c + 1, h))
elseif c > h then
  redis.call('SET', KEYS[1], string.format('%d', c))
end
return redis.call('INCR', KEYS[2])
"""

# KEYS: gen, offset, ledger.  ARGV: gen, expected entry ('' = none), ttl, chunk prefix, n new,
# then one template line per chunk ('?' = allocate a new offset here).
_ALLOCATE = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then
  return {0}
end
local current = redis.call('GET', KEYS[3]) or ''
if current ~= ARGV[2] then
  return {-1, current}
end
local n = tonumber(ARGV[5])
local last = redis.call('INCRBY', KEYS[2], n)
local first = last - n + 1
local lines = {}
local k = 0
for i = 6, #ARGV do
  if ARGV[i] == '?' then
    lines[#lines + 1] = ARGV[4] .. string.format('%d', first + k)
    k = k + 1
  else
    lines[#lines + 1] = ARGV[i]
  end
end
local value = table.concat(lines, '\\n')
redis.call('SET', KEYS[3], value, 'EX', ARGV[3])
return {1, first, value}
"""


class LedgerError(RuntimeError):
    """The ledger holds something this code cannot read (written by another version?)."""


@dataclass(frozen=True, slots=True, order=True)
class ChannelRef:
    """One Snowpipe Streaming channel: where it lives and its name."""

    database: str
    schema: str
    pipe: str
    channel: str

    @property
    def key(self) -> str:
        """The channel's part of a Redis key."""
        return f"{self.database}|{self.schema}|{self.pipe}|{self.channel}"

    @property
    def target(self) -> tuple[str, str, str]:
        """(database, schema, pipe)."""
        return (self.database, self.schema, self.pipe)


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """Where one chunk (one append request) of a batch was sent."""

    ref: ChannelRef
    gen: int
    offset: int

    def line(self) -> str:
        """The record as stored in a ledger entry."""
        r = self.ref
        return f"{r.database}\t{r.schema}\t{r.pipe}\t{r.channel}\t{self.gen}\t{self.offset}"

    @classmethod
    def parse(cls, line: str) -> ChunkRecord:
        """The record stored as `line`."""
        parts = line.split("\t")
        if len(parts) != 6:
            raise LedgerError(f"unreadable ledger line {line!r}")
        database, schema, pipe, channel, gen, offset = parts
        return cls(ChannelRef(database, schema, pipe, channel), int(gen), int(offset))


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A batch's ledger entry: its raw value (for compare-and-set) and one record per chunk."""

    raw: str
    chunks: tuple[ChunkRecord, ...]

    @classmethod
    def parse(cls, raw: str) -> LedgerEntry:
        """The entry stored as `raw`."""
        return cls(raw, tuple(ChunkRecord.parse(line) for line in raw.split("\n") if line))


@dataclass(frozen=True, slots=True)
class Allocated:
    """Offsets were allocated and the ledger entry written."""

    entry: LedgerEntry


@dataclass(frozen=True, slots=True)
class Fenced:
    """The writer's generation is stale: someone opened the channel since; reopen it."""


@dataclass(frozen=True, slots=True)
class Conflict:
    """The batch's ledger entry changed: another process took the batch over."""

    current: LedgerEntry | None


AllocateResult = Allocated | Fenced | Conflict


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Ledger:
    """Atomic ledger operations on the state Redis (thread-safe: redis-py pools connections)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = KEY_PREFIX,
        ttl_seconds: int = LEDGER_TTL_SECONDS,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._ttl = ttl_seconds
        self._fence = client.register_script(_FENCE)
        self._allocate = client.register_script(_ALLOCATE)

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}{kind}:{name}"

    def fence(self, ref: ChannelRef, committed: int) -> int:
        """Record a channel open that reported `committed`; the new writer generation.

        Every offset allocated on the channel above `committed` is recorded as lost (Snowflake
        discarded those rows when the channel was opened), and the generation bump makes any
        other writer of the channel unable to allocate.
        """
        keys = [self._key(k, ref.key) for k in ("offset", "gen", "lost")]
        return int(self._fence(keys=keys, args=[committed]))

    def generation(self, ref: ChannelRef) -> int:
        """The channel's current writer generation (0 if it was never fenced)."""
        value = self._redis.get(self._key("gen", ref.key))
        return int(_text(value)) if value is not None else 0

    def allocate(
        self,
        ref: ChannelRef,
        gen: int,
        batch_id: str,
        template: Sequence[ChunkRecord | None],
        expected: str | None,
    ) -> AllocateResult:
        """Allocate offsets on `ref` for the `None` chunks of `template` and record the batch.

        Atomic: fails with `Fenced` if the channel's generation is no longer `gen`, and with
        `Conflict` if the batch's entry is no longer `expected` (None: no entry).
        """
        new = sum(1 for chunk in template if chunk is None)
        prefix = f"{ref.database}\t{ref.schema}\t{ref.pipe}\t{ref.channel}\t{gen}\t"
        lines = [NEW_CHUNK if chunk is None else chunk.line() for chunk in template]
        result = self._allocate(
            keys=[
                self._key("gen", ref.key),
                self._key("offset", ref.key),
                self._key("ledger", batch_id),
            ],
            args=[gen, expected or "", self._ttl, prefix, new, *lines],
        )
        status = int(result[0])
        if status == 0:
            return Fenced()
        if status == -1:
            current = _text(result[1])
            return Conflict(LedgerEntry.parse(current) if current else None)
        return Allocated(LedgerEntry.parse(_text(result[2])))

    def entry(self, batch_id: str) -> LedgerEntry | None:
        """The batch's ledger entry, or None if it was never appended."""
        value = self._redis.get(self._key("ledger", batch_id))
        return LedgerEntry.parse(_text(value)) if value is not None else None

    def lost(self, ref: ChannelRef, offsets: Sequence[int]) -> list[bool]:
        """For each offset, whether a fence recorded it as discarded."""
        if not offsets:
            return []
        # Ranges are scored by their end, so only ranges ending at or above the smallest offset
        # matter: the few fences since that offset was allocated.
        members = self._redis.zrangebyscore(self._key("lost", ref.key), min(offsets), "+inf")
        ranges = []
        for member in members:
            start, _, end = _text(member).partition(":")
            ranges.append((int(start), int(end)))
        return [any(start <= o <= end for start, end in ranges) for o in offsets]

    def forget(self, batch_id: str) -> None:
        """Delete a batch's entry (tests and `dead-letters drop`)."""
        self._redis.delete(self._key("ledger", batch_id))
