"""Dead letters keep every digit of a row's numbers: rows read back from a channel's log, from
Snowflake's error table and from a stored letter are decoded exactly (a requeue sends what the
producer sent, not a double's rounding of it)."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from worker.deadletter import DeadLetter
from worker.delivery.letters import rows_of
from worker.delivery.log import Entry
from worker.snowpipe.encoding import decode_exact, encode_line

BIG = 2**70 + 1
LONG_FRACTION = "0.12345678901234567890123"


def test_decode_exact_keeps_big_integers_and_long_fractions() -> None:
    row = decode_exact(f'{{"n": {BIG}, "f": {LONG_FRACTION}, "s": "x"}}'.encode())
    assert row == {"n": BIG, "f": Decimal(LONG_FRACTION), "s": "x"}
    assert encode_line(row) == f'{{"n":{BIG},"f":{LONG_FRACTION},"s":"x"}}\n'.encode()


def test_decode_exact_is_orjson_for_short_numbers() -> None:
    assert decode_exact(b'{"a": 1.5, "b": [1, 2]}') == orjson.loads(b'{"a": 1.5, "b": [1, 2]}')


@pytest.mark.parametrize("text", [b"{", b'{"a": NaN, "n": 12345678901234567890}', b"Infinity"])
def test_decode_exact_refuses_what_is_not_json(text: bytes) -> None:
    with pytest.raises(ValueError):
        decode_exact(text)


def test_rows_of_a_log_entry_are_exact() -> None:
    data = f'{{"id": 1, "n": {BIG}}}\n{{"id": 2, "f": {LONG_FRACTION}}}\n[1]\n'.encode()
    entry = Entry(offset=7, batch_id="b", rows=3, data=data, written_ms=0)
    rows, unparsed = rows_of([entry])
    assert rows == [{"id": 1, "n": BIG}, {"id": 2, "f": Decimal(LONG_FRACTION)}]
    assert unparsed == ["[1]"]


def test_a_stored_letter_reads_back_with_its_numbers() -> None:
    letter = DeadLetter("b1", "DB", "S", "P", "why", [{"n": BIG, "f": Decimal(LONG_FRACTION)}])
    again = DeadLetter.loads(letter.dumps())
    assert again.rows == letter.rows
    assert DeadLetter.loads(letter.dumps().decode()).rows == letter.rows


def test_a_letter_with_a_long_digit_run_outside_its_rows_keeps_its_times_as_floats() -> None:
    """A malformed message's raw body may hold any digits: only the rows are read exactly."""
    letter = DeadLetter("b1", "DB", "S", "P", "why", [], kind="malformed",
                        raw="12345678901234567890 and 1.5")  # fmt: skip
    again = DeadLetter.loads(letter.dumps())
    assert isinstance(again.failed_at, float) and again.raw == letter.raw


def test_dead_letters_list_json_writes_exact_rows() -> None:
    """`dead-letters list --json` writes the rows' numbers as stored (to_json, not orjson)."""
    from worker.snowpipe.encoding import to_json

    letter = DeadLetter("b1", "DB", "S", "P", "why", [{"n": BIG, "f": Decimal(LONG_FRACTION)}])
    text = to_json([{"rows": DeadLetter.loads(letter.dumps()).rows}], option=orjson.OPT_INDENT_2)
    assert str(BIG).encode() in text and LONG_FRACTION.encode() in text
