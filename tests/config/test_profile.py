"""config/production.toml: a valid profile as shipped, with the secrets from the environment."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.support.emulator import REPO_ROOT
from tests.support.keys import key_pair
from worker.settings import load_settings

PROFILE = REPO_ROOT / "config" / "production.toml"


def test_the_production_profile_loads_with_the_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SNOWPIPE_CONFIG", str(PROFILE))
    monkeypatch.setenv(
        "SNOWPIPE_PRIVATE_KEY_PATH", str(key_pair("profile").write_private(tmp_path / "k.pem"))
    )
    s = load_settings()  # an unknown or invalid key would raise SettingsError
    assert s.account == "myorg-myaccount"  # from the file
    assert s.account_url == "https://myorg-myaccount.snowflakecomputing.com"
    assert s.broker_url == "redis://redis:6379/0"
    assert s.visibility_timeout_seconds == 300


def test_the_production_profile_holds_no_secret() -> None:
    keys = set(tomllib.loads(PROFILE.read_text()))
    assert not keys & {"private_key", "private_key_path", "private_key_passphrase"}
