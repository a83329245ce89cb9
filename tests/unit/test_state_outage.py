"""ingest_batch riding out a state-store outage (unit: the task's helpers, a fake retried call and
a recorded re-publish; the real outage is tests/reliability/test_state_outage.py), and the
consumer without native delayed delivery."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.keys import key_pair
from tests.support.redis import free_port
from worker.messages import IngestMessage
from worker.settings import load_settings


@pytest.fixture
def tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from worker import runtime

    settings = load_settings(
        account="A", user="U", account_url="http://127.0.0.1:1",
        private_key_path=key_pair("outage").write_private(tmp_path / "key.pem"),
        broker_url=f"redis://127.0.0.1:{free_port()}/0", state_outage_seconds=1.0,
    )  # fmt: skip
    monkeypatch.setattr(runtime, "_settings", settings)
    monkeypatch.setattr(runtime, "_runtime", None)
    from worker import tasks as module

    published: list[dict[str, Any]] = []
    monkeypatch.setattr(module.ingest_batch, "apply_async",
                        lambda **options: published.append(options))  # fmt: skip
    module.published = published
    yield module
    module._shutting_down.clear()


def _batch(tasks: Any, **kw: Any) -> Any:
    return IngestMessage("b-1", "DB", "S", "P", [{"id": 1}], kw.pop("attempt", 0), **kw)


def test_hold_is_the_rest_of_the_outage_window_capped_by_the_soft_time_limit(tasks: Any) -> None:
    assert tasks.state_hold_seconds(300, 450, 0) == 300
    assert tasks.state_hold_seconds(300, 450, 280) == pytest.approx(20)
    assert tasks.state_hold_seconds(600, 450, 0) == pytest.approx(0.8 * 450)  # soft limit first
    # Past the window: one more retry interval, then back in the queue.
    assert tasks.state_hold_seconds(300, 450, 301) == tasks.STATE_RETRY_CAP_SECONDS


def test_retry_delays_double_from_half_a_second_to_a_cap(tasks: Any) -> None:
    assert [tasks.state_retry_delay(n, rng=lambda: 1.0) for n in (1, 2, 3, 4, 5, 9)] == [
        0.5, 1.0, 2.0, 4.0, 5.0, 5.0
    ]  # fmt: skip
    assert tasks.state_retry_delay(9, rng=lambda: 0.0) == 2.5


def test_the_store_answering_again_within_the_hold_ends_the_ride_out(tasks: Any) -> None:
    calls = iter([redis.ConnectionError("down"), "logged"])

    def again() -> str:
        item = next(calls)
        if isinstance(item, BaseException):
            raise item
        return item

    done = tasks._ride_out(None, _batch(tasks), redis.ConnectionError("down"), again)
    assert done == tasks._Done("logged")
    assert tasks.published == []  # the message was held, never re-published


def test_an_outage_longer_than_the_hold_puts_the_batch_back_without_countdown(tasks: Any) -> None:
    def again() -> None:
        raise redis.ConnectionError("still down")

    began = time.time() - 0.5
    result = tasks._ride_out(None, _batch(tasks, attempt=2, outage_since=began),
                             redis.ConnectionError("down"), again)  # fmt: skip
    assert result["outcome"] == "retry_later" and result["attempt"] == 3
    [options] = tasks.published
    assert set(options) == {"kwargs", "task_id"}  # no countdown, no eta
    assert options["kwargs"]["outage_since"] == began  # the outage clock goes on
    assert options["task_id"] == "b-1:3"


def test_a_warm_shutdown_ends_the_hold_at_once(tasks: Any) -> None:
    tasks._shutting_down.set()
    started = time.monotonic()
    result = tasks._ride_out(None, _batch(tasks), redis.ConnectionError("down"), lambda: None)
    assert time.monotonic() - started < 0.5
    assert result["outcome"] == "retry_later" and len(tasks.published) == 1


def test_the_consumer_leaves_native_delayed_delivery_out(tasks: Any) -> None:
    from worker.celery_app import DELAYED_DELIVERY_STEP, Consumer, app

    steps = Consumer.Blueprint.default_steps
    assert DELAYED_DELIVERY_STEP not in steps
    assert "celery.worker.consumer.tasks:Tasks" in steps
    assert app.conf.worker_consumer == "worker.celery_app:Consumer"
