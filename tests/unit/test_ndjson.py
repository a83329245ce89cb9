"""The NDJSON input of `publish`: the whole input checked with the row contract before anything is
sent, batch ids derived from content and position, exact numbers."""

from __future__ import annotations

import io
import re
from decimal import Decimal

import orjson
import pytest

from worker.errors import NdjsonError
from worker.ndjson import (
    MAX_LISTED_LINES,
    batch_id_for,
    check_id_prefix,
    check_ndjson,
    file_batches,
    parse_line,
)
from worker.settings import Settings, load_settings


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(require_identity=False, broker_url="redis://127.0.0.1:6379/0")


def ndjson(*lines: bytes) -> io.BytesIO:
    return io.BytesIO(b"".join(line + b"\n" for line in lines))


def rows(n: int) -> list[bytes]:
    return [orjson.dumps({"id": i, "name": f"row-{i}"}) for i in range(n)]


def ids(stream: io.BytesIO, *, batch_rows: int = 10, prefix: str | None = None,
        pipe: str = "P") -> list[str]:  # fmt: skip
    stream.seek(0)
    return [b.batch_id for b in file_batches(stream, database="D", schema="S", pipe=pipe,
                                             batch_rows=batch_rows, id_prefix=prefix)]  # fmt: skip


# --- Checking the whole input ---------------------------------------------------------------------


def test_a_broken_line_750_of_1000_is_named_with_the_fix(settings: Settings) -> None:
    lines = rows(1000)
    lines[749] = b'{"id": 749, "name": '
    with pytest.raises(NdjsonError) as caught:
        check_ndjson(ndjson(*lines), settings=settings)
    message = str(caught.value)
    assert message.startswith("line 750: not JSON (")
    assert message.endswith(
        "nothing was published: fix the input (one JSON object per line) and run the same "
        "command again"
    )
    assert "\n" not in message


def test_every_line_is_checked_and_the_other_bad_lines_are_listed(settings: Settings) -> None:
    lines = rows(40)
    bad = [3, 5, *range(10, 10 + MAX_LISTED_LINES + 3)]
    for n in bad:
        lines[n - 1] = b"[1, 2]"
    with pytest.raises(NdjsonError) as caught:
        check_ndjson(ndjson(*lines), settings=settings)
    listed = ", ".join(str(n) for n in bad[1 : 1 + MAX_LISTED_LINES])
    assert str(caught.value).startswith(
        f"line 3: a list, not a JSON object (bad lines too: {listed} and 4 more); "
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"{}", "line 2: the row is empty: every row needs at least one column"),
        (b'"text"', "line 2: a string, not a JSON object"),
        (b"null", "line 2: a null, not a JSON object"),
        (b'{"x": NaN}', "line 2: not JSON ("),
        (b'{"x": 12345678901234567890, "y": NaN}', "line 2: not JSON (NaN is not JSON)"),
        (b'{"x": "\xff"}', "line 2: not JSON ("),
    ],
)
def test_rows_the_worker_would_refuse_are_refused_by_line(
    settings: Settings, line: bytes, problem: str
) -> None:
    with pytest.raises(NdjsonError) as caught:
        check_ndjson(ndjson(b'{"id": 1}', line), settings=settings)
    assert str(caught.value).startswith(problem)


def test_a_row_over_the_request_cap_is_refused_by_line() -> None:
    small = load_settings(
        require_identity=False, broker_url="redis://127.0.0.1:6379/0",
        max_request_bytes=2048, compression="none",
    )  # fmt: skip
    with pytest.raises(NdjsonError, match=r"^line 1: the row alone is \d+ bytes"):
        check_ndjson(ndjson(orjson.dumps({"x": "y" * 4000})), settings=small)


def test_a_good_input_counts_its_rows_and_skips_blank_lines(settings: Settings) -> None:
    assert check_ndjson(ndjson(*rows(3), b"", b"   ", b'{"id": 9}\r'), settings=settings) == 4


def test_numbers_are_read_exactly() -> None:
    row = parse_line(b'{"big": 1180591620717411303424, "dec": 0.12345678901234567891}', 1)
    assert row == {"big": 2**70, "dec": Decimal("0.12345678901234567891")}
    assert type(parse_line(b'{"f": 1.5}', 1)["f"]) is float


# --- Batch ids ------------------------------------------------------------------------------------


def test_batch_ids_are_32_hex_digits_and_the_same_for_the_same_input() -> None:
    first = ids(ndjson(*rows(25)))
    assert len(first) == 3
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in first)
    assert len(set(first)) == 3
    assert ids(ndjson(*rows(25))) == first
    # Blank lines and whitespace around a line change nothing.
    spaced = ndjson(b"", *(b"  " + line + b"\r" for line in rows(25)), b"")
    assert ids(spaced) == first


def test_a_changed_batch_changes_only_its_own_id() -> None:
    before = ids(ndjson(*rows(25)))
    lines = rows(25)
    lines[14] = b'{"id": 14, "name": "fixed"}'
    after = ids(ndjson(*lines))
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1] != before[1]


def test_equal_batches_at_two_positions_get_two_ids() -> None:
    same = rows(10)
    assert len(set(ids(ndjson(*same, *same)))) == 2


def test_the_target_the_batch_size_and_the_prefix_make_other_ids() -> None:
    base = ids(ndjson(*rows(20)))
    assert ids(ndjson(*rows(20)), pipe="Q") != base
    assert ids(ndjson(*rows(20)), batch_rows=5)[0] != base[0]
    prefixed = ids(ndjson(*rows(20)), prefix="orders-2024-06-01")
    assert prefixed == [f"orders-2024-06-01-{i}" for i in base]


def test_batch_id_for_separates_its_fields() -> None:
    assert batch_id_for("AB", "C", "P", 0, [b"{}"]) != batch_id_for("A", "BC", "P", 0, [b"{}"])
    assert batch_id_for("D", "S", "P", 0, [b"ab", b"c"]) != batch_id_for(
        "D", "S", "P", 0, [b"a", b"bc"]
    )


def test_batches_carry_their_rows_and_line_numbers() -> None:
    stream = ndjson(b'{"id": 1}', b"", b'{"id": 2}', b'{"id": 3}')
    batches = list(file_batches(stream, database="D", schema="S", pipe="P", batch_rows=2))
    assert [(b.index, b.first_line, b.last_line) for b in batches] == [(0, 1, 3), (1, 4, 4)]
    assert batches[0].rows == [{"id": 1}, {"id": 2}]
    assert batches[1].summary().rows == 1


@pytest.mark.parametrize("prefix", ["", "has space", "-lead", "a/b", "x" * 65, "é"])
def test_an_id_prefix_must_be_plain(prefix: str) -> None:
    with pytest.raises(NdjsonError, match="--id-prefix"):
        check_id_prefix(prefix)


def test_a_plain_id_prefix_passes() -> None:
    assert check_id_prefix("orders_2024-06-01.v2") == "orders_2024-06-01.v2"
