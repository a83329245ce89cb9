"""What the commands print, as an operator reads it: doctor's lines say what is true (the key's
encryption, where the settings came from, which URL to check, a misspelt variable) and print
no log line; `stats` is plain or JSON when piped; `--help` keeps "[local]"; the terminal view of
`status` never folds a number."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
from rich.console import Console
from typer.testing import CliRunner

from tests.support.celery import ACCOUNT, USER
from tests.support.emulator import REPO_ROOT, RunningEmulator
from tests.support.keys import key_pair
from tests.support.redis import RedisDB, free_port
from worker import cli
from worker.settings import load_settings
from worker.tokenstore import identity


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", *args],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60, check=False,
    )  # fmt: skip


def base_env(db: RedisDB, key: Path, account_url: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "SNOWPIPE_ACCOUNT": ACCOUNT,
            "SNOWPIPE_USER": USER, "SNOWPIPE_PRIVATE_KEY_PATH": str(key),
            "SNOWPIPE_ACCOUNT_URL": account_url, "SNOWPIPE_BROKER_URL": db.url}  # fmt: skip


def test_doctor_says_what_is_true_and_prints_each_hint_once(
    shared_emulator: RunningEmulator, db: RedisDB, tmp_path: Path
) -> None:
    pair = key_pair("unregistered-doctor")  # never registered: the token exchange fails
    env = base_env(db, pair.write_private(tmp_path / "key.pem"), shared_emulator.url)
    env["SNOWPIPE_PRIVATE_KEY_PASSPHRASE"] = "set but not needed"  # the key is not encrypted
    env["SNOWPIPE_BROKR_URL"] = "redis://127.0.0.1:1/0"
    result = run(env, "doctor")
    assert result.returncode == 1
    out = result.stdout
    assert "(not encrypted: SNOWPIPE_PRIVATE_KEY_PASSPHRASE is set but not needed)" in out
    assert "decrypted with" not in out
    assert "! environment: SNOWPIPE_BROKR_URL is not a setting: it is ignored" in out
    assert "fix: rename or remove it (did you mean SNOWPIPE_BROKER_URL?)" in out
    assert "(1 with a warning)" in out.splitlines()[-1]
    hint = "must be registered for user"
    assert out.count(hint) == 1 and hint not in result.stderr  # no log line repeats it
    assert "[emulator:" in out  # the emulator's note in brackets is printed, not eaten
    assert result.stderr == ""


def test_doctor_names_the_profile_and_the_url_that_was_set(db: RedisDB, tmp_path: Path) -> None:
    key = key_pair("profile-doctor").write_private(tmp_path / "key.pem")
    profile = tmp_path / "site.toml"
    profile.write_text(f'account_url = "http://127.0.0.1:{free_port()}"\n')  # nothing listens
    env = base_env(db, key, "")
    del env["SNOWPIPE_ACCOUNT_URL"]
    env["SNOWPIPE_CONFIG"] = str(profile)
    out = run(env, "doctor").stdout
    assert f"✓ settings: loaded from profile {profile} and the environment" in out
    assert "fix: check SNOWPIPE_ACCOUNT_URL (http://127.0.0.1:" in out
    assert "check SNOWPIPE_ACCOUNT (" not in out


def test_stats_is_tab_separated_or_json_when_piped(db: RedisDB) -> None:
    db.client.hset("snowpipe:stats", mapping={"logged": 3, "rows_committed": 30})
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "SNOWPIPE_BROKER_URL": db.url,
           "SNOWPIPE_QUEUE_NAM": "typo"}  # fmt: skip
    plain = run(env, "stats")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == ["logged\t3", "rows_committed\t30", "dead letters\t0"]
    assert plain.stderr.splitlines() == [
        "warning: SNOWPIPE_QUEUE_NAM is not a setting and is ignored (did you mean "
        "SNOWPIPE_QUEUE_NAME?)"
    ]
    doc = orjson.loads(run(env, "stats", "--json").stdout)
    assert doc == {"counters": {"logged": 3, "rows_committed": 30}, "token_refreshes": {},
                   "dead_letters": 0, "broker_dead_letters": None}  # fmt: skip


def test_help_keeps_the_extra_in_brackets() -> None:
    for command in ("up", "run"):
        result = CliRunner().invoke(cli.app, [command, "--help"], terminal_width=200)
        assert "Needs the [local] extra." in result.output


def test_a_terminal_table_keeps_16_digit_offsets_on_one_line() -> None:
    header = ["pipe", "channel", "committed", "last issued", "log entries"]
    rows = [["DB.PUBLIC.A-VERY-LONG-PIPE-NAME-STREAMING", "snowpipe_0", "1234567890123456",
             "1234567890123499", "12"]]  # fmt: skip
    table = cli._table("channels", header, rows, width=100)
    assert table is not None
    console = Console(width=100, record=True, force_terminal=True)
    console.print(table)
    text = console.export_text()
    assert "1234567890123456" in text and "1234567890123499" in text  # whole, on one line
    # Too narrow for whole numbers: no table (status prints the plain rows instead).
    assert cli._table("channels", header, rows, width=40) is None


def test_the_token_identity_has_no_trailing_dot_without_a_role(tmp_path: Path) -> None:
    key = key_pair().write_private(tmp_path / "key.pem")
    plain = load_settings(account="localdev", user="loader", private_key_path=key)
    assert identity(plain) == "LOCALDEV.LOADER"
    with_role = load_settings(account="a", user="u", role="r", private_key_path=key)
    assert identity(with_role) == "A.U.R"
