"""Wrong credentials give one line from every command, naming the setting that holds them.

Real servers: RabbitMQ with a wrong password, a private `redis-server` with `requirepass` (as the
broker, and as the state store), each command a real process; `publish_batch` raises the
project's error; a worker whose key does not load exits with one line.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.celery import unique_queue, worker_env
from tests.support.emulator import REPO_ROOT, RunningEmulator
from tests.support.keys import key_pair
from tests.support.redis import PrivateRedis, RedisDB, private_redis
from worker.connectivity import BrokerUnavailableError
from worker.publish import Publisher
from worker.settings import load_settings

PASSWORD = "s3cret-of-the-test"
WRONG = "not-the-password"

BROKER_COMMANDS: list[tuple[str, ...]] = [
    ("publish", "--database", "D", "--schema", "S", "--pipe", "P", "-"),
    ("dead-letters", "requeue"),
    ("status", "--no-snowflake"),
    ("health", "--timeout", "1"),
    ("doctor",),
]
STATE_COMMANDS: list[tuple[str, ...]] = [
    ("stats",),
    ("dead-letters", "list"),
    ("dead-letters", "requeue"),
    ("dead-letters", "drop", "--all"),
    ("status", "--no-snowflake"),
    ("health", "--timeout", "1"),
    ("doctor",),
]


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """A redis-server that wants a password."""
    with private_redis(tmp_path_factory.mktemp("locked"), password=PASSWORD) as server:
        yield server


def env_for(broker: str, state: str, tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "SNOWPIPE_ACCOUNT": "TESTACC",
        "SNOWPIPE_USER": "LOADER",
        "SNOWPIPE_PRIVATE_KEY_PATH": str(key_pair("errors").write_private(tmp_path / "k.pem")),
        "SNOWPIPE_ACCOUNT_URL": "http://127.0.0.1:9",  # doctor: unreachable, reported apart
        "SNOWPIPE_BROKER_URL": broker,
        "SNOWPIPE_STATE_URL": state,
        "SNOWPIPE_QUEUE_NAME": unique_queue("errors"),
    }


def run_all(env: dict[str, str], commands: Sequence[tuple[str, ...]]) -> list[tuple[str, str]]:
    """(command, everything it printed) for each command, run as real processes."""

    def run(args: tuple[str, ...]) -> tuple[str, str]:
        result = subprocess.run(
            [sys.executable, "-c", "from worker.cli import main; main()", *args],
            input='{"id": 1}\n', capture_output=True, text=True, env=env, cwd=REPO_ROOT,
            timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode != 0, f"{args}: {result.stdout}{result.stderr}"
        return " ".join(args), result.stdout + result.stderr

    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(run, commands))


def assert_one_line_each(results: list[tuple[str, str]], *needles: str) -> None:
    for command, printed in results:
        assert "Traceback" not in printed, f"{command}:\n{printed}"
        lines = [ln for ln in printed.splitlines() if "refused the credentials" in ln]
        assert len(lines) == 1, f"{command}:\n{printed}"
        # doctor puts the fix on a line of its own, under its check's line
        where = printed if command == "doctor" else lines[0]
        for needle in needles:
            assert needle in where, f"{command}: {needle!r} not in\n{where}"
        assert "start RabbitMQ" not in printed and "start Redis" not in lines[0]
        assert PASSWORD not in printed and WRONG not in printed


@pytest.mark.rabbitmq
def test_a_wrong_rabbitmq_password_is_one_line_from_every_command(
    db: RedisDB, tmp_path: Path
) -> None:
    broker = f"amqp://guest:{WRONG}@127.0.0.1:5672//"
    results = run_all(env_for(broker, db.url, tmp_path),
                      [*BROKER_COMMANDS, ("stats",), ("dead-letters", "list")])  # fmt: skip
    assert_one_line_each(
        results,
        "the broker at amqp://guest:***@127.0.0.1:5672//",
        "(SNOWPIPE_BROKER_URL)",
        "ACCESS_REFUSED",
        "set the user and password RabbitMQ expects in SNOWPIPE_BROKER_URL",
    )
    settings = load_settings(require_identity=False, broker_url=broker, state_url=db.url,
                             queue_name=unique_queue("errors"))  # fmt: skip
    with pytest.raises(BrokerUnavailableError, match="refused the credentials"):
        Publisher(settings)


# A wrong password (WRONGPASS) with every command; no password at all (NOAUTH) with one.
@pytest.mark.parametrize(
    ("password", "commands"),
    [(WRONG, BROKER_COMMANDS), (None, BROKER_COMMANDS[:1])],
    ids=["wrong-password", "no-password"],
)
def test_a_redis_broker_that_refuses_the_password_is_one_line_from_every_command(
    locked: PrivateRedis,
    db: RedisDB,
    tmp_path: Path,
    password: str | None,
    commands: list[tuple[str, ...]],
) -> None:
    broker = locked.url(0, password=password)
    results = run_all(env_for(broker, db.url, tmp_path), commands)
    assert_one_line_each(results, "(SNOWPIPE_BROKER_URL)", "expects in SNOWPIPE_BROKER_URL")
    settings = load_settings(require_identity=False, broker_url=broker, state_url=db.url,
                             queue_name=unique_queue("errors"))  # fmt: skip
    publisher = Publisher(settings)
    publisher.app.conf.task_publish_retry_policy = {"max_retries": 0}
    try:
        with pytest.raises(BrokerUnavailableError, match="refused the credentials"):
            publisher.publish([{"id": 1}], database="D", schema="S", pipe="P")
    finally:
        publisher.close()


@pytest.mark.parametrize(
    ("password", "commands"),
    [(WRONG, STATE_COMMANDS), (None, STATE_COMMANDS[:1])],
    ids=["wrong-password", "no-password"],
)
def test_a_state_store_that_refuses_the_password_is_one_line_from_every_command(
    locked: PrivateRedis,
    db: RedisDB,
    tmp_path: Path,
    password: str | None,
    commands: list[tuple[str, ...]],
) -> None:
    state = locked.url(0, password=password)
    results = run_all(env_for(db.url, state, tmp_path), commands)
    assert_one_line_each(results, "the state store at", "(SNOWPIPE_STATE_URL)",
                         "expects in SNOWPIPE_STATE_URL")  # fmt: skip


def test_a_worker_whose_key_does_not_load_exits_with_one_line(
    emulator: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    key = key_pair("locked-key").write_private(tmp_path / "key.pem", passphrase=b"right one")
    env = worker_env(emulator, db.url, key, queue=unique_queue("badpass"),
                     private_key_passphrase="wrong one")  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool", "threads",
         "--concurrency", "2", "--hostname", "badpass@test", "--without-gossip",
         "--without-mingle"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60, check=False,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode != 0, log
    assert "Traceback" not in log, log
    fatal = [ln for ln in log.splitlines() if "worker.cannot_start" in ln]
    assert len(fatal) == 1, log
    assert "cannot decrypt" in fatal[0] and "SNOWPIPE_PRIVATE_KEY_PASSPHRASE" in fatal[0]


@pytest.mark.rabbitmq
def test_a_worker_whose_broker_refuses_the_credentials_exits_with_one_line(
    emulator: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    env = worker_env(emulator, f"amqp://guest:{WRONG}@127.0.0.1:5672//",
                     key_pair("w").write_private(tmp_path / "k.pem"),
                     queue=unique_queue("badmq"), state_url=db.url)  # fmt: skip
    log = _worker_fails(env)
    fatal = [ln for ln in log.splitlines() if "worker.cannot_start" in ln]
    assert len(fatal) == 1, log
    assert "(SNOWPIPE_BROKER_URL) refused the credentials (ACCESS_REFUSED" in fatal[0]


def test_a_worker_whose_state_store_refuses_the_credentials_exits_with_one_line(
    emulator: RunningEmulator, locked: PrivateRedis, db: RedisDB, tmp_path: Path
) -> None:
    state = locked.url(0, password=WRONG)
    env = worker_env(emulator, db.url, key_pair("w").write_private(tmp_path / "k.pem"),
                     queue=unique_queue("badstate"), state_url=state)  # fmt: skip
    log = _worker_fails(env, code=78)
    fatal = [ln for ln in log.splitlines() if "worker.cannot_start" in ln]
    assert len(fatal) == 1, log
    assert "(SNOWPIPE_STATE_URL) refused the credentials" in fatal[0]


def _worker_fails(env: dict[str, str], *, code: int | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool", "threads",
         "--concurrency", "2", "--hostname", "refused@test", "--without-gossip",
         "--without-mingle"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60, check=False,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode != 0 if code is None else result.returncode == code, log
    assert "Traceback" not in log and PASSWORD not in log and WRONG not in log, log
    return log
