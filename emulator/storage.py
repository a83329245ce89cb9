"""SQLite persistence: registered pipes, channel offsets and counters, committed rows.

Committed rows are stored one SQLite row per committed append (the good NDJSON lines joined), so
the commit pump writes one row per batch instead of one per table row; `iter_rows` expands them.
Only the event-loop thread touches the connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import orjson

from emulator.schema import Column, columns_from_json

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pipes (
    database TEXT NOT NULL, schema TEXT NOT NULL, pipe TEXT NOT NULL,
    PRIMARY KEY (database, schema, pipe)
);
CREATE TABLE IF NOT EXISTS channels (
    database TEXT NOT NULL, schema TEXT NOT NULL, pipe TEXT NOT NULL, channel_key TEXT NOT NULL,
    name TEXT NOT NULL, client_seq INTEGER NOT NULL, created_on_ms INTEGER NOT NULL,
    last_committed_offset_token TEXT,
    rows_inserted INTEGER NOT NULL, rows_parsed INTEGER NOT NULL, rows_error_count INTEGER NOT NULL,
    last_error_offset_upper_bound TEXT, last_error_message TEXT, last_error_timestamp_ms INTEGER,
    PRIMARY KEY (database, schema, pipe, channel_key)
);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    database TEXT NOT NULL, schema TEXT NOT NULL, pipe TEXT NOT NULL, channel TEXT NOT NULL,
    start_offset_token TEXT, end_offset_token TEXT,
    n_rows INTEGER NOT NULL, positions TEXT, rows BLOB NOT NULL, committed_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pipe_columns (
    database TEXT NOT NULL, schema TEXT NOT NULL, pipe TEXT NOT NULL, columns TEXT NOT NULL,
    PRIMARY KEY (database, schema, pipe)
);
CREATE INDEX IF NOT EXISTS batches_by_pipe ON batches (database, schema, pipe, id);
CREATE TABLE IF NOT EXISTS pipe_tables (
    database TEXT NOT NULL, schema TEXT NOT NULL, pipe TEXT NOT NULL, table_name TEXT NOT NULL,
    PRIMARY KEY (database, schema, pipe)
);
CREATE TABLE IF NOT EXISTS error_logging (
    database TEXT NOT NULL, schema TEXT NOT NULL, table_name TEXT NOT NULL,
    PRIMARY KEY (database, schema, table_name)
);
CREATE TABLE IF NOT EXISTS error_rows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    database TEXT NOT NULL, schema TEXT NOT NULL, table_name TEXT NOT NULL,
    timestamp_ns INTEGER NOT NULL, query_id TEXT NOT NULL, error_code INTEGER NOT NULL,
    error_metadata TEXT NOT NULL, error_data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS error_rows_by_table ON error_rows (database, schema, table_name, id);
"""

TableKey = tuple[str, str, str]


@dataclass(slots=True)
class StoredChannel:
    """A channel row as persisted."""

    database: str
    schema: str
    pipe: str
    channel_key: str
    name: str
    client_seq: int
    created_on_ms: int
    last_committed_offset_token: str | None
    rows_inserted: int
    rows_parsed: int
    rows_error_count: int
    last_error_offset_upper_bound: str | None
    last_error_message: str | None
    last_error_timestamp_ms: int | None


@dataclass(slots=True)
class StoredBatch:
    """One committed append, ready to write."""

    database: str
    schema: str
    pipe: str
    channel: str
    start_offset_token: str | None
    end_offset_token: str | None
    n_rows: int
    positions: list[int] | None
    rows: list[bytes]
    committed_at_ms: int


@dataclass(frozen=True, slots=True)
class ErrorRow:
    """One row of a table's error table (the columns of Snowflake's error tables)."""

    database: str
    schema: str
    table: str
    timestamp_ns: int  # wall-clock time of the append that carried the row (ns since the epoch)
    query_id: str
    error_code: int
    error_metadata: dict[str, object]
    error_data: dict[str, object]


@dataclass(frozen=True, slots=True)
class CommittedRow:
    """One committed table row with the channel and offset token it came with."""

    channel: str
    offset_token: str | None
    row: bytes  # the JSON object text as appended
    committed_at_ms: int = 0  # wall-clock time of the commit (ms since the epoch)


