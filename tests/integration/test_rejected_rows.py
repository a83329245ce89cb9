"""Rejected rows found to the row through the emulator's error tables and SQL API, with the
worker's own client: coalesced batches appended as the pump does, the resolver, the letters."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.support.emulator import RunningEmulator
from tests.support.keys import key_pair
from worker.delivery.channels import ChannelRef
from worker.delivery.log import Entry
from worker.rejections import RowErrorResolver, rejected_letters
from worker.retry import RetryBudget, RetryPolicy
from worker.settings import Settings
from worker.snowpipe.client import SnowpipeClient
from worker.snowpipe.encoding import encode_pieces, encode_request
from worker.snowpipe.errortable import ErrorTableReader, TableLocator, TableName

ACCOUNT, USER = "REJACCT", "LOADER"
DB, SCHEMA = "DB", "PUBLIC"
COLUMNS = [{"name": "ID", "type": "NUMBER", "nullable": False}, {"name": "NAME", "type": "VARCHAR"}]
_tables = itertools.count()


@pytest.fixture(scope="module")
def emu(shared_emulator: RunningEmulator) -> RunningEmulator:
    shared_emulator.register_key(ACCOUNT, USER, key_pair().public_pem)
    return shared_emulator


@pytest.fixture
def client(emu: RunningEmulator) -> Iterator[SnowpipeClient]:
    settings = Settings(
        account=ACCOUNT.lower(),
        user=USER.lower(),
        private_key=key_pair().private_pem.decode(),
        account_url=emu.url,
        retry_deadline_seconds=10.0,
    )
    c = SnowpipeClient(
        settings, policy=RetryPolicy.from_settings(settings, budget=RetryBudget(100))
    )
    yield c
    c.close()


def table_name(prefix: str) -> str:
    return f"{prefix}_{next(_tables)}_{time.monotonic_ns()}"


def entries_of(batches: Sequence[tuple[str, list[dict[str, Any]]]], first: int) -> list[Entry]:
    """The log entries of batches as the task logs them: pieces of at most 2 rows here."""
    entries, offset = [], first
    for batch_id, rows in batches:
        start = 0
        for count, data in encode_pieces(rows, compression="none", max_request_bytes=4096):
            entries.append(Entry(offset, batch_id, count, data, 0, first_row=start))
            offset, start = offset + 1, start + count
    return entries


def append_as_the_pump_does(
    client: SnowpipeClient, ref: ChannelRef, entries: Sequence[Entry]
) -> int:
    """One request for all `entries` (start/end offset tokens), then wait for its commit; the
    channel's rows_error_count after it."""
    opened = client.open_channel(*ref.target, ref.channel)
    payload = encode_request(
        b"".join(e.data for e in entries), sum(e.rows for e in entries), "none"
    )
    client.append_rows(
        *ref.target,
        ref.channel,
        continuation_token=opened.continuation_token,
        payload=payload,
        start_offset_token=str(entries[0].offset),
        end_offset_token=str(entries[-1].offset),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = client.bulk_channel_status(*ref.target, [ref.channel])[ref.channel]
        if status.last_committed_offset_token == str(entries[-1].offset):
            return status.rows_error_count
        time.sleep(0.1)
    raise AssertionError("the append was not committed within 30 s")


def batches_with_bad_rows() -> tuple[list[tuple[str, list[dict[str, Any]]]], set[tuple[str, int]]]:
    """12 batches of 5 rows; 3 rows have a null ID (NOT NULL), one is a duplicate of a good one
    in shape but not in content."""
    bad = {("b03", 2), ("b07", 0), ("b11", 4)}
    batches = []
    for b in range(12):
        batch = f"b{b:02d}"
        rows = [
            {"ID": None if (batch, i) in bad else b * 10 + i, "NAME": f"row {i}"} for i in range(5)
        ]
        batches.append((batch, rows))
    return batches, bad


def test_rows_rejected_in_a_coalesced_request_are_found_to_the_row(
    emu: RunningEmulator, client: SnowpipeClient
) -> None:
    table = table_name("ORDERS")
    pipe = f"{table}-STREAMING"
    emu.add_pipe(DB, SCHEMA, pipe, columns=COLUMNS, error_logging=True)
    ref = ChannelRef(DB, SCHEMA, pipe, "snowpipe_0")
    batches, bad = batches_with_bad_rows()
    entries = entries_of(batches, first=1_000_000)
    errors = append_as_the_pump_does(client, ref, entries)
    assert errors == 3

    resolver = RowErrorResolver.from_settings(client.settings, client)
    resolution = resolver.resolve(ref, entries, expected=errors)
    assert resolution.complete, resolution.reason
    assert resolution.unmatched == ()
    found = {(b, r.row) for b, rows in resolution.rejected.items() for r in rows}
    assert found == bad
    letters = rejected_letters(ref, resolution)
    assert [x.batch_id for x in letters] == ["b03", "b07", "b11"]  # no other batch flagged
    for letter in letters:
        assert letter.kind == "row_errors"
        assert letter.exact_rows
        (rejected,) = letter.detail["rejected"]
        assert letter.rows == [{"ID": None, "NAME": f"row {rejected['row']}"}]
        assert rejected["message"] == "NULL result in a non-nullable column"
        assert rejected["column"] == "ID"


def test_the_reader_only_returns_rows_of_the_channel_and_offset_range(
    emu: RunningEmulator, client: SnowpipeClient
) -> None:
    table = table_name("EVENTS")
    pipe = f"{table}-STREAMING"
    emu.add_pipe(DB, SCHEMA, pipe, columns=COLUMNS, error_logging=True)
    first = entries_of([("a", [{"ID": None, "NAME": "first"}])], first=10)
    second = entries_of([("b", [{"ID": None, "NAME": "second"}])], first=20)
    other = entries_of([("c", [{"ID": None, "NAME": "other channel"}])], first=10)
    append_as_the_pump_does(client, ChannelRef(DB, SCHEMA, pipe, "ch_a"), first)
    append_as_the_pump_does(client, ChannelRef(DB, SCHEMA, pipe, "ch_a"), second)
    append_as_the_pump_does(client, ChannelRef(DB, SCHEMA, pipe, "ch_b"), other)
    reader = ErrorTableReader(client.sql())
    rows = reader.rows(TableName(DB, SCHEMA, table), pipe, "ch_a", 20, 20)
    assert [r.data for r in rows] == ['{"ID":null,"NAME":"second"}']
    (row,) = rows
    assert (row.channel, row.offset_token_lower_bound, row.offset_token_upper_bound) == (
        "ch_a",
        "20",
        "20",
    )
    assert (row.content_type, row.truncated, row.column) == ("json", False, "ID")


def test_without_error_logging_the_resolution_is_unavailable_and_says_how_to_turn_it_on(
    emu: RunningEmulator, client: SnowpipeClient
) -> None:
    table = table_name("PLAIN")
    pipe = f"{table}-STREAMING"
    emu.add_pipe(DB, SCHEMA, pipe, columns=COLUMNS)
    ref = ChannelRef(DB, SCHEMA, pipe, "snowpipe_0")
    entries = entries_of([("x", [{"ID": None, "NAME": "bad"}, {"ID": 1, "NAME": "good"}])], 5)
    assert append_as_the_pump_does(client, ref, entries) == 1
    resolution = RowErrorResolver.from_settings(client.settings, client).resolve(ref, entries, 1)
    assert resolution.status == "unavailable"
    assert f"ALTER TABLE {DB}.{SCHEMA}.{table} SET ERROR_LOGGING = TRUE" in resolution.reason
    assert "002003" in resolution.reason


def test_a_named_pipe_is_located_with_describe_pipe(
    emu: RunningEmulator, client: SnowpipeClient
) -> None:
    table = table_name("TARGET")
    emu.add_pipe(DB, SCHEMA, f"{table}_PIPE", columns=COLUMNS, table=table, error_logging=True)
    locator = TableLocator(client.sql())
    assert locator.table_of(DB, SCHEMA, f"{table}_PIPE") == TableName(DB, SCHEMA, table)
    ref = ChannelRef(DB, SCHEMA, f"{table}_PIPE", "snowpipe_0")
    entries = entries_of([("n", [{"ID": 1, "NAME": "ok"}, {"ID": None, "NAME": "bad"}])], 7)
    assert append_as_the_pump_does(client, ref, entries) == 1
    resolution = RowErrorResolver.from_settings(client.settings, client).resolve(ref, entries, 1)
    assert resolution.complete, resolution.reason
    assert [r.row for r in resolution.rejected["n"]] == [1]
