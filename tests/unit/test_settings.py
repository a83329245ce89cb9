"""Settings: TOML profile + SNOWPIPE_* overrides, and errors that name the setting and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.keys import key_pair
from worker.settings import (
    PROFILE_DIR,
    Settings,
    SettingsError,
    load_settings,
    profile_names,
    profile_path,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SNOWPIPE_* variable of the developer's shell leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("SNOWPIPE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return key_pair().write_private(tmp_path / "key.pem")


def minimal(key_file: Path, **extra: object) -> Settings:
    return load_settings(account="myorg-acct", user="loader", private_key_path=key_file, **extra)


def problems(excinfo: pytest.ExceptionInfo[SettingsError]) -> str:
    return str(excinfo.value)


def test_missing_identity_names_each_variable_and_the_profiles() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings()
    text = problems(info)
    assert "SNOWPIPE_ACCOUNT: is required" in text
    assert "SNOWPIPE_USER: is required" in text
    assert "SNOWPIPE_CONFIG" in text and "local" in text


def test_a_private_key_is_required_and_only_one_source(key_file: Path) -> None:
    with pytest.raises(SettingsError, match=r"SNOWPIPE_PRIVATE_KEY_PATH .*SNOWPIPE_PRIVATE_KEY"):
        load_settings(account="a", user="u")
    with pytest.raises(SettingsError, match="keep one"):
        load_settings(account="a", user="u", private_key_path=key_file, private_key="pem")


def test_a_key_file_that_does_not_exist_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(SettingsError) as info:
        load_settings(account="a", user="u", private_key_path=missing)
    assert "SNOWPIPE_PRIVATE_KEY_PATH" in problems(info)
    assert str(missing) in problems(info)


def test_account_url_defaults_to_the_account_host(key_file: Path) -> None:
    assert minimal(key_file).account_url == "https://myorg-acct.snowflakecomputing.com"
    under = load_settings(account="my_org-acct", user="u", private_key_path=key_file)
    assert under.account_url == "https://my-org-acct.snowflakecomputing.com"


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8087", "http://localhost:8087", "http://[::1]:8087"]
)
def test_plain_http_is_accepted_for_loopback_hosts(key_file: Path, url: str) -> None:
    assert minimal(key_file, account_url=url + "/").account_url == url


def test_plain_http_to_a_remote_host_is_refused(key_file: Path) -> None:
    with pytest.raises(SettingsError, match=r"SNOWPIPE_ACCOUNT_URL .*https://"):
        minimal(key_file, account_url="http://acct.snowflakecomputing.com")


def test_state_store_defaults_to_a_redis_broker(key_file: Path) -> None:
    s = minimal(key_file, broker_url="redis://127.0.0.1:6379/3")
    assert s.state_url == "redis://127.0.0.1:6379/3"
    assert s.broker_is_redis


def test_rabbitmq_broker_needs_a_redis_state_store(key_file: Path) -> None:
    amqp = "amqp://guest:guest@127.0.0.1:5672//"
    with pytest.raises(SettingsError, match="SNOWPIPE_STATE_URL is required"):
        minimal(key_file, broker_url=amqp)
    s = minimal(key_file, broker_url=amqp, state_url="redis://127.0.0.1:6379/0")
    assert not s.broker_is_redis
    with pytest.raises(SettingsError, match="not a Redis URL"):
        minimal(key_file, broker_url=amqp, state_url=amqp)


def test_unsupported_broker_scheme_is_named(key_file: Path) -> None:
    with pytest.raises(SettingsError, match="SNOWPIPE_BROKER_URL scheme 'memory'"):
        minimal(key_file, broker_url="memory://")


def test_out_of_range_knobs_name_their_variable(key_file: Path) -> None:
    with pytest.raises(SettingsError) as info:
        minimal(key_file, retry_attempts=0, jwt_lifetime_seconds=7200)
    assert "SNOWPIPE_RETRY_ATTEMPTS" in problems(info)
    assert "SNOWPIPE_JWT_LIFETIME_SECONDS" in problems(info)


def test_environment_overrides_the_profile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, key_file: Path
) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text(
        f'account = "FROMFILE"\nuser = "U"\nprivate_key_path = "{key_file}"\n'
        "retry_attempts = 7\n"
    )
    monkeypatch.setenv("SNOWPIPE_CONFIG", str(profile))
    monkeypatch.setenv("SNOWPIPE_ACCOUNT", "FROMENV")
    s = load_settings()
    assert s.account == "FROMENV"
    assert s.retry_attempts == 7


def test_a_profile_name_is_looked_up_in_the_packaged_profiles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import worker

    # Package data next to the code (worker/profiles/), so an installed wheel finds it too.
    assert PROFILE_DIR.resolve() == Path(worker.__file__).resolve().parent / "profiles"
    assert profile_names() == ["local"]
    monkeypatch.setenv("SNOWPIPE_CONFIG", "local")
    assert profile_path() == PROFILE_DIR / "local.toml"
    monkeypatch.setenv("SNOWPIPE_CONFIG", "nosuch")
    with pytest.raises(
        SettingsError,
        match=r"SNOWPIPE_CONFIG: profile 'nosuch' not found .*use one of: local, or a path",
    ):
        profile_path()


def test_the_local_profile_targets_the_emulator_on_loopback(
    monkeypatch: pytest.MonkeyPatch, key_file: Path
) -> None:
    monkeypatch.setenv("SNOWPIPE_CONFIG", "local")
    monkeypatch.setenv("SNOWPIPE_PRIVATE_KEY_PATH", str(key_file))
    s = load_settings()
    assert s.account_url.startswith("http://127.0.0.1:")
    assert s.broker_url.startswith("redis://127.0.0.1:")


def test_secrets_never_show_in_repr_or_errors(key_file: Path) -> None:
    secret = "correct-horse-battery-staple"
    s = minimal(key_file, private_key_passphrase=secret)
    assert secret not in repr(s) and secret not in str(s)
    assert s.passphrase() == secret.encode()
    with pytest.raises(SettingsError) as info:
        load_settings(account="a", user="u", private_key=secret, retry_attempts=-1)
    assert secret not in problems(info)


def test_celery_start_with_bad_settings_prints_the_fix_without_a_traceback(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import worker; worker.app"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "SNOWPIPE_ACCOUNT: is required" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_url_in_a_settings_error_shows_no_password(key_file: Path) -> None:
    with pytest.raises(SettingsError) as info:
        minimal(key_file, state_url="http://loader:topsecret@host/0")
    assert "topsecret" not in problems(info)
    assert "http://loader:***@host/0" in problems(info)
    with pytest.raises(SettingsError) as info:
        minimal(key_file, account_url="ftp://u:topsecret@host")
    assert "topsecret" not in problems(info)


def test_a_broker_password_in_the_query_string_is_refused_with_the_form_kombu_reads(
    key_file: Path,
) -> None:
    # kombu's URL parser fails with a TypeError on ?password=: name the fix instead.
    with pytest.raises(SettingsError) as info:
        minimal(key_file, broker_url="redis://127.0.0.1:6379/0?password=topsecret")
    assert "redis://:PASSWORD@HOST:PORT/DB" in problems(info)
    assert "topsecret" not in problems(info)


def test_a_misspelt_variable_is_named_with_the_closest_setting() -> None:
    env = {"SNOWPIPE_BROKR_URL": "redis://x", "SNOWPIPE_CONFIG": "local", "SNOWPIPE_ZZZ": "1",
           "SNOWPIPE_QUEUE_NAME": "q", "HOME": "/root"}  # fmt: skip
    from worker.settings import unknown_variables

    assert unknown_variables(env) == [
        "SNOWPIPE_BROKR_URL is not a setting and is ignored (did you mean SNOWPIPE_BROKER_URL?)",
        "SNOWPIPE_ZZZ is not a setting and is ignored (see docs/configuration.md)",
    ]


def test_the_metrics_endpoint_listens_on_loopback_unless_opened(key_file: Path) -> None:
    assert minimal(key_file).metrics_host == "127.0.0.1"
    assert minimal(key_file, metrics_host="0.0.0.0").metrics_host == "0.0.0.0"
    with pytest.raises(SettingsError, match=r"SNOWPIPE_METRICS_HOST: 'metrics\.example' is not an"):
        minimal(key_file, metrics_host="metrics.example")


def test_the_heartbeat_file_must_be_in_a_writable_directory(
    key_file: Path, tmp_path: Path
) -> None:
    assert minimal(key_file, heartbeat_file=tmp_path / "hb").heartbeat_file == tmp_path / "hb"
    with pytest.raises(SettingsError, match=r"SNOWPIPE_HEARTBEAT_FILE: .* is not a writable dir"):
        minimal(key_file, heartbeat_file=tmp_path / "missing" / "hb")
