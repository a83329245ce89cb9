"""The metrics endpoint of a real `celery -A worker worker`: scraped over HTTP during a run.

A worker on the emulator and a claimed Redis DB (broker and state) with SNOWPIPE_METRICS_PORT set
ingests a few batches; the scrape shows the task counters (written by the pool processes under
prefork, added up by the main process), the pump's appends, bytes and commit latency, the
leases and channel gauges, the token refreshes and the retry budget; a second round of batches
moves the counters.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    launch_worker,
    running,
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.delivery import EMULATOR_ARGS, KEY_NAME, delivery_rig
from tests.support.emulator import RunningEmulator, start_emulator
from tests.support.keys import key_pair
from tests.support.redis import RedisDB, free_port
from worker.publish import Publisher
from worker.settings import load_settings
from worker.snowpipe.errors import BadRequestError, StaleContinuationTokenError

PIPE = "P"
LABEL = f"{DATABASE}.{SCHEMA}.{PIPE}"
BATCHES = 6
ROWS = 5

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    with start_emulator(
        "--commit-delay", "0.2", "--rate-limit", "0", "--pipe", f"{DATABASE}.{SCHEMA}.{PIPE}",
        workdir=tmp_path_factory.mktemp("emu"),
    ) as emulator:  # fmt: skip
        emulator.register_key(ACCOUNT, USER, key_pair("metrics").public_pem)
        yield emulator


def scrape(port: int) -> Samples:
    """Every sample of the endpoint, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples: Samples = {}
    names: list[str] = []
    for family in text_string_to_metric_families(text):
        names.append(family.name)
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    assert len(names) == len(set(names)), f"a metric family is exposed twice: {sorted(names)}"
    return samples


