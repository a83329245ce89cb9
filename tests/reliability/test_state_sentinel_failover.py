"""A real worker whose state store is reached through Redis Sentinel, across a forced failover.

`celery -A worker worker` with SNOWPIPE_STATE_URL=sentinel://... (a primary, a replica and one
Sentinel of tests/support/sentinel.py), a claimed database of the shared Redis as the broker, and
the emulator. Batches published before `SENTINEL FAILOVER` are logged and committed; so are
batches published after it, and their channel-log writes land on the new primary. The failover
happens between the two rounds (no batch in flight): this pins that tasks, pumps, the balancer
and beat's token store follow the new primary by themselves. Exactly once across a failover in
the middle of a run is the business of SNOWPIPE_STATE_MIN_REPLICAS and its own chaos test.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    committed_ids,
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

PIPES = ["F0", "F1"]
ROWS = 10
BATCHES = 15  # per round
EMU = ("--commit-delay", "0.2", "--accept-any-pipe")
LOGGED = re.compile(
    r"Task snowpipe\.ingest_batch\[[^\]]+\] succeeded in [0-9.e-]+s: "
    r"\{'batch_id': '([^']+)', 'outcome': 'logged'"
)


def test_a_worker_on_sentinel_logs_and_commits_batches_before_and_after_a_failover(
    tmp_path: Path,
) -> None:
    with (
        sentinel_set(tmp_path / "ha") as ha,
        claimed_db() as broker,
        start_emulator(*EMU, workdir=tmp_path / "emu") as emu,
    ):
        emu.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        key = key_pair("celery").write_private(tmp_path / "key.pem")
        env = worker_env(
            emu,
            broker.url,
            key,
            queue=unique_queue("sentinel"),
            state_url=ha.url(0),
            state_sentinel_master=ha.master_name,
            channels_per_pipe=2,
            append_linger_seconds=0,
        )
        publisher = Publisher(load_settings(**settings_overrides(env)))

        def publish(first: int) -> set[int]:
            ids: set[int] = set()
            for b in range(first, first + BATCHES):
                rows = make_rows(b * ROWS, ROWS)
                publisher.publish(rows, database=DATABASE, schema=SCHEMA,
                                  pipe=PIPES[b % len(PIPES)], batch_id=f"batch-{b}")  # fmt: skip
                ids.update(row["id"] for row in rows)
            return ids

        def all_committed(ids: set[int]) -> bool:
            return ids <= set(committed_ids(emu, PIPES))

        try:
            worker = launch_worker(env, tmp_path, name="sentinel", pool="threads", concurrency=4)
            with running(worker):
                first = ha.master()
                before = publish(0)
                wait_until(lambda: all_committed(before), timeout=60,
                           what="the first round committed", logs=[worker])  # fmt: skip
                new = ha.failover(demote=False)
                after = publish(BATCHES)
                wait_until(lambda: all_committed(before | after), timeout=60,
                           what="both rounds committed", logs=[worker])  # fmt: skip
                logged = set(LOGGED.findall(worker.log()))
                assert logged >= {f"batch-{b}" for b in range(2 * BATCHES)}, worker.log_tail()
                # The second round's dedup records are on the new primary (snowpipe:batch:<id>).
                on_new = new.client()
                missing = [b for b in range(BATCHES, 2 * BATCHES)
                           if not on_new.exists(f"snowpipe:batch:batch-{b}")]  # fmt: skip
                on_new.close()
                assert not missing, f"{missing} not on {new}\n{ha.logs()}\n{worker.log_tail()}"
                assert new is not first
                assert worker.process.poll() is None, worker.log_tail()
                assert "Unrecoverable error" not in worker.log(), worker.log_tail()
        finally:
            publisher.close()
