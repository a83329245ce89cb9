"""The state store's settings: the Sentinel form of SNOWPIPE_STATE_URL, its master name and
passwords, one-line errors that name the setting and the fix and never show a password, and the
client `state_redis` builds from them (built only: nothing here connects)."""

from __future__ import annotations

import os

import pytest

from worker.redisurl import SentinelUrl, parse_sentinel_url, redact_url
from worker.settings import Settings, SettingsError, load_settings
from worker.statestore import (
    REDIS_CONNECT_TIMEOUT_SECONDS,
    REDIS_SOCKET_TIMEOUT_SECONDS,
    FailoverConnection,
    FailoverPool,
    StatePipeline,
    StateRedis,
    state_redis,
)

SECRET = "s3cr3t-do-not-show"
MASTER = "snowpipe-state"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SNOWPIPE_* variable of the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("SNOWPIPE_"):
            monkeypatch.delenv(name)


def producer(**overrides: object) -> Settings:
    return load_settings(require_identity=False, **overrides)


def refused(**overrides: object) -> str:
    """The one problem line of settings that fail validation."""
    with pytest.raises(SettingsError) as info:
        producer(**overrides)
    text = str(info.value)
    assert SECRET not in text
    lines = [line for line in text.splitlines() if line.startswith("  - ")]
    assert lines, text
    return lines[0].removeprefix("  - ")


# --- The Sentinel form ----------------------------------------------------------------------


def test_celerys_sentinel_form_names_every_sentinel_the_database_and_the_login() -> None:
    url = f"sentinel://:{SECRET}@10.0.0.5:26380;sentinel://10.0.0.6;sentinel://[::1]:26381/3"
    parsed = parse_sentinel_url(url)
    assert parsed == SentinelUrl(
        sentinels=(("10.0.0.5", 26380), ("10.0.0.6", 26379), ("::1", 26381)),
        db=3,
        username=None,
        password=SECRET,
    )
    assert SECRET not in repr(parsed)
    with_user = parse_sentinel_url(f"sentinel://app:{SECRET}@h1:1/2;sentinel://h2:2/2")
    assert (with_user.username, with_user.password, with_user.db) == ("app", SECRET, 2)
    query = parse_sentinel_url(f"sentinel://h1:1?password={SECRET};sentinel://h2:2")
    assert (query.password, query.db) == (SECRET, 0)


def test_a_sentinel_url_with_its_master_name_is_accepted() -> None:
    s = producer(state_url="sentinel://10.0.0.5:26379;sentinel://10.0.0.6:26379/1",
                 state_sentinel_master=f" {MASTER} ")  # fmt: skip
    assert s.state_is_sentinel
    assert s.state_sentinel_master == MASTER
    assert not producer(state_url="redis://127.0.0.1:6379/1").state_is_sentinel


def test_a_sentinel_url_without_a_master_name_names_the_setting_and_the_fix() -> None:
    line = refused(state_url=f"sentinel://:{SECRET}@10.0.0.5:26379/0")
    assert line.startswith("SNOWPIPE_STATE_SENTINEL_MASTER is required with a sentinel://")
    assert "sentinel monitor NAME" in line


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"sentinel://:{SECRET}@h1:26379;;sentinel://h2/0", "has an empty part (number 2)"),
        (f"sentinel://:{SECRET}@h1:26379;redis://h2:6379/0", "is not a sentinel:// address"),
        (f"sentinel://:{SECRET}@h1:port/0", "has an invalid port"),
        (f"sentinel://:{SECRET}@:26379/0", "names no host"),
        (f"sentinel://:{SECRET}@h1:26379/zero", "names database 'zero', not a number"),
        (f"sentinel://:{SECRET}@h1:26379/1;sentinel://h2/2", "names different databases (1, 2)"),
        (f"sentinel://:{SECRET}@h1/0;sentinel://:other@h2/0", "different users or passwords"),
        (f"sentinel://h1:26379/0?password={SECRET}&socket_timeout=1", "has options socket_timeout"),
    ],
)
def test_a_malformed_sentinel_url_is_one_line_naming_the_problem_and_the_form(
    url: str, problem: str
) -> None:
    line = refused(state_url=url, state_sentinel_master=MASTER)
    assert line.startswith("SNOWPIPE_STATE_URL "), line
    assert problem in line, line
    assert "; " in line  # then the fix: the form, or what to remove


def test_a_state_url_that_is_not_redis_is_shown_without_its_password() -> None:
    line = refused(state_url=f"amqp://guest:{SECRET}@h:5672//")
    assert line.startswith("SNOWPIPE_STATE_URL 'amqp://guest:***@h:5672//' is not a Redis URL")
    assert "sentinel://" in line and "SNOWPIPE_STATE_SENTINEL_MASTER" in line