class Storage:
    """The SQLite database (in memory unless a path is given)."""

    def __init__(self, path: str | None) -> None:
        self.path = path or ":memory:"
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if path:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def load_pipes(self) -> list[tuple[str, str, str]]:
        """Every persisted pipe."""
        return [tuple(r) for r in self._db.execute("SELECT database, schema, pipe FROM pipes")]

    def save_pipe(self, database: str, schema: str, pipe: str) -> None:
        """Remember a pipe."""
        self._db.execute(
            "INSERT OR IGNORE INTO pipes VALUES (?, ?, ?)", (database, schema, pipe)
        )

    def load_columns(self) -> dict[tuple[str, str, str], list[Column]]:
        """Every persisted pipe schema."""
        rows = self._db.execute("SELECT database, schema, pipe, columns FROM pipe_columns")
        return {(d, s, p): columns_from_json(orjson.loads(c)) for d, s, p, c in rows}

    def save_columns(self, key: tuple[str, str, str], columns: list[dict[str, object]]) -> None:
        """Remember a pipe's schema."""
        self._db.execute(
            "INSERT OR REPLACE INTO pipe_columns VALUES (?, ?, ?, ?)",
            (*key, orjson.dumps(columns).decode()),
        )

    def load_channels(self) -> list[StoredChannel]:
        """Every persisted channel."""
        rows = self._db.execute(
            "SELECT database, schema, pipe, channel_key, name, client_seq, created_on_ms, "
            "last_committed_offset_token, rows_inserted, rows_parsed, rows_error_count, "
            "last_error_offset_upper_bound, last_error_message, last_error_timestamp_ms "
            "FROM channels"
        )
        return [StoredChannel(*r) for r in rows]

    def delete_channel(self, database: str, schema: str, pipe: str, channel_key: str) -> None:
        """Forget a dropped channel (its committed rows stay)."""
        self._db.execute(
            "DELETE FROM channels WHERE database=? AND schema=? AND pipe=? AND channel_key=?",
            (database, schema, pipe, channel_key),
        )

    def load_pipe_tables(self) -> dict[tuple[str, str, str], str]:
        """The table each registered pipe loads, where one was given or derived."""
        rows = self._db.execute("SELECT database, schema, pipe, table_name FROM pipe_tables")
        return {(d, s, p): t for d, s, p, t in rows}

    def save_pipe_table(self, key: tuple[str, str, str], table: str) -> None:
        """Remember which table a pipe loads."""
        self._db.execute("INSERT OR REPLACE INTO pipe_tables VALUES (?, ?, ?, ?)", (*key, table))

    def load_error_logging(self) -> set[TableKey]:
        """The tables with error logging on."""
        rows = self._db.execute("SELECT database, schema, table_name FROM error_logging")
        return {(d, s, t) for d, s, t in rows}

    def set_error_logging(self, table: TableKey, on: bool) -> None:
        """Turn a table's error logging on or off; off drops its error table's rows."""
        if on:
            self._db.execute("INSERT OR IGNORE INTO error_logging VALUES (?, ?, ?)", table)
            return
        self._db.execute(
            "DELETE FROM error_logging WHERE database=? AND schema=? AND table_name=?", table
        )
        self.truncate_error_rows(table)

    def iter_error_rows(self, table: TableKey) -> Iterator[ErrorRow]:
        """The rows of a table's error table, in the order they were recorded."""
        cursor = self._db.execute(
            "SELECT timestamp_ns, query_id, error_code, error_metadata, error_data FROM error_rows "
            "WHERE database=? AND schema=? AND table_name=? ORDER BY id",
            table,
        )
        for ts, query_id, code, metadata, data in cursor:
            yield ErrorRow(
                *table, ts, query_id, code, orjson.loads(metadata), orjson.loads(data)
            )

    def truncate_error_rows(self, table: TableKey) -> int:
        """Delete every row of a table's error table; returns how many there were."""
        cursor = self._db.execute(
            "DELETE FROM error_rows WHERE database=? AND schema=? AND table_name=?", table
        )
        return int(cursor.rowcount)

    def write(
        self,
        channels: Iterable[StoredChannel],
        batches: Iterable[StoredBatch],
        error_rows: Iterable[ErrorRow] = (),
    ) -> None:
        """Persist channel states, committed batches and error-table rows in one transaction."""
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO channels VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        c.database, c.schema, c.pipe, c.channel_key, c.name, c.client_seq,
                        c.created_on_ms, c.last_committed_offset_token, c.rows_inserted,
                        c.rows_parsed, c.rows_error_count, c.last_error_offset_upper_bound,
                        c.last_error_message, c.last_error_timestamp_ms,
                    )
                    for c in channels
                ],
            )
            db.executemany(
                "INSERT INTO batches (database, schema, pipe, channel, start_offset_token, "
                "end_offset_token, n_rows, positions, rows, committed_at_ms) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        b.database, b.schema, b.pipe, b.channel, b.start_offset_token,
                        b.end_offset_token, b.n_rows,
                        None if b.positions is None else ",".join(map(str, b.positions)),
                        b"\n".join(b.rows), b.committed_at_ms,
                    )
                    for b in batches
                ],
            )
            db.executemany(
                "INSERT INTO error_rows (database, schema, table_name, timestamp_ns, query_id, "
                "error_code, error_metadata, error_data) VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        e.database, e.schema, e.table, e.timestamp_ns, e.query_id, e.error_code,
                        orjson.dumps(e.error_metadata).decode(),
                        orjson.dumps(e.error_data).decode(),
                    )
                    for e in error_rows
                ],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def iter_rows(self, database: str, schema: str, pipe: str) -> Iterator[CommittedRow]:
        """Committed rows of a pipe in commit order."""
        cursor = self._db.execute(
            "SELECT channel, start_offset_token, end_offset_token, n_rows, positions, rows, "
            "committed_at_ms FROM batches WHERE database=? AND schema=? AND pipe=? ORDER BY id",
            (database, schema, pipe),
        )
        for channel, start, end, n_rows, positions, blob, committed_at_ms in cursor:
            if not blob:
                continue
            rows = bytes(blob).split(b"\n")
            where = list(range(len(rows))) if positions is None else [
                int(p) for p in positions.split(",")
            ]
            offsets = _row_offsets(start, end, n_rows)
            for pos, row in zip(where, rows, strict=True):
                yield CommittedRow(
                    channel, offsets[pos] if offsets else end, row, committed_at_ms
                )

    def count_rows(self) -> int:
        """Committed table rows across all pipes (for stats after a restart)."""
        (n,) = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(rows) - LENGTH(REPLACE(rows, X'0A', '')) + 1), 0) "
            "FROM batches WHERE LENGTH(rows) > 0"
        ).fetchone()
        return int(n)


def _row_offsets(start: str | None, end: str | None, n_rows: int) -> list[str] | None:
    """Per-row offset tokens when the batch's integer range has one token per row, else None."""
    if start is None or end is None:
        return None
    try:
        first, last = int(start), int(end)
    except ValueError:
        return None
    if last - first + 1 != n_rows:
        return None
    return [str(first + i) for i in range(n_rows)]
