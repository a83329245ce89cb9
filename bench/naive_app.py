"""The naive worker of bench/throughput.py: what a straightforward implementation does per batch.

    celery -A bench.naive_app worker --pool threads --concurrency 64   (SNOWPIPE_* in the env)

Same Celery configuration as the product (`build_config`) and the task is registered under the
ingest task's name, so it gets exactly the messages the real worker gets. Per batch, the task:

1. builds a NEW `SnowpipeClient` (new httpx client and connections, private key loaded, JWT
   minted, ingest hostname fetched, scoped token exchanged: nothing shared between batches);
2. opens its channel (one per thread, so concurrent tasks never reopen each other's channel);
3. appends the batch (encoded like the product: NDJSON, compressed, split to the size cap);
4. polls bulk channel status every SNOWPIPE_COMMIT_POLL_SECONDS until the channel's committed
   offset token is this batch's, holding its thread meanwhile; then closes the client.

It counts finished batches in the state Redis (`bench:naive:done`) and rows in
`bench:naive:rows`. Failures are counted in `bench:naive:failed` and the message is acknowledged
(the benchmark reports them; the naive worker has no retry design of its own).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import redis
from celery import Celery

from worker.celery_config import INGEST_TASK, build_config
from worker.settings import load_settings
from worker.snowpipe.client import SnowpipeClient
from worker.snowpipe.encoding import encode_rows

DONE_KEY = "bench:naive:done"
ROWS_KEY = "bench:naive:rows"
FAILED_KEY = "bench:naive:failed"
COMMIT_WAIT_SECONDS = 120.0

_settings = load_settings()
app = Celery("bench-naive")
app.conf.update(build_config(_settings))
_redis = redis.Redis.from_url(_settings.state_url)


@app.task(name=INGEST_TASK, bind=True, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
def naive_ingest(
    self: Any,
    *,
    batch_id: str,
    database: str,
    schema: str,
    pipe: str,
    rows: list[dict[str, Any]],
    **_: Any,
) -> None:
    """Open, append, poll until committed, with a client of its own (see the module docstring)."""
    s = _settings
    node = re.sub(r"[^A-Za-z0-9_]", "_", self.request.hostname or "node")
    channel = f"naive_{node}_{threading.get_ident()}"
    try:
        with SnowpipeClient.from_settings(s) as client:
            token = client.open_channel(database, schema, pipe, channel).continuation_token
            chunks = encode_rows(
                rows, compression=s.compression, max_request_bytes=s.max_request_bytes
            )
            for n, chunk in enumerate(chunks):
                token = client.append_rows(
                    database,
                    schema,
                    pipe,
                    channel,
                    continuation_token=token,
                    payload=chunk,
                    start_offset_token=None,
                    end_offset_token=f"{batch_id}.{n}",
                )
            last = f"{batch_id}.{len(chunks) - 1}"
            deadline = time.monotonic() + COMMIT_WAIT_SECONDS
            while True:
                status = client.bulk_channel_status(database, schema, pipe, [channel]).get(channel)
                if status is not None and status.last_committed_offset_token == last:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"batch {batch_id} not committed in {COMMIT_WAIT_SECONDS} s")
                time.sleep(s.commit_poll_seconds)
    except Exception:
        _redis.incr(FAILED_KEY)
        raise
    _redis.incr(DONE_KEY)
    _redis.incrby(ROWS_KEY, len(rows))
