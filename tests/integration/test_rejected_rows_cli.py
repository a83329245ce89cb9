"""From a rejected row to its fix with the CLI: `dead-letters export` (fix the rows, publish them)
and `dead-letters requeue --table-fixed` (fix the table), with a real worker on Redis."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.celery import (
    ACCOUNT,
    USER,
    launch_worker,
    running,
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import REPO_ROOT, RunningEmulator, start_emulator
from tests.support.keys import key_pair
from tests.support.redis import RedisDB
from worker.deadletter import DeadLetter, DeadLetters
from worker.delivery.channels import ChannelRef
from worker.delivery.log import Entry
from worker.publish import Publisher
from worker.rejections import match_error_rows, rejected_letters
from worker.settings import load_settings
from worker.snowpipe.encoding import encode_line
from worker.snowpipe.errortable import ErrorRow

DB, SCHEMA, PIPE = "DEMO", "PUBLIC", "ORDERS-STREAMING"
REF = ChannelRef(DB, SCHEMA, PIPE, "snowpipe_0")
NOT_NULL = [{"name": "ID", "type": "NUMBER", "nullable": False}, {"name": "N", "type": "VARCHAR"}]
NULLABLE = [{"name": "ID", "type": "NUMBER", "nullable": True}, {"name": "N", "type": "VARCHAR"}]


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[RunningEmulator]:
    with start_emulator("--commit-delay", "0.1", workdir=tmp_path / "emulator") as emulator:
        emulator.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        yield emulator


def define_table(emu: RunningEmulator, columns: list[dict[str, Any]]) -> None:
    body = {"database": DB, "schema": SCHEMA, "pipe": PIPE, "columns": columns}
    response = emu.admin.post("/_emulator/pipes", json=body)
    assert response.status_code < 300, response.text


def committed(emu: RunningEmulator) -> list[dict[str, Any]]:
    return [r["row"] for r in emu.rows(DB, SCHEMA, PIPE)]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )


def row_errors_letter() -> DeadLetter:
    """The letter the pump stores for batch b-7 when 2 of its 4 rows were in the error table."""
    rows = [{"ID": i or None, "N": n} for i, n in zip((1, 0, 3, 0), "abcd", strict=True)]
    data = b"".join(encode_line(r, i) for i, r in enumerate(rows))
    entries = [Entry(100, "b-7", 4, data, 0), Entry(101, "b-8", 1, encode_line({"ID": 9}), 0)]
    errors = [
        ErrorRow(
            "snowpipe_0", "100", "101", encode_line(r).decode().strip(), "json", False,
            "NULL result in a non-nullable column", "100072", "ID",
        )
        for r in (rows[1], rows[3])
    ]  # fmt: skip
    (letter,) = rejected_letters(REF, match_error_rows(errors, entries, 2))
    return letter


def test_requeue_sends_the_rejected_rows_once_only_after_the_table_is_fixed(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    define_table(emu, NOT_NULL)
    env = worker_env(
        emu, db.url, key_pair("celery").write_private(tmp_path / "key.pem"),
        queue=unique_queue("rej"),
    )  # fmt: skip
    dead = DeadLetters(db.client)
    letter = row_errors_letter()
    dead.add(letter)
    worker = launch_worker(env, tmp_path, name="rejected")
    with running(worker):
        refused = cli(env, "dead-letters", "requeue")
        assert refused.returncode == 0, refused.stderr
        assert "requeued 0 batch(es)" in refused.stdout
        assert "kept 1 row_errors letter(s)" in refused.stdout
        assert "--table-fixed" in refused.stdout
        assert dead.count() == 1

        define_table(emu, NULLABLE)  # the operator fixes the table
        sent = cli(env, "dead-letters", "requeue", "--kind", "row_errors", "--table-fixed")
        assert sent.returncode == 0, sent.stderr
        assert "requeued 1 batch(es)" in sent.stdout
        wait_until(
            lambda: len(committed(emu)) == 2, timeout=60, what="2 rows committed", logs=[worker]
        )
        assert sorted(committed(emu), key=lambda r: r["N"]) == [
            {"ID": None, "N": "b"},
            {"ID": None, "N": "d"},
        ]
        assert dead.count() == 0

        # A crash between publishing and removing leaves the letter: requeueing it again sends
        # the same batch id (the letter id), which the channel log drops.
        dead.add(letter)
        again = cli(env, "dead-letters", "requeue", "--table-fixed")
        assert "requeued 1 batch(es)" in again.stdout
        marker = [{"ID": 99, "N": "marker"}]
        publisher = Publisher(load_settings(**settings_overrides(env)))
        try:
            publisher.publish(marker, database=DB, schema=SCHEMA, pipe=PIPE, batch_id="marker")
        finally:
            publisher.close()
        wait_until(
            lambda: {"ID": 99, "N": "marker"} in committed(emu),
            timeout=60,
            what="the marker batch committed",
            logs=[worker],
        )
        assert len(committed(emu)) == 3  # the requeued rows once, and the marker


def test_export_writes_the_rows_and_where_each_came_from_then_fixed_rows_are_published(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    define_table(emu, NOT_NULL)
    env = worker_env(
        emu, db.url, key_pair("celery").write_private(tmp_path / "key.pem"),
        queue=unique_queue("exp"),
    )  # fmt: skip
    dead = DeadLetters(db.client)
    letter = row_errors_letter()
    dead.add(letter)
    dead.add(DeadLetter("b-9", DB, SCHEMA, "NOPE", "pipe NOPE does not exist", [{"ID": 5}]))
    dead.add(DeadLetter("m-1", DB, SCHEMA, PIPE, "not JSON", [], kind="malformed", raw="{"))

    out, sources = tmp_path / "rejected.ndjson", tmp_path / "sources.ndjson"
    exported = cli(
        env, "dead-letters", "export", "--kind", "row_errors", "--sources", str(sources), str(out)
    )
    assert exported.returncode == 0, exported.stderr
    assert f"exported 2 row(s) of 1 dead letter(s) to {out}" in exported.stderr
    assert out.read_bytes() == b'{"ID":null,"N":"b"}\n{"ID":null,"N":"d"}\n'
    side = [orjson.loads(line) for line in sources.read_bytes().splitlines()]
    assert side == [
        {
            "line": 1,
            "letter_id": letter.letter_id,
            "batch_id": "b-7",
            "kind": "row_errors",
            "database": DB,
            "schema": SCHEMA,
            "pipe": PIPE,
            "row": 1,
            "message": "NULL result in a non-nullable column",
            "code": "100072",
            "column": "ID",
        },
        {**side[0], "line": 2, "row": 3},
    ]

    everything = cli(env, "dead-letters", "export", "-")
    assert everything.stdout.splitlines() == [
        '{"ID":null,"N":"b"}',
        '{"ID":null,"N":"d"}',
        '{"ID":5}',
    ]
    assert "1 letter(s) have no rows (malformed messages" in everything.stderr
    bad = cli(env, "dead-letters", "export", "--kind", "lost", "-")
    assert bad.returncode == 2
    assert "--kind 'lost' is not a dead-letter kind" in bad.stderr

    # The operator fixes the exported rows and publishes them; then drops the letter.
    fixed = tmp_path / "fixed.ndjson"
    fixed.write_bytes(
        b"".join(
            orjson.dumps({**orjson.loads(line), "ID": 1000 + n}) + b"\n"
            for n, line in enumerate(out.read_bytes().splitlines())
        )
    )
    worker = launch_worker(env, tmp_path, name="export")
    with running(worker):
        published = cli(
            env, "publish", "--database", DB, "--schema", SCHEMA, "--pipe", PIPE, str(fixed)
        )
        assert published.returncode == 0, published.stderr
        wait_until(
            lambda: len(committed(emu)) == 2, timeout=60, what="fixed rows committed", logs=[worker]
        )
    assert sorted(committed(emu), key=lambda r: r["ID"]) == [
        {"ID": 1000, "N": "b"},
        {"ID": 1001, "N": "d"},
    ]
    dropped = cli(env, "dead-letters", "drop", "--batch-id", "b-7")
    assert "dropped 1 dead letter(s)" in dropped.stdout
