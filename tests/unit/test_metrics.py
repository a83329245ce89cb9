"""The metrics endpoint's collectors: scrape-time node gauges, and multiprocess mode across fork."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.emulator import REPO_ROOT
from worker import metrics
from worker.delivery.channels import ChannelRef
from worker.delivery.log import Depth


@dataclass
class FakePump:
    ref: ChannelRef
    committed: int
    in_flight: int


class FakeNode:
    def __init__(self, pumps: list[FakePump], depths: dict[ChannelRef, Depth]) -> None:
        self._pumps = pumps
        self.depths = depths
        self.live_nodes = 3

    def pumps(self) -> list[FakePump]:
        return self._pumps


def samples(collector: metrics.NodeCollector) -> dict[tuple[str, tuple[str, ...]], float]:
    out: dict[tuple[str, tuple[str, ...]], float] = {}
    for family in collector.collect():
        for s in family.samples:
            out[(s.name, tuple(s.labels[k] for k in sorted(s.labels)))] = s.value
    return out


def test_node_collector_reports_leases_depth_age_and_offsets() -> None:
    a = ChannelRef("DB", "S", "P", "c_0")
    b = ChannelRef("DB", "S", "P", "c_1")
    now_ms = int(time.time() * 1000)
    node = FakeNode(
        [FakePump(a, 100, 2), FakePump(b, 7, 0)],
        {a: Depth(5, 1234, now_ms - 30_000), b: Depth(0, 0, None)},
    )
    got = samples(metrics.NodeCollector([node]))  # type: ignore[list-item]
    assert got[("snowpipe_leases_held", ())] == 2
    assert got[("snowpipe_nodes_live", ())] == 3
    assert got[("snowpipe_channel_log_entries", ("c_0", "DB.S.P"))] == 5
    assert got[("snowpipe_channel_log_bytes", ("c_0", "DB.S.P"))] == 1234
    assert 29 <= got[("snowpipe_channel_log_oldest_age_seconds", ("c_0", "DB.S.P"))] <= 40
    assert got[("snowpipe_channel_log_oldest_age_seconds", ("c_1", "DB.S.P"))] == 0
    assert got[("snowpipe_channel_committed_offset", ("c_0", "DB.S.P"))] == 100
    assert got[("snowpipe_channel_appends_in_flight", ("c_0", "DB.S.P"))] == 2


def test_a_channel_not_sampled_yet_has_no_depth_but_its_offset() -> None:
    a = ChannelRef("DB", "S", "P", "c_0")
    got = samples(metrics.NodeCollector([FakeNode([FakePump(a, 1, 0)], {})]))  # type: ignore[list-item]
    assert ("snowpipe_channel_committed_offset", ("c_0", "DB.S.P")) in got
    assert not any(name == "snowpipe_channel_log_entries" for name, _ in got)


def test_no_node_reports_zero_leases() -> None:
    got = samples(metrics.NodeCollector([]))
    assert got[("snowpipe_leases_held", ())] == 0


@pytest.mark.parametrize(
    ("pool", "prefork"),
    [
        ("prefork", True),
        ("processes", True),
        ("celery.concurrency.prefork:TaskPool", True),
        ("threads", False),
        ("solo", False),
        (None, False),
    ],
)
def test_which_pools_fork(pool: Any, prefork: bool) -> None:
    assert metrics.is_prefork(pool) is prefork


def test_the_prefork_pool_class_forks() -> None:
    from celery.concurrency.prefork import TaskPool
    from celery.concurrency.thread import TaskPool as ThreadPool

    assert metrics.is_prefork(TaskPool)
    assert not metrics.is_prefork(ThreadPool)


# In a fresh interpreter (multiprocess mode changes prometheus_client for the whole process):
# a forked child counts into its own file, its inherited gauges keep their values (the livemin
# health flag stays 1), the parent's scrape adds everything up, and a dead child's live gauges
# are swept while its counters stay.
_FORK_SCRIPT = """
import os, sys
from pathlib import Path
from worker import metrics, observability as o

path = Path(sys.argv[1])
o.record_retry_budget(42.0)  # set before the switch: kept
metrics.enable_multiprocess(path)
o.set_guard_health("scoped", True)
o.record_ingest("DB.S.P", "logged", rows=3)
ready_r, ready_w = os.pipe()
done_r, done_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(done_w)
    o.record_ingest("DB.S.P", "logged", rows=4)
    os.write(ready_w, b"x")
    os.read(done_r, 1)  # alive while the parent scrapes
    os._exit(0)
os.close(done_r)
os.read(ready_r, 1)
collector = metrics._SweepingCollector(path)


def scrape():
    got = {}
    for family in collector.collect():
        for s in family.samples:
            got[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return got


for phase in ("child alive", "child dead"):
    got = scrape()
    assert got[("snowpipe_ingest_rows_total", (("pipe", "DB.S.P"),))] == 7, (phase, got)
    key = ("snowpipe_ingest_batches_total", (("outcome", "logged"), ("pipe", "DB.S.P")))
    assert got[key] == 2, (phase, got)
    assert got[("snowpipe_token_guard_healthy", (("name", "scoped"),))] == 1, (phase, got)
    assert got[("snowpipe_retry_budget_tokens", ())] == 42, (phase, got)
    live = any(f.name == f"gauge_livemin_{pid}.db" for f in path.iterdir())
    assert live is (phase == "child alive"), (phase, sorted(path.iterdir()))
    if phase == "child alive":
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
assert any(f.name == f"counter_{pid}.db" for f in path.iterdir())
print("ok")
"""


def test_multiprocess_mode_adds_up_forked_processes(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FORK_SCRIPT), str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr


def test_the_metrics_directory_is_emptied_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given = tmp_path / "given"
    given.mkdir()
    (given / "counter_1.db").write_bytes(b"old")
    (given / "keep.txt").write_text("not ours")
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(given))
    path, owned = metrics.multiprocess_dir("node@host")
    assert (path, owned) == (given, False)
    assert sorted(p.name for p in given.iterdir()) == ["keep.txt"]

    monkeypatch.delenv(metrics.MULTIPROC_ENV)
    monkeypatch.setattr(metrics.tempfile, "gettempdir", lambda: str(tmp_path))
    stale = tmp_path / "snowpipe-metrics-node_host"
    stale.mkdir()
    (stale / "counter_2.db").write_bytes(b"old")
    path, owned = metrics.multiprocess_dir("node@host")
    assert (path, owned) == (stale, True)
    assert list(path.iterdir()) == []


@pytest.mark.parametrize(("host", "bound"), [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
def test_the_endpoint_listens_on_loopback_unless_metrics_host_opens_it(
    host: str | None, bound: str
) -> None:
    from tests.support.redis import free_port

    port = free_port()
    options = f"metrics_port={port}" + (f", metrics_host={host!r}" if host else "")
    code = (
        "from worker import metrics; from worker.settings import load_settings; "
        f"s = load_settings(require_identity=False, {options}); "
        "metrics.start(s, nodename='n', pool=None); "
        "print(metrics._endpoint.server.server_address[0]); metrics.stop()"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False, env=env)  # fmt: skip
    assert result.stdout.splitlines()[-1] == bound, result.stdout + result.stderr
