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


@pytest.mark.parametrize("value", [-(2**63) - 1, -(2**64), 2**64, -(10**19)])
def test_integers_just_beyond_64_bits_keep_every_digit(value: int) -> None:
    # -2**63 - 1 has 19 digits only: orjson made it -9.223372036854776e+18.
    rows = [{"id": i, "token": "ab" * 10} for i in range(500)] + [{"id": value}]
    for document in ({"x": value}, {"rows": rows}):
        text: str = kombu_json.dumps(document)  # type: ignore[no-untyped-call]
        assert serialization.loads(text) == document
        assert serialization.loads(text.encode()) == document


def test_digit_runs_in_strings_keep_the_fast_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    # An ndjson batch's big integers, or digests, are in strings: orjson's values are exact,
    # and Python's reader is not asked (it decodes some five times slower).
    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("decoded again")

    ndjson = '{"big":123456789012345678901234567890}\n' * 3
    many = [{"id": i, "hex": f"{i:04d}1234567890123456789012abc"} for i in range(2000)]
    documents = [[[], {"ndjson": ndjson}, {}], {"rows": many}, {"x": 1e300}]
    texts = [kombu_json.dumps(d) for d in documents]  # type: ignore[no-untyped-call]
    monkeypatch.setattr(serialization.json, "loads", refuse)
    for document, text in zip(documents[:2], texts[:2], strict=True):
        assert serialization.loads(text) == document
    with pytest.raises(AssertionError, match="decoded again"):
        serialization.loads(texts[2])  # a float of 2**63 or more: read again to be sure
