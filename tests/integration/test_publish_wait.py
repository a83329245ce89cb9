"""`snowpipe-worker publish` run again after a failure commits each row once, and `publish --wait`
and `wait_for_batches` tell a producer when its batches are committed or dead-lettered: real
`celery` workers, the real Redis and RabbitMQ, the emulator over HTTP.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import amqp
import orjson
import pytest

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    assert_exactly_once,
    delete_rabbit_queues,
    launch_worker,
    make_rows,
    running,
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import REPO_ROOT, RunningEmulator, start_emulator
from tests.support.keys import key_pair
from tests.support.redis import RedisDB
from tests.support.tcpproxy import TcpProxy
from worker.ndjson import batch_id_for
from worker.publish import Publisher
from worker.settings import load_settings
from worker.waiting import wait_for_batches

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
# A pipe the emulator does not know: the worker dead-letters every batch logged for it.
REFUSED_PIPE = "NOPE"
CLI_TIMEOUT = 180.0
_pipes = itertools.count()


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    with start_emulator(
        "--commit-delay", "0.2", "--rate-limit", "0",
        workdir=tmp_path_factory.mktemp("emulator"),
    ) as emulator:  # fmt: skip
        emulator.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        yield emulator


def new_pipe() -> str:
    """A pipe of the module's emulator that no other test uses (<TABLE>-STREAMING: known)."""
    return f"PW{next(_pipes)}_{int(time.time() * 1000) % 100_000}-STREAMING"


def write_rows(path: Path, count: int, *, broken: int | None = None) -> Path:
    """`count` rows with ids 0.. as NDJSON; line `broken` (1-based) cut short if given."""
    lines = [orjson.dumps(row) for row in make_rows(0, count, pad=50)]
    if broken is not None:
        lines[broken - 1] = lines[broken - 1][:20]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def publish_args(pipe: str, source: Path, *extra: str) -> list[str]:
    return ["publish", "--database", DATABASE, "--schema", SCHEMA, "--pipe", pipe, *extra,
            str(source)]  # fmt: skip


def command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from worker.cli import main; main()", *args]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args), capture_output=True, text=True, env=env, cwd=REPO_ROOT,
        timeout=CLI_TIMEOUT, check=False,
    )  # fmt: skip


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def stat(db: RedisDB, name: str) -> int:
    return int(db.client.hget("snowpipe:stats", name) or 0)


def ids_of(path: Path, pipe: str, batch_rows: int) -> list[str]:
    """The batch ids `publish` derives for `path` (see worker/ndjson.py)."""
    lines = [line.strip() for line in path.read_bytes().splitlines() if line.strip()]
    return [
        batch_id_for(DATABASE, SCHEMA, pipe, index, lines[start : start + batch_rows])
        for index, start in enumerate(range(0, len(lines), batch_rows))
    ]


def rabbit_ready(queue: str) -> int:
    with amqp.Connection("127.0.0.1:5672", userid="guest", password="guest") as conn:
        return int(conn.channel().queue_declare(queue, passive=True).message_count)


# --- A failed publish, run again ------------------------------------------------------------------


