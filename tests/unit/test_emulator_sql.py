"""The emulator's SQL subset on its own: what parses, what each statement answers, the ordering,
and the error code for what is outside it (emulator/sql.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from emulator import sql
from emulator.ndjson import compact_json, parse_rows
from emulator.storage import ErrorRow


def error_row(channel: str, code: int, upper: str | None, source: str | None = "ID") -> ErrorRow:
    metadata: dict[str, object] = {
        "error_code": code, "error_message": "m", "error_source": source, "sql_state": "22000",
        "service": "snowpipe_streaming",
        "details": {"channel_name": channel, "offset_token_upper_bound": upper},
    }
    return ErrorRow("DB", "S", "T", 1_700_000_000_123_456_789, "q", code, metadata,
                    {"$1": '{"n": 1.10}'})


ROWS = [
    error_row("a", 100072, "9"),
    error_row("b", 100038, "10"),
    error_row("a", 100038, None, source=None),
]


def run(text: str, **bindings: str) -> list[list[str | None]]:
    specs: dict[str, object] = {k: {"type": "TEXT", "value": v} for k, v in bindings.items()}
    statement = sql.parse(text, specs)
    assert isinstance(statement, sql.Select)
    return sql.select_rows(statement, ROWS).rows


def test_paths_casts_and_a_binding() -> None:
    rows = run(
        "SELECT error_metadata:details:channel_name::STRING, error_data:\"$1\"::STRING, "
        "error_metadata:error_source FROM ERROR_TABLE(T) "
        "WHERE error_metadata:details:channel_name = ? ORDER BY error_code",
        **{"1": "a"},
    )

    # A JSON null in a variant is the JSON text null, not SQL NULL; ::STRING of it is SQL NULL.
    assert rows == [["a", '{"n": 1.10}', "null"], ["a", '{"n": 1.10}', '"ID"']]


def test_numeric_comparison_of_text_needs_a_cast() -> None:
    as_text = run("SELECT error_code FROM ERROR_TABLE(T) "
                  "WHERE error_metadata:details:offset_token_upper_bound::STRING > '9'")
    as_number = run("SELECT error_code FROM ERROR_TABLE(T) "
                    "WHERE error_metadata:details:offset_token_upper_bound::NUMBER > 9")

    assert as_text == []  # '10' < '9' as text
    assert as_number == [["100038"]]


def test_order_by_several_keys_with_nulls_last_ascending() -> None:
    rows = run("SELECT error_metadata:details:channel_name::STRING, "
               "error_metadata:details:offset_token_upper_bound::NUMBER FROM ERROR_TABLE(T) "
               "ORDER BY 1, 2")

    assert rows == [["a", "9"], ["a", None], ["b", "10"]]


def test_timestamps_render_as_epoch_seconds_with_nine_digits() -> None:
    rows = run("SELECT timestamp FROM ERROR_TABLE(T) WHERE timestamp > '2023-11-14T22:13:20Z' "
               "LIMIT 1")

    assert rows == [["1700000000.123456789"]]


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("COMMIT", "391911"),
        ("CREATE TABLE X (A INT)", "000002"),
        ("SELECT * FROM ERROR_TABLE(T) WHERE error_code = 1 OR error_code = 2", "001003"),
        ("SELECT * FROM ERROR_TABLE(T) e", "001003"),
        ("SELECT query_id:x FROM ERROR_TABLE(T)", "001044"),
        ("SELECT UPPER(query_id) FROM ERROR_TABLE(T)", "000002"),
        ("SELECT error_code::DATE FROM ERROR_TABLE(T)", "000002"),
        ("SELECT 'unterminated FROM ERROR_TABLE(T)", "001003"),
        ("", "000900"),
    ],
)
def test_what_is_outside_the_subset(text: str, code: str) -> None:
    with pytest.raises(sql.SqlError) as caught:
        sql.parse(text)

    assert caught.value.code == code


def test_a_syntax_error_names_the_line_and_position() -> None:
    with pytest.raises(sql.SqlError) as caught:
        sql.parse("SELECT *\n  FROM ERROR_TABLE(T)\n  WHEN")

    assert caught.value.message.endswith("syntax error line 3 at position 2 unexpected 'WHEN'.")


def test_pretty_printed_rows_are_kept_as_their_exact_text() -> None:
    rows = parse_rows(b'{\n  "big": 1180591620717411303424,\n  "s": "a  b",\n  "d": 1.10\n}\n{}')

    assert rows.good == [b'{"big":1180591620717411303424,"s":"a  b","d":1.10}', b"{}"]
    assert compact_json('{ "q": "\\" x" }') == '{"q":"\\" x"}'
    assert Decimal("1.10").as_tuple().exponent == -2
