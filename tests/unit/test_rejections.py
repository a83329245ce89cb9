"""Rejected rows to the row: the mapper (property-based), the letters, the resolver."""

from __future__ import annotations

import base64
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.delivery.channels import ChannelRef
from worker.delivery.log import Entry, HeldWindow
from worker.delivery.rowerrors import ExactAttribution
from worker.errors import (
    ErrorTableUnavailableError,
    PipeTableUnknownError,
    RateLimitedError,
    SqlNoWarehouseError,
    SqlObjectNotFoundError,
)
from worker.rejections import (
    ErrorTableAttribution,
    Resolution,
    RowErrorResolver,
    _parse,
    letter_id,
    match_error_rows,
    rejected_letters,
)
from worker.snowpipe.encoding import encode_line
from worker.snowpipe.errortable import ErrorRow, TableName

REF = ChannelRef("DB", "SC", "T-STREAMING", "snowpipe_0")


def entry(offset: int, batch_id: str, rows: Sequence[dict[str, Any]], first_row: int = 0) -> Entry:
    data = b"".join(encode_line(r, i) for i, r in enumerate(rows))
    return Entry(offset, batch_id, len(rows), data, 0, first_row=first_row)


def rejected(
    row: dict[str, Any] | str,
    lower: int,
    upper: int,
    *,
    message: str = "NULL result in a non-nullable column",
    code: str | None = "100072",
    column: str | None = "ID",
    content_type: str = "json",
    truncated: bool = False,
) -> ErrorRow:
    data = row if isinstance(row, str) else encode_line(row).decode().rstrip("\n")
    return ErrorRow(
        "snowpipe_0", str(lower), str(upper), data, content_type, truncated, message, code, column
    )


def pairs(resolution: Resolution) -> set[tuple[str, int]]:
    return {(b, r.row) for b, rows in resolution.rejected.items() for r in rows}


# --- Examples ------------------------------------------------------------------------------------


def test_three_bad_rows_among_forty_coalesced_batches_are_found_to_the_row() -> None:
    # The case: 40 batches of 10 rows in one request, 3 rows bad.
    entries, bad = [], {("b07", 3), ("b21", 0), ("b39", 9)}
    for n in range(40):
        rows = [
            {"ID": None if (f"b{n:02d}", i) in bad else n * 10 + i, "NAME": f"row {i}"}
            for i in range(10)
        ]
        entries.append(entry(1000 + n, f"b{n:02d}", rows))
    errors = [rejected({"ID": None, "NAME": f"row {i}"}, 1000, 1039) for (_, i) in sorted(bad)]
    resolution = match_error_rows(errors, entries, expected=3)
    assert resolution.complete
    assert resolution.matched == 3
    assert pairs(resolution) == bad
    assert set(resolution.rejected) == {"b07", "b21", "b39"}  # the 37 others are not flagged
    assert resolution.unmatched == ()


def test_row_indexes_count_from_the_entrys_first_row_in_its_batch() -> None:
    entries = [
        entry(5, "b", [{"n": 0}, {"n": 1}]),
        entry(6, "b", [{"n": 2}, {"n": 3}], first_row=2),
    ]
    resolution = match_error_rows([rejected({"n": 3}, 5, 6)], entries, 1)
    (rejection,) = resolution.rejected["b"]
    assert (rejection.row, rejection.offset) == (3, 6)


def test_identical_lines_take_the_next_unmatched_one_in_offset_order() -> None:
    same = {"ID": None}
    entries = [entry(1, "a", [same, {"ID": 1}]), entry(2, "b", [same, same])]
    one = match_error_rows([rejected(same, 1, 2)], entries, 1)
    assert pairs(one) == {("a", 0)}
    three = match_error_rows([rejected(same, 1, 2)] * 3, entries, 3)
    assert pairs(three) == {("a", 0), ("b", 0), ("b", 1)}
    four = match_error_rows([rejected(same, 1, 2)] * 4, entries, 4)
    assert four.matched == 3
    assert len(four.unmatched) == 1  # a line is matched at most once
    assert four.status == "short"
    assert four.shortfall == 1


def test_an_error_row_only_matches_lines_of_entries_within_its_bounds() -> None:
    same = {"ID": None}
    entries = [entry(1, "a", [same]), entry(2, "b", [same]), entry(3, "c", [same])]
    resolution = match_error_rows([rejected(same, 2, 3), rejected(same, 9, 9)], entries, 2)
    assert pairs(resolution) == {("b", 0)}
    assert [r.offset_token_lower_bound for r in resolution.unmatched] == ["9"]


