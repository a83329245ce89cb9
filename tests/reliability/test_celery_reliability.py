"""Exactly once despite crashes, redeliveries, invalidated channels, error storms, expiring tokens.

Real `celery` workers (subprocesses), the real Redis (a claimed DB per test), the emulator over
HTTP. Every check reads the committed rows back from the emulator: each id exactly once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    CeleryProcess,
    assert_exactly_once,
    launch_worker,
    make_rows,
    running,
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import RunningEmulator, start_emulator
from tests.support.keys import key_pair
from tests.support.redis import RedisDB, claimed_db
from worker.delivery.channels import ChannelRef
from worker.publish import Publisher
from worker.settings import load_settings

PIPES = [f"P{i}" for i in range(4)]
ROWS = 50


@dataclass
class Rig:
    emu: RunningEmulator
    db: RedisDB
    env: dict[str, str]
    publisher: Publisher
    tmp: Path

    def publish(self, first_batch: int, count: int, **kwargs: str) -> list[str]:
        return [
            self.publisher.publish(
                make_rows(b * ROWS, ROWS),
                database=DATABASE,
                schema=SCHEMA,
                pipe=PIPES[b % len(PIPES)],
                **kwargs,
            )
            for b in range(first_batch, first_batch + count)
        ]

    def committed(self) -> int:
        return int(self.emu.stats()["rows_committed"])

    def stat(self, name: str) -> int:
        value = self.db.client.hget("snowpipe:stats", name)
        return int(value) if value else 0

    def finish(self, batches: int, workers: list[CeleryProcess], timeout: float = 90) -> None:
        total = batches * ROWS
        wait_until(
            lambda: self.committed() >= total,
            timeout=timeout,
            what=f"{total} rows committed",
            logs=workers,
        )
        wait_until(lambda: self.emu.stats()["batches_pending"] == 0, timeout=10, what="idle")
        assert_exactly_once(self.emu, PIPES, set(range(total)), logs=workers)
        dead = self.db.client.lrange("snowpipe:dead", 0, -1)
        assert dead == [], dead
        for w in workers:
            assert "raised unexpected" not in w.log(), w.log_tail()


@contextmanager
def make_rig(tmp_path: Path, emu_args: tuple[str, ...], **settings: object) -> Iterator[Rig]:
    with claimed_db() as db, start_emulator(*emu_args, workdir=tmp_path / "emu") as emu:
        emu.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        key_path = key_pair("celery").write_private(tmp_path / "key.pem")
        env = worker_env(emu, db.url, key_path, queue=unique_queue("rel"), **settings)
        publisher = Publisher(load_settings(**settings_overrides(env)))
        try:
            yield Rig(emu, db, env, publisher, tmp_path)
        finally:
            publisher.close()


BASE_EMU = ("--commit-delay", "0.5", "--rate-limit", "0", "--accept-any-pipe")


@pytest.mark.slow
def test_kill_9_of_a_pool_child_mid_run_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    with make_rig(tmp_path, BASE_EMU) as rig:
        worker = launch_worker(rig.env, tmp_path, name="kchild", pool="prefork", concurrency=4)
        with running(worker):
            rig.publish(0, 80)
            wait_until(lambda: rig.committed() >= 15 * ROWS, timeout=60, what="15 batches",
                       logs=[worker])
            children = worker.children()
            assert children, worker.log_tail()
            os.kill(children[0], signal.SIGKILL)
            rig.finish(80, [worker])
            assert "WorkerLostError" in worker.log() or "exited with" in worker.log()


@pytest.mark.slow
def test_kill_9_of_the_whole_worker_mid_run_then_restart_commits_every_row_once(
    tmp_path: Path,
) -> None:
    # A small visibility timeout so the dead node's unacked messages come back within the test.
    with make_rig(tmp_path, BASE_EMU, visibility_timeout_seconds=10) as rig:
        first = launch_worker(rig.env, tmp_path, name="kall", pool="threads", concurrency=8)
        rig.publish(0, 80)
        wait_until(lambda: rig.committed() >= 15 * ROWS, timeout=60, what="15 batches",
                   logs=[first])
        # Rows in flight at the crash stay uncommitted until the new worker has reopened (fenced)
        # the channels, which discards them: their batches must be appended again.
        rig.emu.pause_commits(True)
        wait_until(lambda: rig.emu.stats()["batches_pending"] >= 2, timeout=30,
                   what="appends in flight", logs=[first])
        first.kill()
        assert rig.committed() < 80 * ROWS, "the run ended before the kill"
        second = launch_worker(rig.env, tmp_path, name="kall", pool="threads", concurrency=8)
        with running(second):
            wait_until(lambda: second.log().count("channel.opened") >= len(PIPES), timeout=30,
                       what="the new worker to reopen its channels", logs=[second])
            rig.emu.pause_commits(False)
            rig.finish(80, [first, second], timeout=120)
            # Every message is acknowledged in the end, including the redelivered ones.
            wait_until(lambda: rig.db.client.hlen("unacked") == 0, timeout=60,
                       what="no unacked messages", logs=[second])
            rig.finish(80, [first, second])
            # The crash left rows in flight that the reopen discarded; they were sent again.
            assert rig.emu.stats()["batches_discarded"] > 0


def test_a_batch_published_twice_with_one_id_is_logged_and_sent_once(
    tmp_path: Path,
) -> None:
    fast = ("--commit-delay", "0.2", "--rate-limit", "0", "--accept-any-pipe")
    with make_rig(tmp_path, fast) as rig:
        worker = launch_worker(rig.env, tmp_path, name="redeliver", pool="threads", concurrency=4)
        with running(worker):
            rig.publish(0, 1, batch_id="batch-once")
            rig.finish(1, [worker])
            appends = rig.emu.stats()["appends"]
            # The same batch again, as the broker would redeliver it.
            rig.publish(0, 1, batch_id="batch-once")
            wait_until(lambda: rig.stat("already_logged") == 1, timeout=30,
                       what="the redelivery to be acknowledged", logs=[worker])
            assert rig.emu.stats()["appends"] == appends
            rig.finish(1, [worker])


def test_a_channel_invalidated_mid_run_is_reopened_and_replayed_exactly_once(
    tmp_path: Path,
) -> None:
    with make_rig(tmp_path, BASE_EMU) as rig:
        worker = launch_worker(rig.env, tmp_path, name="inval", pool="threads", concurrency=8)
        with running(worker):
            rig.emu.pause_commits(True)
            rig.publish(0, 8)
            # Every channel that logged a batch has an append in flight (coalesced: maybe one).
            wait_until(lambda: rig.emu.stats()["batches_pending"] >= 1
                       and rig.emu.stats()["batches_pending"]
                       == rig.db.client.scard("snowpipe:channels"),
                       timeout=30, what="appends in flight on every channel", logs=[worker])
            # In-flight rows are discarded by the invalidation.
            for member in rig.db.client.smembers("snowpipe:channels"):
                ref = ChannelRef.from_key(member.decode())
                rig.emu.invalidate(ref.database, ref.schema, ref.pipe, ref.channel)
            rig.emu.pause_commits(False)
            rig.publish(8, 32)
            rig.finish(40, [worker])
            # Each invalidated channel was reopened: a second open per channel at least.
            assert worker.log().count("channel.opened") >= 2 * len(PIPES), worker.log_tail()


@pytest.mark.slow
def test_503_and_429_storms_with_5_second_tokens_commit_exactly_once_without_task_failure(
    tmp_path: Path,
) -> None:
    emu_args = ("--commit-delay", "0.2", "--rate-limit", "0", "--accept-any-pipe",
                "--scoped-token-ttl", "5")
    with make_rig(tmp_path, emu_args) as rig:
        rig.emu.fault(endpoint="append", status=503, probability=0.15)
        rig.emu.fault(endpoint="append", status=429, probability=0.1, retry_after=0.2,
                      body={"code": "390701", "message": "rate limited"})
        rig.emu.fault(endpoint="status", status=503, probability=0.1)
        rig.emu.fault(endpoint="open", status=503, count=3)
        worker = launch_worker(rig.env, tmp_path, name="storm", pool="threads", concurrency=8)
        with running(worker):
            started = time.monotonic()
            batch = 0
            while time.monotonic() - started < 15:  # outlive three token lifetimes
                rig.publish(batch, 4)
                batch += 4
                time.sleep(1)
            rig.finish(batch, [worker], timeout=120)
            stats = rig.emu.stats()
            assert stats["tokens_issued"] >= 3, stats
            assert stats["faults_fired"] > 0, stats


def test_appends_whose_answers_are_lost_are_settled_by_a_reopen_not_resent(
    tmp_path: Path,
) -> None:
    # The emulator accepts these appends, then drops the connection before the answer: the
    # worker cannot know whether they landed. Resending with the same continuation token could
    # commit them twice; the worker reopens the channel instead and replays what was discarded.
    with make_rig(tmp_path, BASE_EMU) as rig:
        rig.emu.fault(endpoint="append", mode="drop", count=6)
        worker = launch_worker(rig.env, tmp_path, name="lost", pool="threads", concurrency=8)
        with running(worker):
            rig.publish(0, 24)
            rig.finish(24, [worker])
            stats = rig.emu.stats()
            assert stats["faults_fired"] == 6, stats
            assert stats["batches_discarded"] >= 1, stats