def test_sentinel_settings_without_a_sentinel_url_are_refused() -> None:
    line = refused(state_url="redis://127.0.0.1:6379/0", state_sentinel_master=MASTER)
    assert line.startswith("SNOWPIPE_STATE_SENTINEL_MASTER is set but SNOWPIPE_STATE_URL is not")
    line = refused(broker_url="redis://127.0.0.1:6379/0", state_sentinel_password=SECRET)
    assert line.startswith("SNOWPIPE_STATE_SENTINEL_PASSWORD is set but SNOWPIPE_STATE_URL")
    assert "unset it" in line


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@127.0.0.1:6379/0",
        f"redis://127.0.0.1:6379/0?password={SECRET}",
        f"sentinel://:{SECRET}@h1:26379/0",
    ],
)
def test_a_password_in_the_url_and_in_its_setting_is_refused(url: str) -> None:
    line = refused(state_url=url, state_password=SECRET, state_sentinel_master=MASTER * (
        url.startswith("sentinel")
    ))  # fmt: skip
    assert line.startswith("SNOWPIPE_STATE_PASSWORD is set and SNOWPIPE_STATE_URL has a password")
    assert "keep one" in line


def test_passwords_are_masked_in_every_part_and_in_queries() -> None:
    url = (
        f"sentinel://user:{SECRET}@h1:26379;sentinel://h2:26379/0?password={SECRET};"
        f"sentinel://:{SECRET}@h3"
    )
    shown = redact_url(url)
    assert SECRET not in shown
    assert shown == (
        "sentinel://user:***@h1:26379;sentinel://h2:26379/0?password=***;sentinel://:***@h3"
    )
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url(f"redis://u:{SECRET}@[::1/0") == "redis://***@[::1/0"  # unparsable


# --- The client built from them ---------------------------------------------------------------


def test_a_redis_url_gives_a_plain_client_with_the_explicit_timeouts() -> None:
    client = state_redis(producer(state_url="redis://127.0.0.1:6399/4", state_password=SECRET))
    try:
        assert isinstance(client, StateRedis)
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6399, 4)
        assert kwargs["password"] == SECRET
        assert kwargs["socket_timeout"] == REDIS_SOCKET_TIMEOUT_SECONDS
        assert kwargs["socket_connect_timeout"] == REDIS_CONNECT_TIMEOUT_SECONDS
        assert isinstance(client.pipeline(transaction=False), StatePipeline)
    finally:
        client.close()


def test_a_sentinel_url_gives_a_client_of_the_named_master_through_every_sentinel() -> None:
    s = producer(
        state_url=f"sentinel://:{SECRET}@10.0.0.5:26379;sentinel://10.0.0.6:26380/2",
        state_sentinel_master=MASTER,
        state_sentinel_password="sentinel-" + SECRET,
    )
    client = state_redis(s)
    try:
        assert isinstance(client, StateRedis)
        pool = client.connection_pool
        assert isinstance(pool, FailoverPool) and pool.service_name == MASTER
        assert pool.connection_class is FailoverConnection
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["password"]) == (2, SECRET)
        assert kwargs["socket_timeout"] == REDIS_SOCKET_TIMEOUT_SECONDS
        assert client.sentinel_manager is not None
        sentinels = client.sentinel_manager.sentinels
        addresses = [(c.connection_pool.connection_kwargs["host"],
                      c.connection_pool.connection_kwargs["port"]) for c in sentinels]  # fmt: skip
        assert addresses == [("10.0.0.5", 26379), ("10.0.0.6", 26380)]
        assert all(
            c.connection_pool.connection_kwargs["password"] == "sentinel-" + SECRET
            for c in sentinels
        )
        assert SECRET not in repr(client) + repr(pool)
    finally:
        client.close()


def test_the_redis_password_setting_reaches_the_nodes_behind_sentinel() -> None:
    s = producer(state_url="sentinel://10.0.0.5/0", state_sentinel_master=MASTER,
                 state_password=SECRET)  # fmt: skip
    client = state_redis(s)
    try:
        assert client.connection_pool.connection_kwargs["password"] == SECRET
        sentinel_kwargs = client.sentinel_manager.sentinels[0].connection_pool.connection_kwargs  # type: ignore[union-attr]
        assert sentinel_kwargs.get("password") is None
    finally:
        client.close()


# --- The example configuration (config/redis/, what tests/support/sentinel.py starts from) ----


def test_the_example_node_config_keeps_what_it_acknowledged_on_every_node() -> None:
    from tests.support.sentinel import NODE_CONFIG, directives

    found = {d[0].lower(): d[1:] for d in directives(NODE_CONFIG)}
    assert found["appendonly"] == ["yes"] and found["appendfsync"] == ["always"]
    assert found["maxmemory-policy"] == ["noeviction"]
    assert found["replicaof"] == ["redis-state-1", "6379"]
    assert found["replica-priority"] != ["0"]  # a replica that can be promoted


def test_the_example_sentinel_config_monitors_the_documented_master_with_a_quorum_of_two() -> None:
    from tests.support.sentinel import SENTINEL_CONFIG, directives

    lines = [d for d in directives(SENTINEL_CONFIG) if d[0] == "sentinel"]
    monitor = next(d for d in lines if d[1] == "monitor")
    assert monitor[2:] == [MASTER, "redis-state-1", "6379", "2"]
    per_master = {d[1] for d in lines if len(d) > 2 and d[2] == MASTER}
    assert {"down-after-milliseconds", "failover-timeout", "parallel-syncs"} <= per_master
