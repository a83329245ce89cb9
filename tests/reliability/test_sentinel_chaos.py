"""Chaos with a highly available state store: the primary killed mid-run, every row once.

A primary and a replica (AOF `appendfsync always` on both, config/redis/) watched by a Sentinel
(tests/support/sentinel.py); two real worker nodes (`celery -A worker worker`) reaching the state
store through `sentinel://` with `SNOWPIPE_STATE_MIN_REPLICAS=1`; the broker a claimed database of
the shared Redis, or RabbitMQ; the emulator. Batches are published at a steady rate while the
primary is killed with SIGKILL mid-run; Sentinel promotes the replica; the old primary is started
again later and rejoins as a replica (until then the new primary has no replica, so tasks hold
their messages: nothing unreplicated is acknowledged and no pump sends what a replica lacks).
Every row is committed exactly once and both nodes keep running.
"""

from __future__ import annotations

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
    committed_ids,
    delete_rabbit_queues,
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
from tests.support.sentinel import sentinel_set
from worker.publish import Publisher
from worker.settings import load_settings

PIPES = ["H0", "H1"]
ROWS = 10
BATCHES = 120
RATE = 20.0  # batches per second: the kill falls in the middle of the run
EMU = ("--commit-delay", "0.5", "--rate-limit", "10", "--accept-any-pipe")
RABBIT = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_the_state_primary_killed_mid_run_under_two_nodes_loses_and_duplicates_nothing(
    tmp_path: Path, broker: str
) -> None:
    with (
        sentinel_set(tmp_path / "ha") as ha,
        claimed_db() as db,
        start_emulator(*EMU, workdir=tmp_path / "emu") as emu,
    ):
        emu.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        key = key_pair("celery").write_private(tmp_path / "key.pem")
        queue = unique_queue("chaos")
        env = worker_env(
            emu, db.url if broker == "redis" else RABBIT, key, queue=queue,
            state_url=ha.url(0), state_sentinel_master=ha.master_name,
            state_min_replicas=1, state_replica_timeout_ms=500,
            lease_ttl_seconds=6, channels_per_pipe=2,
        )  # fmt: skip
        publisher = Publisher(load_settings(**settings_overrides(env)))
        expected: set[int] = set()
        published = threading.Event()

        def publish_all() -> None:
            for b in range(BATCHES):
                rows = make_rows(b * ROWS, ROWS)
                publisher.publish(rows, database=DATABASE, schema=SCHEMA,
                                  pipe=PIPES[b % len(PIPES)], batch_id=f"chaos-{b}")  # fmt: skip
                expected.update(row["id"] for row in rows)
                time.sleep(1 / RATE)
            published.set()

        nodes = [
            launch_worker(env, tmp_path / name, name=name, pool="threads", concurrency=8)
            for name in ("chaos-a", "chaos-b")
        ]
        try:
            with running(nodes[0]), running(nodes[1]):
                writer = threading.Thread(target=publish_all, name="publisher", daemon=True)
                writer.start()
                wait_until(lambda: len(committed_ids(emu, PIPES)) >= 20 * ROWS, timeout=60,
                           what="the run under way", logs=nodes)  # fmt: skip
                old = ha.kill_master()  # SIGKILL, mid-run
                ha.wait_for_master(other_than=old)
                time.sleep(2.0)  # the new primary runs without a replica for a while
                old.start()  # back, and Sentinel makes it a replica of the new primary
                ha.wait_replicas_online(1)
                writer.join(60)
                assert published.is_set(), "the publisher did not finish"
                wait_until(lambda: expected <= set(committed_ids(emu, PIPES)), timeout=120,
                           what="every row committed", logs=nodes)  # fmt: skip
                wait_until(lambda: emu.stats()["batches_pending"] == 0, timeout=30,
                           what="nothing in flight", logs=nodes)  # fmt: skip
                time.sleep(2.0)  # a late duplicate would show up now
                assert_exactly_once(emu, PIPES, expected, nodes)
                for node in nodes:
                    assert node.process.poll() is None, node.log_tail()
                    assert "Unrecoverable error" not in node.log(), node.log_tail()
        finally:
            publisher.close()
            if broker == "rabbitmq":
                delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")
