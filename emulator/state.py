"""Pipes, channels, continuation tokens, pending batches and the commit pump.

Everything here runs on the event loop thread (uvicorn with one worker), and no method awaits
between reading and changing a channel, so channel updates are atomic without locks.

Continuation tokens are `"<client_seq>_<row_seq>"` (the shape seen in Snowflake's Openflow test
fixtures): an open bumps `client_seq` and resets `row_seq`, each accepted append bumps `row_seq`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
import secrets
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from emulator.config import EmulatorConfig
from emulator.errors import (
    BYTE_RATE_LIMIT_BODY,
    RATE_LIMIT_BODY,
    STALE_SEQUENCER_MESSAGE,
    ApiError,
    bad_request,
    channel_not_found,
    coded,
    pipe_not_found,
)
from emulator.errortable import error_rows
from emulator.ndjson import ParsedRows
from emulator.schema import Column
from emulator.storage import ErrorRow, Storage, StoredBatch, StoredChannel, TableKey

PipeKey = tuple[str, str, str]
ChannelKey = tuple[str, str, str, str]
IMPLICIT_PIPE_SUFFIX = "-STREAMING"
ELASTIC_CHANNEL = "ELASTIC"
# The pump sleeps this much past the next due commit, so that batches appended in the same few
# milliseconds are written together (one SQLite transaction); commits are never early.
_COMMIT_BATCH_SLACK = 0.002


def _now_ms() -> int:
    return int(time.time() * 1000)


def rfc3339_ms(ms: int | None) -> str | None:
    """`2026-01-02T03:04:05.678Z` for epoch milliseconds (None stays None)."""
    if ms is None:
        return None
    when = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@dataclass(slots=True)
class PendingBatch:
    """An accepted append waiting for its commit."""

    channel: Channel
    start_offset_token: str | None
    end_offset_token: str | None
    rows: ParsedRows
    appended_at: float
    commit_at: float
    discarded: bool = False
    appended_ns: int = 0  # wall clock of the append (the error table's `timestamp`)


@dataclass(slots=True)
class Channel:
    """One named channel of a pipe."""

    database: str
    schema: str
    pipe: str
    key: str  # upper-cased name, for case-insensitive lookups
    name: str  # as opened
    client_seq: int
    created_on_ms: int
    row_seq: int = 0
    status_code: str = "SUCCESS"
    last_committed_offset_token: str | None = None
    rows_inserted: int = 0
    rows_parsed: int = 0
    rows_error_count: int = 0
    last_error_offset_upper_bound: str | None = None
    last_error_message: str | None = None
    last_error_timestamp_ms: int | None = None
    avg_latency_ms: float = 0.0
    pending: deque[PendingBatch] = field(default_factory=deque)
    session: str = field(default_factory=lambda: secrets.token_hex(8))
    bucket: float = 0.0
    bucket_at: float = 0.0
    byte_bucket: float = 0.0
    byte_bucket_at: float = 0.0

    @property
    def continuation_token(self) -> str:
        """The token the next append must carry."""
        return f"{self.client_seq}_{self.row_seq}"

    def status(self, *, requested_name: str | None = None) -> dict[str, Any]:
        """The channel status object (docs/protocol.md#bulk-channel-status).

        One error counter, `rows_error_count` (a client mapping both spellings to one field
        refuses an object with both); `last_error_timestamp` is RFC 3339 or null.
        """
        return {
            "database_name": self.database,
            "schema_name": self.schema,
            "pipe_name": self.pipe,
            "channel_name": requested_name or self.name,
            "channel_status_code": self.status_code,
            "last_committed_offset_token": self.last_committed_offset_token,
            "created_on_ms": self.created_on_ms,
            "rows_inserted": self.rows_inserted,
            "rows_parsed": self.rows_parsed,
            "rows_error_count": self.rows_error_count,
            "last_error_offset_upper_bound": self.last_error_offset_upper_bound,
            "last_error_message": self.last_error_message,
            "last_error_timestamp": rfc3339_ms(self.last_error_timestamp_ms),
            "snowflake_avg_processing_latency_ms": round(self.avg_latency_ms),
        }

    def stored(self) -> StoredChannel:
        """The persisted form."""
        return StoredChannel(
            self.database, self.schema, self.pipe, self.key, self.name, self.client_seq,
            self.created_on_ms, self.last_committed_offset_token, self.rows_inserted,
            self.rows_parsed, self.rows_error_count, self.last_error_offset_upper_bound,
            self.last_error_message, self.last_error_timestamp_ms,
        )


@dataclass
class Stats:
    """Counters for GET /_emulator/stats."""

    requests: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    appends: int = 0
    append_bytes: int = 0  # request bodies of accepted appends, as on the wire (compressed)
    rows_appended: int = 0
    rows_committed: int = 0
    rows_in_error: int = 0
    batches_committed: int = 0
    batches_discarded: int = 0
    commit_lag_total: float = 0.0
    commit_lag_max: float = 0.0

    def count(self, endpoint: str, status: int) -> None:
        """Count one response."""
        by_status = self.requests[endpoint]
        key = str(status)
        by_status[key] = by_status.get(key, 0) + 1


def identifier(name: str) -> str:
    """An identifier as Snowflake resolves it: `"Quoted"` keeps its case (without the quotes,
    `""` read as `"`), anything else is upper-cased."""
    name = name.strip()
    if len(name) >= 2 and name.startswith('"') and name.endswith('"'):
        return name[1:-1].replace('""', '"')
    return name.upper()


def pipe_key(database: str, schema: str, pipe: str) -> PipeKey:
    """Identifiers in paths: unquoted ones are case-insensitive (stored upper-cased)."""
    return (identifier(database), identifier(schema), identifier(pipe))


def implied_table(pipe: str) -> str:
    """The table a pipe loads when none was named: `T` for `T-STREAMING`, else the pipe's name."""
    if pipe.endswith(IMPLICIT_PIPE_SUFFIX) and len(pipe) > len(IMPLICIT_PIPE_SUFFIX):
        return pipe[: -len(IMPLICIT_PIPE_SUFFIX)]
    return pipe


def default_pipe(table: str) -> str:
    """The name of a table's default pipe (`T-STREAMING`, or `"My T-STREAMING"` when quoted)."""
    table = table.strip()
    if len(table) >= 2 and table.startswith('"') and table.endswith('"'):
        return table[:-1] + IMPLICIT_PIPE_SUFFIX + '"'
    return table + IMPLICIT_PIPE_SUFFIX


class EmulatorState:
    """All channel state of one emulator process, plus the commit pump."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.started_ns = time.time_ns()
        self.storage = Storage(config.db_path)
        self.stats = Stats()
        self.pipes: set[PipeKey] = set()
        self.columns: dict[PipeKey, list[Column]] = {}
        # The table a pipe loads, where it was named at registration (else `implied_table`).
        self.pipe_tables: dict[PipeKey, str] = {}
        # Tables with ERROR_LOGGING = TRUE: their rejected rows go to their error table.
        self.error_logging: set[TableKey] = set()
        self.channels: dict[ChannelKey, Channel] = {}
        self.commits_paused = False
        self._queue: deque[PendingBatch] = deque()
        self._wake = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self.pipes.update(self.storage.load_pipes())
        self.columns.update(self.storage.load_columns())
        self.pipe_tables.update(self.storage.load_pipe_tables())
        self.error_logging.update(self.storage.load_error_logging())
        for database, schema, pipe in config.pipes:
            named = (database, schema, pipe)
            self.add_pipe(
                database, schema, pipe, columns=config.pipe_columns.get(named),
                table=config.pipe_tables.get(named),
                error_logging=config.pipe_error_logging.get(named),
            )
        for c in self.storage.load_channels():
            # After a restart every old continuation token is stale (pending rows were lost):
            # the client must reopen and replay from the committed offset, as after a failover.
            self.channels[(c.database, c.schema, c.pipe, c.channel_key)] = Channel(
                database=c.database, schema=c.schema, pipe=c.pipe, key=c.channel_key,
                name=c.name, client_seq=c.client_seq + 1, created_on_ms=c.created_on_ms,
                last_committed_offset_token=c.last_committed_offset_token,
                rows_inserted=c.rows_inserted, rows_parsed=c.rows_parsed,
                rows_error_count=c.rows_error_count,
                last_error_offset_upper_bound=c.last_error_offset_upper_bound,
                last_error_message=c.last_error_message,
                last_error_timestamp_ms=c.last_error_timestamp_ms,
            )

    # -- pipes ---------------------------------------------------------------------------------

    def add_pipe(
        self,
        database: str,
        schema: str,
        pipe: str,
        *,
        columns: list[Column] | None = None,
        table: str | None = None,
        error_logging: bool | None = None,
    ) -> PipeKey:
        """Register a pipe (idempotent); with `columns`, (re)define its table's schema.

        `table` names the table the pipe loads (default: `implied_table`); `error_logging` turns
        that table's error logging on or off (None leaves it as it is; off drops its error
        table's rows, as on the service).
        """
        for label, value in (("database", database), ("schema", schema), ("pipe", pipe)):
            if not value or not value.strip():
                raise ValueError(f"{label} must be a non-empty identifier")
        if table is not None and not table.strip():
            raise ValueError("table must be a non-empty identifier (or left out)")
        key = self._add_key(pipe_key(database, schema, pipe), columns)
        if table is not None:
            self.pipe_tables[key] = identifier(table)
            self.storage.save_pipe_table(key, self.pipe_tables[key])
        if error_logging is not None:
            self.set_error_logging(self.table_of(key), error_logging)
        return key

    def table_of(self, pipe: PipeKey) -> TableKey:
        """The table a pipe loads."""
        return (pipe[0], pipe[1], self.pipe_tables.get(pipe) or implied_table(pipe[2]))

    def set_error_logging(self, table: TableKey, on: bool) -> None:
        """ERROR_LOGGING = TRUE/FALSE on a table (FALSE drops its error table's rows)."""
        if on:
            self.error_logging.add(table)
        else:
            self.error_logging.discard(table)
        self.storage.set_error_logging(table, on)

    def tables(self) -> set[TableKey]:
        """Every table a known pipe loads."""
        return {self.table_of(p) for p in self.pipes}

    def pipes_of(self, table: TableKey) -> list[PipeKey]:
        """The known pipes that load `table`."""
        return sorted(p for p in self.pipes if self.table_of(p) == table)

    def _add_key(self, key: PipeKey, columns: list[Column] | None = None) -> PipeKey:
        if key not in self.pipes:
            self.pipes.add(key)
            self.storage.save_pipe(*key)
        if columns is not None:
            self.columns[key] = list(columns)
            self.storage.save_columns(key, [c.as_json() for c in columns])
        return key

    def require_pipe(self, database: str, schema: str, pipe: str) -> PipeKey:
        """The pipe's key; implicit `<TABLE>-STREAMING` pipes are created on first use."""
        key = pipe_key(database, schema, pipe)
        if key in self.pipes:
            return key
        implicit = key[2].endswith(IMPLICIT_PIPE_SUFFIX) and len(key[2]) > len(
            IMPLICIT_PIPE_SUFFIX
        )
        if implicit or self.config.accept_any_pipe:
            return self._add_key(key)
        raise pipe_not_found(*key)

    # -- channels ------------------------------------------------------------------------------

    def open_channel(
        self,
        database: str,
        schema: str,
        pipe: str,
        channel: str,
        *,
        offset_token: str | None,
        fail_on_uncommitted_rows: bool,
    ) -> Channel:
        """Create or reopen a channel: bumps the client sequencer, discards in-flight rows."""
        pkey = self.require_pipe(database, schema, pipe)
        ckey = (*pkey, channel.upper())
        ch = self.channels.get(ckey)
        if ch is None:
            ch = Channel(
                database=pkey[0], schema=pkey[1], pipe=pkey[2], key=ckey[3], name=channel,
                client_seq=0, created_on_ms=_now_ms(),
            )
            self.channels[ckey] = ch
        else:
            self._check_uncommitted(ch, fail_on_uncommitted_rows)
            self._discard_pending(ch)
            ch.client_seq += 1
            ch.row_seq = 0
            ch.status_code = "SUCCESS"
            ch.name = channel  # bulk status matches the name of the latest open
        if offset_token is not None:
            ch.last_committed_offset_token = offset_token
        self.storage.write([ch.stored()], [])
        return ch

    def drop_channel(
        self, database: str, schema: str, pipe: str, channel: str, *, fail_on_uncommitted_rows: bool
    ) -> Channel:
        """Delete a channel and its offset token (its committed rows stay)."""
        ch = self.channel(database, schema, pipe, channel)
        self._check_uncommitted(ch, fail_on_uncommitted_rows)
        self._discard_pending(ch)
        del self.channels[(ch.database, ch.schema, ch.pipe, ch.key)]
        self.storage.delete_channel(ch.database, ch.schema, ch.pipe, ch.key)
        return ch

    def invalidate(self, database: str, schema: str, pipe: str, channel: str) -> Channel:
        """Mark a channel ERR_CHANNEL_MUST_BE_REOPENED; its in-flight rows are lost."""
        ch = self.channel(database, schema, pipe, channel)
        self._discard_pending(ch)
        ch.status_code = "ERR_CHANNEL_MUST_BE_REOPENED"
        return ch

    def channel(self, database: str, schema: str, pipe: str, channel: str) -> Channel:
        """An existing channel (path lookup, case-insensitive); 404 ApiError otherwise."""
        pkey = self.require_pipe(database, schema, pipe)
        ch = self.channels.get((*pkey, channel.upper()))
        if ch is None:
            raise channel_not_found(channel, legacy=self.config.legacy_channel_not_found)
        return ch

    def statuses(
        self, database: str, schema: str, pipe: str, names: list[str]
    ) -> dict[str, dict[str, Any]]:
        """Status objects keyed by the requested names; channels not found are omitted.

        Names are case-sensitive, as documented: a name matches a channel opened with exactly
        that name (`--case-insensitive-status` matches ignoring case). Every pipe has its
        `ELASTIC` channel, appended to or not.
        """
        pkey = self.require_pipe(database, schema, pipe)
        out: dict[str, dict[str, Any]] = {}
        for name in names:
            if name == ELASTIC_CHANNEL:
                out[name] = self._elastic(pkey).status(requested_name=name)
                continue
            ch = self.channels.get((*pkey, name.upper()))
            if ch is None:
                continue
            if ch.name == name or self.config.case_insensitive_status:
                out[name] = ch.status(requested_name=name)
        return out

    def fail_over(self, pipe: PipeKey | None) -> int:
        """A pipe (None: every pipe) moved host: in-flight rows are lost, tokens go stale.

        Returns how many channels were affected. The scoped-token side (410 until the client
        rediscovers the host) is `ScopedTokens.fail_over`.
        """
        affected = 0
        for ch in self.channels.values():
            if pipe is None or (ch.database, ch.schema, ch.pipe) == pipe:
                self._discard_pending(ch)
                ch.client_seq += 1
                ch.row_seq = 0
                affected += 1
        return affected

    def _check_uncommitted(self, ch: Channel, fail_on_uncommitted_rows: bool) -> None:
        if fail_on_uncommitted_rows and any(not b.discarded for b in ch.pending):
            raise coded(
                409,
                "ERR_CHANNEL_HAS_UNCOMMITTED_DATA",
                f"Channel {ch.name} has uncommitted data.",
                reason="wait for the commit, or pass fail_on_uncommitted_rows=false to discard",
            )

    def _discard_pending(self, ch: Channel) -> None:
        for batch in ch.pending:
            batch.discarded = True
            self.stats.batches_discarded += 1
        ch.pending.clear()

    # -- appends -------------------------------------------------------------------------------

    def check_rate(self, ch: Channel, now: float) -> None:
        """Token bucket of `rate_limit` requests per second per channel; 429 when empty."""
        rate = self.config.rate_limit
        if rate <= 0:
            return
        capacity = max(rate, 1.0)
        if ch.bucket_at == 0.0:
            ch.bucket = capacity
        else:
            ch.bucket = min(capacity, ch.bucket + (now - ch.bucket_at) * rate)
        ch.bucket_at = now
        if ch.bucket >= 1.0:
            ch.bucket -= 1.0
            return
        wait = (1.0 - ch.bucket) / rate
        raise ApiError(
            429,
            RATE_LIMIT_BODY,
            reason=f"more than {rate:g} requests/s on channel {ch.name} (--rate-limit)",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    def check_byte_rate(self, ch: Channel, nbytes: int, now: float) -> None:
        """`max_bytes_per_second` of uncompressed rows per channel; 429 `390701` above it.

        A bucket one second deep: a request is accepted while the bucket is not in debt (so a
        single request may be larger than a second's allowance) and takes its bytes from it.
        """
        rate = self.config.max_bytes_per_second
        if rate <= 0:
            return
        if ch.byte_bucket_at == 0.0:
            ch.byte_bucket = rate
        else:
            ch.byte_bucket = min(rate, ch.byte_bucket + (now - ch.byte_bucket_at) * rate)
        ch.byte_bucket_at = now
        if ch.byte_bucket > 0:
            ch.byte_bucket -= nbytes
            return
        wait = -ch.byte_bucket / rate
        raise ApiError(
            429,
            BYTE_RATE_LIMIT_BODY,
            reason=(
                f"more than {rate:g} uncompressed bytes/s on channel {ch.name} "
                "(--max-bytes-per-second): slow down or spread the rows over more channels"
            ),
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    def check_continuation(self, ch: Channel, token: str | None) -> None:
        """400 for a missing, stale or out-of-sequence continuation token; 409 if invalidated."""
        if ch.status_code != "SUCCESS":
            raise coded(
                409,
                ch.status_code,
                f"Channel {ch.name} is invalid and must be reopened.",
                reason="the channel was invalidated: reopen it, replay from its committed offset",
            )
        if not token:
            raise bad_request(
                "ERR_MISSING_CONTINUATION_TOKEN",
                "continuationToken query parameter is required (from open channel or the "
                "previous append)",
            )
        client, sep, row = token.partition("_")
        if not sep or not client.isdigit() or not row.isdigit():
            raise bad_request(
                "ERR_INVALID_CONTINUATION_TOKEN",
                "continuationToken is not one this service issued",
            )
        if int(client) != ch.client_seq:
            raise ApiError(
                400,
                {"code": "STALE_CONTINUATION_TOKEN_SEQUENCER", "message": STALE_SEQUENCER_MESSAGE},
                reason="the channel was reopened after this token was issued",
            )
        if int(row) != ch.row_seq:
            raise bad_request(
                "ERR_CHANNEL_HAS_INVALID_ROW_SEQUENCER",
                f"Row sequencer {row} in the continuation token does not match the channel's "
                f"{ch.row_seq}; use the next_continuation_token of the latest append, or reopen",
            )

    def append(
        self,
        ch: Channel,
        rows: ParsedRows,
        *,
        start_offset_token: str | None,
        end_offset_token: str | None,
        now: float,
        advance: bool = True,
        wire_bytes: int = 0,
    ) -> None:
        """Queue a batch for commit after the commit delay; advances the row sequencer.

        `wire_bytes` is the request body's size as received (before decompression).
        """
        batch = PendingBatch(
            channel=ch,
            start_offset_token=start_offset_token,
            end_offset_token=end_offset_token,
            rows=rows,
            appended_at=now,
            commit_at=now + self.config.commit_delay,
            appended_ns=time.time_ns(),
        )
        ch.pending.append(batch)
        if advance:
            ch.row_seq += 1
        self.stats.appends += 1
        self.stats.append_bytes += wire_bytes
        self.stats.rows_appended += rows.total
        was_empty = not self._queue
        self._queue.append(batch)
        if was_empty:
            self._wake.set()

    def elastic_channel(self, database: str, schema: str, pipe: str) -> Channel:
        """The implicit ELASTIC channel of a pipe (no sequencer, no offset tokens)."""
        return self._elastic(self.require_pipe(database, schema, pipe))

    def _elastic(self, pkey: PipeKey) -> Channel:
        ckey = (*pkey, ELASTIC_CHANNEL)
        ch = self.channels.get(ckey)
        if ch is None:
            ch = Channel(
                database=pkey[0], schema=pkey[1], pipe=pkey[2], key=ELASTIC_CHANNEL,
                name=ELASTIC_CHANNEL, client_seq=0, created_on_ms=_now_ms(),
            )
            self.channels[ckey] = ch
        return ch

    # -- commit pump ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the commit pump on the running loop."""
        self._wake = asyncio.Event()
        self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    async def stop(self) -> None:
        """Stop the pump and close the database (pending batches are lost, as on a crash)."""
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        self.storage.close()

    def set_paused(self, paused: bool) -> None:
        """Pause or resume commits (admin)."""
        self.commits_paused = paused
        self._wake.set()

    def pending_batches(self) -> int:
        """Batches appended but not yet committed or discarded."""
        return sum(1 for b in self._queue if not b.discarded)

    async def _run_pump(self) -> None:
        while True:
            if self.commits_paused or not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = self._queue[0].commit_at - time.monotonic()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), timeout=delay + _COMMIT_BATCH_SLACK
                    )
                continue
            self.commit_due(time.monotonic())

    def commit_due(self, now: float) -> int:
        """Commit every batch due by `now`, in append order; returns how many."""
        due: list[PendingBatch] = []
        while self._queue and self._queue[0].commit_at <= now:
            batch = self._queue.popleft()
            if not batch.discarded:
                due.append(batch)
        if not due:
            return 0
        now_ms = _now_ms()
        touched: dict[int, Channel] = {}
        stored: list[StoredBatch] = []
        errors: list[ErrorRow] = []
        for batch in due:
            ch = batch.channel
            rows = batch.rows
            stored.append(
                StoredBatch(
                    ch.database, ch.schema, ch.pipe, ch.name, batch.start_offset_token,
                    batch.end_offset_token, rows.total, rows.good_positions, rows.good, now_ms,
                )
            )
            if rows.rejected:
                errors.extend(self._error_rows(batch))
            touched[id(ch)] = ch
        for batch in due:
            self._apply_commit(batch, now, now_ms)
        # Rows and offsets go to SQLite in one transaction, in the same loop step as the
        # in-memory update, so no request ever sees an offset whose rows are not readable.
        live = [
            c for c in touched.values()
            if self.channels.get((c.database, c.schema, c.pipe, c.key)) is c
        ]
        self.storage.write([c.stored() for c in live], stored, errors)
        return len(due)

    def _error_rows(self, batch: PendingBatch) -> list[ErrorRow]:
        """The error-table rows of a committing batch (none unless its table logs errors)."""
        ch = batch.channel
        table = self.table_of((ch.database, ch.schema, ch.pipe))
        if table not in self.error_logging:
            return []
        return error_rows(
            table, batch.rows.rejected, pipe=ch.pipe, channel=ch.name,
            start_offset_token=batch.start_offset_token,
            end_offset_token=batch.end_offset_token,
            timestamp_ns=batch.appended_ns, query_id=str(uuid.uuid4()),
        )

    def _apply_commit(self, batch: PendingBatch, now: float, now_ms: int) -> None:
        ch = batch.channel
        if ch.pending and ch.pending[0] is batch:
            ch.pending.popleft()
        rows = batch.rows
        if batch.end_offset_token is not None:
            ch.last_committed_offset_token = batch.end_offset_token
        ch.rows_parsed += rows.total
        ch.rows_inserted += len(rows.good)
        if rows.errors:
            ch.rows_error_count += rows.errors
            ch.last_error_offset_upper_bound = batch.end_offset_token
            ch.last_error_message = rows.first_error
            ch.last_error_timestamp_ms = now_ms
        lag = now - batch.appended_at
        ch.avg_latency_ms = lag * 1000 if ch.avg_latency_ms == 0 else (
            0.9 * ch.avg_latency_ms + 100 * lag
        )
        stats = self.stats
        stats.rows_committed += len(rows.good)
        stats.rows_in_error += rows.errors
        stats.batches_committed += 1
        stats.commit_lag_total += lag
        stats.commit_lag_max = max(stats.commit_lag_max, lag)