def test_a_row_reserialised_by_snowflake_matches_by_its_json_value() -> None:
    row = {"ID": None, "AMOUNT": Decimal("1.10"), "TAGS": ["x", {"k": True}], "N": 2**70}
    entries = [entry(1, "a", [{"ID": 1}, row])]
    text = '{ "TAGS":["x",{"k":true}],"N":1180591620717411303424, "AMOUNT":1.1,"ID":null }'
    resolution = match_error_rows([rejected(text, 1, 1)], entries, 1)
    assert pairs(resolution) == {("a", 1)}


def test_json_equality_never_takes_true_for_1_and_bytes_win_over_json() -> None:
    entries = [entry(1, "a", [{"v": 1}, {"v": True}, {"v": 1.0}])]
    resolution = match_error_rows(
        [rejected('{"v": true}', 1, 1), rejected({"v": 1.0}, 1, 1)], entries, 2
    )
    # `{"v":1.0}` is byte-identical to line 2; `{"v": true}` equals line 1 as JSON only.
    assert pairs(resolution) == {("a", 1), ("a", 2)}


def test_a_truncated_payload_matches_the_line_it_starts() -> None:
    entries = [entry(1, "a", [{"ID": 1, "BIG": "x" * 50}, {"ID": None, "BIG": "y" * 50}])]
    cut = encode_line({"ID": None, "BIG": "y" * 50}).decode()[:20]
    resolution = match_error_rows([rejected(cut, 1, 1, truncated=True)], entries, 1)
    assert pairs(resolution) == {("a", 1)}


def test_a_base64_payload_is_compared_as_its_bytes() -> None:
    entries = [entry(1, "a", [{"ID": 1}, {"ID": None}])]
    raw = base64.b64encode(encode_line({"ID": None}).rstrip(b"\n")).decode()
    resolution = match_error_rows([rejected(raw, 1, 1, content_type="binary-base64")], entries, 1)
    assert pairs(resolution) == {("a", 1)}


def test_rows_that_cannot_be_placed_are_reported_not_guessed() -> None:
    entries = [entry(1, "a", [{"ID": 1}])]
    strays = [
        rejected({"ID": 99}, 1, 1),  # no such line
        ErrorRow("snowpipe_0", "1", None, '{"ID":1}', "json", False, "m", None, None),
        ErrorRow("snowpipe_0", "1", "1", None, "json", False, "m", None, None),
        rejected("not base64!", 1, 1, content_type="binary-base64"),
    ]
    resolution = match_error_rows(strays, entries, 4)
    assert resolution.matched == 0
    assert len(resolution.unmatched) == 4
    assert resolution.rejected == {}
    assert resolution.status == "short"
    assert resolution.reason == "0 of 4 rejected rows found"


def test_messages_become_one_line() -> None:
    entries = [entry(1, "a", [{"ID": None}])]
    resolution = match_error_rows(
        [rejected({"ID": None}, 1, 1, message="Numeric value 'x'\n  is not recognized")],
        entries,
        1,
    )
    assert resolution.rejected["a"][0].message == "Numeric value 'x' is not recognized"


# --- Properties ----------------------------------------------------------------------------------

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.text(max_size=5),
    st.decimals(
        allow_nan=False, allow_infinity=False, places=2, max_value=10**6, min_value=-(10**6)
    ),
)
ROWS = st.dictionaries(st.sampled_from(["ID", "NAME", "V"]), VALUES, min_size=1, max_size=3)


@dataclass
class Scenario:
    entries: list[Entry]
    requests: list[tuple[int, int]]  # offset bounds of each request
    bad: list[tuple[str, int, int]]  # (batch, row, request index) of each rejected row
    lines: dict[tuple[str, int], bytes]


