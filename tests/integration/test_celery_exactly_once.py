"""20k rows in 200 batches over 10 pipes, committed exactly once, by real `celery` workers.

Prefork and threads pools, Redis and RabbitMQ brokers; the ledger and token store are always on
Redis. The emulator runs with a 0.2 s commit delay and no rate limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    assert_exactly_once,
    delete_rabbit_queues,
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
from tests.support.redis import RedisDB
from worker.publish import Publisher
from worker.settings import load_settings

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
PIPES = [f"P{i}" for i in range(10)]
BATCHES = 200
ROWS_PER_BATCH = 100


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[RunningEmulator]:
    with start_emulator(
        "--commit-delay", "0.2", "--rate-limit", "0", "--accept-any-pipe",
        workdir=tmp_path / "emulator",
    ) as emulator:  # fmt: skip
        emulator.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        yield emulator


@pytest.mark.slow
@pytest.mark.parametrize(
    ("broker", "pool", "concurrency"),
    [
        ("redis", "threads", 16),
        ("redis", "prefork", 6),
        pytest.param("rabbitmq", "threads", 16, marks=pytest.mark.rabbitmq),
        pytest.param("rabbitmq", "prefork", 6, marks=pytest.mark.rabbitmq),
    ],
)
def test_20k_rows_in_200_batches_over_10_pipes_are_committed_exactly_once(
    emu: RunningEmulator,
    db: RedisDB,
    tmp_path: Path,
    broker: str,
    pool: str,
    concurrency: int,
) -> None:
    queue = unique_queue(f"eo-{broker}-{pool}")
    key_path = key_pair("celery").write_private(tmp_path / "key.pem")
    broker_url = db.url if broker == "redis" else RABBIT_URL
    env = worker_env(emu, broker_url, key_path, queue=queue, state_url=db.url)
    publisher = Publisher(load_settings(**settings_overrides(env)))
    try:
        worker = launch_worker(env, tmp_path, name=f"eo{pool}", pool=pool, concurrency=concurrency)
        with running(worker):
            for b in range(BATCHES):
                publisher.publish(
                    make_rows(b * ROWS_PER_BATCH, ROWS_PER_BATCH),
                    database=DATABASE,
                    schema=SCHEMA,
                    pipe=PIPES[b % len(PIPES)],
                )
            total = BATCHES * ROWS_PER_BATCH
            wait_until(
                lambda: emu.stats()["rows_committed"] >= total,
                timeout=150,
                what=f"{total} rows committed",
                logs=[worker],
            )
            # Let any stray duplicate surface before counting.
            wait_until(
                lambda: emu.stats()["batches_pending"] == 0, timeout=10, what="no pending rows"
            )
            assert_exactly_once(emu, PIPES, set(range(total)), logs=[worker])
            assert db.client.hlen("snowpipe:letters") == 0
    finally:
        publisher.close()
        if broker == "rabbitmq":
            delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")
