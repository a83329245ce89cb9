"""The state Redis killed (SIGKILL) and restarted mid-run, with `appendfsync always`.

`ingest_batch` acknowledges a batch once it is in its channel log on the state Redis, so with
`appendfsync always` (every write fsynced before Redis answers it) a crash of the state Redis
must lose no acknowledged batch. Black-box: a real worker; the state store is a private
`redis-server` (AOF, fsync always) that is killed and started again on the same port and data
dir; the broker is a claimed DB of the shared Redis, which is never restarted. Commits are
paused around the kill, so acknowledged batches sit in the logs (and in flight at the emulator)
when the state Redis dies.

The worker must survive (its pumps, its balancer and its tasks reconnect), and every batch (each
acknowledged one in particular) must be committed exactly once.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    assert_exactly_once,
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
from tests.support.redis import claimed_db, private_redis
from worker.publish import Publisher
from worker.settings import load_settings

PIPES = ["S0", "S1"]
ROWS = 10
RATE = 40.0  # batches per second
BEFORE, DOWN, AFTER = 2.5, 1.5, 2.0  # publish, kill, stay down, restart, publish
EMU = ("--commit-delay", "0.3", "--rate-limit", "10", "--accept-any-pipe")
DEAD_KEY = "snowpipe:letters"  # the dead letters (worker/deadletter.py)
SUCCEEDED = re.compile(
    r"Task snowpipe\.ingest_batch\[[^\]]+\] succeeded in [0-9.e-]+s: "
    r"\{'batch_id': '([^']+)', 'outcome': '(logged|already_logged)'"
)


def acknowledged(log: str) -> set[str]:
    """Batch ids the worker acknowledged (logged now or found already logged)."""
    return {m.group(1) for m in SUCCEEDED.finditer(log)}


@pytest.mark.slow
def test_state_redis_killed_and_restarted_with_fsync_always_loses_no_acknowledged_batch(
    tmp_path: Path,
) -> None:
    with (
        private_redis(tmp_path / "state", appendfsync="always") as server,
        claimed_db() as broker,
        start_emulator(*EMU, workdir=tmp_path / "emu") as emu,
    ):
        emu.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        key = key_pair("celery").write_private(tmp_path / "key.pem")
        env = worker_env(
            emu,
            broker.url,
            key,
            queue=unique_queue("state"),
            state_url=server.url(0),
            channels_per_pipe=2,
        )
        publisher = Publisher(load_settings(**settings_overrides(env)))
        state = server.client(0)
        published: list[int] = []

        def publish(first: int, count: int, rate: float) -> None:
            t0 = time.monotonic()
            for n, b in enumerate(range(first, first + count)):
                time.sleep(max(0.0, t0 + n / rate - time.monotonic()))
                publisher.publish(
                    make_rows(b * ROWS, ROWS),
                    database=DATABASE,
                    schema=SCHEMA,
                    pipe=PIPES[b % len(PIPES)],
                    batch_id=f"batch-{b}",
                )
                published.append(b)

        def committed() -> int:
            return int(emu.stats()["rows_committed"])

        try:
            worker = launch_worker(env, tmp_path, name="state", pool="threads", concurrency=8)
            with running(worker):
                # Warm up: every channel leased, opened and committing.
                publish(0, 20, rate=100)
                wait_until(
                    lambda: committed() >= 20 * ROWS,
                    timeout=30,
                    what="warm-up commits",
                    logs=[worker],
                )
                emu.pause_commits(True)
                steady = int(RATE * (BEFORE + DOWN + AFTER))
                during = threading.Thread(target=publish, args=(20, steady, RATE), daemon=True)
                during.start()
                time.sleep(BEFORE)
                in_logs = sum(int(state.xlen(k)) for k in state.scan_iter("snowpipe:log:*"))
                acked_before = acknowledged(worker.log())
                server.stop(kill=True)
                time.sleep(DOWN)
                server.start()
                during.join(BEFORE + DOWN + AFTER + 30)
                assert not during.is_alive(), "publishing did not finish"
                assert in_logs > 0, "nothing sat in the logs at the kill"
                assert len(acked_before) > 20, "too few batches acknowledged before the kill"
                total = len(published)
                wait_until(
                    lambda: len(acknowledged(worker.log())) >= total,
                    timeout=40,
                    what=f"{total} batches acknowledged",
                    logs=[worker],
                )
                emu.pause_commits(False)
                wait_until(
                    lambda: committed() >= total * ROWS,
                    timeout=40,
                    what=f"{total * ROWS} rows committed",
                    logs=[worker],
                )
                wait_until(lambda: emu.stats()["batches_pending"] == 0, timeout=10, what="idle")
                log = worker.log()
                # Everything published (every acknowledged batch among it) committed once.
                assert acknowledged(log) == {f"batch-{b}" for b in published}
                assert_exactly_once(
                    emu,
                    PIPES,
                    {i for b in published for i in range(b * ROWS, (b + 1) * ROWS)},
                    logs=[worker],
                )
                assert state.hvals(DEAD_KEY) == []
                # The worker lived through it and noticed: tasks retried, pumps reconnected.
                assert worker.process.poll() is None, worker.log_tail()
                assert "ingest.state_failed" in log or "pump.failed" in log, worker.log_tail()
                assert "Unrecoverable error" not in log, worker.log_tail()
                assert "channel.log_forgot" not in log, worker.log_tail()
        finally:
            publisher.close()
            state.close()
