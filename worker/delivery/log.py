"""The channel log: per channel, an ordered, durable log of batches in the state Redis.

`ChannelLog.append` is where a batch gets its channel offsets, once: one Lua script that returns
the batch's existing record if its id was seen before (dedup), and otherwise issues the next
offsets and writes the entries and the dedup record together. Offsets never change afterwards.
The pump that holds the channel's lease settles the channel after every open, appends the log to
Snowflake in order, and trims what Snowflake reports committed (docs/delivery.md).

Keys (prefix `snowpipe:`, channel key `database|schema|pipe|channel`):

    log:{chan}       a Redis stream; entry id `<offset>-0`, fields b (batch id), n (rows),
                     d (NDJSON bytes), t (ms written, Redis clock), p (piece index in the batch),
                     k (pieces in the batch), r (index in the batch of the piece's first row)
    next:{chan}      the last offset issued on the channel
    bytes:{chan}     bytes of NDJSON in the log (the backpressure cap compares against it)
    settled:{chan}   the incarnation of the state Redis in which a pump last settled the channel
    committed:{chan} Snowflake's committed offset at the last confirmation (decimal string)
    errors:{chan}    Snowflake's rows_error_count at the last confirmation
    sent:{chan}      the highest offset any pump may have put in an append request
    markinc:{chan}   the incarnation of the last settle (a refused open keeps it): from that
                     settle on, the sent mark covers every append, unless the store changed
    held:{chan}      a stream of committed entries held until their row errors are attributed
    heldinfo:{chan}  a hash: one field per held window (see `HeldWindow`)
    refused:{chan}   why Snowflake refuses to open the channel (expires; set by the pump)
    batch:{id}       dedup record `chan TAB first TAB last`, plus `TAB D TAB <letter id>` once
                     the batch was dead-lettered from the log; expires after the redelivery
                     horizon (`SNOWPIPE_DEDUP_TTL_SECONDS`)
    channels         set of every channel key that ever had an entry (or a task waiting on it)
    stats            counters (the append script counts its outcomes)
    letters, letters:order   dead letters (worker/deadletter.py)

**The settle gate.** An incarnation is `run_id:master_replid` of the state Redis, read by each
script (`INFO`): it changes at every restart and every promotion of a replica, which is when the
store may have come back older than it was. A task may log on a channel only while the channel
is settled in the current incarnation: a pump opened it, raised `next` to at least Snowflake's
committed offset C and trimmed what is at or below C (`settle`). So every offset issued is above
C, every entry at or below C was committed (by induction over sessions), and a store that came
back older or empty is made consistent by trimming, never by moving entries (docs/delivery.md
argues it). Every script that changes a log on a pump's behalf checks the pump's lease value and
that the channel is still settled in the current incarnation.

Multi-key scripts assume one Redis node (a single instance or a primary, not a cluster).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.deadletter import LETTERS_KEY, ORDER_KEY
from worker.delivery.channels import (
    CHANNELS_KEY,
    STATS_KEY,
    ChannelRef,
    batch_key,
    channel_key,
)
from worker.errors import SnowpipeWorkerError

# Offsets as decimal strings (Lua helper). Lua's numbers are doubles: above 2^53 `x + 1 == x`,
# and offsets are microseconds since 1970 (about 2^50) or whatever Snowflake reports as
# committed (another writer's, a clock far ahead). Digit strings are exact.
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
local function offset_of(id) return dec(string.match(id, '^(%d+)')) end
"""

# The state Redis's incarnation: `run_id:master_replid`. A store without INFO (fakeredis, the
# embedded broker of the local stack, which keeps nothing anyway) has one incarnation, "-".
# A Redis user that may not run INFO is caught at start (`ChannelLog.incarnation_supported`).
_INCARNATION = """
local function incarnation()
  local ok, server = pcall(redis.call, 'INFO', 'server')
  if not ok or type(server) ~= 'string' then return '-' end
  local run = string.match(server, 'run_id:(%w+)') or '?'
  local ok2, repl = pcall(redis.call, 'INFO', 'replication')
  local rep = '?'
  if ok2 and type(repl) == 'string' then rep = string.match(repl, 'master_replid:(%w+)') or '?' end
  return run .. ':' .. rep
end
"""

# Sum of the `d` field lengths of stream entries.
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

