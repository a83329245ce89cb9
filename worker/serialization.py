"""Decoding Celery's JSON messages with orjson: the same values as kombu's decoder, faster.

A batch of a hundred rows is a message of about 15 KB that the worker decodes twice (kombu's
envelope, then the task's body). kombu decodes with the standard library and an `object_hook`
called for every JSON object (every row), which came to about a tenth of the worker's CPU per
batch. orjson returns the same values for every document it accepts; kombu's decoder remains for
what it handles differently: its tagged values (`{"__type__": ..., "__value__": ...}`: datetime,
Decimal, UUID, bytes), integers beyond 64 bits (orjson would make them floats: a message with a
run of 19 digits that decodes to such a float is read again by Python's reader), and anything
orjson refuses (NaN, lone surrogates).
Encoding is kombu's, unchanged, so producers and other consumers see the same messages.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from kombu import serialization
from kombu.utils import json as kombu_json

_TAG = '"__type__"'
_TAG_BYTES = _TAG.encode()
# orjson turns an integer beyond 64 bits into a float without a word (2**70 loses its last digits).
# Such an integer has 19 digits or more (-2**63 - 1 has 19): a message with a run of 19 digits
# anywhere (in a number, or harmlessly in a string, such as the lines of an `ndjson` batch) is
# decoded by orjson and then searched for a float that may have been such an integer (one of
# magnitude 2**63 or more); only if it holds one is it decoded again with Python's own JSON
# reader, which keeps the exact int. The run is found with bytes.translate (every digit to "0")
# and a substring search: both C loops, some twenty times faster than a regular expression.
_DIGITS_TO_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_RUN = b"0" * 19
_BIG = float(2**63)


def _long_digit_run(data: bytes | str) -> bool:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return _LONG_RUN in data.translate(_DIGITS_TO_ZERO)


def _has_big_float(value: Any) -> bool:
    """Whether `value` (decoded JSON) holds a float of magnitude 2**63 or more."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is float and abs(item) >= _BIG:
            return True
    return False


def loads(data: Any) -> Any:
    """`data` (str, bytes, bytearray or memoryview of JSON) decoded exactly as kombu does."""
    if isinstance(data, memoryview):
        data = data.tobytes()
    tagged = _TAG_BYTES in data if isinstance(data, bytes | bytearray) else _TAG in data
    if not tagged:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
        else:
            if not _long_digit_run(data) or not _has_big_float(value):
                return value
            # No tagged value: kombu's decoder would return what Python's reader returns.
            return json.loads(data)
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
