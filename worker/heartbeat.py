"""The node's heartbeat: its name claimed at start, its heartbeat file, its registration.

Two bootsteps, in the worker's main process:

- `ConsumerProgress` (a consumer step) proves the consumer alive: while it is connected it stamps
  the time from the consumer's own timer, which runs on the consumer's event loop, every
  heartbeat period; when the connection is lost Celery stops the step and the node is
  "connecting to the broker" (Celery retries, bounded by `broker_connection_max_retries`) until
  it starts again.
- `HeartbeatStep` (a worker step, started before the pumps: `PumpStep` requires it):
  1. refuses to start under a name a live node already has (worker/registry.py): one log line,
     `node.duplicate_name`, and exit code 78 (EX_CONFIG);
  2. every `SNOWPIPE_HEARTBEAT_SECONDS`, if the consumer made progress within
     `CONSUMER_STALL_SECONDS` (or is connecting) and the pump balancer within
     `BALANCER_STALL_SECONDS`, rewrites `SNOWPIPE_HEARTBEAT_FILE` (worker/heartbeat_file.py)
     with the node's readiness; otherwise it leaves the file alone (it ages, and a liveness
     probe fails) and logs `node.stalled` once, naming what stopped;
  3. in a thread of its own, keeps the readiness up to date (the broker connection, then
     worker/health.py's checks: state store, leases, token guard, start-up checks) and renews
     the node's registration. That thread may wait on a state store that does not answer; the
     file is written regardless, with the readiness it last knew, marked not ready once that is
     older than three periods. A state-store outage makes the node unready, never dead.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import redis
from celery import bootsteps

from worker import heartbeat_file
from worker.observability import get_logger

# The consumer's event loop runs its timers at least every second or so; a minute without one
# means it is blocked.
CONSUMER_STALL_SECONDS = 60.0
# A balancer tick waits on the state store at most about 90 s when it stops answering (each
# Redis call: 10 s socket timeout, retried; measured 20-40 s per call on a frozen server, two
# calls before the tick gives up), so twice that is a stuck balancer, not a slow state store.
BALANCER_STALL_SECONDS = 180.0
# sysexits.h EX_CONFIG: a configuration error (a duplicate node name, a state store that refuses
# the credentials), not a crash.
EXIT_CONFIG = 78
JOIN_SECONDS = 5.0

_log = get_logger("worker.heartbeat")


def _check(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": ok, "detail": detail}


class ConsumerState:
    """What the consumer did last, stamped by `ConsumerProgress` (one per worker process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = "starting"  # starting | consuming | connecting | stopping
        self.since = time.monotonic()
        self.beat = self.since

    def set(self, state: str) -> None:
        with self._lock:
            now = time.monotonic()
            self.state, self.since, self.beat = state, now, now

    def stamp(self) -> None:
        self.beat = time.monotonic()

    def check(self, now: float) -> dict[str, Any]:
        """Liveness of the consumer: consuming with a recent stamp, or (re)connecting."""
        with self._lock:
            state, since, beat = self.state, self.since, self.beat
        if state == "consuming":
            idle = now - beat
            if idle > CONSUMER_STALL_SECONDS:
                return _check(False, f"the consumer's event loop has not run for {idle:.0f} s")
            return _check(True, "consuming")
        if state == "connecting":
            return _check(True, f"connecting to the broker (for {now - since:.0f} s)")
        return _check(True, state)


consumer_state = ConsumerState()


class ConsumerProgress(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: stamps `consumer_state` from the consumer's event loop."""

    requires: ClassVar[tuple[str, ...]] = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer: Any = None

    def start(self, parent: Any) -> None:
        from worker import runtime

        consumer_state.set("consuming")
        period = runtime.settings().heartbeat_seconds
        self._timer = parent.timer.call_repeatedly(period, consumer_state.stamp)

    def stop(self, parent: Any) -> None:
        # Celery stops the consumer's steps when the connection is lost, then reconnects.
        self._cancel()
        consumer_state.set("connecting")

    def shutdown(self, parent: Any) -> None:
        self._cancel()
        consumer_state.set("stopping")

    def _cancel(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            with contextlib.suppress(Exception):
                timer.cancel()


def runtime_settings() -> Any:
    from worker import runtime

    return runtime.settings()


def _pump_node(parent: Any) -> Any:
    from worker.health import pump_node

    return pump_node(parent)


class HeartbeatStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: the node's name, heartbeat file and registration (module docstring)."""

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._parent: Any = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._claimed = False
        self._readiness: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._stalled = False
        self._client: redis.Redis | None = None

    def start(self, parent: Any) -> None:
        from worker import runtime
        from worker.registry import WorkerRegistry
        from worker.statestore import state_redis

        settings = runtime.settings()
        self._parent = parent
        self.name = str(parent.hostname)
        self.period = settings.heartbeat_seconds
        self.path: Path | None = settings.heartbeat_file
        self._client = state_redis(settings)
        self.registry = WorkerRegistry(self._client, period_seconds=self.period)
        self._claim()
        self._write()
        self._stop.clear()
        for target, name in ((self._beat, "heartbeat"), (self._assess, "readiness")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _claim(self) -> None:
        from worker.connectivity import diagnose, state_error

        try:
            claim = self.registry.claim(self.name)
        except redis.RedisError as exc:
            if diagnose(exc)[0] != "unreachable":  # credentials, permission, TLS: not an outage
                _log.critical("worker.cannot_start",
                              detail=str(state_error(runtime_settings(), exc)))  # fmt: skip
                raise SystemExit(EXIT_CONFIG) from None
            # Nothing to compare with: start (the pumps ride the outage out), register later.
            _log.warning("node.name_unchecked", node=self.name, detail=f"the state store did "
                         f"not answer ({type(exc).__name__}); a node of the same name is not "
                         "detected")  # fmt: skip
            return
        if claim.duplicate:
            _log.critical(
                "node.duplicate_name",
                node=self.name,
                detail=f"another live node of this deployment is named {self.name}: give each "
                "node a name of its own with -n (e.g. -n ingest1@%h, or -n $POD_NAME@%h), or "
                "stop the other one",
            )
            raise SystemExit(EXIT_CONFIG)
        self._claimed = True

    def stop(self, parent: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(JOIN_SECONDS)
        self._threads.clear()
        if self._parent is not None:
            self._write(stopping=True)
        if self._claimed and self._client is not None:
            with contextlib.suppress(redis.RedisError):
                self.registry.leave(self.name)
            self._claimed = False
        if self._client is not None:
            self._client.close()
            self._client = None

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)

    # --- The two threads ----------------------------------------------------------------------

    def liveness(self, now: float) -> dict[str, dict[str, Any]]:
        """The consumer's and the balancer's progress."""
        checks = {"consumer": consumer_state.check(now)}
        node = _pump_node(self._parent)
        if node is None:
            checks["pump balancer"] = _check(True, "no pumps on this node (yet)")
            return checks
        balancer = node.balancer
        thread = getattr(balancer, "_thread", None)
        idle = now - getattr(balancer, "progress", now)
        if thread is not None and not thread.is_alive():
            checks["pump balancer"] = _check(False, "the balancer thread has ended")
        elif idle > BALANCER_STALL_SECONDS:
            checks["pump balancer"] = _check(False, f"no balancer tick for {idle:.0f} s")
        else:
            checks["pump balancer"] = _check(True, "ticking")
        return checks

    def _beat(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self._write()
            except Exception as exc:  # noqa: BLE001 (the next period tries again)
                _log.warning("heartbeat.write_failed", error=type(exc).__name__, detail=str(exc))

    def _write(self, *, stopping: bool = False) -> None:
        now = time.monotonic()
        checks = self.liveness(now)
        alive = all(c["ok"] for c in checks.values())
        if not alive:
            if not self._stalled:
                self._stalled = True
                _log.error("node.stalled", node=self.name, problems={
                    name: c["detail"] for name, c in checks.items() if not c["ok"]
                }, consequence="the heartbeat file is no longer written")  # fmt: skip
            return
        if self._stalled:
            self._stalled = False
            _log.info("node.progressing", node=self.name)
        readiness = self._readiness
        if stopping:
            checks["node"] = _check(False, "stopping")
        elif readiness is None:
            checks["node"] = _check(False, "starting")
        elif now - readiness[0] > 3 * self.period:
            checks["state store"] = _check(
                False, f"readiness not assessed for {now - readiness[0]:.0f} s (waiting on the "
                "state store)"
            )
        else:
            checks.update(readiness[1])
        ready = all(c["ok"] for c in checks.values())
        if self.path is None:
            return
        heartbeat_file.write(
            self.path,
            {
                "node": self.name,
                "pid": os.getpid(),
                "written_at": time.time(),
                "period_seconds": self.period,
                "alive": True,
                "ready": ready,
                "checks": checks,
            },
        )

    def _assess(self) -> None:
        while True:
            try:
                self._readiness = (time.monotonic(), self.readiness())
            except Exception as exc:  # noqa: BLE001 (reported as not ready)
                self._readiness = (time.monotonic(), {"readiness": _check(False, str(exc))})
            try:
                assert self._client is not None
                self.registry.renew(self.name)
                self._claimed = True
            except (redis.RedisError, AssertionError):
                pass  # the outage is in the readiness already
            if self._stop.wait(self.period):
                return

    def readiness(self) -> dict[str, dict[str, Any]]:
        """The broker connection and worker/health.py's checks, as this node sees them."""
        from worker.health import node_checks

        assert self._client is not None
        state = consumer_state.state
        connected = state == "consuming"
        checks = {"broker": _check(connected, "connected" if connected else state)}
        node = _pump_node(self._parent)
        checks.update(node_checks(node, node.redis if node is not None else self._client))
        return checks