@st.composite
def scenarios(draw: st.DrawFn, *, distinct: bool) -> Scenario:
    n_batches = draw(st.integers(1, 6))
    entries: list[Entry] = []
    lines: dict[tuple[str, int], bytes] = {}
    offset = draw(st.integers(1, 10**16))
    serial = 0
    for b in range(n_batches):
        batch = f"batch-{b}"
        rows = draw(st.lists(ROWS, min_size=1, max_size=6))
        if distinct:  # a unique key per row (the usual case: ids, timestamps)
            rows = [{**row, "SEQ": serial + i} for i, row in enumerate(rows)]
        serial += len(rows)
        cuts = (
            sorted(draw(st.sets(st.integers(1, len(rows) - 1), max_size=2)))
            if len(rows) > 1
            else []
        )
        start = 0
        for end in [*cuts, len(rows)]:
            entries.append(entry(offset, batch, rows[start:end], first_row=start))
            for i in range(start, end):
                lines[(batch, i)] = encode_line(rows[i], i).rstrip(b"\n")
            offset += draw(st.integers(1, 3))
            start = end
    # Consecutive entries form requests.
    bounds = (
        sorted(draw(st.sets(st.integers(1, len(entries) - 1), max_size=3)))
        if len(entries) > 1
        else []
    )
    requests, start = [], 0
    for end in [*bounds, len(entries)]:
        requests.append((entries[start].offset, entries[end - 1].offset))
        start = end
    rows_by_request: list[list[tuple[str, int]]] = [[] for _ in requests]
    for e in entries:
        r = next(k for k, (lo, hi) in enumerate(requests) if lo <= e.offset <= hi)
        rows_by_request[r] += [(e.batch_id, e.first_row + i) for i in range(e.rows)]
    bad = []
    for r, rows in enumerate(rows_by_request):
        for batch, row in draw(st.lists(st.sampled_from(rows), unique=True, max_size=len(rows))):
            bad.append((batch, row, r))
    return Scenario(entries, requests, bad, lines)


def render(value: Any) -> str:
    """JSON text of a parsed value, keys reversed and spaced: another text of the same value."""
    if isinstance(value, dict):
        items = [f"{json.dumps(k)} : {render(v)}" for k, v in reversed(list(value.items()))]
        return "{ " + ", ".join(items) + " }"
    if isinstance(value, list):
        return "[ " + ", ".join(render(v) for v in value) + " ]"
    if isinstance(value, Decimal):
        return str(value)
    return json.dumps(value)


def reserialised(line: bytes, way: int) -> str:
    """The row's text as Snowflake might store it: as sent, or re-rendered."""
    if way == 0:
        return line.decode()
    return render(json.loads(line, parse_float=Decimal))


def error_rows(s: Scenario, rng: random.Random) -> list[ErrorRow]:
    out = []
    for batch, row, r in s.bad:
        lo, hi = s.requests[r]
        line = s.lines[(batch, row)]
        text = reserialised(line, rng.randrange(2))
        out.append(rejected(text, lo, hi, message=f"bad {batch}/{row}"))
    rng.shuffle(out)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(distinct=True), st.randoms(use_true_random=False))
def test_with_distinct_rows_every_rejected_row_is_found_exactly(
    s: Scenario, rng: random.Random
) -> None:
    resolution = match_error_rows(error_rows(s, rng), s.entries, len(s.bad))
    assert resolution.complete
    assert resolution.unmatched == ()
    assert pairs(resolution) == {(b, r) for b, r, _ in s.bad}
    # Snowflake's message goes with its own row.
    for batch, rows in resolution.rejected.items():
        assert all(x.message == f"bad {batch}/{x.row}" for x in rows)
    # A batch without a rejected row is never flagged.
    assert set(resolution.rejected) == {b for b, _, _ in s.bad}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(distinct=False), st.randoms(use_true_random=False))
def test_with_repeated_rows_each_request_gets_its_count_of_each_content(
    s: Scenario, rng: random.Random
) -> None:
    resolution = match_error_rows(error_rows(s, rng), s.entries, len(s.bad))
    assert resolution.complete
    assert resolution.unmatched == ()
    got = pairs(resolution)
    assert len(got) == len(s.bad)  # no line twice

    def request_of(batch: str, row: int) -> int:
        offset = next(
            e.offset
            for e in s.entries
            if e.batch_id == batch and e.first_row <= row < e.first_row + e.rows
        )
        return next(k for k, (lo, hi) in enumerate(s.requests) if lo <= offset <= hi)

    def key(batch: str, row: int) -> tuple[int, Any]:
        # Lines with the same JSON value are interchangeable (the fallback may take either).
        return (request_of(batch, row), _parse(s.lines[(batch, row)]))

    assert Counter(key(b, r) for b, r in got) == Counter(key(b, r) for b, r, _ in s.bad)


