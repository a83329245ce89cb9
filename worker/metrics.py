"""The metrics endpoint of a worker node: Prometheus text on `SNOWPIPE_METRICS_PORT` (0: off).

The metrics themselves are defined in worker/observability.py (and listed, with their labels, in
docs/operations.md#metrics). This module serves them from the worker's main process:

- threads (or solo) pool: one process; the default registry is served as is.
- prefork pool: tasks run in pool processes, so every process writes its values to memory-mapped
  files in a per-node directory (prometheus_client's multiprocess mode) and the main process
  adds them up when scraped. `start()` runs at `worker_init`, before the pool forks: it empties
  the directory (`PROMETHEUS_MULTIPROC_DIR` if set, else `<tmp>/snowpipe-metrics-<node>`),
  switches prometheus_client to file-backed values and starts the HTTP server. A pool process
  that exits is marked dead (`mark_process_dead`: its live gauges go; its counters stay), and a
  scrape also sweeps the files of processes that died without saying so (kill -9).

Gauges that describe the node rather than a process (leases held, channel log depth and the age
of its oldest entry, committed offsets, token expiry) are computed at scrape time by
`NodeCollector` from what the node already knows: the depth of each held channel's log is read
on the balancer's tick (one pipelined Redis call per tick, only while metrics are on), never per
batch and never during a scrape.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, start_http_server
from prometheus_client import multiprocess as _multiprocess
from prometheus_client import values as _values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from worker.observability import get_logger

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from worker.delivery.node import Node
    from worker.settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PREFORK_POOLS = ("prefork", "processes")
_FILE_PID = re.compile(r"^gauge_live\w*?_(\d+)\.db$")

_log = get_logger("worker.metrics")


# --- Node gauges (computed at scrape time) --------------------------------------------------------

_nodes: weakref.WeakSet[Node] = weakref.WeakSet()


def watch(node: Node) -> None:
    """Report `node`'s leases, channels and tokens at every scrape (Node.start calls this)."""
    _nodes.add(node)


def unwatch(node: Node) -> None:
    """Stop reporting `node` (Node.stop)."""
    _nodes.discard(node)


class NodeCollector(Collector):
    """Scrape-time gauges of the watched nodes of this process (see the module docstring)."""

    def __init__(self, nodes: Iterable[Node] | None = None) -> None:
        self._fixed = list(nodes) if nodes is not None else None

    def describe(self) -> list[Any]:
        return []  # names are not reserved: collect() runs only when scraped

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nodes = self._fixed if self._fixed is not None else list(_nodes)
        chan = ["pipe", "channel"]
        leases = GaugeMetricFamily(
            "snowpipe_leases_held", "Channel leases this node holds (one pump each)."
        )
        live = GaugeMetricFamily(
            "snowpipe_nodes_live", "Live nodes this node saw at its last balancer tick."
        )
        entries = GaugeMetricFamily(
            "snowpipe_channel_log_entries",
            "Entries in the channel's log (logged, not yet seen committed), per held channel.",
            labels=chan,
        )
        size = GaugeMetricFamily(
            "snowpipe_channel_log_bytes", "NDJSON bytes in the channel's log.", labels=chan
        )
        age = GaugeMetricFamily(
            "snowpipe_channel_log_oldest_age_seconds",
            "Age of the oldest entry in the channel's log (0 when empty): how far delivery lags.",
            labels=chan,
        )
        committed = GaugeMetricFamily(
            "snowpipe_channel_committed_offset",
            "Snowflake's committed offset of the channel as the pump last saw it.",
            labels=chan,
        )
        inflight = GaugeMetricFamily(
            "snowpipe_channel_appends_in_flight",
            "Appends accepted and not yet seen committed, per held channel.",
            labels=chan,
        )
        held = 0
        now_ms = time.time() * 1000
        for node in nodes:
            pumps = node.pumps()
            held += len(pumps)
            live_count = getattr(node, "live_nodes", 0)
            if live_count:
                live.add_metric([], live_count)
            depths = dict(getattr(node, "depths", {}))
            for pump in pumps:
                labels = [_pipe(pump.ref), pump.ref.channel]
                committed.add_metric(labels, pump.committed)
                inflight.add_metric(labels, pump.in_flight)
                depth = depths.get(pump.ref)
                if depth is None:
                    continue
                entries.add_metric(labels, depth.entries)
                size.add_metric(labels, depth.bytes)
                oldest = depth.oldest_ms
                age.add_metric(labels, max(0.0, (now_ms - oldest) / 1000) if oldest else 0.0)
        leases.add_metric([], held)
        yield from (leases, live, entries, size, age, committed, inflight)
        yield _token_expiry()


