"""The channel log: per channel, an ordered, durable log of batches in the state Redis.

`ChannelLog.append` is where a batch gets its channel offset, once: one Lua script that returns
the batch's existing record if its id was seen before (dedup), and otherwise issues the next
offsets and writes the entries and the dedup record together. Offsets never change afterwards
(except in the alarm case `raise_floor` handles). The pump that holds the channel's lease reads
the log in order, appends it to Snowflake, and trims what Snowflake reports committed.

Keys (prefix `snowpipe:`, channel key `database|schema|pipe|channel`):

    log:{chan}     a Redis stream; entry id `<offset>-0`, fields b (batch id), n (rows),
                   d (NDJSON bytes), t (ms written, Redis clock)
    next:{chan}    the last offset issued on the channel
    bytes:{chan}   bytes of NDJSON in the log (the backpressure cap compares against it)
    batch:{id}     dedup record `chan TAB first offset TAB last offset`, expires after the
                   redelivery horizon (`SNOWPIPE_DEDUP_TTL_SECONDS`)
    channels       set of every channel key that ever had an entry
    stats          counters (the append script counts logged, already_logged, log_full)
    dead           dead letters (worker/deadletter.py)

Offsets are `max(last + 1, Redis TIME in µs)`: increasing per channel, and after a state Redis
lost its last writes (a restart without fsync, a failover) the next offsets are still above any
offset issued before, because the clock moved on while the counter went back. So a batch logged
after such a loss never reuses an offset Snowflake may already count as committed.

Scripts that change a log on behalf of a pump (trim, dead-letter, raise the floor) first check
the pump's lease value, so a pump that lost its lease can no longer change the log.
Multi-key scripts assume one Redis node (a single instance or a primary, not a cluster).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.deadletter import DEAD_KEY
from worker.delivery.channels import (
    CHANNELS_KEY,
    STATS_KEY,
    ChannelRef,
    batch_key,
    channel_key,
)
from worker.errors import SnowpipeWorkerError

# Offsets as decimal strings (Lua helper, pasted into the scripts that compute offsets). Lua's
# numbers are doubles: above 2^53 `x + 1 == x`, so an offset Snowflake reports as committed that
# is that large (another writer's, or a clock far ahead) would make the scripts issue one offset
# twice (XADD refuses it) and, in _RAISE_FLOOR, drop entries. Digit strings are exact.
_DECIMAL = """
local function dec(s)
  s = string.gsub(s, '^0+', '')
  if s == '' then return '0' end
  return s
end
local function dec_cmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function dec_max(a, b)
  if dec_cmp(a, b) >= 0 then return a end
  return b
