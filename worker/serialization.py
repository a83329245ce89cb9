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
# orjson turns an integer beyond 64 bits into a float without a word (2**70 loses its last digits),
# of magnitude 2**63 or more. So once orjson decoded a message, it is searched for such a float,
# and only a message holding one is decoded again with Python's own JSON reader (kombu's decoder
# without tagged values), which keeps the exact int. The search costs a Python step per value,
# so a message of many values (a batch's rows) is first looked at as text: an integer beyond 64
# bits is a run of 19 digits or more (-2**63 - 1 has 19) that starts a number (after ":", ",",
# "[", "-" or a blank) and does not go on as a fraction or exponent; a message without one is
# exact as decoded. A run inside a string (a hex digest, the lines of an `ndjson` batch) is not
# one. The runs are found with bytes.translate (every digit to "0") and bytes.find: C loops.
_DIGITS_TO_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_RUN = b"0" * 19
_ZERO = ord("0")
_STARTS_NUMBER = frozenset(b":,[- \t\r\n")
_GOES_ON = frozenset(b".eE")
_BIG = float(2**63)
# Values searched per byte of the message before its text is looked at instead (a value costs
# about as much as 100 bytes of text).
_VALUES_PER_BYTE_SHIFT = 8
_MIN_VALUES = 64


def _big_integer_in_text(data: bytes | str) -> bool:
    """Whether `data` may hold an integer beyond 64 bits (see above; never a false no)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    zeros = raw.translate(_DIGITS_TO_ZERO)
    at = zeros.find(_LONG_RUN)
    while at >= 0:
        end = at + len(_LONG_RUN)
        while end < len(zeros) and zeros[end] == _ZERO:
            end += 1
        before = raw[at - 1] if at else 0x20
        after = raw[end] if end < len(raw) else 0x20
        if before in _STARTS_NUMBER and after not in _GOES_ON:
            return True
        at = zeros.find(_LONG_RUN, end)
    return False


def _big_float(value: Any, budget: int | None) -> bool | None:
    """Whether `value` (decoded JSON) holds a float of magnitude 2**63 or more; None when it
    holds more than `budget` values (None: no limit)."""
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
        if budget is not None:
            budget -= 1
            if budget < 0:
                return None
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
            big = _big_float(value, max(_MIN_VALUES, len(data) >> _VALUES_PER_BYTE_SHIFT))
            if big is None:  # many values: the text says whether to search them
                big = _big_integer_in_text(data) and bool(_big_float(value, None))
            if not big:
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
