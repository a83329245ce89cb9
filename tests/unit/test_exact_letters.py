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