@settings(max_examples=100, deadline=None)
@given(scenarios(distinct=False), st.randoms(use_true_random=False), st.integers(0, 3))
def test_the_order_of_the_error_rows_never_changes_the_answer_and_a_shortfall_is_counted(
    s: Scenario, rng: random.Random, more: int
) -> None:
    rows = error_rows(s, rng)
    first = match_error_rows(rows, s.entries, len(s.bad) + more)
    rng.shuffle(rows)
    second = match_error_rows(rows, s.entries, len(s.bad) + more)
    assert pairs(first) == pairs(second)
    assert first.shortfall == more
    assert first.complete == (more == 0)


# --- The letters ---------------------------------------------------------------------------------


def test_one_letter_per_batch_with_exactly_its_rejected_rows_and_why() -> None:
    entries = [
        entry(1, "a", [{"ID": 1}, {"ID": None, "N": "x"}, {"ID": 3}]),
        entry(2, "b", [{"ID": 4}]),
        entry(3, "c", [{"ID": None, "N": "y"}, {"ID": "z"}]),
    ]
    resolution = match_error_rows(
        [
            rejected({"ID": None, "N": "x"}, 1, 3),
            rejected({"ID": None, "N": "y"}, 1, 3),
            rejected(
                {"ID": "z"},
                1,
                3,
                message="Numeric value 'z' is not recognized",
                code="100038",
                column="ID",
            ),
        ],
        entries,
        3,
    )
    letters = rejected_letters(REF, resolution)
    assert [letter.batch_id for letter in letters] == ["a", "c"]  # b had none: no letter
    a, c = letters
    assert a.kind == c.kind == "row_errors"
    assert (a.database, a.schema, a.pipe) == ("DB", "SC", "T-STREAMING")
    assert a.rows == [{"ID": None, "N": "x"}]
    assert a.detail["rejected"] == [
        {
            "row": 1,
            "message": "NULL result in a non-nullable column",
            "code": "100072",
            "column": "ID",
        }
    ]
    assert a.detail["channel"] == "snowpipe_0"
    assert a.detail["offsets"] == [1]
    assert c.rows == [{"ID": None, "N": "y"}, {"ID": "z"}]
    assert [x["row"] for x in c.detail["rejected"]] == [0, 1]
    assert c.detail["rejected"][1]["code"] == "100038"
    assert "rejected 2 row(s)" in c.reason
    assert "row 0: NULL result in a non-nullable column (and 1 more)" in c.reason
    assert "\n" not in c.reason


def test_letter_ids_are_the_same_for_the_same_rows_so_a_second_add_is_harmless() -> None:
    entries = [entry(1, "a", [{"ID": None}, {"ID": 2}])]
    once = rejected_letters(REF, match_error_rows([rejected({"ID": None}, 1, 1)], entries, 1))
    again = rejected_letters(REF, match_error_rows([rejected({"ID": None}, 1, 1)], entries, 1))
    assert once[0].letter_id == again[0].letter_id
    assert once[0].letter_id.startswith("a-rejected-")
    assert letter_id(REF, "a", [0]) != letter_id(REF, "a", [1])
    assert letter_id(REF, "a", [0]) != letter_id(
        ChannelRef("DB", "SC", "T-STREAMING", "snowpipe_1"), "a", [0]
    )


def test_a_resolution_without_rejected_rows_builds_no_letter() -> None:
    assert rejected_letters(REF, Resolution("unavailable", 3, reason="off")) == []


# --- The resolver --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeReader:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[Any, ...]] = []

    def rows(self, table: TableName, pipe: str, channel: str, lower: int, upper: int) -> Any:
        self.calls.append((table, pipe, channel, lower, upper))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


TABLE = TableName("DB", "SC", "T")


class FakeLocator:
    def __init__(self, answer: TableName | Exception = TABLE) -> None:
        self.answer = answer

    def table_of(self, database: str, schema: str, pipe: str) -> TableName:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


ENTRIES = [entry(10, "a", [{"ID": None}]), entry(12, "b", [{"ID": 2}])]


def resolver(
    reader: FakeReader, locator: FakeLocator | None = None, clock: Clock | None = None
) -> RowErrorResolver:
    return RowErrorResolver(
        reader,  # type: ignore[arg-type]
        locator or FakeLocator(),  # type: ignore[arg-type]
        clock=clock or Clock(),
    )


