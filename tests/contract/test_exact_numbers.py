"""Committed rows keep their numbers exactly as the request carried them: integers beyond 64 bits
and decimals with trailing zeros read back through the admin API unchanged, whether the body is
NDJSON or pretty-printed JSON, and with a table schema too.

Each test runs over HTTP and over HTTPS (tests/contract/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest

from tests.contract.refclient import RefClient
from tests.support.emulator import RunningEmulator
from tests.support.keys import key_pair

ACCOUNT, USER = "NUMACCT", "LOADER"
DB, SCHEMA = "DB", "PUBLIC"
ROW = b'{"id": 1, "big": 1180591620717411303424, "price": 1.10, "tiny": -1.000e-30}'
PRETTY = b'{\n  "id": 2,\n  "big": -18446744073709551617,\n  "price": 12.500\n}\n'


@pytest.fixture(scope="module")
def registered(shared_emulator: RunningEmulator) -> RunningEmulator:
    shared_emulator.register_key(ACCOUNT, USER, key_pair().public_pem)
    return shared_emulator


@pytest.fixture
def client(registered: RunningEmulator) -> Iterator[RefClient]:
    c = RefClient(registered.url, ACCOUNT, USER, key_pair().private_key).connect()
    yield c
    c.close()


def test_big_integers_and_decimals_read_back_exactly(
    client: RefClient, registered: RunningEmulator
) -> None:
    token = client.open(DB, SCHEMA, "NUM-STREAMING", "ndjson")["next_continuation_token"]
    client.append(DB, SCHEMA, "NUM-STREAMING", "ndjson", ROW + b"\n", continuation_token=token,
                  end="1").raise_for_status()
    client.wait_committed(DB, SCHEMA, "NUM-STREAMING", "ndjson", "1")

    (row,) = [r["row"] for r in registered.rows(DB, SCHEMA, "NUM-STREAMING")
              if r["row"]["id"] == 1]

    assert row["big"] == 2**70
    assert isinstance(row["price"], Decimal) and str(row["price"]) == "1.10"
    assert str(row["tiny"]) == "-1.000E-30"


def test_the_admin_api_sends_the_row_text_as_appended(
    client: RefClient, registered: RunningEmulator
) -> None:
    token = client.open(DB, SCHEMA, "RAW-STREAMING", "raw")["next_continuation_token"]
    client.append(DB, SCHEMA, "RAW-STREAMING", "raw", ROW + b"\n", continuation_token=token,
                  end="1").raise_for_status()
    client.wait_committed(DB, SCHEMA, "RAW-STREAMING", "raw", "1")

    body = registered.admin.get(
        "/_emulator/rows", params={"database": DB, "schema": SCHEMA, "pipe": "RAW-STREAMING"}
    ).content

    assert body.endswith(b',"row":' + ROW + b"}\n")


def test_pretty_printed_rows_keep_their_numbers(
    client: RefClient, registered: RunningEmulator
) -> None:
    token = client.open(DB, SCHEMA, "NUM-STREAMING", "pretty")["next_continuation_token"]
    client.append(DB, SCHEMA, "NUM-STREAMING", "pretty", PRETTY + PRETTY.replace(b"2", b"3", 1),
                  continuation_token=token, end="2").raise_for_status()
    client.wait_committed(DB, SCHEMA, "NUM-STREAMING", "pretty", "2")

    rows = [r["row"] for r in registered.rows(DB, SCHEMA, "NUM-STREAMING")
            if r["channel"] == "pretty"]

    assert [r["id"] for r in rows] == [2, 3]
    assert rows[0]["big"] == -(2**64) - 1
    assert str(rows[0]["price"]) == "12.500"


def test_numbers_pass_a_number_column_unchanged(
    client: RefClient, registered: RunningEmulator
) -> None:
    registered.add_pipe(DB, SCHEMA, "TYPED", columns=[
        {"name": "ID", "type": "NUMBER", "nullable": False},
        {"name": "BIG", "type": "NUMBER"},
        {"name": "PRICE", "type": "NUMBER"},
    ])
    token = client.open(DB, SCHEMA, "TYPED", "typed")["next_continuation_token"]
    client.append(DB, SCHEMA, "TYPED", "typed", ROW + b"\n", continuation_token=token,
                  end="1").raise_for_status()
    status = client.wait_committed(DB, SCHEMA, "TYPED", "typed", "1")
    assert status["rows_error_count"] == 0

    (row,) = [r["row"] for r in registered.rows(DB, SCHEMA, "TYPED")]

    assert row["big"] == 2**70 and str(row["price"]) == "1.10"