def _token_expiry() -> GaugeMetricFamily:
    from worker.auth.guard import _GUARDS

    family = GaugeMetricFamily(
        "snowpipe_token_expires_in_seconds",
        "Seconds until the freshest token of each guard in the main process expires.",
        labels=["name"],
    )
    best: dict[str, float] = {}
    now = time.time()
    for guard in list(_GUARDS):
        token = guard.current()
        if token is not None:
            best[guard.name] = max(best.get(guard.name, -1e18), token.expires_at - now)
    for name, seconds in sorted(best.items()):
        family.add_metric([name], seconds)
    return family


def _pipe(ref: Any) -> str:
    return f"{ref.database}.{ref.schema}.{ref.pipe}"


def pipe_label(database: str, schema: str, pipe: str) -> str:
    """The `pipe` label of a pipe: `DATABASE.SCHEMA.PIPE`."""
    return f"{database}.{schema}.{pipe}"


# --- Multiprocess mode ----------------------------------------------------------------------------


def enable_multiprocess(path: Path) -> None:
    """Switch this process (and the children it forks) to file-backed metric values in `path`.

    prometheus_client picks its value class from the environment when it is imported; the
    worker only knows its pool later, so the class is swapped here, before any pool process
    exists: labelled metrics create their values on first use (after this), unlabelled ones are
    re-created. What was counted before (nothing on the task paths) starts again from zero.
    """
    from worker import observability

    os.environ[MULTIPROC_ENV] = str(path)
    observability._ingest_children.clear()
    prom: Any = _values  # prometheus_client's internals are untyped
    value_class = prom.MultiProcessValue()
    prom.ValueClass = value_class
    _hold_lock_across_fork(value_class)
    for metric in list(REGISTRY._collector_to_names):
        if not isinstance(metric, MetricWrapperBase):
            continue
        collector: Any = metric
        if collector._labelnames:
            with collector._lock:
                collector._metrics.clear()
        else:
            kept = collector._value.get() if isinstance(collector, Gauge) else None
            collector._metric_init()
            if kept is not None:
                collector.set(kept)
    # Registered after the lock hook: hooks run in order, so the lock is free by then.
    os.register_at_fork(after_in_child=_republish_gauges)


def _republish_gauges() -> None:
    """In a new pool process: write the gauge values it inherited into its own file.

    A forked process starts its files empty, and a value it inherited (a guard's health flag,
    the retry budget: the process's state is the parent's at the fork) reads 0 there until
    set again; `livemin` would then report an escalation that is not there.
    """
    inherited: list[tuple[Any, float]] = []
    for metric in list(REGISTRY._collector_to_names):
        if not isinstance(metric, Gauge):
            continue
        collector: Any = metric
        children = list(collector._metrics.values()) if collector._labelnames else [collector]
        for child in children:
            value = getattr(child._value, "_value", None)  # still the parent's, in memory
            if isinstance(value, float):
                inherited.append((child, value))
    # All read first: the first set() in this process resets every value to its (empty) file.
    for child, value in inherited:
        child.set(value)


def _hold_lock_across_fork(value_class: Any) -> None:
    """Fork with the file-backed values' one lock free (held by a pump thread, it would stay
    held forever in the pool process and hang its first metric update)."""
    inc = value_class.inc
    names = inc.__code__.co_freevars
    lock = inc.__closure__[names.index("lock")].cell_contents if "lock" in names else None
    if lock is None:
        _log.warning("metrics.fork_lock_unknown", detail="prometheus_client changed its values")
        return
    os.register_at_fork(before=lock.acquire, after_in_parent=lock.release,
                        after_in_child=lock.release)  # fmt: skip


class _SweepingCollector(Collector):
    """The files of every process, after dropping the live gauges of processes that died."""

    def __init__(self, path: Path) -> None:
        self._path = path
        files: Any = _multiprocess.MultiProcessCollector
        self._files = files(None, str(path))

    def collect(self) -> Any:
        sweep_dead(self._path)
        return self._files.collect()


