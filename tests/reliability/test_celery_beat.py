"""Beat refreshes the shared token ahead of every process; without beat, workers refresh alone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    CeleryProcess,
    assert_exactly_once,
    launch_beat,
    launch_worker,
    make_rows,
    running,
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import start_emulator
from tests.support.keys import key_pair
from tests.support.redis import claimed_db
from worker.publish import Publisher
from worker.settings import load_settings
from worker.tokenstore import TokenStore, identity

PIPES = ["P0", "P1"]
ROWS = 20
TOKEN_TTL = 20
BEAT_SECONDS = 5  # beat's slack before a worker's own soft window is half of this: keep it
WITH_BEAT_SECONDS = 2 * TOKEN_TTL  # two token lifetimes
WITHOUT_BEAT_SECONDS = TOKEN_TTL + 5  # longer than one token lifetime


@pytest.mark.slow
def test_beat_serves_every_refresh_and_workers_refresh_alone_when_beat_stops(
    tmp_path: Path,
) -> None:
    emu_args = ("--scoped-token-ttl", str(TOKEN_TTL), "--commit-delay", "0.2", "--rate-limit", "0",
                "--accept-any-pipe")
    with claimed_db() as db, start_emulator(*emu_args, workdir=tmp_path / "emu") as emu:
        emu.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        key_path = key_pair("celery").write_private(tmp_path / "key.pem")
        env = worker_env(emu, db.url, key_path, queue=unique_queue("beat"),
                         beat_refresh_seconds=BEAT_SECONDS)
        settings = load_settings(**settings_overrides(env))
        store = TokenStore(db.client, identity(settings))
        publisher = Publisher(settings)
        worker = launch_worker(env, tmp_path, name="beat", pool="prefork", concurrency=3)
        beat = launch_beat(env, tmp_path)
        logs: list[CeleryProcess] = [worker, beat]
        batch = 0

        def publish_for(seconds: float) -> None:
            nonlocal batch
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for _ in range(2):
                    publisher.publish(make_rows(batch * ROWS, ROWS), database=DATABASE,
                                      schema=SCHEMA, pipe=PIPES[batch % 2])
                    batch += 1
                time.sleep(1)

        try:
            with running(worker, beat):
                wait_until(lambda: store.refresh_counts().get("beat", 0) >= 1, timeout=30,
                           what="beat's first refresh", logs=logs)
                publish_for(WITH_BEAT_SECONDS)
                counts = store.refresh_counts()
                assert counts.get("request_path", 0) == 0, (counts, worker.log_tail())
                # Beat refreshes once remaining <= margin (20 % of 20 s = 4 s) + 1.5 x 5 s, checked
                # every 5 s: at 9.5 to 4.5 s before expiry, so at least once per 15.5 s (plus the
                # first refresh, before publishing began).
                assert counts["beat"] >= 1 + WITH_BEAT_SECONDS // 16, counts
                assert emu.stats()["tokens_issued"] == counts["beat"]

                beat.stop()
                publish_for(WITHOUT_BEAT_SECONDS)
                total = batch * ROWS
                wait_until(lambda: emu.stats()["rows_committed"] >= total, timeout=60,
                           what=f"{total} rows committed", logs=logs)
                after = store.refresh_counts()
                assert after.get("request_path", 0) >= 1, after
                assert_exactly_once(emu, PIPES, set(range(total)), logs=logs)
                assert db.client.hlen("snowpipe:letters") == 0
                assert "raised unexpected" not in worker.log()
        finally:
            publisher.close()