def test_the_resolver_reads_the_offset_range_of_the_entries_and_maps_the_rows() -> None:
    reader = FakeReader([[rejected({"ID": None}, 10, 12)]])
    resolution = resolver(reader).resolve(REF, ENTRIES, 1)
    assert resolution.complete
    assert pairs(resolution) == {("a", 0)}
    assert reader.calls == [(TableName("DB", "SC", "T"), "T-STREAMING", "snowpipe_0", 10, 12)]


def test_rows_not_yet_in_the_error_table_give_a_short_resolution() -> None:
    resolution = resolver(FakeReader([[]])).resolve(REF, ENTRIES, 1)
    assert resolution.status == "short"
    assert resolution.shortfall == 1


def test_a_transient_failure_is_short_and_asked_again_next_time() -> None:
    reader = FakeReader(
        [RateLimitedError("slow down", status=429), [rejected({"ID": None}, 10, 12)]]
    )
    r = resolver(reader)
    first = r.resolve(REF, ENTRIES, 1)
    assert first.status == "short"
    assert "slow down" in first.reason
    assert r.resolve(REF, ENTRIES, 1).complete


@pytest.mark.parametrize(
    "error",
    [
        SqlObjectNotFoundError(
            "Table 'T' does not exist or not authorized.", status=422, code="002003"
        ),
        SqlNoWarehouseError("No active warehouse selected", status=422, code="000606"),
    ],
)
def test_an_unreadable_error_table_is_unavailable_with_the_fix_and_not_asked_for_a_while(
    error: Exception,
) -> None:
    clock = Clock()
    reader = FakeReader([error, [rejected({"ID": None}, 10, 12)]])
    r = resolver(reader, clock=clock)
    first = r.resolve(REF, ENTRIES, 1)
    assert first.status == "unavailable"
    assert "ALTER TABLE DB.SC.T SET ERROR_LOGGING = TRUE" in first.reason
    assert "\n" not in first.reason
    clock.now = 299.0
    assert r.resolve(REF, ENTRIES, 1).status == "unavailable"
    assert len(reader.calls) == 1
    clock.now = 300.0
    assert r.resolve(REF, ENTRIES, 1).complete


def test_a_pipe_whose_table_is_unknown_is_unavailable() -> None:
    locator = FakeLocator(PipeTableUnknownError("pipe NAMED is not a default pipe", "set X"))
    resolution = resolver(FakeReader([]), locator).resolve(REF, ENTRIES, 1)
    assert resolution.status == "unavailable"
    assert "not a default pipe" in resolution.reason


def test_with_error_tables_off_nothing_is_read() -> None:
    off = RowErrorResolver(None, None, off_reason="SNOWPIPE_ERROR_TABLE=off")
    resolution = off.resolve(REF, ENTRIES, 2)
    assert (resolution.status, resolution.reason, resolution.shortfall) == (
        "unavailable",
        "SNOWPIPE_ERROR_TABLE=off",
        2,
    )
    assert not off.enabled


# --- The pump's exact attribution ----------------------------------------------------------------


def window(errors: int) -> HeldWindow:
    return HeldWindow(after=9, upto=12, errors=errors, upper_bound="12", message="m", total=7)


def test_the_pumps_attribution_gives_letters_none_while_short_and_raises_when_unavailable() -> None:
    reader = FakeReader([[], [rejected({"ID": None}, 10, 12)]])
    exact: ExactAttribution = ErrorTableAttribution(resolver(reader))
    assert exact.letters(REF, window(1), ENTRIES) is None  # not in the error table yet
    (letter,) = exact.letters(REF, window(1), ENTRIES) or []
    assert (letter.batch_id, letter.kind, letter.rows) == ("a", "row_errors", [{"ID": None}])
    assert letter.detail["attribution"] == "error_table"
    unavailable = ErrorTableAttribution(
        resolver(FakeReader([SqlObjectNotFoundError("no error table", status=422, code="002003")]))
    )
    with pytest.raises(ErrorTableUnavailableError, match="SET ERROR_LOGGING = TRUE"):
        unavailable.letters(REF, window(1), ENTRIES)


def test_with_error_tables_off_the_pump_gets_no_exact_attribution() -> None:
    from worker.settings import Settings

    assert ErrorTableAttribution.from_settings(Settings(error_table="off"), None) is None  # type: ignore[arg-type]
