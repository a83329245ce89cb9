"""`snowpipe-worker publish` and `dead-letters list|requeue|drop` against the real Redis."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.support.celery import unique_queue
from tests.support.emulator import REPO_ROOT
from tests.support.keys import key_pair
from tests.support.redis import RedisDB
from worker.deadletter import DeadLetter, DeadLetters


@pytest.fixture
def env(db: RedisDB, tmp_path: Path) -> dict[str, str]:
    key_path = key_pair("celery").write_private(tmp_path / "key.pem")
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "SNOWPIPE_ACCOUNT": "TESTACC",
        "SNOWPIPE_USER": "LOADER",
        "SNOWPIPE_PRIVATE_KEY_PATH": str(key_path),
        "SNOWPIPE_ACCOUNT_URL": "http://127.0.0.1:9",
        "SNOWPIPE_BROKER_URL": db.url,
        "SNOWPIPE_QUEUE_NAME": unique_queue("cli"),
    }


def cli(env: dict[str, str], *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", *args],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )


def test_publish_reads_ndjson_into_batches_and_prints_a_summary(
    env: dict[str, str], db: RedisDB, tmp_path: Path
) -> None:
    source = tmp_path / "rows.ndjson"
    source.write_bytes(b"".join(orjson.dumps({"id": i}) + b"\n" for i in range(25)))
    result = cli(env, "publish", "--database", "D", "--schema", "S", "--pipe", "P",
                 "--batch-rows", "10", str(source))
    assert result.returncode == 0, result.stderr
    assert "published 25 rows in 3 batches to D.S.P" in result.stdout
    assert db.client.llen(env["SNOWPIPE_QUEUE_NAME"]) == 3


def test_publish_names_the_bad_line_and_publishes_nothing_after_it(
    env: dict[str, str], db: RedisDB
) -> None:
    result = cli(env, "publish", "--database", "D", "--schema", "S", "--pipe", "P", "-",
                 stdin=b'{"id": 1}\n[1, 2]\n{"id": 3}\n')
    assert result.returncode == 1
    assert "line 2: a list, not a JSON object" in result.stderr
    assert db.client.llen(env["SNOWPIPE_QUEUE_NAME"]) == 0


def test_publish_needs_only_the_broker_url(env: dict[str, str], db: RedisDB) -> None:
    for name in ("SNOWPIPE_ACCOUNT", "SNOWPIPE_USER", "SNOWPIPE_PRIVATE_KEY_PATH",
                 "SNOWPIPE_ACCOUNT_URL"):  # fmt: skip
        del env[name]
    result = cli(env, "publish", "--database", "D", "--schema", "S", "--pipe", "P", "-",
                 stdin=b'{"id": 1}\n')
    assert result.returncode == 0, result.stderr
    assert db.client.llen(env["SNOWPIPE_QUEUE_NAME"]) == 1


def test_a_bad_broker_setting_is_still_named(env: dict[str, str]) -> None:
    env["SNOWPIPE_BROKER_URL"] = "kafka://127.0.0.1:9092"
    result = cli(env, "publish", "--database", "D", "--schema", "S", "--pipe", "P", "-")
    assert result.returncode == 2
    assert "SNOWPIPE_BROKER_URL" in result.stderr


def test_dead_letters_list_requeue_and_drop(env: dict[str, str], db: RedisDB) -> None:
    dead = DeadLetters(db.client)
    dead.add(DeadLetter("b-1", "D", "S", "NOPE", "pipe NOPE does not exist", [{"id": 1}]))
    dead.add(DeadLetter("b-2", "D", "S", "P", "2 row errors", [{"id": 2}], kind="row_errors"))
    listed = cli(env, "dead-letters", "list")
    assert listed.returncode == 0, listed.stderr
    assert "b-1" in listed.stdout and "pipe NOPE does not exist" in listed.stdout
    assert "2 dead letter(s)" in listed.stdout

    requeued = cli(env, "dead-letters", "requeue")
    assert requeued.returncode == 0, requeued.stderr
    assert "requeued 1 batch(es)" in requeued.stdout
    assert "kept 1 row_errors letter" in requeued.stdout
    message = orjson.loads(db.client.lindex(env["SNOWPIPE_QUEUE_NAME"], 0))
    _, kwargs, _ = orjson.loads(base64.b64decode(message["body"]))
    letter_id = kwargs["requeue_of"]
    assert kwargs["batch_id"] == "b-1" and letter_id.startswith("b-1#")
    assert message["headers"]["id"] == f"b-1:requeue:{letter_id}"

    refused = cli(env, "dead-letters", "drop")
    assert refused.returncode == 2 and "--all" in refused.stderr
    dropped = cli(env, "dead-letters", "drop", "--batch-id", "b-2")
    assert "dropped 1 dead letter(s)" in dropped.stdout
    assert dead.count() == 0

