"""Command-line options: rate limit, --db persistence, --strict, TLS, --public-key, --pipe."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.contract.refclient import RefClient
from tests.support.emulator import REPO_ROOT, start_emulator
from tests.support.keys import key_pair

ACCOUNT, USER = "OPTACCT", "LOADER"
DB, SCHEMA, PIPE = "DB", "PUBLIC", "OPT-STREAMING"


def test_rate_limit_answers_429_with_retry_after() -> None:
    with start_emulator("--rate-limit", "2") as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        token = c.open(DB, SCHEMA, PIPE, "rl")["next_continuation_token"]
        statuses = []
        for _ in range(4):
            response = c.append(DB, SCHEMA, PIPE, "rl", [{"a": 1}], continuation_token=token)
            statuses.append(response.status_code)
            if response.status_code == 200:
                token = response.json()["next_continuation_token"]
            else:
                limited = response
        assert statuses[:2] == [200, 200]
        assert 429 in statuses
        assert limited.json() == {
            "code": "390701", "error_code": "390701",
            "message": "Request rate exceeds max. Try later.",
        }
        assert int(limited.headers["retry-after"]) >= 1
        c.close()


def test_rate_limit_zero_turns_it_off() -> None:
    with start_emulator("--rate-limit", "0") as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        token = c.open(DB, SCHEMA, PIPE, "free")["next_continuation_token"]
        for _ in range(30):
            response = c.append(DB, SCHEMA, PIPE, "free", [{"a": 1}], continuation_token=token)
            assert response.status_code == 200
            token = response.json()["next_continuation_token"]
        c.close()


def test_committed_rows_and_offsets_survive_a_restart_with_db(tmp_path: Path) -> None:
    db = tmp_path / "emu.sqlite"
    args = ("--db", str(db), "--commit-delay", "0.1")
    with start_emulator(*args) as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        token = c.open(DB, SCHEMA, PIPE, "keep")["next_continuation_token"]
        c.append(DB, SCHEMA, PIPE, "keep", [{"n": 1}, {"n": 2}], continuation_token=token,
                 start="1", end="2")
        c.wait_committed(DB, SCHEMA, PIPE, "keep", "2")
        c.close()
    with start_emulator(*args) as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        assert [r["row"] for r in emu.rows(DB, SCHEMA, PIPE)] == [{"n": 1}, {"n": 2}]
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        status = c.status(DB, SCHEMA, PIPE, ["keep"]).json()["channel_statuses"]["keep"]
        assert status["last_committed_offset_token"] == "2"
        # A continuation token from before the restart is stale: reopen and resume.
        stale = c.append(DB, SCHEMA, PIPE, "keep", [{"n": 3}], continuation_token=token)
        assert stale.status_code == 400
        reopened = c.open(DB, SCHEMA, PIPE, "keep")
        assert reopened["channel_status"]["last_committed_offset_token"] == "2"
        c.close()


def test_scoped_tokens_do_not_survive_a_restart(tmp_path: Path) -> None:
    args = ("--db", str(tmp_path / "emu.sqlite"))
    with start_emulator(*args) as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        old = c.scoped_token
        c.close()
    with start_emulator(*args) as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        c.scoped_token = old
        assert c.open_channel(DB, SCHEMA, PIPE, "x").status_code == 401
        c.close()


def test_a_missing_accept_header_is_refused_by_default_as_by_the_service() -> None:
    with start_emulator() as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key)
        # httpx always sends Accept: */* unless the header is removed explicitly.
        request = c.http.build_request(
            "GET", f"{emu.url}/v2/streaming/hostname",
            headers={"Authorization": f"Bearer {c.jwt()}"},
        )
        del request.headers["accept"]
        response = c.http.send(request)
        assert response.status_code in (400, 406)
        assert response.json()["code"] == "391902"
        assert c.get_hostname().status_code == 200
        c.close()


def test_tls_serves_https_with_the_written_ca(tmp_path: Path) -> None:
    with start_emulator(tls=True, workdir=tmp_path) as emu:
        assert emu.url.startswith("https://127.0.0.1:")
        assert emu.ca_file is not None and emu.ca_file.read_bytes().startswith(b"-----BEGIN")
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key,
                      verify=ssl.create_default_context(cafile=emu.ca_file))
        c.connect()
        assert c.ingest_url is not None and c.ingest_url.startswith("https://127.0.0.1:")
        assert c.open(DB, SCHEMA, PIPE, "tls")["channel_status"]["channel_status_code"] == "SUCCESS"
        c.close()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{emu.url}/_emulator/stats", verify=True)


def test_public_key_and_pipe_options_register_at_start(tmp_path: Path) -> None:
    pem = tmp_path / "loader.pub"
    pem.write_bytes(key_pair().public_pem)
    with start_emulator(
        "--public-key", f"{ACCOUNT}.{USER}={pem}", "--pipe", "DB.PUBLIC.CUSTOM_PIPE"
    ) as emu:
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        assert c.open_channel(DB, SCHEMA, "custom_pipe", "c").status_code == 200
        assert c.open_channel(DB, SCHEMA, "OTHER_PIPE", "c").status_code == 404
        c.close()


def test_accept_any_pipe_creates_pipes_on_first_use() -> None:
    with start_emulator("--accept-any-pipe") as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        assert c.open_channel(DB, SCHEMA, "ANYTHING", "c").status_code == 200
        c.close()


def test_bad_option_fails_with_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "emulator", "--public-key", "no-equals-sign"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert "ACCOUNT.USER=PEMFILE" in result.stderr
    assert result.stdout == ""


def test_stdout_carries_exactly_the_one_start_line() -> None:
    with start_emulator("--log-level", "info") as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        c.open_channel(DB, SCHEMA, "NO_SUCH_PIPE", "c")  # a refusal, logged at info
        c.close()
        emu.admin.close()
        emu.process.terminate()
        emu.process.wait(10)
        assert emu.process.stdout is not None
        assert emu.process.stdout.read() == ""
        assert "unknown pipe" in emu.stderr()


def test_forwarded_headers_are_ignored_even_when_uvicorn_is_told_to_trust_them() -> None:
    # With FORWARDED_ALLOW_IPS=* uvicorn would take the client's address from X-Forwarded-For:
    # a request claiming 127.0.0.1 would pass the admin API's loopback check from anywhere, and
    # one from loopback claiming another address is refused. The emulator uses the socket's.
    with start_emulator(env={"FORWARDED_ALLOW_IPS": "*"}) as emu:
        response = emu.admin.get(
            "/_emulator/pipes",
            headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
        )
        assert response.status_code == 200, response.text
