"""Redacting log pipeline and token metrics: no token, key or passphrase in rendered output."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from prometheus_client import REGISTRY

from tests.support.keys import key_pair
from worker import observability
from worker.auth.keypair import KeyPairError, KeyPairJWT, load_private_key
from worker.observability import (
    MAX_TRANSIENT_SECRETS,
    REDACTED,
    configure_logging,
    get_logger,
    is_secret_key,
    record_token_refresh,
    redact_text,
    register_secret,
    set_guard_health,
)


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """Logging configured to render JSON into a buffer; restored afterwards."""
    buffer = io.StringIO()
    root = logging.getLogger()
    level = root.level
    configure_logging("DEBUG", json=True, stream=buffer)
    try:
        yield buffer
    finally:
        for handler in [h for h in root.handlers if h.get_name() == "snowpipe-worker"]:
            root.removeHandler(handler)
        root.setLevel(level)
        structlog.reset_defaults()


def _lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def _jwt() -> str:
    return KeyPairJWT(key_pair().private_key, account="a", user="u").mint()


def test_values_under_secret_keys_are_masked(output: io.StringIO) -> None:
    get_logger("t").info(
        "request.sent",
        token="opaque-scoped-token-value",
        headers={"Authorization": "Bearer opaque-bearer", "Accept": "application/json"},
        private_key="whatever",
        passphrase="hunter2-pass",
        client_secret="s3cr3t-value",
        offset_token="42",
        continuation_token="cont-1",
    )
    [line] = _lines(output)
    rendered = output.getvalue()
    for secret in ("opaque-scoped-token-value", "opaque-bearer", "hunter2-pass", "s3cr3t-value"):
        assert secret not in rendered
    assert line["token"] == REDACTED
    assert line["headers"] == {"Authorization": REDACTED, "Accept": "application/json"}
    # Snowflake's offset and continuation tokens are not credentials: they stay readable.
    assert line["offset_token"] == "42"
    assert line["continuation_token"] == "cont-1"


def test_jwt_anywhere_in_a_string_is_masked(output: io.StringIO) -> None:
    token = _jwt()
    get_logger("t").warning("auth.failed", detail=f"server said no to Bearer {token} (401)")
    logging.getLogger("httpx").warning("foreign line with %s inside", token)
    rendered = output.getvalue()
    assert token not in rendered
    assert token.split(".")[2] not in rendered  # not even the signature
    lines = _lines(output)
    assert lines[0]["detail"] == f"server said no to Bearer {REDACTED} (401)"
    assert lines[1]["event"] == f"foreign line with {REDACTED} inside"


def test_pem_block_and_registered_passphrase_are_masked(output: io.StringIO) -> None:
    pem = key_pair().private_pem.decode().strip()
    passphrase = "my-very-own-passphrase"
    register_secret(passphrase)
    log = get_logger("t")
    log.error("config.dump", raw=f"key:\n{pem}\npass={passphrase}")
    log.info(f"positional {passphrase}")
    rendered = output.getvalue()
    assert "PRIVATE KEY" not in rendered
    assert pem.splitlines()[1] not in rendered
    assert passphrase not in rendered
    assert _lines(output)[0]["raw"] == f"key:\n{REDACTED}\npass={REDACTED}"


def test_secrets_in_exception_tracebacks_are_masked(output: io.StringIO) -> None:
    token = _jwt()
    try:
        raise RuntimeError(f"token endpoint returned {token}")
    except RuntimeError:
        get_logger("t").exception("fetch.crashed")
    rendered = output.getvalue()
    assert "RuntimeError" in rendered
    assert token not in rendered


def test_key_loading_registers_the_passphrase(output: io.StringIO, tmp_path: Path) -> None:
    passphrase = b"loaded-passphrase-123"
    pem = key_pair().write_private(tmp_path / "k.p8", passphrase=passphrase).read_bytes()
    load_private_key(pem, passphrase)
    with pytest.raises(KeyPairError):
        load_private_key(pem, b"other-wrong-passphrase")
    logging.getLogger("x").error("oops %s / %s", passphrase.decode(), "other-wrong-passphrase")
    rendered = output.getvalue()
    assert "loaded-passphrase-123" not in rendered
    assert "other-wrong-passphrase" not in rendered  # even a wrong passphrase is a secret


def test_console_renderer_is_redacted_too() -> None:
    buffer = io.StringIO()
    configure_logging("INFO", json=False, stream=buffer)
    try:
        get_logger("t").info("x", authorization="Bearer abcdefgh", note=_jwt())
    finally:
        for handler in [
            h for h in logging.getLogger().handlers if h.get_name() == "snowpipe-worker"
        ]:
            logging.getLogger().removeHandler(handler)
        structlog.reset_defaults()
    rendered = buffer.getvalue()
    assert "abcdefgh" not in rendered and "eyJ" not in rendered
    assert REDACTED in rendered


def test_configure_twice_keeps_one_handler() -> None:
    root = logging.getLogger()
    configure_logging("INFO", stream=io.StringIO())
    configure_logging("INFO", stream=io.StringIO())
    try:
        assert len([h for h in root.handlers if h.get_name() == "snowpipe-worker"]) == 1
    finally:
        for handler in [h for h in root.handlers if h.get_name() == "snowpipe-worker"]:
            root.removeHandler(handler)
        structlog.reset_defaults()


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("LOUD")


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("token", True),
        ("scoped_token", True),
        ("access_token", True),
        ("Authorization", True),
        ("assertion", True),
        ("private_key", True),
        ("private_key_pem", True),
        ("passphrase", True),
        ("password", True),
        ("client_secret", True),
        ("jwt", True),
        ("offset_token", False),
        ("start_offset_token", False),
        ("last_committed_offset_token", False),
        ("continuation_token", False),
        ("X-Snowflake-Authorization-Token-Type", False),
        ("lifetime", False),
        ("name", False),
    ],
)
def test_secret_key_names(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_short_values_are_not_registered() -> None:
    register_secret("abc")
    assert redact_text("abc abc") == "abc abc"


def test_transient_secrets_are_bounded() -> None:
    first = "transient-secret-number-0000"
    register_secret(first, transient=True)
    assert redact_text(first) == REDACTED
    for i in range(1, MAX_TRANSIENT_SECRETS + 1):
        register_secret(f"transient-secret-number-{i:04d}", transient=True)
    assert redact_text(first) == first  # rotated out: the process cannot grow without bound
    assert len(observability._secrets.transient) == MAX_TRANSIENT_SECRETS


def test_refresh_counter_and_health_gauge() -> None:
    labels = {"name": "metrics-test", "reason": "soft", "outcome": "success"}
    before = REGISTRY.get_sample_value("snowpipe_token_refreshes_total", labels) or 0.0
    record_token_refresh("metrics-test", "soft", "success")
    assert REGISTRY.get_sample_value("snowpipe_token_refreshes_total", labels) == before + 1
    set_guard_health("metrics-test", False)
    sample = REGISTRY.get_sample_value("snowpipe_token_guard_healthy", {"name": "metrics-test"})
    assert sample == 0.0