def value(samples: Samples, metric: str, **labels: str) -> float:
    """The sum of `metric`'s samples whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == metric and want <= ls)


def has(samples: Samples, metric: str) -> bool:
    return any(n == metric for n, _ in samples)


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_scrape_shows_the_run_and_counters_move(
    emu: RunningEmulator, db: RedisDB, tmp_path: Path, pool: str
) -> None:
    port = free_port()
    key_path = key_pair("metrics").write_private(tmp_path / "key.pem")
    env = worker_env(
        emu, db.url, key_path, queue=unique_queue("metrics"), metrics_port=port,
        channels_per_pipe=2, append_linger_seconds=0.2, lease_ttl_seconds=3,
    )  # fmt: skip
    publisher = Publisher(load_settings(**settings_overrides(env)))
    worker = launch_worker(env, tmp_path, name=f"metrics-{pool}", pool=pool, concurrency=2)
    try:
        with running(worker):

            def publish_round(first: int) -> None:
                for b in range(BATCHES):
                    rows = [{"id": first + b * ROWS + i} for i in range(ROWS)]
                    # Fixed ids, so that each round logs on both channels (crc32 of the id).
                    publisher.publish(rows, database=DATABASE, schema=SCHEMA, pipe=PIPE,
                                      batch_id=f"metrics-{first}-{b}")  # fmt: skip

            def committed(total: int) -> bool:
                s = scrape(port)
                # Committed, and the balancer's tick saw the logs trimmed.
                return (
                    value(s, "snowpipe_rows_committed_total", pipe=LABEL) >= total
                    and has(s, "snowpipe_channel_log_entries")
                    and value(s, "snowpipe_channel_log_entries") == 0
                )

            publish_round(0)
            wait_until(lambda: committed(BATCHES * ROWS), timeout=45, what="rows committed",
                       logs=[worker])  # fmt: skip
            first = scrape(port)

            # Tasks (pool processes under prefork) and pumps (the main process).
            assert value(first, "snowpipe_ingest_batches_total", pipe=LABEL,
                         outcome="logged") == BATCHES  # fmt: skip
            assert value(first, "snowpipe_ingest_rows_total", pipe=LABEL) == BATCHES * ROWS
            assert value(first, "snowpipe_rows_committed_total", pipe=LABEL) == BATCHES * ROWS
            assert value(first, "snowpipe_batches_committed_total", pipe=LABEL) == BATCHES
            accepted = value(first, "snowpipe_appends_total", pipe=LABEL, outcome="accepted")
            assert 1 <= accepted <= BATCHES
            assert value(first, "snowpipe_append_bytes_count", pipe=LABEL) == accepted
            assert value(first, "snowpipe_append_bytes_sum", pipe=LABEL) > 0
            assert value(first, "snowpipe_commit_latency_seconds_count", pipe=LABEL) == accepted
            latency = value(first, "snowpipe_commit_latency_seconds_sum", pipe=LABEL)
            assert 0 < latency < 30 * accepted
            assert value(first, "snowpipe_delivery_latency_seconds_count", pipe=LABEL) == accepted
            assert value(first, "snowpipe_channel_opens_total", pipe=LABEL) >= 1
            assert value(first, "snowpipe_leases_held") == 2
            assert value(first, "snowpipe_lease_events_total", event="acquired") == 2
            assert value(first, "snowpipe_nodes_live") == 1
            assert value(first, "snowpipe_channel_log_oldest_age_seconds") == 0
            assert value(first, "snowpipe_channel_committed_offset", pipe=LABEL) > 0
            assert value(first, "snowpipe_token_refreshes_total", name="scoped",
                         outcome="success") >= 1  # fmt: skip
            assert value(first, "snowpipe_token_guard_healthy", name="scoped") == 1
            assert value(first, "snowpipe_token_guard_wait_seconds_count", name="scoped") >= 1
            assert value(first, "snowpipe_token_expires_in_seconds", name="scoped") > 60
            assert value(first, "snowpipe_retry_budget_tokens") == 100
            assert value(first, "snowpipe_dead_letters_total") == 0

            publish_round(1000)
            wait_until(lambda: committed(2 * BATCHES * ROWS), timeout=45,
                       what="the second round committed", logs=[worker])  # fmt: skip
            second = scrape(port)
            assert value(second, "snowpipe_ingest_batches_total", outcome="logged") == 2 * BATCHES
            assert value(second, "snowpipe_appends_total", outcome="accepted") > accepted
            assert "metrics.serving" in worker.log()
    finally:
        publisher.close()


# --- The pump's failure counters, in-process (the delivery rig: real log, pump and emulator) ---


@pytest.fixture
def rig_emu(tmp_path: Path) -> Iterator[RunningEmulator]:
    with start_emulator(*EMULATOR_ARGS, workdir=tmp_path / "rig-emu") as emulator:
        emulator.register_key(ACCOUNT, USER, key_pair(KEY_NAME).public_pem)
        yield emulator


def test_reopens_refusals_and_dead_letters_are_counted(rig_emu: RunningEmulator) -> None:
    from prometheus_client import REGISTRY

    def sample(metric: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(metric, labels) or 0.0

    with delivery_rig(rig_emu) as rig:
        ref = rig.ref()
        label = f"{DATABASE}.{SCHEMA}.{ref.pipe}"
        names = [
            ("snowpipe_appends_total", {"pipe": label, "outcome": "reopen_required"}),
            ("snowpipe_appends_total", {"pipe": label, "outcome": "refused"}),
            ("snowpipe_channel_reopens_total",
             {"pipe": label, "reason": "StaleContinuationTokenError"}),
            ("snowpipe_channel_reopens_total", {"pipe": label, "reason": "refused"}),
            ("snowpipe_dead_letters_total", {"kind": "failed"}),
            ("snowpipe_rows_committed_total", {"pipe": label}),
        ]  # fmt: skip
        before = {(n, tuple(ls.items())): sample(n, **ls) for n, ls in names}

        def delta(metric: str, **labels: str) -> float:
            return sample(metric, **labels) - before[(metric, tuple(labels.items()))]

        rig.log_batch(ref, "m-ok-1", range(0, 10))
        bad = rig.log_batch(ref, "m-bad", range(10, 20))
        rig.log_batch(ref, "m-ok-2", range(20, 30))
        stale = [True]

        def before_append(first: int, last: int) -> None:
            if stale:
                stale.clear()
                raise StaleContinuationTokenError("injected", code="STALE_CONTINUATION_TOKEN")
            if first <= bad.first <= last:
                raise BadRequestError("injected: the batch is malformed", status=400)

        client = rig.client()
        client.before_append = before_append
        rig.start_pump(ref, client=client)
        rig.wait_exactly_once(set(range(0, 10)) | set(range(20, 30)), refs=[ref], timeout=30)
        assert rig.dead_letters.count() == 1
        assert delta("snowpipe_appends_total", pipe=label, outcome="reopen_required") == 1
        assert delta("snowpipe_channel_reopens_total", pipe=label,
                     reason="StaleContinuationTokenError") == 1  # fmt: skip
        assert delta("snowpipe_appends_total", pipe=label, outcome="refused") >= 1
        assert delta("snowpipe_channel_reopens_total", pipe=label, reason="refused") >= 1
        assert delta("snowpipe_dead_letters_total", kind="failed") == 1
        assert delta("snowpipe_rows_committed_total", pipe=label) == 20
