"""Run Snowflake's official SDK against a running emulator, in a subprocess, and read its result.

    run = run_official_sdk(emu, tmp_path, key=key_pair("sdk"), account="SDKACCT", user="LOADER",
                           database="DB", schema="PUBLIC", pipe="EVENTS", channel="c1",
                           batches=3, rows_per_batch=200)
    assert run.ok, run.describe()

The emulator must serve HTTPS (`start_emulator(..., tls=True)`): the SDK refuses `http://` URLs and
trusts the emulator's throwaway CA only through `SSL_CERT_FILE`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.emulator import REPO_ROOT, RunningEmulator
from tests.support.keys import KeyPair
from tests.support.sdk_runner import RESULT_PREFIX

# Per SDK operation (flush, commit wait, close). The happy path takes ~3 s; each retry 1-12 s.
DEFAULT_OP_TIMEOUT = 45
# The whole subprocess: SDK start, every operation, close. A hung SDK is killed after this.
DEFAULT_PROCESS_TIMEOUT = 90.0
# The SDK retries control-plane calls (hostname, token, pipe-info) for up to 10 h by default, so a
# broken emulator would only show as the process timeout; this makes the SDK itself give up and say
# which call failed. The data path (appends, where the tests inject faults) keeps its defaults.
MGMT_RETRY_TOTAL_BACKOFF_SECONDS = 30
# How much of the SDK's log a failure message shows.
OUTPUT_TAIL_CHARS = 6000


@dataclass
class SdkRun:
    """What one SDK subprocess did: exit code (None if killed on timeout), output, result."""

    returncode: int | None
    output: str
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the SDK committed every planned row and closed cleanly."""
        return self.returncode == 0 and bool(self.result.get("ok"))

    def describe(self) -> str:
        """The result and the tail of the SDK's log, for an assertion message."""
        tail = self.output[-OUTPUT_TAIL_CHARS:]
        return f"exit={self.returncode} result={self.result}\n--- SDK output (tail) ---\n{tail}"


def run_official_sdk(
    emu: RunningEmulator,
    workdir: Path,
    *,
    key: KeyPair,
    account: str,
    user: str,
    database: str,
    schema: str,
    pipe: str,
    channel: str,
    batches: int,
    rows_per_batch: int,
    op_timeout: int = DEFAULT_OP_TIMEOUT,
    process_timeout: float = DEFAULT_PROCESS_TIMEOUT,
    **extra: Any,
) -> SdkRun:
    """Run `tests.support.sdk_runner` once against `emu` (extra plan keys pass through)."""
    if emu.ca_file is None or not emu.url.startswith("https://"):
        raise ValueError("the official SDK needs HTTPS: start the emulator with tls=True")
    workdir.mkdir(parents=True, exist_ok=True)
    key_file = workdir / f"{channel}-key.p8"
    key_file.write_bytes(key.private_pem)
    key_file.chmod(0o600)
    plan = {
        "url": emu.url,
        "account": account,
        "user": user,
        "private_key_file": str(key_file),
        "database": database,
        "schema": schema,
        "pipe": pipe,
        "channel": channel,
        "batches": batches,
        "rows_per_batch": rows_per_batch,
        "timeout_seconds": op_timeout,
        "properties": {"mgmt_retry_total_backoff_seconds": MGMT_RETRY_TOTAL_BACKOFF_SECONDS},
        **extra,
    }
    plan_file = workdir / f"{channel}-plan.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "SSL_CERT_FILE": str(emu.ca_file), "SS_LOG_LEVEL": "info"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.support.sdk_runner", str(plan_file)],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=process_timeout,
            check=False,
        )
        returncode: int | None = done.returncode
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        returncode = None
        output = _text(exc.stdout) + _text(exc.stderr) + f"\n[killed after {process_timeout} s]"
    result: dict[str, Any] = {}
    for line in output.splitlines():
        if line.startswith(RESULT_PREFIX):
            # The SDK's own log lines go to the same pipes and can land on the result's line
            # (no newline between two writers): read the JSON document and ignore the rest.
            result, _ = json.JSONDecoder().raw_decode(line[len(RESULT_PREFIX) :])
    return SdkRun(returncode, output, result)


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
