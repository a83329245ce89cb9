"""A state-store outage ridden out, the batches kept in the queue (SNOWPIPE_STATE_OUTAGE_SECONDS).

Shortened form of a Redis failover: the state store (a private `redis-server`) is stopped for
20 s while batches keep arriving on RabbitMQ; the tasks ride it out for up to 40 s. Black-box: a
real worker, the shared RabbitMQ (unique queue names), the emulator. Afterwards every row is
committed exactly once, nothing was re-published, rejected or dead-lettered (neither in the state
store nor in the broker's `<queue>.dead`), and no log line says a dead letter was not stored.
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
from tests.support.redis import private_redis
from worker.brokerletters import BrokerDeadLetters
from worker.publish import Publisher
from worker.settings import load_settings

RABBIT = "amqp://guest:guest@127.0.0.1:5672//"
PIPES = ["O0", "O1"]
ROWS = 10
DOWN_SECONDS = 20.0
OUTAGE_SETTING = 40  # seconds the tasks ride it out: longer than the outage


@pytest.mark.slow
def test_a_state_store_outage_is_ridden_out_with_every_batch_kept_and_committed_once(
    tmp_path: Path,
) -> None:
    queue = unique_queue("outage")
    with (
        private_redis(tmp_path / "state") as server,
        start_emulator("--commit-delay", "0.2", "--accept-any-pipe",
                       workdir=tmp_path / "emu") as emu,  # fmt: skip
    ):
        pair = key_pair("outage")
        emu.register_key(ACCOUNT, USER, pair.public_pem)
        env = worker_env(emu, RABBIT, pair.write_private(tmp_path / "key.pem"), queue=queue,
                         state_url=server.url(0), channels_per_pipe=2,
                         state_outage_seconds=OUTAGE_SETTING)  # fmt: skip
        settings = load_settings(**settings_overrides(env))
        publisher = Publisher(settings)
        published: list[int] = []

        def publish(first: int, count: int, pause: float) -> None:
            for b in range(first, first + count):
                publisher.publish(make_rows(b * ROWS, ROWS), database=DATABASE, schema=SCHEMA,
                                  pipe=PIPES[b % 2], batch_id=f"outage-{b}")  # fmt: skip
                published.append(b)
                time.sleep(pause)

        try:
            worker = launch_worker(env, tmp_path, name="outage", concurrency=4)
            with running(worker):
                publish(0, 10, 0)
                wait_until(lambda: int(emu.stats()["rows_committed"]) >= 10 * ROWS, timeout=30,
                           what="warm-up commits", logs=[worker])  # fmt: skip
                server.stop()
                down_at = time.monotonic()
                during = threading.Thread(target=publish, args=(10, 30, DOWN_SECONDS / 40))
                during.start()
                wait_until(lambda: "ingest.state_unavailable" in worker.log(), timeout=10,
                           what="tasks holding their batches", logs=[worker])  # fmt: skip
                time.sleep(max(0.0, DOWN_SECONDS - (time.monotonic() - down_at)))
                server.start()
                during.join(30)
                total = len(published)
                wait_until(lambda: int(emu.stats()["rows_committed"]) >= total * ROWS,
                           timeout=40, what=f"{total * ROWS} rows committed",
                           logs=[worker])  # fmt: skip
                wait_until(lambda: emu.stats()["batches_pending"] == 0, timeout=10, what="idle")
                assert_exactly_once(emu, PIPES, set(range(total * ROWS)), logs=[worker])
                log = worker.log()
                assert "ingest.state_recovered" in log, worker.log_tail()
                for quiet in ("ingest.state_requeued", "ingest.state_outage_exceeded",
                              "dead letter not stored", "ingest.dead_letter", "Reject",
                              "Unrecoverable error"):  # fmt: skip
                    assert quiet not in log, f"{quiet!r} logged\n{worker.log_tail()}"
                assert worker.process.poll() is None
                assert server.client(0).hlen("snowpipe:letters") == 0
                assert BrokerDeadLetters(settings).count() == 0
        finally:
            publisher.close()
            delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")
