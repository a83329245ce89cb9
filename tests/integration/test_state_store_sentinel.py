"""The state store through Redis Sentinel: `state_redis` follows a failover by itself.

A real primary, replica and Sentinel (tests/support/sentinel.py). Writes, a registered Lua script
and a pipeline of `[script, WAIT]` go to whichever node Sentinel names, after a kill -9 of the
primary and after `SENTINEL FAILOVER`; while the failover lasts, callers see `redis.RedisError`s
only. A pipeline retried on a new connection loads its scripts there first. `doctor` and
`status` show the primary, its replicas and their lag.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import redis

from tests.support.emulator import REPO_ROOT
from tests.support.redis import RedisDB, free_port, private_redis
from tests.support.sentinel import FAILOVER_WAIT, SentinelSet, sentinel_set
from worker.settings import Settings, load_settings
from worker.statestore import StatePipeline, StateRedis, redis_client, state_redis

SCRIPT = "return redis.call('INCR', KEYS[1])"
KEY = "sentinel-test:counter"
SECRET = "not-shown-anywhere"

T = TypeVar("T")


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[SentinelSet]:
    with sentinel_set(tmp_path / "ha") as started:
        yield started


def settings_of(ha: SentinelSet, **extra: Any) -> Settings:
    return load_settings(
        require_identity=False,
        state_url=ha.url(0),
        state_sentinel_master=ha.master_name,
        **extra,
    )


def until_it_succeeds(call: Callable[[], T], errors: list[BaseException]) -> T:
    """`call()` again until it returns (bounded by a failover's time); every failure on the way
    must be a redis.RedisError (anything else fails the test at once) and is kept in `errors`."""
    deadline = time.monotonic() + FAILOVER_WAIT
    while True:
        try:
            return call()
        except redis.RedisError as exc:
            errors.append(exc)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_writes_and_a_registered_script_reach_the_new_primary_after_a_kill_9(
    ha: SentinelSet,
) -> None:
    client = state_redis(settings_of(ha))
    try:
        incr = client.register_script(SCRIPT)
        assert incr(keys=[KEY]) == 1
        assert client.execute_command("WAIT", 1, 5000) == 1  # the replica has it
        old = ha.kill_master()
        errors: list[BaseException] = []
        assert until_it_succeeds(lambda: incr(keys=[KEY]), errors) == 2
        new = ha.master()
        assert new is not old
        assert new.client().get(KEY) == b"2"  # the script ran there (loaded again: NOSCRIPT)
        assert errors, "the primary was killed: some calls must have failed on the way"
        # The old primary comes back, an old copy until Sentinel demotes it: the client keeps
        # writing to the primary Sentinel names (redis-py alone would reconnect to the old one).
        old.start()
        assert old.role() == "master"  # for now
        assert until_it_succeeds(lambda: client.incr(KEY), errors) == 3
        assert new.client().get(KEY) == b"3"
        assert old.client().get(KEY) == b"1"
    finally:
        client.close()


def test_a_forced_failover_moves_writes_to_the_new_primary_before_the_old_is_demoted(
    ha: SentinelSet,
) -> None:
    client = state_redis(settings_of(ha))
    try:
        incr = client.register_script(SCRIPT)
        assert incr(keys=[KEY]) == 1
        old = ha.master()
        new = ha.failover(demote=False)
        # Sentinel leaves the old primary a primary for some seconds after the switch (it
        # demotes it on its next look); the client asks Sentinel while it is in use and moves.
        errors: list[BaseException] = []

        def write_lands_on_new() -> bool:
            before = int(new.client().get(KEY) or 0)
            incr(keys=[KEY])
            return int(new.client().get(KEY) or 0) > before

        deadline = time.monotonic() + FAILOVER_WAIT
        while not until_it_succeeds(write_lands_on_new, errors):
            assert time.monotonic() < deadline, "writes never reached the new primary"
            time.sleep(0.05)
        assert old.role() == "master", "the old primary was demoted first: nothing was shown"
    finally:
        client.close()


def test_a_connection_that_reconnects_asks_sentinel_where_the_primary_is(ha: SentinelSet) -> None:
    # What a command's retry does after a connection error: disconnect, then send again on the
    # same connection object. redis-py reconnects it to its last address (issue #3874).
    client = state_redis(settings_of(ha))
    try:
        pool = client.connection_pool
        connection = pool.get_connection()
        try:
            old = ha.master()
            assert connection.port == old.port
            new = ha.failover(demote=False)  # the old primary still takes writes for a while
            connection.disconnect()
            connection.send_command("SET", KEY, "retried")
            assert connection.read_response() == b"OK"
            assert connection.port == new.port
            assert new.client().get(KEY) == b"retried"
            assert old.client().get(KEY) is None
        finally:
            pool.release(connection)
    finally:
        client.close()


def test_a_sentinel_that_names_a_replica_is_passed_over(ha: SentinelSet) -> None:
    replica = ha.replica()
    stale = ha.start_stale_sentinel(replica)
    s = load_settings(
        require_identity=False,
        state_url=f"sentinel://127.0.0.1:{stale.port};{ha.url(0)}",
        state_sentinel_master=ha.master_name,
    )
    client = state_redis(s)
    try:
        # The first Sentinel names the replica: the connection checks ROLE, asks the next one.
        for n in range(3):
            assert client.set(KEY, n) is True
        assert ha.master().client().get(KEY) == b"2"
        assert client.connection_pool.master_address == ("127.0.0.1", ha.master().port)
    finally:
        client.close()


def test_a_pipeline_of_a_script_and_wait_works_before_and_after_a_failover(
    ha: SentinelSet,
) -> None:
    client = state_redis(settings_of(ha))
    try:
        incr = client.register_script(SCRIPT)

        def script_then_wait(timeout_ms: int) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            assert isinstance(pipe, StatePipeline)
            incr(keys=[KEY], client=pipe)
            pipe.execute_command("WAIT", 1, timeout_ms)
            return pipe.execute()

        # WAIT counts the replicas that acknowledged this connection's writes: the script's.
        # (It answers as soon as the replica has: the long timeout only leaves room for a
        # loaded machine.)
        assert script_then_wait(10_000) == [1, 1]
        ha.kill_master()
        errors: list[BaseException] = []
        # No replica left: WAIT waits its whole timeout, kept short.
        assert until_it_succeeds(lambda: script_then_wait(200), errors) == [2, 0]
    finally:
        client.close()


class _BrokenAfterLoading(StatePipeline):
    """A pipeline whose connection breaks, and whose server loses its scripts (as a new
    primary has none), between loading its scripts and running them."""

    other: redis.Redis

    def load_scripts(self) -> None:
        super().load_scripts()
        connection_id = self.immediate_execute_command("CLIENT", "ID")
        self.other.script_flush()
        self.other.client_kill_filter(_id=connection_id)


def test_a_pipeline_retried_on_a_new_connection_loads_its_scripts_again(tmp_path: Path) -> None:
    with private_redis(tmp_path / "redis") as server:
        client = redis_client(server.url(0))
        other = server.client()
        try:
            assert isinstance(client, StateRedis)
            incr = client.register_script(SCRIPT)
            pipe = _BrokenAfterLoading(
                client.connection_pool, client.response_callbacks, False, None
            )
            pipe.other = other
            incr(keys=[KEY], client=pipe)
            pipe.execute_command("GET", KEY)
            assert pipe.execute() == [1, b"1"]  # retried once, on a new connection
            assert other.script_exists(incr.sha) == [True]
        finally:
            client.close()
            other.close()


# --- doctor and status ------------------------------------------------------------------------


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", *args],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60, check=False,
    )  # fmt: skip


def base_env(broker: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "SNOWPIPE_BROKER_URL": broker}


def doctor_line(output: str, name: str) -> str:
    lines = output.splitlines()
    for i, text in enumerate(lines):
        if text[2:].startswith(f"{name}:"):
            fix = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("    fix:") else ""
            return f"{text}\n{fix}".strip()
    raise AssertionError(f"no {name!r} line in:\n{output}")


def test_status_and_doctor_show_the_primary_its_replicas_and_their_lag(
    ha: SentinelSet, db: RedisDB, tmp_path: Path
) -> None:
    env = {**base_env(db.url), **ha.env(0)}
    result = cli(env, "status", "--json", "--no-snowflake")
    assert result.returncode == 0, result.stdout + result.stderr
    view = orjson.loads(result.stdout)["state_replication"]
    primary, replica = ha.master(), ha.replica()
    assert view["via"] == "sentinel" and view["master_name"] == ha.master_name
    assert (view["primary"], view["role"]) == (f"127.0.0.1:{primary.port}", "master")
    assert [r["address"] for r in view["replicas"]] == [f"127.0.0.1:{replica.port}"]
    entry = view["replicas"][0]
    assert entry["state"] == "online" and entry["behind_bytes"] >= 0 and entry["lag_seconds"] >= 0
    assert "slave" in entry["sentinel_flags"]
    assert (view["replicas_online"], view["min_replicas"], view["problem"]) == (1, 0, None)

    text = cli(env, "status", "--no-snowflake")
    assert text.returncode == 0, text.stderr
    section = text.stdout.split("[state store]\n", 1)[1].split("\n[", 1)[0].splitlines()
    assert section[1].split("\t")[:3] == ["primary", f"127.0.0.1:{primary.port} (Sentinel "
                                          f"master {ha.master_name})", "master"]  # fmt: skip
    assert section[2].split("\t")[:3] == ["replica", f"127.0.0.1:{replica.port}", "online"]

    # Doctor (no Snowflake here: its account checks fail, the state store's still run).
    env["SNOWPIPE_ACCOUNT_URL"] = f"http://127.0.0.1:{free_port()}"
    env.update(SNOWPIPE_ACCOUNT="ACC", SNOWPIPE_USER="U", SNOWPIPE_PRIVATE_KEY="x")
    ok = doctor_line(cli(env, "doctor").stdout, "state replication")
    assert ok.startswith(f"✓ state replication: primary 127.0.0.1:{primary.port} (Sentinel "
                         f"master '{ha.master_name}'), 1 replica(s) online"), ok  # fmt: skip
    assert f"127.0.0.1:{replica.port} online, " in ok and "bytes behind" in ok

    # More replicas asked for than are online: both say so.
    env["SNOWPIPE_STATE_MIN_REPLICAS"] = "2"
    short = doctor_line(cli(env, "doctor").stdout, "state replication")
    assert short.startswith("✗ state replication:"), short
    assert "SNOWPIPE_STATE_MIN_REPLICAS is 2 but 1 replica(s) are online" in short
    assert "fix: bring replicas up, or lower SNOWPIPE_STATE_MIN_REPLICAS" in short
    problem = orjson.loads(cli(env, "status", "--json", "--no-snowflake").stdout)
    assert "SNOWPIPE_STATE_MIN_REPLICAS is 2" in problem["state_replication"]["problem"]

    # A redis:// URL that reaches the replica: every write would fail with READONLY.
    env.pop("SNOWPIPE_STATE_SENTINEL_MASTER")
    env.update(SNOWPIPE_STATE_URL=f"redis://127.0.0.1:{replica.port}/0",
               SNOWPIPE_STATE_MIN_REPLICAS="0")  # fmt: skip
    direct = doctor_line(cli(env, "doctor").stdout, "state replication")
    assert direct.startswith(f"✗ state replication: primary 127.0.0.1:{replica.port}: "
                             "SNOWPIPE_STATE_URL reaches a replica"), direct  # fmt: skip


def test_sentinels_that_name_no_primary_are_one_line_without_the_password(db: RedisDB) -> None:
    dead = free_port()
    env = {
        **base_env(db.url),
        "SNOWPIPE_STATE_URL": f"sentinel://:{SECRET}@127.0.0.1:{dead};sentinel://{db.url[8:]}",
        "SNOWPIPE_STATE_SENTINEL_MASTER": "snowpipe-state",
    }
    result = cli(env, "stats")
    assert result.returncode == 3, result.stdout + result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and SECRET not in message and "Traceback" not in message
    assert message.startswith(f"error: cannot reach the state store through the Sentinels at "
                              f"sentinel://:***@127.0.0.1:{dead};")  # fmt: skip
    assert f"127.0.0.1:{dead}: Error 111 connecting" in message
    assert "127.0.0.1:6379: unknown command 'SENTINEL'" in message  # a Redis, not a Sentinel
    assert "SNOWPIPE_STATE_SENTINEL_MASTER" in message
