"""config/redis/: the state Redis configuration and the ACL users, loaded by a real redis-server.

- state.conf: the worker's persistence check (at start) and `doctor` find nothing to warn about;
  the same checks on a Redis without it do warn (so they are not blind).
- users.conf: a real worker and beat deliver with the worker user, a producer publishes with the
  producer user, which cannot read the scoped token the workers share (or any other state key).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis
from structlog.testing import capture_logs

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    assert_exactly_once,
    launch_beat,
    launch_worker,
    make_rows,
    running,
    wait_until,
    worker_env,
)
from tests.support.emulator import REPO_ROOT, RunningEmulator
from tests.support.keys import key_pair
from tests.support.redis import redis_server
from worker.delivery.node import check_persistence
from worker.doctor import Doctor
from worker.publish import Publisher
from worker.settings import load_settings

CONFIG = REPO_ROOT / "config" / "redis"
STATE_CONF = CONFIG / "state.conf"
USERS_CONF = CONFIG / "users.conf"


def persistence_events(client: redis.Redis) -> list[dict[str, object]]:
    """What the worker logs about the state store's persistence at start."""
    with capture_logs() as events:
        check_persistence(client)
    return [e for e in events if str(e.get("event", "")).startswith("state.persistence")]


def doctor_persistence(url: str) -> tuple[bool, str]:
    settings = load_settings(require_identity=False, broker_url=url)
    doctor = Doctor(settings)
    doctor._persistence(settings)
    (check,) = doctor.results
    return check.ok, check.detail


def test_the_state_redis_config_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    with redis_server(tmp_path / "state", str(STATE_CONF)) as port:
        client = redis.Redis(port=port, decode_responses=True)
        config = client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "always"
        assert config["no-appendfsync-on-rewrite"] == "no"
        assert config["maxmemory-policy"] == "noeviction"
        assert config["cluster-enabled"] == "no"

        assert persistence_events(client) == []  # nothing to warn about at worker start
        assert doctor_persistence(f"redis://127.0.0.1:{port}/0") == (
            True, "appendonly yes, appendfsync always"
        )  # fmt: skip

        client.set("k", "v")
        client.close()
    assert list((tmp_path / "state").glob("appendonlydir/*.aof"))  # written to disk

    # The same checks against a Redis without the file: they are not blind.
    with redis_server(tmp_path / "bare", "--save", "", "--appendonly", "no") as port:
        bare = redis.Redis(port=port)
        assert [e["event"] for e in persistence_events(bare)] == ["state.persistence.none"]
        assert doctor_persistence(f"redis://127.0.0.1:{port}/0")[0] is False
        bare.close()


def test_the_users_load_and_leaves_no_anonymous_access(tmp_path: Path) -> None:
    with redis_server(tmp_path / "r", "--include", str(USERS_CONF)) as port:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).get("anything")
        admin = redis.Redis(port=port, username="admin", password="change-me-admin")
        users = set(admin.acl_users())
        assert users == {"default", "admin", "snowpipe-worker", "snowpipe-producer"}
        admin.close()


def test_producers_publish_workers_deliver_and_producers_cannot_read_the_token(
    tmp_path: Path, emulator: RunningEmulator
) -> None:
    pair = key_pair("acl")
    emulator.register_key(ACCOUNT, USER, pair.public_pem)
    key_path = pair.write_private(tmp_path / "key.pem")
    with redis_server(tmp_path / "redis", str(STATE_CONF), "--include", str(USERS_CONF)) as port:
        admin = redis.Redis(port=port, username="admin", password="change-me-admin")
        worker_url = f"redis://snowpipe-worker:change-me-worker@127.0.0.1:{port}/0"
        producer_url = f"redis://snowpipe-producer:change-me-producer@127.0.0.1:{port}/0"
        # The default queue name: the producer's key patterns name it.
        env = worker_env(emulator, worker_url, key_path, queue="snowpipe.ingest",
                         beat_refresh_seconds=1)  # fmt: skip
        worker = launch_worker(env, tmp_path, name="acl", concurrency=2)
        beat = launch_beat(env, tmp_path)
        with running(worker, beat):
            producer_env = {"broker_url": producer_url}
            publisher = Publisher(load_settings(require_identity=False, **producer_env))
            for batch in range(3):
                publisher.publish(make_rows(batch * 10, 10), database=DATABASE, schema=SCHEMA,
                                  pipe="EVENTS-STREAMING")  # fmt: skip
            wait_until(
                lambda: len(emulator.rows(DATABASE, SCHEMA, "EVENTS-STREAMING")) >= 30,
                timeout=60, what="30 rows committed", logs=[worker, beat],
            )  # fmt: skip
            assert_exactly_once(emulator, ["EVENTS-STREAMING"], set(range(30)), [worker])
            # The shared token is there, and the worker user reads it (beat shares it that way).
            wait_until(lambda: bool(admin.keys("snowpipe:token:*")), timeout=30,
                       what="the shared token", logs=[worker, beat])  # fmt: skip
            (token_key,) = admin.keys("snowpipe:token:*")

            producer = redis.Redis.from_url(producer_url)
            for refused in (
                lambda: producer.get(token_key),
                lambda: producer.hgetall(token_key),
                lambda: producer.keys("*"),
                lambda: producer.llen("snowpipe:dead"),
                lambda: producer.publish("anything", "x"),
            ):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    refused()
            producer.close()

            # `doctor` runs with the worker user, the persistence check included.
            doctor = subprocess.run(
                [sys.executable, "-c", "from worker.cli import main; main()", "doctor"],
                env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert doctor.returncode == 0, doctor.stdout + doctor.stderr
            assert "state persistence: appendonly yes, appendfsync always" in doctor.stdout

        # Nothing the workers, beat or doctor did was refused by the ACLs.
        refusals = [entry for entry in admin.acl_log() if entry["username"] != "snowpipe-producer"]
        assert refusals == [], refusals
        admin.close()
