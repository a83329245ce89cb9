"""`snowpipe-worker doctor`: every ✓ against the emulator and a private Redis, and each ✗ line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.celery import ACCOUNT, USER, unique_queue
from tests.support.emulator import REPO_ROOT, RunningEmulator
from tests.support.keys import key_pair
from tests.support.redis import PrivateRedis, free_port, private_redis

PIPE = "DOC-STREAMING"  # a <TABLE>-STREAMING pipe exists in the emulator without registration
PASSPHRASE = "correct horse battery"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path_factory.mktemp("redis")) as redis_server:
        yield redis_server


@pytest.fixture
def env(shared_emulator: RunningEmulator, server: PrivateRedis, tmp_path: Path) -> dict[str, str]:
    pair = key_pair("doctor")
    shared_emulator.register_key(ACCOUNT, USER, pair.public_pem)
    key_path = pair.write_private(tmp_path / "key.pem", passphrase=PASSPHRASE.encode())
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "SNOWPIPE_ACCOUNT": ACCOUNT,
        "SNOWPIPE_USER": USER,
        "SNOWPIPE_PRIVATE_KEY_PATH": str(key_path),
        "SNOWPIPE_PRIVATE_KEY_PASSPHRASE": PASSPHRASE,
        "SNOWPIPE_ACCOUNT_URL": shared_emulator.url,
        "SNOWPIPE_BROKER_URL": server.url(1),
        "SNOWPIPE_STATE_URL": server.url(2),
        "SNOWPIPE_QUEUE_NAME": unique_queue("doctor"),
    }


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", "doctor", *args],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60, check=False,
    )  # fmt: skip


def line(output: str, name: str) -> str:
    """The line of check `name` (with its fix line, if any)."""
    lines = output.splitlines()
    for i, text in enumerate(lines):
        if text[2:].startswith(f"{name}:"):
            fix = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("    fix:") else ""
            return f"{text}\n{fix}".strip()
    raise AssertionError(f"no {name!r} line in:\n{output}")


def test_every_check_passes_on_a_good_configuration(
    env: dict[str, str], shared_emulator: RunningEmulator
) -> None:
    fingerprint = shared_emulator.register_key(ACCOUNT, USER, key_pair("doctor").public_pem)
    shared_emulator.add_pipe("DB", "PUBLIC", PIPE, error_logging=True)
    result = doctor(env, "--pipe", f"DB.PUBLIC.{PIPE}")
    assert result.returncode == 0, result.stdout + result.stderr
    names = ["settings", "private key", "key fingerprint", "account host", "account URL",
             "token exchange", f"pipe DB.PUBLIC.{PIPE}", "SQL API",
             f"error table of DB.PUBLIC.{PIPE}", "broker", "state store",
             "state persistence", "state replication"]  # fmt: skip
    for name in names:
        assert line(result.stdout, name).startswith("✓"), result.stdout
    assert fingerprint in line(result.stdout, "key fingerprint")
    assert "RSA_PUBLIC_KEY_FP" in line(result.stdout, "key fingerprint")
    assert "passphrase" in line(result.stdout, "private key").lower()
    assert PASSPHRASE not in result.stdout + result.stderr
    assert "13 passed, 0 failed\n" in result.stdout


def test_a_key_snowflake_rejects_a_stopped_broker_and_no_persistence_are_each_a_cross(
    env: dict[str, str], server: PrivateRedis, tmp_path: Path
) -> None:
    env["SNOWPIPE_PRIVATE_KEY_PATH"] = str(key_pair("unregistered").write_private(tmp_path / "k"))
    del env["SNOWPIPE_PRIVATE_KEY_PASSPHRASE"]
    env["SNOWPIPE_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    client = server.client()
    client.config_set("appendonly", "no")
    try:
        result = doctor(env)
    finally:
        client.config_set("appendonly", "yes")
        client.close()
    out = result.stdout
    assert result.returncode == 1, out
    token = line(out, "token exchange")
    assert token.startswith("✗") and "fix:" in token and "RSA_PUBLIC_KEY_FP" in token, out
    broker = line(out, "broker")
    assert broker.startswith("✗") and "SNOWPIPE_BROKER_URL" in broker and "fix:" in broker, out
    persistence = line(out, "state persistence")
    assert persistence.startswith("✗") and "appendonly yes" in persistence, out
    assert line(out, "state store").startswith("✓")


def test_a_wrong_passphrase_and_a_stopped_state_store(env: dict[str, str]) -> None:
    env["SNOWPIPE_PRIVATE_KEY_PASSPHRASE"] = "not it"
    env["SNOWPIPE_STATE_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    result = doctor(env)
    out = result.stdout
    assert result.returncode == 1, out
    key = line(out, "private key")
    assert key.startswith("✗") and "passphrase is wrong" in key, out
    assert "SNOWPIPE_PRIVATE_KEY_PASSPHRASE" in key
    state = line(out, "state store")
    assert state.startswith("✗") and "SNOWPIPE_STATE_URL" in state and "fix:" in state, out
    assert "not it" not in out + result.stderr
    assert "Traceback" not in out + result.stderr


def test_an_unknown_pipe_from_the_pipes_setting(env: dict[str, str]) -> None:
    env["SNOWPIPE_PIPES"] = f"DB.PUBLIC.{PIPE}, DB.PUBLIC.NO_SUCH_PIPE"
    result = doctor(env)
    out = result.stdout
    assert result.returncode == 1, out
    assert line(out, f"pipe DB.PUBLIC.{PIPE}").startswith("✓")
    unknown = line(out, "pipe DB.PUBLIC.NO_SUCH_PIPE")
    assert unknown.startswith("✗") and "not found" in unknown and "fix:" in unknown, out


def test_a_table_without_error_logging_is_a_warning_that_says_how_to_turn_it_on(
    env: dict[str, str],
) -> None:
    result = doctor(env, "--pipe", "DB.PUBLIC.PLAIN-STREAMING")
    out = result.stdout
    assert result.returncode == 0, out  # a warning: the pipe works, rejected rows coarsely
    warning = line(out, "error table of DB.PUBLIC.PLAIN-STREAMING")
    assert warning.startswith("! "), out
    assert "attributed to whole batches" in warning
    assert "fix: turn error logging on: ALTER TABLE DB.PUBLIC.PLAIN SET ERROR_LOGGING = TRUE" in (
        warning
    )
    assert "(1 with a warning)" in out
    off = doctor({**env, "SNOWPIPE_ERROR_TABLE": "off"}, "--pipe", "DB.PUBLIC.PLAIN-STREAMING")
    assert "error table" not in off.stdout
    assert "SQL API" not in off.stdout


def test_invalid_settings_are_one_cross_with_the_fix(env: dict[str, str]) -> None:
    del env["SNOWPIPE_ACCOUNT"]
    result = doctor(env)
    assert result.returncode == 1
    settings = line(result.stdout, "settings")
    assert settings.startswith("✗") and "SNOWPIPE_ACCOUNT" in settings