# A pump's session is valid while it holds the lease and the channel is settled in the current
# incarnation: -1 lease lost, -2 the store changed (restart, failover) since the settle.
_SESSION = """
local function session(lease_key, lease_value, settled_key)
  if redis.call('GET', lease_key) ~= lease_value then return -1 end
  if redis.call('GET', settled_key) ~= incarnation() then return -2 end
  return 0
end
"""

# Confirm Snowflake's committed offset c and error count e: trim the log up to c, except that
# when e rose since the last confirmation, the entries committed since then, (c0, c], go to the
# held stream first (their row errors are attributed from there), with a window record.
# KEYS used: log, bytes, committed, errors, held, heldinfo (passed as arguments).
_CONFIRM = """
local function confirm(k_log, k_bytes, k_committed, k_errors, k_held, k_info, c, e, bound, msg)
  local prev = redis.call('GET', k_committed)
  local errs = redis.call('GET', k_errors)
  local c0 = c
  if prev then c0 = dec(prev) end
  local e0 = e
  if errs then e0 = tonumber(errs) end
  local held = 0
  if e > e0 then
    if dec_cmp(c0, c) < 0 then
      local window = redis.call('XRANGE', k_log, '(' .. c0 .. '-0', c .. '-0')
      for _, en in ipairs(window) do
        if pcall(redis.call, 'XADD', k_held, en[1], unpack(en[2])) then held = held + 1 end
      end
    else
      c0 = c  -- nothing committed since: an empty window, reported as unattributed
    end
    redis.call('HSET', k_info, tostring(e),
               c0 .. '\\t' .. c .. '\\t' .. (e - e0) .. '\\t' .. bound .. '\\t' .. msg)
  end
  local gone = redis.call('XRANGE', k_log, '-', c .. '-0')
  local removed = #gone
  if removed > 0 then
    local total = data_bytes(gone)
    redis.call('XTRIM', k_log, 'MINID', dec_add(c, 1) .. '-0')
    if total > 0 then redis.call('DECRBY', k_bytes, total) end
  end
  if (not prev) or dec_cmp(dec(prev), c) <= 0 then redis.call('SET', k_committed, c) end
  redis.call('SET', k_errors, e)
  return {removed, held}
end
"""

# KEYS: batch, next, log, bytes, channels, stats, settled, refused.
# ARGV: batch id, ttl, cap, chan key, requeue_of, n pieces, then per piece: rows, data, first row.
# Returns {status, value}: 0 already logged (record), 1 logged (record), 2 log full (bytes),
# 3 in the dead letters (letter id), 4 refused (reason), 5 unsettled.
_APPEND = (
    _DECIMAL
    + _INCARNATION
    + """
local seen = redis.call('GET', KEYS[1])
if seen then
  local letter = string.match(seen, '^[^\\t]*\\t[^\\t]*\\t[^\\t]*\\tD\\t(.*)$')
  if not letter then
    redis.call('HINCRBY', KEYS[6], 'already_logged', 1)
    return {0, seen}
  end
  if letter ~= ARGV[5] then
    redis.call('HINCRBY', KEYS[6], 'already_dead_lettered', 1)
    return {3, letter}
  end
end
if redis.call('GET', KEYS[7]) ~= incarnation() then
  local refused = redis.call('GET', KEYS[8])
  if refused then
    redis.call('HINCRBY', KEYS[6], 'refused', 1)
    return {4, refused}
  end
  redis.call('SADD', KEYS[5], ARGV[4])
  redis.call('HINCRBY', KEYS[6], 'unsettled', 1)
  return {5, ''}
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
local n = tonumber(ARGV[6])
local total = 0
local rows = 0
local now_ms = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
for i = 0, n - 1 do
  local data = ARGV[8 + 3 * i]
  redis.call('XADD', KEYS[3], dec_add(first, i) .. '-0',
             'b', ARGV[1], 'n', ARGV[7 + 3 * i], 'd', data, 't', now_ms,
             'p', i, 'k', n, 'r', ARGV[9 + 3 * i])
  total = total + #data
  rows = rows + tonumber(ARGV[7 + 3 * i])
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

# KEYS: lease, next, log, bytes, committed, errors, held, heldinfo, settled, refused, sent,
# markinc.
# ARGV: lease value, committed offset, error count, error upper bound, error message, the
# incarnation the pump saw before its lease check ("": not checked).
# Returns {status, incarnation, floor raised, trimmed, held, sent mark}; status -1: lease lost,
# -2: the store changed since the lease check (a store that came back older can hold a lease
# value whose pump opened before another pump's later open: its committed offset is stale).
_SETTLE = (
    _DECIMAL
    + _INCARNATION
    + _DATA_BYTES
    + _CONFIRM
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1, '', 0, 0, 0, '0'} end
local inc = incarnation()
if ARGV[6] ~= '' and ARGV[6] ~= inc then return {-2, inc, 0, 0, 0, '0'} end
local c = dec(ARGV[2])
local last = dec(redis.call('GET', KEYS[2]) or '0')
local raised = 0
if dec_cmp(last, c) < 0 then
  redis.call('SET', KEYS[2], c)
  raised = 1
end
local r = confirm(KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], c,
                  tonumber(ARGV[3]), ARGV[4], ARGV[5])
redis.call('SET', KEYS[9], inc)
redis.call('SET', KEYS[12], inc)
redis.call('DEL', KEYS[10])
return {1, inc, raised, r[1], r[2], redis.call('GET', KEYS[11]) or '0'}
"""
)