def test_a_broken_line_publishes_nothing_and_the_fixed_file_commits_every_row_once(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    queue = unique_queue("pw-fix")
    pipe = new_pipe()
    key_path = key_pair("celery").write_private(tmp_path / "key.pem")
    env = worker_env(emu, db.url, key_path, queue=queue)
    source = write_rows(tmp_path / "rows.ndjson", 1000, broken=750)
    args = publish_args(pipe, source, "--batch-rows", "100", "--wait", "--timeout", "120")

    refused = cli(env, *args)
    assert refused.returncode == 1, refused.stderr
    assert error_lines(refused) == [refused.stderr.strip()]  # one line
    assert refused.stderr.startswith("error: line 750: not JSON (")
    assert "nothing was published" in refused.stderr
    assert db.client.llen(queue) == 0

    write_rows(source, 1000)  # fixed
    worker = launch_worker(env, tmp_path, name="pwfix", concurrency=4)
    with running(worker):
        done = cli(env, *args)
        assert done.returncode == 0, done.stderr + worker.log_tail()
        assert "published 1000 rows in 10 batches" in done.stdout
        assert "10 of 10 batches (1000 rows) committed" in done.stdout
        assert_exactly_once(emu, [pipe], set(range(1000)), logs=[worker])

        # The same command once more: every batch is already committed, nothing again.
        again = cli(env, *args)
        assert again.returncode == 0, again.stderr
        assert "10 of 10 batches (1000 rows) committed" in again.stdout
        wait_until(lambda: stat(db, "already_logged") >= 10, timeout=60,
                   what="the second run's batches deduplicated", logs=[worker])  # fmt: skip
        assert_exactly_once(emu, [pipe], set(range(1000)), logs=[worker])


@pytest.mark.parametrize(
    "broker", ["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]
)
def test_a_publish_killed_half_way_then_run_again_commits_each_row_once(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path, broker: str
) -> None:
    queue = unique_queue(f"pw-kill-{broker}")
    pipe = new_pipe()
    key_path = key_pair("celery").write_private(tmp_path / "key.pem")
    source = write_rows(tmp_path / "rows.ndjson", 1000)
    args = publish_args(pipe, source, "--batch-rows", "20")  # 50 batches
    port = 6379 if broker == "redis" else 5672
    try:
        with TcpProxy("127.0.0.1", port) as proxy:
            through = (
                f"redis://127.0.0.1:{proxy.port}/{db.number}" if broker == "redis"
                else f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
            )  # fmt: skip
            env = worker_env(emu, through, key_path, queue=queue, state_url=db.url)
            # The messages are larger than the file: the broker stops taking them half way.
            proxy.hold_after(source.stat().st_size // 2)
            publisher = subprocess.Popen(
                command(*args), env=env, cwd=REPO_ROOT,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                held = proxy.held.wait(60)
                assert held, f"the publish ended first: {publisher.communicate(timeout=10)}"
            finally:
                publisher.kill()
                publisher.communicate(timeout=30)
        queued = db.client.llen(queue) if broker == "redis" else rabbit_ready(queue)
        assert 0 < queued < 50

        direct = RABBIT_URL if broker == "rabbitmq" else db.url
        env = worker_env(emu, direct, key_path, queue=queue, state_url=db.url)
        worker = launch_worker(env, tmp_path, name=f"pwkill{broker}", concurrency=4)
        with running(worker):
            rerun = cli(env, *args, "--wait", "--timeout", "120")
            assert rerun.returncode == 0, rerun.stderr + worker.log_tail()
            assert "50 of 50 batches (1000 rows) committed" in rerun.stdout
            wait_until(lambda: stat(db, "already_logged") >= queued, timeout=60,
                       what="the killed run's batches deduplicated", logs=[worker])  # fmt: skip
            assert_exactly_once(emu, [pipe], set(range(1000)), logs=[worker])
    finally:
        if broker == "rabbitmq":
            delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")


# --- publish --wait -------------------------------------------------------------------------------


def test_publish_wait_names_each_dead_lettered_batch_and_exits_1(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    queue = unique_queue("pw-dead")
    key_path = key_pair("celery").write_private(tmp_path / "key.pem")
    env = worker_env(emu, RABBIT_URL, key_path, queue=queue, state_url=db.url)
    source = write_rows(tmp_path / "rows.ndjson", 30)
    ids = ids_of(source, REFUSED_PIPE, 10)
    try:
        worker = launch_worker(env, tmp_path, name="pwdead", concurrency=4)
        with running(worker):
            result = cli(env, *publish_args(REFUSED_PIPE, source, "--batch-rows", "10",
                                            "--wait", "--timeout", "120"))  # fmt: skip
        assert result.returncode == 1, result.stderr + worker.log_tail()
        problems = error_lines(result)
        assert len(problems) == 4, result.stderr  # one per batch, and the summary
        for n, (batch_id, line) in enumerate(zip(ids, problems, strict=False), start=1):
            first = 10 * (n - 1) + 1
            assert line.startswith(
                f"error: batch {batch_id} ({n} of 3, lines {first}-{first + 9}) is a dead letter: "
                "Snowflake refuses"
            ), line
            assert "ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED" in line, line
            assert line.endswith(f"see `snowpipe-worker dead-letters list --batch-id {batch_id}`")
        assert problems[3].startswith("error: 0 of 3 batches (0 rows) committed in ")
        assert problems[3].endswith("; 3 with dead letters")
    finally:
        delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")


def test_publish_wait_names_the_batches_still_pending_at_the_timeout_and_exits_4(
    db: RedisDB, tmp_path: Path
) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "SNOWPIPE_BROKER_URL": db.url,
        "SNOWPIPE_QUEUE_NAME": unique_queue("pw-late"),
    }
    source = write_rows(tmp_path / "rows.ndjson", 15)
    ids = ids_of(source, "P", 10)
    result = cli(env, *publish_args("P", source, "--batch-rows", "10", "--wait",
                                    "--timeout", "0.5"))  # fmt: skip  # no worker runs
    assert result.returncode == 4, result.stderr
    assert error_lines(result)[:2] == [
        f"error: batch {ids[0]} (1 of 2, lines 1-10) still pending after 0.5 s: not logged: still "
        "in the queue (is a worker consuming it?), or in RabbitMQ's dead-letter queue",
        f"error: batch {ids[1]} (2 of 2, lines 11-15) still pending after 0.5 s: not logged: "
        "still in the queue (is a worker consuming it?), or in RabbitMQ's dead-letter queue",
    ]
    assert error_lines(result)[2].endswith(
        "; 2 still pending: run the same command again to keep waiting"
    )
    # Not a terminal: plain progress lines, no bar.
    assert "waiting: 0/2 batches committed, 0 dead-lettered, 0 logged and not yet committed, " \
        "2 not yet logged" in result.stderr  # fmt: skip


def test_publish_wait_says_the_state_store_is_unreachable_before_publishing(
    db: RedisDB, tmp_path: Path
) -> None:
    queue = unique_queue("pw-nostate")
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "SNOWPIPE_BROKER_URL": db.url,
        "SNOWPIPE_STATE_URL": "redis://127.0.0.1:9/0",
        "SNOWPIPE_QUEUE_NAME": queue,
    }
    source = write_rows(tmp_path / "rows.ndjson", 5)
    result = cli(env, *publish_args("P", source, "--wait"))
    assert result.returncode == 3
    assert result.stderr.startswith("error: cannot reach the state store at redis://127.0.0.1:9/0")
    assert db.client.llen(queue) == 0


# --- wait_for_batches -----------------------------------------------------------------------------


def test_wait_for_batches_reports_committed_and_dead_lettered_batches(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    queue = unique_queue("pw-api")
    pipe = new_pipe()
    key_path = key_pair("celery").write_private(tmp_path / "key.pem")
    env = worker_env(emu, db.url, key_path, queue=queue)
    settings = load_settings(**settings_overrides(env))
    publisher = Publisher(settings)
    worker = launch_worker(env, tmp_path, name="pwapi", concurrency=4)
    try:
        with running(worker):
            good: Sequence[str] = [
                publisher.publish(make_rows(10 * b, 10), database=DATABASE, schema=SCHEMA,
                                  pipe=pipe)
                for b in range(5)
            ]  # fmt: skip
            refused = publisher.publish(make_rows(100, 3), database=DATABASE, schema=SCHEMA,
                                        pipe=REFUSED_PIPE)  # fmt: skip
            result = wait_for_batches([*good, refused], timeout=120, settings=settings)
            assert result.states == {**dict.fromkeys(good, "committed"),
                                     refused: "dead_lettered"}, worker.log_tail()  # fmt: skip
            assert result.reasons[refused].startswith("Snowflake refuses"), result.reasons
            assert not result.timed_out and result.done and not result.ok
            assert not result.rows_rejected
            assert_exactly_once(emu, [pipe], set(range(50)), logs=[worker])
    finally:
        publisher.close()
