"""The heartbeat's decisions, one component at a time: when a node counts as alive, what a probe
reads from the file, and the node registry's duplicate-name check (fakeredis, its clock moved by
the test)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest

from tests.support.fake_redis import RedisClock
from worker import heartbeat, heartbeat_file
from worker.registry import WorkerRegistry


def test_a_consumer_counts_as_alive_while_consuming_with_a_recent_stamp_or_connecting() -> None:
    state = heartbeat.ConsumerState()
    now = time.monotonic()
    assert state.check(now)["ok"]  # starting
    state.set("consuming")
    assert state.check(now + 10)["ok"]
    stale = state.check(now + heartbeat.CONSUMER_STALL_SECONDS + 1)
    assert not stale["ok"] and "event loop has not run" in stale["detail"]
    state.set("connecting")  # Celery retries the broker: riding an outage out, not stuck
    assert state.check(now + 3600)["ok"]


def test_a_balancer_that_stopped_ticking_or_ended_is_not_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = time.monotonic()
    nodes: dict[str, Any] = {}
    monkeypatch.setattr(heartbeat, "_pump_node", lambda parent: nodes["node"])
    monkeypatch.setattr(heartbeat, "consumer_state", heartbeat.ConsumerState())

    def balancer(progress: float, alive: bool = True) -> dict[str, Any]:
        thread = SimpleNamespace(is_alive=lambda: alive)
        nodes["node"] = SimpleNamespace(balancer=SimpleNamespace(progress=progress,
                                                                 _thread=thread))  # fmt: skip
        step = heartbeat.HeartbeatStep.__new__(heartbeat.HeartbeatStep)
        step._parent = None
        return step.liveness(now)["pump balancer"]

    assert balancer(now - 5)["ok"]
    assert balancer(now - 120)["ok"]  # a tick waiting on a state store that stopped answering
    stuck = balancer(now - heartbeat.BALANCER_STALL_SECONDS - 1)
    assert not stuck["ok"] and "no balancer tick for" in stuck["detail"]
    assert balancer(now, alive=False) == {"ok": False, "detail": "the balancer thread has ended"}


def _write(path: Path, *, age: float, ready: bool, **checks: dict[str, Any]) -> None:
    heartbeat_file.write(path, {"node": "n@h", "period_seconds": 1.0, "ready": ready,
                                "alive": True, "checks": checks})  # fmt: skip
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def test_liveness_is_the_files_age_only(tmp_path: Path) -> None:
    path = tmp_path / "hb.json"
    missing = heartbeat_file.liveness(path)
    assert not missing.ok and "no heartbeat file" in missing.line
    _write(path, age=2, ready=False, **{"state store": {"ok": False, "detail": "down"}})
    assert heartbeat_file.liveness(path).ok  # not ready, but alive
    _write(path, age=31, ready=True)
    old = heartbeat_file.liveness(path)  # default: max(30 s, six periods of 1 s)
    assert not old.ok and "more than 30 s: it is dead or stuck" in old.line
    assert heartbeat_file.liveness(path, max_age=60).ok


def test_readiness_needs_a_fresh_file_that_says_ready(tmp_path: Path) -> None:
    path = tmp_path / "hb.json"
    _write(path, age=1, ready=True, broker={"ok": True, "detail": "connected"})
    verdict, checks = heartbeat_file.readiness(path)
    assert verdict.ok and checks["broker"]["detail"] == "connected"
    _write(path, age=1, ready=False, **{"leases": {"ok": False, "detail": "not renewed"}})
    verdict, _ = heartbeat_file.readiness(path)
    assert not verdict.ok and verdict.line == "n@h is not ready: leases: not renewed"
    _write(path, age=100, ready=True)
    assert not heartbeat_file.readiness(path)[0].ok


def test_the_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "hb.json"
    heartbeat_file.write(path, {"a": 1})
    heartbeat_file.write(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["hb.json"]  # no temporary file left


def test_a_name_is_refused_only_while_another_node_renews_it(
    fredis: fakeredis.FakeRedis, redis_clock: RedisClock
) -> None:
    live = WorkerRegistry(fredis, period_seconds=1)
    assert not live.claim("a@h").duplicate
    assert live.live() == ["a@h"]

    newcomer = WorkerRegistry(fredis, period_seconds=1)

    def renewing(_: float) -> None:  # the live node renews while the newcomer waits
        redis_clock.advance(0.25)
        live.renew("a@h")

    assert newcomer.claim("a@h", sleep=renewing).duplicate

    # A predecessor that crashed: its entry is live for three periods but nobody renews it.
    crashed = newcomer.claim("a@h", sleep=lambda s: redis_clock.advance(s) or time.sleep(s))
    assert not crashed.duplicate
    redis_clock.advance(2)
    assert live.live() == ["a@h"]  # the newcomer's own registration: three periods
    redis_clock.advance(2)
    assert live.live() == []