# KEYS: lease, settled, log, bytes, committed, errors, held, heldinfo.
# ARGV: lease value, committed offset, error count, error upper bound, error message.
_TRIM = (
    _DECIMAL
    + _INCARNATION
    + _DATA_BYTES
    + _SESSION
    + _CONFIRM
    + """
local ok = session(KEYS[1], ARGV[1], KEYS[2])
if ok < 0 then return {ok, 0} end
return confirm(KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], dec(ARGV[2]),
               tonumber(ARGV[3]), ARGV[4], ARGV[5])
"""
)

# KEYS: lease, settled, sent.  ARGV: lease value, offset. Raises the sent mark; returns it.
_MARK_SENT = (
    _DECIMAL
    + _INCARNATION
    + _SESSION
    + """
local ok = session(KEYS[1], ARGV[1], KEYS[2])
if ok < 0 then return ok end
local mark = dec_max(dec(redis.call('GET', KEYS[3]) or '0'), dec(ARGV[2]))
redis.call('SET', KEYS[3], mark)
return mark
"""
)

# KEYS: lease, settled, log, bytes, sent, letters, order, batch, markinc.
# ARGV: lease value, mode, letter id, letter JSON, now ms, chan key, then the entry ids.
# Mode "settled": the pump settled the channel in this incarnation (so nothing it removes can
# still commit: the open discarded what was in flight). Mode "unsent": no settle (the open is
# refused); every entry removed must lie above the sent mark (no pump ever sent it), and the
# mark must be complete: the channel was settled in this incarnation (a store that came back
# older may have lost the write that raised it, while the appends it covered went out).
# Returns how many entries were removed (0: none left, nothing stored); -1 lease lost, -2 store
# changed, -3 an entry may have been sent.
_DEAD_LETTER = (
    _DECIMAL
    + _INCARNATION
    + _DATA_BYTES
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if ARGV[2] == 'settled' then
  if redis.call('GET', KEYS[2]) ~= incarnation() then return -2 end
else
  if redis.call('GET', KEYS[9]) ~= incarnation() then return -3 end
  local sent = dec(redis.call('GET', KEYS[5]) or '0')
  for i = 7, #ARGV do
    if dec_cmp(offset_of(ARGV[i]), sent) <= 0 then return -3 end
  end
end
local removed = 0
local total = 0
for i = 7, #ARGV do
  local found = redis.call('XRANGE', KEYS[3], ARGV[i], ARGV[i])
  if #found > 0 then
    total = total + data_bytes(found)
    removed = removed + redis.call('XDEL', KEYS[3], ARGV[i])
  end
end
if removed == 0 then return 0 end
if total > 0 then redis.call('DECRBY', KEYS[4], total) end
redis.call('HSET', KEYS[6], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[7], ARGV[5], ARGV[3])
local record = redis.call('GET', KEYS[8])
if record and string.sub(record, 1, #ARGV[6] + 1) == ARGV[6] .. '\\t' then
  local live = string.match(record, '^([^\\t]*\\t[^\\t]*\\t[^\\t]*)')
  local ttl = redis.call('PTTL', KEYS[8])
  if ttl > 0 then
    redis.call('SET', KEYS[8], live .. '\\tD\\t' .. ARGV[3], 'PX', ttl)
  else
    redis.call('SET', KEYS[8], live .. '\\tD\\t' .. ARGV[3])
  end
end
return removed
"""
)

# KEYS: lease, settled, refused.  ARGV: lease value, reason, ttl ms.
# An open was refused for good: close the gate (tasks dead-letter new batches for the channel at
# once, with the reason) until an open succeeds again.
_REFUSE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], ARGV[2], 'PX', tonumber(ARGV[3]))
return 1
"""

# KEYS: lease, settled, held, heldinfo, letters, order.
# ARGV: lease value, window field, now ms, n letters, then n (id, JSON) pairs, then held ids.
_RELEASE_HELD = (
    _INCARNATION
    + _SESSION
    + """
local ok = session(KEYS[1], ARGV[1], KEYS[2])
if ok < 0 then return ok end
local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  local id = ARGV[5 + 2 * i]
  redis.call('HSET', KEYS[5], id, ARGV[6 + 2 * i])
  redis.call('ZADD', KEYS[6], 'NX', ARGV[3], id)
end
for i = 5 + 2 * n, #ARGV do redis.call('XDEL', KEYS[3], ARGV[i]) end
redis.call('HDEL', KEYS[4], ARGV[2])
return 1
"""
)

# Does this store tell scripts its incarnation? ("-" on a store without INFO for scripts.)
_WHICH_INCARNATION = _INCARNATION + "return incarnation()"


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
    piece: int = 0  # its index among the batch's pieces
    pieces: int = 1  # how many pieces the batch has (consecutive offsets)
    first_row: int = 0  # index in the batch of this piece's first row

    @property
    def entry_id(self) -> str:
        """The entry's stream id."""
        return f"{self.offset}-0"

    @property
    def batch_offsets(self) -> tuple[int, int]:
        """The first and last offsets of the entry's batch (its pieces are consecutive)."""
        first = self.offset - self.piece
        return first, first + self.pieces - 1


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


@dataclass(frozen=True, slots=True)
class InDeadLetters:
    """The batch was dead-lettered from a log (letter `letter_id`) and this is not the requeue
    of that letter: nothing was written (a late redelivery of the original message)."""

    letter_id: str


@dataclass(frozen=True, slots=True)
class ChannelRefused:
    """Snowflake refuses to open the batch's channel (its pipe, usually): nothing was written."""

    reason: str


@dataclass(frozen=True, slots=True)
class Unsettled:
    """No pump has settled the channel since the state store (re)started: nothing was written;
    a pump settles it within a lease tick or two (docs/delivery.md, the settle gate)."""


AppendResult = Logged | AlreadyLogged | LogFull | InDeadLetters | ChannelRefused | Unsettled


@dataclass(frozen=True, slots=True)
class Settled:
    """What `settle` did: the incarnation it settled in, whether the offset counter had to be
    raised to Snowflake's committed offset (the store forgot), entries trimmed and held, and the
    channel's sent mark."""

    incarnation: str
    raised: bool
    trimmed: int
    held: int
    sent_mark: int


@dataclass(frozen=True, slots=True)
class Confirmed:
    """What a trim did: entries removed from the log, and how many of them were held."""

    trimmed: int
    held: int


@dataclass(frozen=True, slots=True)
class HeldWindow:
    """Entries committed between two confirmations during which Snowflake's error count rose:
    offsets (after, upto], `errors` more rows in error, the last error's upper bound and
    message as the channel status gave them."""

    after: int
    upto: int
    errors: int
    upper_bound: str
    message: str
    total: int  # Snowflake's error count at the end of the window (the window's field)

    @property
    def field(self) -> str:
        """The window's field in `heldinfo:{chan}`."""
        return str(self.total)


@dataclass(frozen=True, slots=True)
class Depth:
    """How much a channel's log holds."""

    entries: int
    bytes: int
    oldest_ms: int | None


class LeaseLost(SnowpipeWorkerError):
    """The pump's lease value is no longer the channel's: it must stop working the channel."""


class StoreChanged(SnowpipeWorkerError):
    """The state Redis restarted or failed over since the pump settled the channel (or another
    pump settled it): the pump must reopen and settle again before it changes the log."""


class StateNotReplicatedError(SnowpipeWorkerError, redis.RedisError):
    """A write reached fewer replicas than SNOWPIPE_STATE_MIN_REPLICAS in time (a failover could
    take it back). Tasks ride it out like a state-store outage (every `except redis.RedisError`
    catches it); a pump sends nothing until a later WAIT succeeds."""


class MaybeSent(SnowpipeWorkerError):
    """An entry to dead-letter without a settle lies at or below the sent mark, or the mark may
    be incomplete (no settle since the store restarted or failed over): it may still be
    committed, so it stays in the log until an open succeeds."""
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


def _int(value: Any, default: int = 0) -> int:
    return int(_text(value)) if value is not None else default


def _entries(raw: Any) -> list[Entry]:
    out: list[Entry] = []
    for entry_id, fields in raw or ():
        offset = int(_text(entry_id).partition("-")[0])
        f = {_text(k): v for k, v in fields.items()}
        out.append(
            Entry(
                offset,
                _text(f.get("b", b"")),
                _int(f.get("n")),
                bytes(f.get("d", b"")),
                _int(f.get("t")),
                _int(f.get("p")),
                _int(f.get("k"), 1),
                _int(f.get("r")),
            )
        )
    return out


def _check_session(status: int, ref: ChannelRef) -> None:
    if status == -1:
        raise LeaseLost(str(ref))
    if status == -2:
        raise StoreChanged(f"{ref}: the state store changed since the channel was settled")


class ChannelLog:
    """The channel logs on the state Redis (thread-safe: redis-py pools connections)."""

    def __init__(self, client: redis.Redis, *, dedup_ttl_seconds: int) -> None:
        self._redis = client
        self._ttl = dedup_ttl_seconds
        self._append = client.register_script(_APPEND)
        self._settle = client.register_script(_SETTLE)
        self._trim = client.register_script(_TRIM)
        self._mark_sent = client.register_script(_MARK_SENT)
        self._dead = client.register_script(_DEAD_LETTER)
        self._refuse = client.register_script(_REFUSE)
        self._release = client.register_script(_RELEASE_HELD)
        self._which = client.register_script(_WHICH_INCARNATION)

    @property
    def redis(self) -> redis.Redis:
        """The state Redis client."""
        return self._redis

    # --- The task side --------------------------------------------------------------------------

    def append(
        self,
        ref: ChannelRef,
        batch_id: str,
        pieces: Sequence[Piece],
        *,
        cap_bytes: int = 0,
        requeue_of: str | None = None,
        replicas: int = 0,
        replica_timeout_ms: int = 0,
    ) -> AppendResult:
        """Log `pieces` of batch `batch_id` on `ref` with fresh offsets, unless it may not be.

        Atomic: one of the outcomes of `AppendResult`, and only `Logged` wrote anything.
        `requeue_of`: the letter id when this is a requeue of a dead letter. With `replicas`,
        a WAIT on the same connection follows the script, and StateNotReplicatedError says that
        fewer replicas than that acknowledged it in `replica_timeout_ms`.
        """
        if not pieces:
            raise ValueError("a batch needs at least one piece")
        args: list[Any] = [
            batch_id, self._ttl, cap_bytes, ref.key, requeue_of or "", len(pieces),
        ]  # fmt: skip
        first_row = 0
        for piece in pieces:
            args.extend((piece.rows, piece.data, first_row))
            first_row += piece.rows
        keys = [
            batch_key(batch_id),
            channel_key("next", ref),
            channel_key("log", ref),
            channel_key("bytes", ref),
            CHANNELS_KEY,
            STATS_KEY,
            channel_key("settled", ref),
            channel_key("refused", ref),
        ]
        status, value = self._call(
            self._append, keys, args,
            replicas=replicas, timeout_ms=replica_timeout_ms, what="the log write",
        )  # fmt: skip
        return _append_result(ref, int(status), _text(value))

    def _call(
        self, script: Any, keys: list[str], args: list[Any], *, replicas: int, timeout_ms: int,
        what: str,
    ) -> Any:  # fmt: skip
        """Run `script`; with `replicas`, WAIT on the same connection right after it."""
        if not replicas:
            return script(keys=keys, args=args)
        pipe = self._redis.pipeline(transaction=False)
        script(keys=keys, args=args, client=pipe)
        pipe.wait(replicas, timeout_ms)
        result, acked = pipe.execute()
        if int(acked) < replicas:
            raise StateNotReplicatedError(
                f"{what} reached {int(acked)} of {replicas} replicas in {timeout_ms} ms "
                "(SNOWPIPE_STATE_MIN_REPLICAS)"
            )
        return result

    # --- The pump side --------------------------------------------------------------------------

    def settle(
        self, ref: ChannelRef, lease: str, committed: int, *, errors: int = 0,
        upper_bound: str | None = None, message: str | None = None,
        checked_in: str | None = None,
    ) -> Settled:  # fmt: skip
        """After an open: raise the offset counter to Snowflake's committed offset, confirm it
        (trim, or hold what row errors touched), and mark the channel settled (see the module
        docstring). LeaseLost if the lease is not `lease`'s; StoreChanged if the store's
        incarnation is no longer `checked_in`, the one seen before the lease check that
        preceded the open (the open may predate another pump's: open again)."""
        keys = [
            channel_key(kind, ref)
            for kind in (
                "lease", "next", "log", "bytes", "committed", "errors", "held", "heldinfo",
                "settled", "refused", "sent", "markinc",
            )
        ]  # fmt: skip
        args: list[Any] = [
            lease, committed, errors, upper_bound or "", _one_line(message), checked_in or "",
        ]  # fmt: skip
        status, inc, raised, trimmed, held, sent = self._settle(keys=keys, args=args)
        _check_session(int(status), ref)
        return Settled(_text(inc), bool(int(raised)), int(trimmed), int(held), _int(sent))

    def trim(
        self, ref: ChannelRef, lease: str, committed: int, *, errors: int = 0,
        upper_bound: str | None = None, message: str | None = None,
    ) -> Confirmed:  # fmt: skip
        """Confirm a committed offset and error count (the trim, or holding what row errors
        touched). LeaseLost / StoreChanged when the session is no longer valid."""
        keys = [
            channel_key(kind, ref)
            for kind in ("lease", "settled", "log", "bytes", "committed", "errors", "held",
                         "heldinfo")
        ]  # fmt: skip
        args: list[Any] = [lease, committed, errors, upper_bound or "", _one_line(message)]
        removed, held = self._trim(keys=keys, args=args)
        _check_session(int(removed), ref)
        return Confirmed(int(removed), int(held))

    def mark_sent(
        self, ref: ChannelRef, lease: str, offset: int, *, replicas: int = 0, timeout_ms: int = 0
    ) -> int:
        """Raise the channel's sent mark to `offset` before appending up to it; the mark. With
        `replicas`, StateNotReplicatedError unless that many replicas acknowledged it (a WAIT
        on the same connection: the entries written before are covered too, replication is
        ordered)."""
        keys = [channel_key("lease", ref), channel_key("settled", ref), channel_key("sent", ref)]
        mark = self._call(
            self._mark_sent, keys, [lease, offset],
            replicas=replicas, timeout_ms=timeout_ms, what="the sent mark",
        )  # fmt: skip
        if isinstance(mark, int) and mark < 0:
            _check_session(mark, ref)
        return int(_text(mark))

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

    def dead_letter(
        self,
        ref: ChannelRef,
        lease: str,
        entries: Sequence[Entry],
        letter_id: str,
        letter: bytes,
        *,
        settled: bool = True,
        now_ms: int = 0,
        replicas: int = 0,
        timeout_ms: int = 0,
    ) -> int:
        """Move `entries` (one batch's) out of the log into the dead letters, atomically.

        Returns how many entries were removed (0: already gone, nothing stored); with
        `replicas`, StateNotReplicatedError unless that many replicas acknowledged it. The
        batch's dedup record is marked with the letter id, so a late copy of the original is not
        logged again but the letter's requeue is. `settled`: the pump settled the channel in
        this incarnation; otherwise each entry must lie above the sent mark, and the channel
        must have been settled in this incarnation (MaybeSent).
        """
        if not entries:
            return 0
        batch_ids = {e.batch_id for e in entries}
        if len(batch_ids) != 1:
            raise ValueError("dead_letter takes the entries of one batch")
        keys = [
            channel_key("lease", ref),
            channel_key("settled", ref),
            channel_key("log", ref),
            channel_key("bytes", ref),
            channel_key("sent", ref),
            LETTERS_KEY,
            ORDER_KEY,
            batch_key(entries[0].batch_id),
            channel_key("markinc", ref),
        ]
        args: list[Any] = [
            lease, "settled" if settled else "unsent", letter_id, letter, now_ms, ref.key,
            *(e.entry_id for e in entries),
        ]  # fmt: skip
        removed = int(
            self._call(
                self._dead, keys, args, replicas=replicas, timeout_ms=timeout_ms,
                what="a dead letter",
            )
        )  # fmt: skip
        if removed == -3:
            raise MaybeSent(f"{ref}: an entry of batch {entries[0].batch_id} may have been sent")
        _check_session(removed, ref)
        return removed

    def refuse(self, ref: ChannelRef, lease: str, reason: str, ttl_seconds: float) -> None:
        """Close the channel's gate with `reason` for `ttl_seconds` (an open was refused)."""
        keys = [channel_key("lease", ref), channel_key("settled", ref), channel_key("refused", ref)]
        args: list[Any] = [lease, _one_line(reason), int(ttl_seconds * 1000)]
        done = int(self._refuse(keys=keys, args=args))
        if done < 0:
            raise LeaseLost(str(ref))

    def sent_mark(self, ref: ChannelRef) -> int:
        """The channel's sent mark (0 if none)."""
        return _int(self._redis.get(channel_key("sent", ref)))

    # --- Held entries (row errors) --------------------------------------------------------------

    def held_windows(self, ref: ChannelRef) -> list[HeldWindow]:
        """The windows of held entries waiting for their row errors to be attributed, oldest
        first."""
        raw = self._redis.hgetall(channel_key("heldinfo", ref))
        windows = []
        for field, value in raw.items():
            after, upto, errors, bound, message = _text(value).split("\t", 4)
            windows.append(
                HeldWindow(int(after), int(upto), int(errors), bound, message, int(_text(field)))
            )
        return sorted(windows, key=lambda w: w.total)

    def held_entries(self, ref: ChannelRef, window: HeldWindow) -> list[Entry]:
        """The held entries of `window`."""
        raw = self._redis.xrange(
            channel_key("held", ref), f"({window.after}-0", f"{window.upto}-0"
        )
        return _entries(raw)

    def release_held(
        self,
        ref: ChannelRef,
        lease: str,
        window: HeldWindow,
        entries: Sequence[Entry],
        letters: Sequence[tuple[str, bytes]],
        *,
        now_ms: int,
    ) -> None:
        """Store the row-error `letters` (id, JSON) of `window` and drop its held entries, in one
        script (adding a letter twice overwrites it with the same content)."""
        keys = [
            channel_key("lease", ref),
            channel_key("settled", ref),
            channel_key("held", ref),
            channel_key("heldinfo", ref),
            LETTERS_KEY,
            ORDER_KEY,
        ]
        args: list[Any] = [lease, window.field, now_ms, len(letters)]
        for letter_id, data in letters:
            args.extend((letter_id, data))
        args.extend(e.entry_id for e in entries)
        _check_session(int(self._release(keys=keys, args=args)), ref)

    # --- Inspection -----------------------------------------------------------------------------

    def incarnation(self) -> str:
        """The incarnation the scripts see (`-` where the store offers no INFO to scripts)."""
        return _text(self._which())

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
        return self.depths([ref])[0]

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
        return _int(self._redis.get(channel_key("next", ref)))

    def committed_offset(self, ref: ChannelRef) -> int:
        """Snowflake's committed offset at the channel's last confirmation (0 if none)."""
        return _int(self._redis.get(channel_key("committed", ref)))


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())



def _append_result(ref: ChannelRef, status: int, value: str) -> AppendResult:
    if status == 0:
        return AlreadyLogged(value)
    if status == 2:
        return LogFull(int(value))
    if status == 3:
        return InDeadLetters(value)
    if status == 4:
        return ChannelRefused(value)
    if status == 5:
        return Unsettled()
    _, first, last = value.split("\t")[:3]
    return Logged(ref, int(first), int(last))
