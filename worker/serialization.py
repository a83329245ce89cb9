"""Decoding Celery's JSON messages with orjson: the same values as kombu's decoder, faster.

A batch of a hundred rows is a message of about 15 KB that the worker decodes twice (kombu's
envelope, then the task's body). kombu decodes with the standard library and an `object_hook`
called for every JSON object (every row), which came to about a tenth of the worker's CPU per
batch. orjson returns the same values for every document it accepts; kombu's decoder remains for
what it handles differently: its tagged values (`{"__type__": ..., "__value__": ...}`: datetime,
Decimal, UUID, bytes), integers beyond 64 bits (orjson would make them floats: a message with a
run of 20 digits goes to kombu's decoder), and anything orjson refuses (NaN, lone surrogates).
Encoding is kombu's, unchanged, so producers and other consumers see the same messages.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from kombu import serialization
from kombu.utils import json as kombu_json

_TAG = '"__type__"'
_TAG_BYTES = _TAG.encode()
# orjson turns an integer beyond 64 bits into a float without a word (2**70 loses its last digits):
# a run of 20 digits or more anywhere (in a number, or harmlessly in a string) sends the message to
# kombu's decoder, which keeps Python's exact int.
_LONG_DIGITS = re.compile(r"\d{20}")
_LONG_DIGITS_BYTES = re.compile(rb"\d{20}")


def loads(data: Any) -> Any:
    """`data` (str, bytes, bytearray or memoryview of JSON) decoded exactly as kombu does."""
    if isinstance(data, memoryview):
        data = data.tobytes()
    if isinstance(data, (bytes, bytearray)):
        exact = _TAG_BYTES in data or _LONG_DIGITS_BYTES.search(data) is not None
    else:
        exact = _TAG in data or _LONG_DIGITS.search(data) is not None
    if not exact:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return kombu_json.loads(data)  # type: ignore[no-untyped-call]


def install() -> None:
    """Decode `application/json` messages of this process with `loads` (encoding unchanged)."""
    register: Any = serialization.registry.register
    register(
        "json",
        kombu_json.dumps,
        loads,
        content_type="application/json",
        content_encoding="utf-8",
    )
