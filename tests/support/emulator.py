"""Start the Snowpipe Streaming emulator as a subprocess and drive its admin API.

    with start_emulator("--commit-delay", "0.2") as emu:
        emu.register_key("MYACCT", "LOADER", key_pair().public_pem)
        ... point a client at emu.url ...
        assert emu.rows("DB", "SCHEMA", "T-STREAMING")

The emulator runs as `python -m emulator --port 0 ...` (a real server on loopback, nothing shared
with the test process); `start_emulator` waits for its `listening on` line.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
# The tests' --commit-delay: short enough that a test waiting for a commit stays fast, long
# enough to observe "pending".
TEST_COMMIT_DELAY = "0.2"


class EmulatorStartError(RuntimeError):
    """The emulator exited or stayed silent instead of printing its `listening on` line."""


class RunningEmulator:
    """A started emulator: its URL, an admin client and helpers for the admin API."""

    def __init__(
        self,
        process: subprocess.Popen[str],
        url: str,
        *,
        ca_file: Path | None,
        stderr_path: Path,
        workdir: Path,
    ) -> None:
        self.process = process
        self.url = url  # e.g. http://127.0.0.1:41234 (https:// with tls=True)
        self.host = url.split("://", 1)[1].rsplit(":", 1)[0]
        self.port = int(url.rsplit(":", 1)[1])
        self.ca_file = ca_file
        self.stderr_path = stderr_path
        self.workdir = workdir
        verify: Any = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self.admin = httpx.Client(base_url=url, verify=verify, timeout=10.0)

    # -- admin API -----------------------------------------------------------------------------

    def _ok(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise AssertionError(
                f"admin {response.request.method} {response.request.url.path} -> "
                f"{response.status_code}: {response.text}"
            )
        return response.json()

    def register_key(self, account: str, user: str, public_pem: bytes | str) -> str:
        """Register a public key for ACCOUNT.USER; returns its `SHA256:` fingerprint."""
        pem = public_pem.decode() if isinstance(public_pem, bytes) else public_pem
        body = {"account": account, "user": user, "public_key_pem": pem}
        return str(self._ok(self.admin.post("/_emulator/keys", json=body))["fingerprint"])

    def add_pipe(
        self,
        database: str,
        schema: str,
        pipe: str,
        *,
        columns: list[dict[str, Any]] | None = None,
        table: str | None = None,
        error_logging: bool | None = None,
    ) -> dict[str, Any]:
        """Register a pipe (pipes named <TABLE>-STREAMING need no registration), optionally with
        its table's columns, the table it loads and that table's error logging."""
        body: dict[str, Any] = {"database": database, "schema": schema, "pipe": pipe}
        options = {"columns": columns, "table": table, "error_logging": error_logging}
        body.update({name: value for name, value in options.items() if value is not None})
        return dict(self._ok(self.admin.post("/_emulator/pipes", json=body)))

    def stats(self) -> dict[str, Any]:
        """GET /_emulator/stats."""
        return dict(self._ok(self.admin.get("/_emulator/stats")))

    def rows(self, database: str, schema: str, pipe: str) -> list[dict[str, Any]]:
        """Committed rows: [{"channel", "offset_token", "committed_at_ms", "row"}, ...] in order.

        Numbers read back exactly as the rows carried them: integers of any size as int,
        decimals as Decimal (`1.10` stays Decimal("1.10"); it still equals 1.1 only where the
        float is exact, as 12.5 is).
        """
        response = self.admin.get(
            "/_emulator/rows", params={"database": database, "schema": schema, "pipe": pipe}
        )
        if response.status_code != 200:
            raise AssertionError(f"rows -> {response.status_code}: {response.text}")
        return [
            json.loads(line, parse_float=Decimal)
            for line in response.content.splitlines()
            if line.strip()
        ]

    def fault(self, **rule: Any) -> str:
        """Add a fault rule (endpoint=..., status=..., body=..., count=..., probability=...,
        delay_ms=..., retry_after=..., mode="respond"|"drop"); returns its id."""
        return str(self._ok(self.admin.post("/_emulator/faults", json=rule))["id"])

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        self._ok(self.admin.delete("/_emulator/faults"))

    def expire_tokens(self) -> None:
        """Every scoped token issued so far is expired from now on."""
        self._ok(self.admin.post("/_emulator/expire-tokens"))

    def invalidate(self, database: str, schema: str, pipe: str, channel: str) -> None:
        """The channel reports ERR_CHANNEL_MUST_BE_REOPENED until it is reopened."""
        body = {"database": database, "schema": schema, "pipe": pipe, "channel": channel}
        self._ok(self.admin.post("/_emulator/invalidate", json=body))

    def pause_commits(self, paused: bool = True) -> None:
        """Hold (or release) the commit pump: appended rows stay uncommitted meanwhile."""
        self._ok(self.admin.post("/_emulator/commits", json={"paused": paused}))

    # -- lifecycle -----------------------------------------------------------------------------

    def stderr(self) -> str:
        """What the emulator wrote to stderr so far (for failure messages)."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> int | None:
        """Terminate the emulator (kill after a timeout); returns its exit code."""
        self.admin.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        if self.process.stdout:
            self.process.stdout.close()
        return self.process.returncode

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch_emulator(
    *extra_args: str,
    tls: bool = False,
    workdir: Path | None = None,
    timeout: float = STARTUP_TIMEOUT,
    env: dict[str, str] | None = None,
) -> RunningEmulator:
    """Start `python -m emulator --port 0 *extra_args` and wait for its `listening on` line.

    The caller must `stop()` it; prefer the `start_emulator` context manager.
    """
    workdir = workdir or Path(tempfile.mkdtemp(prefix="emulator-test-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "emulator", "--port", "0", *extra_args]
    ca_file: Path | None = None
    if tls:
        ca_file = workdir / "emulator-ca.pem"
        args += ["--tls", "--ca-out", str(ca_file)]
    stderr_path = workdir / "emulator.stderr"
    proc_env = {**os.environ, **(env or {})}
    proc_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), proc_env.get("PYTHONPATH", "")) if p
    )
    with stderr_path.open("wb") as stderr_file:
        process = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
            env=proc_env,
        )
    line = _first_line(process, timeout)
    if not line.startswith("listening on "):
        process.kill()
        process.wait()
        raise EmulatorStartError(
            f"emulator did not start (got {line!r}); args={args[3:]}\n"
            f"stderr:\n{stderr_path.read_text(errors='replace')}"
        )
    return RunningEmulator(
        process,
        line.split("listening on ", 1)[1].strip(),
        ca_file=ca_file,
        stderr_path=stderr_path,
        workdir=workdir,
    )


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The first stdout line, or '' if the process exits or the timeout passes."""
    result: list[str] = []
    assert process.stdout is not None
    stdout = process.stdout
    reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0].strip() if result else ""


@contextlib.contextmanager
def start_emulator(
    *extra_args: str,
    tls: bool = False,
    workdir: Path | None = None,
    timeout: float = STARTUP_TIMEOUT,
    env: dict[str, str] | None = None,
) -> Iterator[RunningEmulator]:
    """A running emulator for the duration of the `with` block (stopped afterwards)."""
    emu = launch_emulator(*extra_args, tls=tls, workdir=workdir, timeout=timeout, env=env)
    try:
        yield emu
    finally:
        emu.stop()


# What the contract fixture `emulator_starter` returns: start(*switches) -> a running emulator.
Starter = Callable[..., contextlib.AbstractContextManager[RunningEmulator]]