end
local function dec_add(a, n)
  local digits = {}
  local carry = n
  for i = #a, 1, -1 do
    local d = string.byte(a, i) - 48 + carry
    digits[#digits + 1] = d % 10
    carry = (d - d % 10) / 10
  end
  while carry > 0 do
    digits[#digits + 1] = carry % 10
    carry = (carry - carry % 10) / 10
  end
  local out = {}
  for i = #digits, 1, -1 do out[#out + 1] = string.format('%d', digits[i]) end
  return dec(table.concat(out))
end
"""

# KEYS: batch, next, log, bytes, channels, stats.  ARGV: batch id, ttl, cap, chan key,
# n pieces, then per piece: row count, NDJSON bytes. Counts its outcome in stats (no extra
# round trip per task).
_APPEND = (
    _DECIMAL
    + """
local seen = redis.call('GET', KEYS[1])
if seen then
  redis.call('HINCRBY', KEYS[6], 'already_logged', 1)
  return {0, seen}
end
local cap = tonumber(ARGV[3])
if cap > 0 then
  local used = tonumber(redis.call('GET', KEYS[4]) or '0')
  if used >= cap then
    redis.call('HINCRBY', KEYS[6], 'log_full', 1)
    return {2, tostring(used)}
  end
end
local t = redis.call('TIME')
local now_us = dec(t[1] .. string.format('%06d', tonumber(t[2])))
local last = dec(redis.call('GET', KEYS[2]) or '0')
local first = dec_max(dec_add(last, 1), now_us)
local n = tonumber(ARGV[5])
local total = 0
local rows = 0
local now_ms = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
for i = 0, n - 1 do
  local data = ARGV[7 + 2 * i]
  redis.call('XADD', KEYS[3], dec_add(first, i) .. '-0',
             'b', ARGV[1], 'n', ARGV[6 + 2 * i], 'd', data, 't', now_ms)
  total = total + #data
  rows = rows + tonumber(ARGV[6 + 2 * i])
end
redis.call('HINCRBY', KEYS[6], 'logged', 1)
redis.call('HINCRBY', KEYS[6], 'rows_logged', rows)
local final = dec_add(first, n - 1)
redis.call('SET', KEYS[2], final)
redis.call('INCRBY', KEYS[4], total)
local record = ARGV[4] .. '\\t' .. first .. '\\t' .. final
redis.call('SET', KEYS[1], record, 'EX', tonumber(ARGV[2]))
redis.call('SADD', KEYS[5], ARGV[4])
return {1, record}
"""
)

# Sum of the `d` field lengths of stream entries (Lua helper, pasted into scripts below).
_DATA_BYTES = """
local function data_bytes(entries)
  local total = 0
  for _, e in ipairs(entries) do
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 'd' then total = total + #f[i + 1] end
    end
  end
  return total
end
"""

# KEYS: lease, log, bytes.  ARGV: lease value, committed offset, first offset to keep.
_TRIM = (
    _DATA_BYTES
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local gone = redis.call('XRANGE', KEYS[2], '-', ARGV[2])
if #gone == 0 then return 0 end
local total = data_bytes(gone)
redis.call('XTRIM', KEYS[2], 'MINID', ARGV[3] .. '-0')
if total > 0 then redis.call('DECRBY', KEYS[3], total) end
return #gone
"""
)

# KEYS: lease, log, bytes, dead, batch.  ARGV: lease value, dead letter JSON, chan key,
# then the entry ids to remove.
_DEAD_LETTER = (
    _DATA_BYTES
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local removed = 0
local total = 0
for i = 4, #ARGV do
  local found = redis.call('XRANGE', KEYS[2], ARGV[i], ARGV[i])
  if #found > 0 then
    total = total + data_bytes(found)
    removed = removed + redis.call('XDEL', KEYS[2], ARGV[i])
  end
end
if removed == 0 then return 0 end
if total > 0 then redis.call('DECRBY', KEYS[3], total) end
redis.call('RPUSH', KEYS[4], ARGV[2])
-- The batch was never committed: forget its id, so that a requeue of the dead letter is logged.
local record = redis.call('GET', KEYS[5])
if record and string.sub(record, 1, #ARGV[3] + 1) == ARGV[3] .. '\\t' then
  redis.call('DEL', KEYS[5])
end
return removed
"""
)

# KEYS: lease, next, log.  ARGV: lease value, committed offset, chan key, dedup key prefix.
# If Snowflake's committed offset is beyond the last offset issued, the log forgot (the state
# Redis came back empty or older): raise the counter above it and move every entry that sits
# at or below it to new offsets above it, in order, updating their dedup records. Each entry is
# added at its new offset before it is deleted at the old one: a script that fails half-way
# (Redis does not roll scripts back) leaves a duplicate entry, never a lost one.
_RAISE_FLOOR = (
    _DECIMAL
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1, 0} end
local committed = dec(ARGV[2])
local last = dec(redis.call('GET', KEYS[2]) or '0')
if dec_cmp(last, committed) >= 0 then return {0, 0} end
local stale = redis.call('XRANGE', KEYS[3], '-', ARGV[2])
local next_offset = committed
local tail = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
if #tail > 0 then
  next_offset = dec_max(next_offset, dec(string.match(tail[1][1], '^(%d+)')))
end
for _, e in ipairs(stale) do
  next_offset = dec_add(next_offset, 1)
  local id = next_offset
  local f = e[2]
  redis.call('XADD', KEYS[3], id .. '-0', unpack(f))
  redis.call('XDEL', KEYS[3], e[1])
  for i = 1, #f, 2 do
    if f[i] == 'b' then
      local key = ARGV[4] .. f[i + 1]
      local ttl = redis.call('TTL', key)
      if ttl > 0 then
        redis.call('SET', key, ARGV[3] .. '\\t' .. id .. '\\t' .. id, 'EX', ttl)
      end
    end
  end
end
redis.call('SET', KEYS[2], next_offset)
return {1, #stale}
"""
)


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of a batch that becomes one log entry (one offset): NDJSON lines and their count."""

    rows: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry as the pump reads it."""

    offset: int
    batch_id: str
    rows: int
    data: bytes
    written_ms: int

    @property
    def entry_id(self) -> str:
        """The entry's stream id."""
        return f"{self.offset}-0"


@dataclass(frozen=True, slots=True)
class Logged:
    """The batch was written to the log now: its channel and offsets."""

    ref: ChannelRef
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class AlreadyLogged:
    """The batch id was seen before: nothing was written (a redelivery or a duplicate)."""

    record: str


@dataclass(frozen=True, slots=True)
class LogFull:
    """The channel's log is over its byte cap: nothing was written (backpressure)."""

    used_bytes: int


AppendResult = Logged | AlreadyLogged | LogFull


@dataclass(frozen=True, slots=True)
class FloorResult:
    """What `raise_floor` did: nothing, or raised the counter and moved `moved` entries."""

    raised: bool
    moved: int


@dataclass(frozen=True, slots=True)
class Depth:
    """How much a channel's log holds."""

    entries: int
    bytes: int
    oldest_ms: int | None


class LeaseLost(SnowpipeWorkerError):
    """The pump's lease value is no longer the channel's: it must stop working the channel."""


_warned_keys: set[str] = set()


def _warn_invalid_key(key: str) -> None:
    if key in _warned_keys:
        return
    _warned_keys.add(key)
    from worker.observability import get_logger

    get_logger("worker.delivery.log").warning(
        "channels.invalid_key",
        key=key,
        note="skipped: not database|schema|pipe|channel; its log (if any) is not delivered. "
        "Inspect it with `snowpipe-worker status`, then remove the member from snowpipe:channels",
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(raw: Any) -> list[Entry]:
    out: list[Entry] = []
    for entry_id, fields in raw or ():
        offset = int(_text(entry_id).partition("-")[0])
        f = {_text(k): v for k, v in fields.items()}
        out.append(
            Entry(
                offset,
                _text(f.get("b", b"")),
                int(_text(f.get("n", b"0"))),
                bytes(f.get("d", b"")),
                int(_text(f.get("t", b"0"))),
            )
        )
    return out


class ChannelLog:
    """The channel logs on the state Redis (thread-safe: redis-py pools connections)."""

    def __init__(self, client: redis.Redis, *, dedup_ttl_seconds: int) -> None:
        self._redis = client
        self._ttl = dedup_ttl_seconds
        self._append = client.register_script(_APPEND)
        self._trim = client.register_script(_TRIM)
        self._dead = client.register_script(_DEAD_LETTER)
        self._floor = client.register_script(_RAISE_FLOOR)

    # --- The task side --------------------------------------------------------------------------

    def append(
        self, ref: ChannelRef, batch_id: str, pieces: Sequence[Piece], *, cap_bytes: int = 0
    ) -> AppendResult:
        """Log `pieces` of batch `batch_id` on `ref` with fresh offsets, unless already logged.

        Atomic: either the batch id was seen (`AlreadyLogged`), or the log is over `cap_bytes`
        (`LogFull`, nothing written), or every piece got its offset (`Logged`).
        """
        if not pieces:
            raise ValueError("a batch needs at least one piece")
        args: list[Any] = [batch_id, self._ttl, cap_bytes, ref.key, len(pieces)]
        for piece in pieces:
            args.extend((piece.rows, piece.data))
        keys = [
            batch_key(batch_id),
            channel_key("next", ref),
            channel_key("log", ref),
            channel_key("bytes", ref),
            CHANNELS_KEY,
            STATS_KEY,
        ]
        status, value = self._append(keys=keys, args=args)
        if int(status) == 0:
            return AlreadyLogged(_text(value))
        if int(status) == 2:
            return LogFull(int(_text(value)))
        _, first, last = _text(value).split("\t")
        return Logged(ref, int(first), int(last))

    def wait_for_replicas(self, replicas: int, timeout_ms: int) -> int:
        """Block until `replicas` replicas acknowledged this connection's writes; how many did."""
        return int(self._redis.wait(replicas, timeout_ms))

    # --- The pump side --------------------------------------------------------------------------

    def read(self, ref: ChannelRef, after: int, count: int) -> list[Entry]:
        """Up to `count` entries with offsets above `after`, in order."""
        raw = self._redis.xrange(channel_key("log", ref), f"({after}-0", "+", count=count)
        return _entries(raw)

    def wait(self, ref: ChannelRef, after: int, count: int, block_ms: int) -> list[Entry]:
        """Like `read`, but waits up to `block_ms` for an entry to arrive."""
        raw = self._redis.xread(
            {channel_key("log", ref): f"{after}-0"}, count=count, block=block_ms
        )
        if not raw:
            return []
        # RESP2 answers [[stream, entries]], RESP3 {stream: [entries]}.
        streams: Any = raw
        return _entries(
            next(iter(streams.values())) if isinstance(streams, dict) else streams[0][1]
        )

    def entries_of(self, ref: ChannelRef, first: int, last: int) -> list[Entry]:
        """The entries with offsets first..last still in the log."""
        return _entries(self._redis.xrange(channel_key("log", ref), f"{first}-0", f"{last}-0"))

    def trim(self, ref: ChannelRef, lease: str, committed: int) -> int:
        """Remove the entries at or below `committed`; how many. LeaseLost if not `lease`'s."""
        keys = [channel_key("lease", ref), channel_key("log", ref), channel_key("bytes", ref)]
        removed = int(self._trim(keys=keys, args=[lease, committed, committed + 1]))
        if removed < 0:
            raise LeaseLost(str(ref))
        return removed

    def dead_letter(
        self, ref: ChannelRef, lease: str, entries: Sequence[Entry], letter: bytes
    ) -> int:
        """Move `entries` (one batch's) out of the log into the dead letters, atomically.

        Returns how many entries were removed (0: already gone, nothing stored). The batch's
        dedup record is dropped too, so a requeue of the dead letter is logged again.
        """
        if not entries:
            return 0
        batch_ids = {e.batch_id for e in entries}
        if len(batch_ids) != 1:
            raise ValueError("dead_letter takes the entries of one batch")
        keys = [
            channel_key("lease", ref),
            channel_key("log", ref),
            channel_key("bytes", ref),
            DEAD_KEY,
            batch_key(entries[0].batch_id),
        ]
        args: list[Any] = [lease, letter, ref.key, *(e.entry_id for e in entries)]
        removed = int(self._dead(keys=keys, args=args))
        if removed < 0:
            raise LeaseLost(str(ref))
        return removed

    def raise_floor(self, ref: ChannelRef, lease: str, committed: int) -> FloorResult:
        """Make sure no entry sits at or below Snowflake's committed offset (see _RAISE_FLOOR)."""
        keys = [channel_key("lease", ref), channel_key("next", ref), channel_key("log", ref)]
        status, moved = self._floor(keys=keys, args=[lease, committed, ref.key, batch_key("")])
        if int(status) < 0:
            raise LeaseLost(str(ref))
        return FloorResult(int(status) == 1, int(moved))

    # --- Inspection -----------------------------------------------------------------------------

    def channels(self) -> list[ChannelRef]:
        """Every channel that ever had an entry, sorted. A member that is not a channel key (a
        name with `|`, an empty name: written before names were checked) is skipped, with one
        warning per process: one bad key never stops the others from being served (`status`
        lists them)."""
        refs: list[ChannelRef] = []
        for member in self._redis.smembers(CHANNELS_KEY):
            key = _text(member)
            try:
                refs.append(ChannelRef.from_key(key))
            except ValueError:
                _warn_invalid_key(key)
        return sorted(refs)

    def depth(self, ref: ChannelRef) -> Depth:
        """Entries and bytes in the log, and when its oldest entry was written."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.xlen(channel_key("log", ref))
        pipe.get(channel_key("bytes", ref))
        pipe.xrange(channel_key("log", ref), "-", "+", count=1)
        length, used, first = pipe.execute()
        oldest = _entries(first)[0].written_ms if first else None
        return Depth(int(length), int(_text(used)) if used else 0, oldest)

    def depths(self, refs: Sequence[ChannelRef]) -> list[Depth]:
        """`depth` of each of `refs`, in one round trip."""
        if not refs:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for ref in refs:
            pipe.xlen(channel_key("log", ref))
            pipe.get(channel_key("bytes", ref))
            pipe.xrange(channel_key("log", ref), "-", "+", count=1)
        raw = pipe.execute()
        out: list[Depth] = []
        for i in range(0, len(raw), 3):
            length, used, first = raw[i : i + 3]
            oldest = _entries(first)[0].written_ms if first else None
            out.append(Depth(int(length), int(_text(used)) if used else 0, oldest))
        return out

    def last_offset(self, ref: ChannelRef) -> int:
        """The last offset issued on the channel (0 if none)."""
        value = self._redis.get(channel_key("next", ref))
        return int(_text(value)) if value is not None else 0
