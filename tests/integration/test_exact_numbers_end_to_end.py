"""Numbers keep every digit from `publish_batch` to the committed row: integers beyond 64 bits,
decimals with trailing zeros, through a real worker on both brokers (Celery's JSON message, the
worker's decoder, the channel log, the append, the emulator's table)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    delete_rabbit_queues,
    launch_worker,
    running,
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import start_emulator
from tests.support.keys import key_pair
from tests.support.redis import RedisDB
from worker.publish import Publisher
from worker.settings import load_settings

RABBIT = "amqp://guest:guest@127.0.0.1:5672//"
# Two batches: big integers alone (a message without tagged values, which the worker decodes
# with orjson unless it sees a long digit run), and decimals (kombu's tagged values).
INTEGERS = [{"id": 1, "big": 2**70 + 1}, {"id": 2, "big": -(10**30) - 7}]
DECIMALS = [
    {"id": 3, "price": Decimal("1.10"), "tiny": Decimal("-1.000E-30")},
    {"id": 4, "price": Decimal("0.1000000000000000055511151231257827")},
]


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_big_integers_and_decimals_are_committed_exactly(
    db: RedisDB, tmp_path: Path, broker: str
) -> None:
    with start_emulator("--commit-delay", "0.2", "--accept-any-pipe",
                        workdir=tmp_path / "emu") as emu:  # fmt: skip
        emu.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        queue = unique_queue("numbers")
        env = worker_env(
            emu, db.url if broker == "redis" else RABBIT,
            key_pair("celery").write_private(tmp_path / "key.pem"), queue=queue,
            state_url=db.url,
        )  # fmt: skip
        publisher = Publisher(load_settings(**settings_overrides(env)))
        worker = launch_worker(env, tmp_path, name="numbers", pool="threads", concurrency=2)
        try:
            with running(worker):
                for rows in (INTEGERS, DECIMALS):
                    publisher.publish(rows, database=DATABASE, schema=SCHEMA, pipe="NUMBERS")
                wait_until(lambda: len(emu.rows(DATABASE, SCHEMA, "NUMBERS")) == 4, timeout=60,
                           what="every row committed", logs=[worker])  # fmt: skip
            rows = sorted((r["row"] for r in emu.rows(DATABASE, SCHEMA, "NUMBERS")),
                          key=lambda r: r["id"])  # fmt: skip
            assert rows[0]["big"] == 2**70 + 1 and type(rows[0]["big"]) is int
            assert rows[1]["big"] == -(10**30) - 7
            assert str(rows[2]["price"]) == "1.10"
            assert rows[2]["tiny"] == Decimal("-1.000E-30")
            assert str(rows[3]["price"]) == "0.1000000000000000055511151231257827"
        finally:
            publisher.close()
            if broker == "rabbitmq":
                delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")
