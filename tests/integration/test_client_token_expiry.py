"""Scoped tokens that live 4 s, eight lifetimes of appends: every refresh lands before expiry."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.support.emulator import start_emulator
from tests.support.keys import key_pair
from worker.retry import RetryBudget, RetryPolicy
from worker.settings import Settings
from worker.snowpipe.client import SnowpipeClient
from worker.snowpipe.encoding import encode_rows

TTL_SECONDS = 4  # the guard's margin is 20 %: refreshes 0.8 s before expiry
RUN_SECONDS = 8.0 * TTL_SECONDS
APPEND_INTERVAL = 0.15  # under the emulator's 10 requests/s per channel
DB, SCHEMA, PIPE, CHANNEL = "DB", "PUBLIC", "TTL-STREAMING", "ttl-channel"


@pytest.mark.slow
def test_short_lived_scoped_tokens_never_surface_a_401(tmp_path: Path) -> None:
    with start_emulator(
        "--scoped-token-ttl", str(TTL_SECONDS), "--commit-delay", "0.2", workdir=tmp_path
    ) as emu:
        emu.register_key("ACME", "LOADER", key_pair().public_pem)
        settings = Settings(
            account="acme",
            user="loader",
            private_key=key_pair().private_pem.decode(),
            account_url=emu.url,
        )
        policy = RetryPolicy.from_settings(settings, budget=RetryBudget(100))
        sent = 0
        with capture_logs() as events, SnowpipeClient(settings, policy=policy) as client:
            ct = client.open_channel(DB, SCHEMA, PIPE, CHANNEL).continuation_token
            started = time.monotonic()
            while time.monotonic() - started < RUN_SECONDS:
                [payload] = encode_rows([{"n": sent}])
                # Any error here (a 401 that got through, an expired token) fails the test.
                ct = client.append_rows(
                    DB,
                    SCHEMA,
                    PIPE,
                    CHANNEL,
                    continuation_token=ct,
                    payload=payload,
                    start_offset_token=str(sent),
                    end_offset_token=str(sent),
                )
                sent += 1
                time.sleep(APPEND_INTERVAL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                status = client.bulk_channel_status(DB, SCHEMA, PIPE, [CHANNEL])[CHANNEL]
                if status.last_committed_offset_token == str(sent - 1):
                    break
                time.sleep(0.1)

        stats = emu.stats()
        rejected = {ep: by.get("401", 0) for ep, by in stats["requests"].items()}
        assert sum(rejected.values()) == 0, rejected  # not even one reactive refresh was needed
        assert sent > RUN_SECONDS / APPEND_INTERVAL / 2

        refreshes = [
            ev
            for ev in events
            if ev["event"] == "token.refresh.success" and ev.get("name") == "scoped"
        ]
        later = refreshes[1:]  # the first is the initial fetch
        assert len(later) >= RUN_SECONDS / TTL_SECONDS - 2, len(later)
        # Every refresh happened in the soft window: before expiry, with time to spare.
        assert {ev["reason"] for ev in later} == {"soft"}
        assert all(ev["remaining"] > 0 for ev in later), [ev["remaining"] for ev in later]
        assert stats["requests"]["token"]["200"] == len(refreshes)

        committed = [r["row"]["n"] for r in emu.rows(DB, SCHEMA, PIPE)]
        assert committed == list(range(sent))
