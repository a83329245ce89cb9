"""Names (Snowflake's identifier rules and the worker's own) and the message type built on them."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from worker.errors import InvalidBatchError, InvalidNameError, MalformedMessageError
from worker.identifiers import canonical_name, check_name, parse_pipe_list
from worker.messages import IngestMessage
from worker.settings import SettingsError, load_settings


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("EVENTS", "EVENTS"),
        ("events", "EVENTS"),  # unquoted names resolve upper-cased
        ("_My$table1", "_MY$TABLE1"),
        ("events-streaming", "EVENTS-STREAMING"),  # a table's default pipe
        ("Events-STREAMING", "EVENTS-STREAMING"),
        ('"EVENTS"', "EVENTS"),  # needs no quotes: the same object as EVENTS
        ('"EVENTS-STREAMING"', "EVENTS-STREAMING"),
        ('"events"', '"events"'),  # quoted keeps its case
        ('"my pipe"', '"my pipe"'),
        ('"say ""hi"""', '"say ""hi"""'),
        ('"Ünïcode"', '"Ünïcode"'),
        ("A" * 255, "A" * 255),
    ],
)
def test_valid_names_and_their_one_spelling(name: str, canonical: str) -> None:
    assert check_name("pipe", name) == name
    assert canonical_name("pipe", name) == canonical


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("X|Y", "contains '|', which the worker's state store uses to join names"),
        ('"X|Y"', "contains '|'"),
        ("..", "is a path step"),
        (".", "is a path step"),
        ("A.B", "contains '.'"),
        ('"A.B"', "contains '.'"),
        ("", "pipe is empty"),
        ("   ", "pipe is empty"),
        ("P\nX", "control character"),
        ("9LIVES", "is not a valid Snowflake identifier: an unquoted name starts with a letter"),
        ("my-pipe", 'put any other name in double quotes, e.g. "my-pipe"'),
        ("P ", "not a valid Snowflake identifier"),
        ('"open', "opens a double quote it does not close"),
        ('"a"b"', "has a lone double quote inside"),
        ('""', "is empty between its quotes"),
        ("A" * 256, "256 characters long: Snowflake allows 255"),
        ('"' + "a" * 256 + '"', "256 characters long between its quotes"),
        (5, "must be a string (the object's name), got int"),
        (None, "got NoneType"),
    ],
)
def test_invalid_names_name_the_rule_and_the_fix(name: Any, message: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        check_name("pipe", name)
    assert message in str(info.value)
    assert isinstance(info.value, InvalidBatchError)


def test_the_default_pipe_form_is_for_pipes_only() -> None:
    assert check_name("pipe", "T-STREAMING") == "T-STREAMING"
    with pytest.raises(InvalidNameError, match="not a valid Snowflake identifier"):
        check_name("database", "T-STREAMING")


def test_a_pipe_list_is_read_with_the_same_rules() -> None:
    assert parse_pipe_list(" db.public.events , DB.PUBLIC.\"Mixed\" ,") == {
        ("DB", "PUBLIC", "EVENTS"),
        ("DB", "PUBLIC", '"Mixed"'),
    }
    with pytest.raises(InvalidNameError, match=re.escape("is not DATABASE.SCHEMA.PIPE")):
        parse_pipe_list("DB.EVENTS")
    with pytest.raises(InvalidNameError, match=re.escape("'DB.PUBLIC.X|Y': pipe 'X|Y' contains")):
        parse_pipe_list("DB.PUBLIC.X|Y")


def test_snowpipe_pipes_is_checked_at_start_and_served_canonically() -> None:
    settings = load_settings(require_identity=False, pipes="db.public.events")
    assert settings.served_pipes() == {("DB", "PUBLIC", "EVENTS")}
    assert load_settings(require_identity=False).served_pipes() is None
    with pytest.raises(SettingsError, match=r"SNOWPIPE_PIPES.*contains '\|'"):
        load_settings(require_identity=False, pipes="DB.PUBLIC.A|B")


def _kwargs(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"batch_id": "b-1", "database": "db", "schema": "public",
                            "pipe": "events", "rows": [{"id": 1}]}  # fmt: skip
    return {**base, **fields}


def test_a_message_is_read_with_canonical_names() -> None:
    message = IngestMessage.from_kwargs(_kwargs(attempt=2, outage_since=5, requeue_of="L1"))
    assert (message.database, message.schema, message.pipe) == ("DB", "PUBLIC", "EVENTS")
    assert (message.attempt, message.outage_since, message.requeue_of) == (2, 5.0, "L1")
    assert IngestMessage.from_kwargs(message.kwargs()) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (["b", "DB"], "the keyword arguments are an array, not an object"),
        ({"batch_id": "b"}, "missing keyword argument(s) database, schema, pipe, rows"),
        (_kwargs(colour="red"), "unknown keyword argument(s) colour"),
        (_kwargs(batch_id=7), "batch_id must be a string, got int"),
        (_kwargs(batch_id="a b"), "without spaces or control characters"),
        (_kwargs(batch_id=""), "must be non-empty"),
        (_kwargs(rows={"id": 1}), "rows must be an array of row objects, got an object"),
        (_kwargs(rows="[]"), "got a string"),
        (_kwargs(attempt=-1), "attempt must be a whole number >= 0"),
        (_kwargs(attempt=True), "attempt must be a whole number"),
        (_kwargs(attempt="1"), "attempt must be a whole number"),
        (_kwargs(outage_since="yesterday"), "outage_since must be epoch seconds"),
        (_kwargs(outage_since=math.inf), "outage_since must be epoch seconds"),
        (_kwargs(requeue_of=3), "requeue_of must be a dead letter's id"),
        (_kwargs(pipe="X|Y"), "contains '|'"),
        (_kwargs(database=""), "database is empty"),
        (_kwargs(schema=[1]), "schema must be a string"),
    ],
)
def test_a_message_that_is_no_valid_batch_says_why(kwargs: Any, message: str) -> None:
    with pytest.raises(InvalidBatchError) as info:
        IngestMessage.from_kwargs(kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, MalformedMessageError | InvalidNameError)
