"""worker.serialization.loads decodes every message exactly as kombu's JSON decoder does."""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Any

import pytest
from kombu.utils import json as kombu_json

from worker import serialization

DOCUMENTS: list[Any] = [
    {"rows": [{"id": i, "v": i * 1.5, "s": f"é-{i}", "n": None, "t": True} for i in range(50)]},
    [[], {"batch_id": "b1", "rows": [{"x": -0.0, "big": 2**63 - 1, "e": 1e-300}]}, {}],
    {"when": datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)},
    {"amount": decimal.Decimal("1.10"), "id": uuid.UUID(int=7)},
    {"huge": 2**80},
    "plain",
    12,
]


@pytest.mark.parametrize("document", DOCUMENTS)
@pytest.mark.parametrize("form", ["str", "bytes", "bytearray", "memoryview"])
def test_the_same_values_as_kombu(document: Any, form: str) -> None:
    text: str = kombu_json.dumps(document)  # type: ignore[no-untyped-call]
    data: Any = {
        "str": text,
        "bytes": text.encode(),
        "bytearray": bytearray(text.encode()),
        "memoryview": memoryview(text.encode()),
    }[form]
    expected = kombu_json.loads(text)  # type: ignore[no-untyped-call]
    got = serialization.loads(data)
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize("text", ['{"x": NaN}', '{"x": Infinity}', '"\\ud800"', "[1e400]"])
def test_what_orjson_refuses_is_decoded_by_kombu(text: str) -> None:
    expected = kombu_json.loads(text)  # type: ignore[no-untyped-call]
    got = serialization.loads(text)
    assert repr(got) == repr(expected)


def test_invalid_json_raises_like_kombu() -> None:
    with pytest.raises(ValueError):
        serialization.loads("{not json")


@pytest.mark.parametrize("value", [2**64, 2**70 + 1, -(2**65) - 3, 10**30 + 7])
def test_integers_beyond_64_bits_keep_every_digit(value: int) -> None:
    # orjson alone decodes these as floats (2**70 + 1 came back as 1.1805916207174113e+21).
    text: str = kombu_json.dumps({"rows": [{"id": value}]})  # type: ignore[no-untyped-call]
    for data in (text, text.encode()):
        got = serialization.loads(data)["rows"][0]["id"]
        assert type(got) is int and got == value
