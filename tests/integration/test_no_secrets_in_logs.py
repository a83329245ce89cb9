"""Every log line of real client runs, raw and rendered, is free of tokens, keys and passphrases.

The runs cover the paths that talk about credentials: the first token fetch, proactive and forced
refreshes (401), retries, a wrong key, a rejected scoped token. Logging is at DEBUG everywhere,
httpx and httpcore included. Two views are checked:

- raw: every `LogRecord` as emitted, before any redaction (structlog events arrive as dicts), so
  the code itself never tries to log a secret;
- rendered: what the configured handler writes after the redaction processor.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.support.emulator import RunningEmulator, start_emulator
from tests.support.keys import key_pair
from worker.auth.guard import Token
from worker.auth.keypair import KeyPairJWT
from worker.observability import configure_logging
from worker.retry import RetryBudget, RetryPolicy
from worker.settings import Settings
from worker.snowpipe import errors as e
from worker.snowpipe.client import SnowpipeClient
from worker.snowpipe.encoding import encode_rows

PASSPHRASE = "correct horse battery staple 42"
DB, SCHEMA, PIPE = "DB", "PUBLIC", "LOGS-STREAMING"


class RecordingMinter(KeyPairJWT):
    """A KeyPairJWT that remembers every JWT it signs (the secrets to look for)."""

    __slots__ = ("seen",)

    def mint(self, now: float | None = None) -> str:
        value = super().mint(now)
        self.seen.append(value)
        return value

    def token(self) -> Token:
        token = super().token()
        self.seen.append(token.value)
        return token


class RawRecords(logging.Handler):
    """Keeps each record's message as emitted (structlog event dicts included), unredacted."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()} {record.exc_text or ''}")


@pytest.fixture
def captured() -> Iterator[tuple[RawRecords, io.StringIO]]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved_level = root.level
    saved_handlers = list(root.handlers)
    configure_logging("DEBUG", json=True, stream=stream)
    raw = RawRecords()
    root.addHandler(raw)
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield raw, stream
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.NOTSET)
        structlog.reset_defaults()


def make_client(
    emu: RunningEmulator, settings: Settings, scoped_seen: list[str], minter: RecordingMinter
) -> SnowpipeClient:
    return SnowpipeClient(
        settings,
        minter=minter,
        policy=RetryPolicy.from_settings(settings, budget=RetryBudget(100)),
        publish=lambda token: scoped_seen.append(token.value),
    )


def recording_minter(settings: Settings) -> RecordingMinter:
    base = KeyPairJWT.from_settings(settings)
    minter = RecordingMinter(
        base._key,
        account=settings.account,
        user=settings.user,
        role=settings.role,
        lifetime_seconds=settings.jwt_lifetime_seconds,
    )
    minter.seen = []
    return minter


def run_client_session(
    emu: RunningEmulator, key_file: Path, errors: list[str]
) -> tuple[list[str], list[str]]:
    """Drive the client through every credential path; the JWTs and scoped tokens it used."""
    settings = Settings(
        account="acme",
        user="loader",
        role="LOADER_ROLE",
        private_key_path=key_file,
        private_key_passphrase=PASSPHRASE,
        account_url=emu.url,
        # A 5 s scoped token: proactive refreshes happen during the session too.
        retry_deadline_seconds=10.0,
    )
    scoped: list[str] = []
    minter = recording_minter(settings)
    with make_client(emu, settings, scoped, minter) as client:
        opened = client.open_channel(DB, SCHEMA, PIPE, "secret-ch")
        ct = opened.continuation_token
        for n in range(3):
            [payload] = encode_rows([{"n": n}])
            ct = client.append_rows(
                DB,
                SCHEMA,
                PIPE,
                "secret-ch",
                continuation_token=ct,
                payload=payload,
                start_offset_token=str(n),
                end_offset_token=str(n),
            )
        emu.expire_tokens()  # forced refresh after a 401
        emu.fault(
            endpoint="append", status=503, body="ERR_GENERAL_EXCEPTION_RETRY_REQUEST", count=1
        )
        [payload] = encode_rows([{"n": 3}])
        ct = client.append_rows(
            DB,
            SCHEMA,
            PIPE,
            "secret-ch",
            continuation_token=ct,
            payload=payload,
            start_offset_token="3",
            end_offset_token="3",
        )
        time.sleep(1.1)  # a new second: the beat refresh's token then expires later
        client.tokens.refresh("beat")
        client.bulk_channel_status(DB, SCHEMA, PIPE, ["secret-ch"])
        emu.fault(endpoint="status", status=401, body={"code": "390144", "message": "nope"})
        try:
            client.bulk_channel_status(DB, SCHEMA, PIPE, ["secret-ch"])
        except e.AuthError as exc:
            errors.extend([str(exc), repr(exc)])
            logging.getLogger("test").exception("auth failed as expected")
        emu.clear_faults()

    # A key the emulator does not know: the refusal path logs too.
    wrong_settings = Settings(
        account="acme",
        user="loader",
        private_key=key_pair("unregistered").private_pem.decode(),
        account_url=emu.url,
    )
    wrong_minter = recording_minter(wrong_settings)
    with make_client(emu, wrong_settings, scoped, wrong_minter) as wrong:
        try:
            wrong.open_channel(DB, SCHEMA, PIPE, "secret-ch-2")
        except e.InvalidJWTError as exc:
            errors.extend([str(exc), repr(exc)])
            structlog.get_logger("test").error("open.failed", error=str(exc), exc_info=True)
    return minter.seen + wrong_minter.seen, scoped


def secret_fragments(jwts: list[str], scoped: list[str], pem: bytes) -> dict[str, str]:
    """Every secret (and its most distinctive part) with a label for failure messages."""
    found: dict[str, str] = {PASSPHRASE: "passphrase"}
    for kind, values in (("jwt", jwts), ("scoped", scoped)):
        for value in values:
            found[value] = kind
            found[value.rsplit(".", 1)[-1]] = f"{kind} signature"
    body = [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]
    for line in body:
        found[line] = "private key PEM line"
    return found


def test_client_runs_log_no_token_key_or_passphrase(
    captured: tuple[RawRecords, io.StringIO], tmp_path: Path
) -> None:
    raw, stream = captured
    pair = key_pair()
    key_file = pair.write_private(tmp_path / "key.p8", passphrase=PASSPHRASE.encode())
    encrypted_pem = key_file.read_bytes()
    errors: list[str] = []
    with start_emulator(
        "--scoped-token-ttl", "5", "--commit-delay", "0.1", workdir=tmp_path / "emu"
    ) as emu:
        emu.register_key("ACME", "LOADER", pair.public_pem)
        jwts, scoped = run_client_session(emu, key_file, errors)

    rendered = stream.getvalue()
    raw_text = "\n".join(raw.lines)
    # The session did what it is meant to cover.
    assert len(jwts) >= 2 and len(scoped) >= 2
    for event in ("token.refresh.success", "retry.scheduled", "token.refresh.failure"):
        assert event in rendered, event
    assert "HTTP Request:" in raw_text  # httpx's own DEBUG/INFO lines were captured
    assert len(errors) == 4

    secrets: dict[str, Any] = secret_fragments(jwts, scoped, pair.private_pem)
    secrets.update(secret_fragments([], [], encrypted_pem))
    # Report labels only: a failure message must not print the secret it found.
    leaks = []
    for secret, label in secrets.items():
        if secret in raw_text:
            leaks.append(f"{label} in a raw log record")
        if secret in rendered:
            leaks.append(f"{label} in rendered log output")
        if any(secret in text for text in errors):
            leaks.append(f"{label} in an error message")
    assert leaks == []
