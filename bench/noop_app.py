"""The ceiling of bench/throughput.py: a Celery app whose one task does nothing but count itself.

    celery -A bench.noop_app worker --pool threads --concurrency 64   (SNOWPIPE_* in the env)

Same configuration as the product's app (`build_config`: acks late, prefetch 1, the same queue
and broker), and the task is registered under the ingest task's name, so `Publisher.publish`
sends it exactly the messages the real worker gets. The difference between the two runs is the
product's own work per batch. The task ignores its arguments; its only work is one INCR on the
state Redis, so the benchmark can see when every task has run.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery

from worker.celery_config import INGEST_TASK, build_config
from worker.settings import load_settings

DONE_KEY = "bench:noop:done"

_settings = load_settings()
app = Celery("bench-noop")
app.conf.update(build_config(_settings))
_redis = redis.Redis.from_url(_settings.state_url)


@app.task(name=INGEST_TASK, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
def noop(**_: Any) -> None:
    """Count one run (the arguments are the ingest task's, ignored)."""
    _redis.incr(DONE_KEY)