def sweep_dead(path: Path) -> None:
    """`mark_process_dead` for each process with live-gauge files that no longer runs."""
    seen: set[int] = set()
    for file in path.glob("gauge_live*.db"):
        match = _FILE_PID.match(file.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid in seen or pid == os.getpid():
            continue
        seen.add(pid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _mark_dead(pid, path)
        except PermissionError:
            pass  # exists (someone else's): not ours to judge


def _mark_dead(pid: int, path: Path) -> None:
    mark: Any = _multiprocess.mark_process_dead
    mark(pid, str(path))


def multiprocess_dir(nodename: str) -> tuple[Path, bool]:
    """The node's metrics directory, emptied of old files; whether this module created it."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("*.db"):
            old.unlink(missing_ok=True)
        return path, False
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", nodename)
    path = Path(tempfile.gettempdir()) / f"snowpipe-metrics-{safe}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)
    return path, True


def is_prefork(pool: Any) -> bool:
    """Whether `pool` (a Celery pool alias or class, as `worker_init` sees it) forks processes."""
    if isinstance(pool, str):
        return pool.rsplit(":", 1)[-1] in _PREFORK_POOLS or pool.endswith("prefork:TaskPool")
    module = getattr(pool, "__module__", "")
    return module.endswith("concurrency.prefork")


# --- The server -----------------------------------------------------------------------------------


class _Endpoint:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.server: WSGIServer | None = None
        self.thread: threading.Thread | None = None
        self.path: Path | None = None
        self.owns_path = False
        self.pid = 0


_endpoint = _Endpoint()


def start(settings: Settings, *, nodename: str, pool: Any) -> int | None:
    """Serve the metrics on `settings.metrics_port` (0: do nothing); the port bound, or None.

    Called once in the worker's main process before the pool starts (`worker_init`). A port in
    use is logged (naming the setting) and the worker runs on without an endpoint.
    """
    from worker.retry import process_budget

    port = settings.metrics_port
    if not port:
        return None
    with _endpoint.lock:
        if _endpoint.server is not None:
            return int(_endpoint.server.server_port)
        registry: CollectorRegistry = REGISTRY
        mode = "single"
        if is_prefork(pool):
            path, owned = multiprocess_dir(nodename)
            enable_multiprocess(path)
            registry = CollectorRegistry()
            registry.register(_SweepingCollector(path))
            _endpoint.path, _endpoint.owns_path = path, owned
            mode = "multiprocess"
        registry.register(NodeCollector())
        process_budget(settings)  # publishes its level: the gauge is never a meaningless 0
        try:
            server, thread = start_http_server(port, addr=settings.metrics_host, registry=registry)
        except OSError as exc:
            _log.error(
                "metrics.port_unavailable",
                port=port,
                host=settings.metrics_host,
                detail=f"cannot serve metrics on {settings.metrics_host} port {port} ({exc}): "
                "choose a free port in SNOWPIPE_METRICS_PORT (0 for no metrics endpoint), or an "
                "address of this host in SNOWPIPE_METRICS_HOST",
            )
            return None
        _endpoint.server, _endpoint.thread, _endpoint.pid = server, thread, os.getpid()
        bound = int(server.server_port)
        _log.info("metrics.serving", host=settings.metrics_host, port=bound, mode=mode,
                  directory=str(_endpoint.path or ""))  # fmt: skip
        return bound


def after_fork_in_child() -> None:
    """In a pool process: close the inherited listening socket (only the main process serves)."""
    server = _endpoint.server
    if server is not None and _endpoint.pid != os.getpid():
        with contextlib.suppress(OSError):
            server.socket.close()
        _endpoint.server = _endpoint.thread = None


def process_exited(pid: int) -> None:
    """A pool process ended: drop its live gauges (its counters stay in the totals)."""
    path = _endpoint.path or (Path(os.environ[MULTIPROC_ENV]) if MULTIPROC_ENV in os.environ
                              else None)  # fmt: skip
    if path is not None and path.is_dir():
        _mark_dead(pid, path)


def stop() -> None:
    """Stop serving (worker shutdown) and remove the metrics directory this module created."""
    with _endpoint.lock:
        server, _endpoint.server = _endpoint.server, None
        if server is not None and _endpoint.pid == os.getpid():
            server.shutdown()
            server.server_close()
        if _endpoint.owns_path and _endpoint.path is not None and _endpoint.pid == os.getpid():
            shutil.rmtree(_endpoint.path, ignore_errors=True)
            _endpoint.path = None
