"""Throughput of the delivery core against its goals, in one run, on loopback only.

    PYTHONPATH=. .venv/bin/python bench/throughput.py [--quick] [--only drain,ceiling,ours,...]
        [--broker redis|amqp] [--concurrency 64] [--rows 100] [--pool threads|prefork]
        [--profile] [--pump-process]

The emulator runs with Snowflake's per-channel rate limit on (`--rate-limit 10`) and
`--accept-any-pipe`; each phase gets its own emulator, its own claimed Redis DB (tests/support/
redis.py) and its own queue, all stopped, emptied and released afterwards. Every batch is R rows
(~130 bytes of JSON each), published with the product's `Publisher` under batch ids `b<n>`;
batch n holds row ids n*R .. n*R+R-1, so every committed row can be checked exactly once.

Phases (`--only` picks some, `drain` = the six drain-* phases; the order is fixed). The drain
phases come first and their goals table ("cost per row") is the headline, printed last:

drain-*   The queue is filled first (every batch published with the `Publisher`, no worker
          running), then one node is started and its drain timed, so the publisher's speed does
          not count. Steady rate = rate between 10 % and 90 % done, from a count sampled over time
          (no-op: its Redis INCR counter; worker: the emulator's `rows_committed`); also node
          start -> last task/commit. Worker CPU = the node's whole process tree (main process,
          pool children, reaped children) from node start (startup included, also shown apart)
          to the end. `--pool` and `--concurrency` apply to the no-op and the worker alike.
  drain-noop  bench/noop_app.py (the baseline: plain Celery, one no-op task, acks late,
              prefetch 1, same broker, task name and messages), 6,000 batches x 100 rows.
  drain-6s    the worker, commit delay 6 s, 10 pipes, 6,000 batches x 100 rows.
  drain-1s    the same at commit delay 1 s.
  drain-1000  the worker at 6 s, 2,000 batches x 1,000 rows: rows/s, MB/s of row JSON committed
              (MB = 1e6 bytes of the rows' compact JSON: sum of len(orjson.dumps(row)) + 1) and
              worker CPU per MB.
  drain-6s-ndjson, drain-1000-ndjson  drain-6s and drain-1000 with the batches published in
              the NDJSON form (`form="ndjson"`: the rows travel as one NDJSON string).
          (--quick: 1,500 and 300 batches.) --drain-rounds N runs them N times interleaved
          and the goals use each figure's median (the machine's load changes). Goals: drain
          rate at 6 s / no-op's >= 0.85; CPU per 100-row batch / no-op's <= 1.25; steady rate at
          6 s / at 1 s >= 0.95; 1000-row batches >= 40 MB/s; <= 25 ms worker CPU per MB; exactly
          once in every phase (worker: read back from the emulator; no-op: task runs ==
          messages, 1 s after the last).
          --profile [drain-6s,drain-1000]: drain-6s (or the phases named) once more, not
          counted in the goals, with `py-spy record --gil --subprocesses --nonblocking` on the
          node(s): a collapsed-stack file (speedscope.app or flamegraph.pl) and the top 20
          functions by own time, with each one's hottest line. py-spy is looked for on PATH and
          next to this Python (install: .venv/bin/pip install py-spy).
          --pump-process: the worker phases run two nodes: one consuming with
          SNOWPIPE_PUMP_ENABLED=false and one running the pumps that consumes no ingest queue
          (`--exclude-queues`); CPU is both process trees.
ceiling   A no-op Celery app (bench/noop_app.py: the product's Celery config, the ingest task's
          name, one Redis INCR per task) on the same broker, pool (threads) and concurrency, with
          the same messages: tasks/s (first publish -> last task) and worker CPU per task.
ours      The real worker (`celery -A worker worker`) at commit delay 6 s and 1 s: batches/s
          first publish -> last row committed, and steady-state batches/s from the emulator's
          committed-row count over time (between 20 % and 80 % of the rows). Goals: steady
          rate >= 0.7 x the ceiling; rate at 6 s / rate at 1 s >= 0.9; worker CPU per batch
          (main process + children) <= 1.5 x the no-op task's. Every row read back exactly once.
latency   Commit delay 6 s, batches published at a paced 0.5 x the ceiling's tasks/s for a fixed
          time; per batch, commit time (the emulator's `committed_at_ms` of its rows) minus
          publish time: p50/p95/p99. Goal p99 <= delay + 2 s. A batch not committed by the end
          of the wait counts as infinitely late.
backlog   Every append refused (an emulator fault, 503) while a backlog is published and the
          tasks finish, so the pumps fall behind by all of it; then the fault is cleared and the
          emulator's appends and `append_bytes` (wire bytes) are counted over the drain.
          Goal: mean bytes per append >= 1 MiB.
naive     bench/naive_app.py (new client, key, JWT, hostname, token per batch; open, append, poll
          until committed) with the same concurrency at commit delay 6 s, a bounded number of
          batches. Goal: ours (steady, at 6 s) / naive rows/s >= 10.
nodes     2 then 4 worker nodes (distinct --hostname), 10 pipes x 4 channels, a paced load;
          once the leases (`snowpipe:lease:*` in the state DB) settle, leases per node (goal
          max - min <= 1); then kill -9 one node and time until every channel it held is held by
          a survivor (goal <= lease TTL + 5 s); then stop publishing, wait for every row, check
          exactly once (the dead node's unacked messages come back after the visibility timeout).

Where a goal is not met, the CPU% of the worker main process(es) and children, the emulator,
Redis (shared) and this process (the publisher) over the phase is printed, with what saturated.
Every wait is bounded (--timeout and the per-phase limits); on a timeout the figures reached so
far are reported. The last line is one JSON object with every figure.
Exit status: 0, or 1 when a phase was not exactly once or failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import orjson

from bench._harness import (
    DATABASE,
    SCHEMA,
    CommitSampler,
    CountSampler,
    CpuMeter,
    Rig,
    batch_rows,
    emulator_errors,
    group_cpu,
    make_rows,
    percentile,
    pipes,
    publish,
    read_back,
    rig,
    rnd,
    saturation,
    wait_for,
)
from tests.support.keys import key_pair

PHASES = (
    "drain-noop", "drain-6s", "drain-1s", "drain-1000", "drain-6s-ndjson", "drain-1000-ndjson",
    "ceiling", "ours", "latency", "backlog", "naive", "nodes",
)  # fmt: skip
NOOP_DONE_KEY = "bench:noop:done"  # bench/noop_app.py
NAIVE_DONE_KEY, NAIVE_FAILED_KEY = "bench:naive:done", "bench:naive:failed"  # bench/naive_app.py
LEASE_PREFIX = "snowpipe:lease:"
LOG_PREFIX = "snowpipe:log:"
MIB = 1024 * 1024

GOAL_SHARE_OF_CEILING = 0.7
GOAL_DELAY_RATIO = 0.9
GOAL_CPU_RATIO = 1.5
GOAL_LATENCY_EXTRA_S = 2.0
GOAL_BYTES_PER_APPEND = MIB
GOAL_VS_NAIVE = 10.0
GOAL_LEASE_SPREAD = 1
GOAL_TAKEOVER_EXTRA_S = 5.0

QUICK = {
    "ceiling_batches": 600, "ours_batches": 400, "latency_seconds": 8.0,
    "backlog_batches": 2000, "naive_rounds": 1, "nodes": "2", "timeout": 45.0,
    "settle_timeout": 25.0, "drain_batches": 1500, "drain_1000_batches": 300,
    "drain_timeout": 120.0,
}  # fmt: skip
FULL = {
    "ceiling_batches": 3000, "ours_batches": 5000, "latency_seconds": 30.0,
    "backlog_batches": 6000, "naive_rounds": 3, "nodes": "2,4", "timeout": 120.0,
    "settle_timeout": 40.0, "drain_batches": 6000, "drain_1000_batches": 2000,
    "drain_timeout": 600.0,
}  # fmt: skip


@dataclass
class Goal:
    name: str
    value: float | None
    target: float
    higher_is_better: bool
    unit: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        shown = "n/a" if self.value is None else f"{self.value:g}{self.unit}"
        if self.value is not None and math.isinf(self.value):
            shown = "never (not every batch committed within the wait)"
        verdict = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[self.met]
        return f"{self.name}: {shown} (goal {op} {self.target:g}{self.unit}) -> {verdict}"

    def as_json(self) -> dict[str, Any]:
        finite = self.value is not None and math.isfinite(self.value)
        return {
            "name": self.name, "value": self.value if finite else None,
            "value_text": None if finite or self.value is None else "never (not committed)",
            "target": self.target,
            "op": ">=" if self.higher_is_better else "<=", "met": self.met,
        }  # fmt: skip


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    key_path: Path
    results: dict[str, Any] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def drain_phases(self) -> list[str]:
        return [p for p in self.args.only if p.startswith("drain-")]

    @property
    def profile_dir(self) -> Path:
        return Path(self.args.profile_dir) if self.args.profile_dir else self.workdir

    def phase(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one phase; an exception is reported and recorded as a failure, not raised."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 (one phase failing must not stop the others)
            traceback.print_exc()
            self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"  PHASE {name} FAILED: {exc}")
            return None

    @property
    def cores(self) -> int:
        return os.cpu_count() or 1

    def settings(self, **extra: Any) -> dict[str, Any]:
        """SNOWPIPE_* of the worker processes (settings an older core does not know are ignored
        by its processes; the publisher passes on only the ones it knows)."""
        a = self.args
        poll = {} if a.commit_poll is None else {"commit_poll_seconds": a.commit_poll}
        return {
            **poll,
            "channels_per_pipe": a.channels_per_pipe,
            "lease_ttl_seconds": a.lease_ttl,
            **extra,
        }

    def rig(self, prefix: str, commit_delay: float, **extra: Any) -> Any:
        return rig(
            self.workdir, commit_delay=commit_delay, broker=self.args.broker,
            key_path=self.key_path, prefix=prefix, settings=self.settings(**extra),
        )  # fmt: skip

    def goal(self, goal: Goal, cpu: CpuMeter | None = None) -> Goal:
        self.goals.append(goal)
        print(f"  {goal.line()}")
        if goal.met is False and cpu is not None and cpu.used:
            print(f"    {saturation(cpu.percents(), self.cores)}")
        return goal

    def ceiling_rate(self) -> float | None:
        c = self.results.get("ceiling")
        return c.get("tasks_per_s") if c else self.args.load


def verdict(check: Any, complete: bool) -> str:
    """Exactly once, or what is wrong; missing rows of a timed-out phase are not a failure."""
    if check.exactly_once:
        return "exactly once"
    if not complete and check.duplicates == 0 and check.unexpected == 0:
        return f"no duplicates; {check.missing} rows not committed (timed out)"
    return (
        f"NOT EXACTLY ONCE ({check.duplicates} duplicates, {check.missing} missing, "
        f"{check.unexpected} unexpected)"
    )


def header(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def cpu_json(meter: CpuMeter) -> dict[str, Any]:
    return {
        "cpu_s": {k: round(v, 2) for k, v in meter.used.items()},
        "cpu_percent": meter.percents(),
        "cpu_wall_s": round(meter.wall, 2),
    }


def tail_on_failure(r: Rig, what: str) -> None:
    for node in r.nodes:
        print(f"  ({what}) last lines of {node.name}:")
        for line in node.log().splitlines()[-8:]:
            print(f"    {line[:300]}")


# -- ceiling -------------------------------------------------------------------------------------


def run_ceiling(b: Bench) -> dict[str, Any]:
    a = b.args
    n = a.ceiling_batches
    header(
        f"ceiling: no-op task, {n} messages of {a.rows} rows, threads x {a.concurrency}, "
        f"{a.broker} broker"
    )
    batches = batch_rows(n, a.rows)
    with b.rig("noop", 1.0) as r:
        node = r.start_node(app="bench.noop_app", name="noop", concurrency=a.concurrency)
        pub = r.get_publisher()
        meter = CpuMeter([node], r.emu, r.db.client).start()
        t0 = time.time()
        publish(pub, batches, pipes(a.pipes))
        t_pub = time.time()

        def ran() -> int:
            return int(r.db.client.get(NOOP_DONE_KEY) or 0)

        complete = wait_for(lambda: ran() >= n, a.timeout)
        t1 = time.time()
        meter.stop()
        done = ran()
    elapsed = t1 - t0
    res = {
        "tasks": done,
        "complete": complete,
        "elapsed_s": round(elapsed, 2),
        "publish_per_s": round(n / max(1e-9, t_pub - t0), 1),
        "tasks_per_s": round(done / elapsed, 1),
        "worker_cpu_per_task_ms": rnd(1000 * meter.worker_total / max(1, done), 3),
        **cpu_json(meter),
    }
    print(
        f"  {res['tasks_per_s']} tasks/s ({done}/{n} tasks in {res['elapsed_s']} s"
        f"{'' if complete else ', TIMED OUT'}); publish {res['publish_per_s']}/s; worker CPU "
        f"{res['worker_cpu_per_task_ms']} ms per task"
    )
    print(f"  {saturation(meter.percents(), b.cores)}")
    return res


# -- ours ------------------------------------------------------------------------------------------


def run_ours(b: Bench, delay: float) -> dict[str, Any]:
    a = b.args
    n, total = a.ours_batches, a.ours_batches * a.rows
    header(
        f"ours at commit delay {delay:g} s: {n} batches x {a.rows} rows over {a.pipes} pipes, "
        f"threads x {a.concurrency}, rate limit 10/s per channel"
    )
    batches = batch_rows(n, a.rows)
    with b.rig(f"ours{delay:g}".replace(".", "_"), delay) as r:
        node = r.start_node(app="worker", name=f"ours{delay:g}".replace(".", "_"),
                            concurrency=a.concurrency)  # fmt: skip
        pub = r.get_publisher()
        with CommitSampler(r.emu) as sampler:
            meter = CpuMeter([node], r.emu, r.db.client).start()
            t0 = time.time()
            publish(pub, batches, pipes(a.pipes))
            t_pub = time.time()
            complete = wait_for(lambda: sampler.latest() >= total, a.timeout + delay)
            t_end = time.time()
            meter.stop()
        # A duplicate could still be in flight: let the emulator commit what it holds.
        wait_for(lambda: r.emu.stats()["batches_pending"] == 0, delay + 5.0)
        stats = r.emu.stats()
        check = read_back(r.emu, pipes(a.pipes), range(total))
        if not complete:
            tail_on_failure(r, "timed out")
    committed_rows = stats["rows_committed"]
    last = check.last_commit() if complete else t_end
    elapsed = (last or t_end) - t0
    steady = sampler.steady_rows_per_s()
    res = {
        "commit_delay_s": delay,
        "batches": n,
        "complete": complete,
        "rows_committed": committed_rows,
        "publish_per_s": round(n / max(1e-9, t_pub - t0), 1),
        "publish_s": round(t_pub - t0, 2),
        "elapsed_s": round(elapsed, 2),
        "batches_per_s": round(committed_rows / a.rows / elapsed, 1),
        "rows_per_s": round(committed_rows / elapsed),
        "steady_batches_per_s": rnd(steady / a.rows if steady else None, 1),
        "steady_rows_per_s": rnd(steady, 0),
        "appends": stats["appends"],
        "append_bytes": stats.get("append_bytes"),
        "open_channels": stats["open_channels"],
        "errors": emulator_errors(stats),
        "worker_cpu_per_batch_ms": rnd(
            1000 * meter.worker_total / max(1, committed_rows / a.rows), 3
        ),
        **check.summary(),
        **cpu_json(meter),
    }
    print(
        f"  end to end {res['batches_per_s']} batches/s, {res['rows_per_s']:,} rows/s "
        f"({committed_rows:,}/{total:,} rows, first publish -> last commit {res['elapsed_s']} s"
        f"{'' if complete else ', TIMED OUT'}); steady {res['steady_batches_per_s']} batches/s"
    )
    print(
        f"  publish {res['publish_per_s']}/s over {res['publish_s']} s; emulator "
        f"{res['appends']} appends on {res['open_channels']} channels, errors "
        f"{res['errors'] or 'none'}; worker CPU {res['worker_cpu_per_batch_ms']} ms per batch"
    )
    print(
        f"  read back {check.rows:,} rows: {check.duplicates} duplicates, {check.missing} "
        f"missing, {check.unexpected} unexpected -> {verdict(check, complete)}"
    )
    if not check.exactly_once and (complete or check.duplicates or check.unexpected):
        b.failures.append(f"ours {delay:g} s: not exactly once")
    res["_meter"] = meter
    return res


def ours_goals(b: Bench) -> None:
    runs = {r["commit_delay_s"]: r for r in b.results.get("ours", [])}
    ceiling = b.ceiling_rate()
    noop_cpu = (b.results.get("ceiling") or {}).get("worker_cpu_per_task_ms")
    if not runs:
        return
    header("ours: goals")
    for delay, r in sorted(runs.items(), reverse=True):
        rate = r["steady_batches_per_s"] or r["batches_per_s"]
        share = rnd(rate / ceiling, 3) if ceiling and rate else None
        r["share_of_ceiling"] = share
        r["share_of_ceiling_end_to_end"] = rnd(r["batches_per_s"] / ceiling, 3) if ceiling else None
        b.goal(
            Goal(f"steady batches/s at {delay:g} s / ceiling ({rate} / {ceiling})", share,
                 GOAL_SHARE_OF_CEILING, True),
            r["_meter"],
        )  # fmt: skip
    if 6.0 in runs and 1.0 in runs:
        r6, r1 = runs[6.0], runs[1.0]
        v6 = r6["steady_batches_per_s"] or r6["batches_per_s"]
        v1 = r1["steady_batches_per_s"] or r1["batches_per_s"]
        ratio = rnd(v6 / v1, 3) if v1 else None
        b.results["delay_ratio_6_over_1"] = ratio
        b.results["delay_ratio_6_over_1_end_to_end"] = rnd(
            r6["batches_per_s"] / r1["batches_per_s"], 3
        ) if r1["batches_per_s"] else None  # fmt: skip
        b.goal(Goal(f"batches/s at 6 s / at 1 s ({v6} / {v1})", ratio, GOAL_DELAY_RATIO, True),
               r6["_meter"])  # fmt: skip
    for delay, r in sorted(runs.items(), reverse=True):
        if noop_cpu:
            ratio = rnd(r["worker_cpu_per_batch_ms"] / noop_cpu, 2)
            r["cpu_ratio_to_noop"] = ratio
            b.goal(
                Goal(f"worker CPU per batch / no-op task at {delay:g} s "
                     f"({r['worker_cpu_per_batch_ms']} / {noop_cpu} ms)", ratio,
                     GOAL_CPU_RATIO, False),
                r["_meter"],
            )  # fmt: skip


# -- latency -----------------------------------------------------------------------------------


def run_latency(b: Bench) -> dict[str, Any]:
    a = b.args
    delay = 6.0
    ceiling = b.ceiling_rate()
    if not ceiling:
        raise RuntimeError("latency needs the ceiling: run the ceiling phase or pass --load")
    rate = 0.5 * ceiling
    n = max(1, int(rate * a.latency_seconds))
    header(
        f"latency at half the ceiling: {rate:.1f} batches/s for {a.latency_seconds:g} s "
        f"({n} batches), commit delay {delay:g} s"
    )
    batches = batch_rows(n, a.rows)
    total = n * a.rows
    with b.rig("latency", delay) as r:
        node = r.start_node(app="worker", name="latency", concurrency=a.concurrency)
        pub = r.get_publisher()
        with CommitSampler(r.emu) as sampler:
            meter = CpuMeter([node], r.emu, r.db.client).start()
            published = publish(pub, batches, pipes(a.pipes), rate=rate)
            complete = wait_for(lambda: sampler.latest() >= total, delay + a.timeout)
            meter.stop()
        check = read_back(r.emu, pipes(a.pipes), range(total))
        if not complete:
            tail_on_failure(r, "timed out")
    lat: list[float] = []
    for bi, at in published.items():
        ids = range(bi * a.rows, (bi + 1) * a.rows)
        times = [check.committed_at.get(i) for i in ids]
        lat.append(max(times) - at if all(t is not None for t in times) else math.inf)  # type: ignore[type-var,operator]
    spread = max(published.values()) - min(published.values()) if published else 0.0
    late = sum(1 for x in lat if math.isinf(x))

    def show(q: float) -> float | None:
        v = percentile(lat, q)
        return None if v is None or math.isinf(v) else round(v, 3)

    res = {
        "commit_delay_s": delay,
        "offered_per_s": round(rate, 1),
        "published": n,
        "achieved_publish_per_s": round((n - 1) / spread, 1) if spread > 0 else None,
        "complete": complete,
        "not_committed": late,
        "p50_s": show(0.5),
        "p95_s": show(0.95),
        "p99_s": show(0.99),
        "max_s": show(1.0),
        **check.summary(),
        **cpu_json(meter),
    }

    def fmt(v: float | None) -> str:
        return "not committed" if v is None else f"{v:g} s"

    print(
        f"  publish -> committed: p50 {fmt(res['p50_s'])}, p95 {fmt(res['p95_s'])}, "
        f"p99 {fmt(res['p99_s'])}, max {fmt(res['max_s'])}; published at "
        f"{res['achieved_publish_per_s']}/s (offered {res['offered_per_s']}/s); "
        f"{late} of {n} batches not committed within the wait"
    )
    print(f"  read back: {verdict(check, complete)}")
    if not check.exactly_once and (complete or check.duplicates or check.unexpected):
        b.failures.append("latency: not exactly once")
    p99 = percentile(lat, 0.99)
    b.goal(
        Goal("publish -> committed p99 at 0.5 x ceiling, delay 6 s",
             None if p99 is None else (round(p99, 3) if not math.isinf(p99) else math.inf),
             delay + GOAL_LATENCY_EXTRA_S, False, " s"),
        meter,
    )  # fmt: skip
    return res


# -- backlog -------------------------------------------------------------------------------------


def log_entries(client: Any) -> int:
    """Entries waiting in the channel logs (`snowpipe:log:*` streams) of the state DB."""
    total = 0
    for key in client.scan_iter(match=f"{LOG_PREFIX}*", count=500):
        with contextlib.suppress(Exception):
            total += int(client.xlen(key))
    return total


def run_backlog(b: Bench) -> dict[str, Any]:
    a = b.args
    n, total, pipe_names = a.backlog_batches, a.backlog_batches * a.rows, pipes(a.backlog_pipes)
    delay = 1.0
    header(
        f"bytes per append with a backlog: {n} batches x {a.rows} rows over "
        f"{a.backlog_pipes} pipe(s), appends refused (503) until the tasks are done"
    )
    batches = batch_rows(n, a.rows)
    with b.rig("backlog", delay) as r:
        node = r.start_node(app="worker", name="backlog", concurrency=a.concurrency)
        pub = r.get_publisher()
        r.emu.fault(endpoint="append", status=503)
        t0 = time.time()
        publish(pub, batches, pipe_names)
        t_pub = time.time()
        # Hold until the tasks are done: the logs stop growing (bounded by --timeout).
        history: list[int] = []

        def settled() -> bool:
            history.append(log_entries(r.db.client))
            last = history[-8:]
            return len(last) == 8 and len(set(last)) == 1 and last[-1] > 0

        held = wait_for(settled, a.timeout, interval=0.25)
        waiting = history[-1] if history else 0
        hold_s = time.time() - t_pub
        refused = r.emu.stats()["requests"].get("append", {}).get("503", 0)
        stats0 = r.emu.stats()
        with CommitSampler(r.emu) as sampler:
            meter = CpuMeter([node], r.emu, r.db.client).start()
            r.emu.clear_faults()
            t_clear = time.time()
            complete = wait_for(lambda: sampler.latest() >= total, a.timeout + delay)
            t_end = time.time()
            meter.stop()
        wait_for(lambda: r.emu.stats()["batches_pending"] == 0, delay + 5.0)
        stats1 = r.emu.stats()
        check = read_back(r.emu, pipe_names, range(total))
        if not complete:
            tail_on_failure(r, "timed out")
    appends = stats1["appends"] - stats0["appends"]
    has_bytes = "append_bytes" in stats1
    sent = (stats1["append_bytes"] - stats0["append_bytes"]) if has_bytes else None
    mean = round(sent / appends) if sent is not None and appends else None
    res = {
        "batches": n,
        "publish_s": round(t_pub - t0, 2),
        "held_s": round(hold_s, 2),
        "logs_settled": held,
        "log_entries_at_release": waiting,
        "appends_refused_while_held": refused,
        "complete": complete,
        "drain_s": round((check.last_commit() or t_end) - t_clear, 2) if complete else None,
        "appends": appends,
        "append_bytes": sent,
        "bytes_per_append": mean,
        "rows_per_append": round((stats1["rows_appended"] - stats0["rows_appended"]) / appends)
        if appends
        else None,
        **check.summary(),
        **cpu_json(meter),
    }
    print(
        f"  held {res['held_s']} s after publishing ({refused} appends refused; "
        f"{waiting} log entries waiting{'' if held else '; logs never settled'}); drain: "
        f"{appends} appends, {sent if sent is not None else 'n/a'} bytes, "
        f"{res['rows_per_append']} rows per append"
        f"{'' if complete else ', TIMED OUT'}"
    )
    print(f"  read back: {verdict(check, complete)}")
    if not check.exactly_once and (complete or check.duplicates or check.unexpected):
        b.failures.append("backlog: not exactly once")
    b.goal(
        Goal("mean bytes per append during the drain",
             None if mean is None else round(mean / MIB, 3), 1.0, True, " MiB"),
        meter,
    )  # fmt: skip
    return res


# -- naive -----------------------------------------------------------------------------------------


def run_naive(b: Bench) -> dict[str, Any]:
    a = b.args
    delay = 6.0
    n = a.concurrency * a.naive_rounds
    total = n * a.rows
    header(
        f"naive worker: {n} batches ({a.naive_rounds} x {a.concurrency} threads), commit "
        f"delay {delay:g} s"
    )
    batches = batch_rows(n, a.rows)
    with b.rig("naive", delay) as r:
        node = r.start_node(app="bench.naive_app", name="naive", concurrency=a.concurrency)
        pub = r.get_publisher()

        def finished() -> int:
            c = r.db.client
            return int(c.get(NAIVE_DONE_KEY) or 0) + int(c.get(NAIVE_FAILED_KEY) or 0)

        meter = CpuMeter([node], r.emu, r.db.client).start()
        t0 = time.time()
        publish(pub, batches, pipes(a.pipes))
        limit = a.naive_rounds * (delay + 10.0) + a.timeout
        complete = wait_for(lambda: finished() >= n, limit, interval=0.1)
        t_end = time.time()
        meter.stop()
        failed = int(r.db.client.get(NAIVE_FAILED_KEY) or 0)
        stats = r.emu.stats()
        check = read_back(r.emu, pipes(a.pipes), range(total))
        if not complete or failed:
            tail_on_failure(r, "timed out" if not complete else "failures")
    committed = stats["rows_committed"]
    elapsed = (check.last_commit() or t_end) - t0 if committed else t_end - t0
    res = {
        "batches": n,
        "complete": complete,
        "failed": failed,
        "rows_committed": committed,
        "elapsed_s": round(elapsed, 2),
        "rows_per_s": round(committed / elapsed, 1),
        "batches_per_s": round(committed / a.rows / elapsed, 2),
        "tokens_issued": stats["tokens_issued"],
        "worker_cpu_per_batch_ms": rnd(1000 * meter.worker_total / max(1, committed / a.rows), 3),
        **check.summary(),
        **cpu_json(meter),
    }
    print(
        f"  {res['rows_per_s']:,} rows/s ({res['batches_per_s']} batches/s; {committed:,}/"
        f"{total:,} rows in {res['elapsed_s']} s{'' if complete else ', TIMED OUT'}); "
        f"{failed} failed; {res['tokens_issued']} scoped tokens issued; worker CPU "
        f"{res['worker_cpu_per_batch_ms']} ms per batch"
    )
    return res


def naive_goal(b: Bench) -> None:
    naive = b.results.get("naive")
    ours = {r["commit_delay_s"]: r for r in b.results.get("ours", [])}.get(6.0)
    if not naive or not ours or not naive["rows_per_s"]:
        return
    header("ours vs naive at commit delay 6 s")
    mine = ours["steady_rows_per_s"] or ours["rows_per_s"]
    ratio = round(mine / naive["rows_per_s"], 2)
    b.results["ours_over_naive"] = ratio
    b.results["ours_over_naive_end_to_end"] = round(ours["rows_per_s"] / naive["rows_per_s"], 2)
    b.goal(Goal(f"ours / naive rows/s ({mine:,.0f} / {naive['rows_per_s']:,.0f})", ratio,
                GOAL_VS_NAIVE, True), ours["_meter"])  # fmt: skip


# -- nodes ---------------------------------------------------------------------------------------


class LazyBatches:
    """Batches built when asked for (a long paced run would not fit in memory up front)."""

    def __init__(self, count: int, rows: int) -> None:
        self.count, self.rows = count, rows

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, b: int) -> list[dict[str, Any]]:
        if not 0 <= b < self.count:
            raise IndexError(b)
        return make_rows(b * self.rows, self.rows)


def leases(client: Any) -> dict[str, str]:
    """Channel key -> node holding its lease (`snowpipe:lease:<chankey>` = node\\ttoken\\tgen)."""
    out: dict[str, str] = {}
    for key in client.scan_iter(match=f"{LEASE_PREFIX}*", count=500):
        value = client.get(key)
        if value is None:
            continue
        out[key.decode().removeprefix(LEASE_PREFIX)] = value.decode().split("\t", 1)[0]
    return out


def per_node(held: dict[str, str], names: list[str]) -> dict[str, int]:
    counts = Counter(held.values())
    return {name: counts.get(name, 0) for name in names} | {
        k: v for k, v in counts.items() if k not in names
    }


def lease_events(r: Rig) -> dict[str, dict[str, int]]:
    """`lease.*` events in each node's log (structlog JSON lines), per node and event."""
    out: dict[str, dict[str, int]] = {}
    for node in r.nodes:
        counts: Counter[str] = Counter()
        for line in node.log().splitlines():
            if '"lease.' not in line or not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(line).get("event", "")
                if event.startswith("lease."):
                    counts[event] += 1
        out[node.name] = dict(counts)
    return out


def run_nodes(b: Bench, k: int) -> dict[str, Any]:
    a = b.args
    delay = 1.0
    channels = a.node_pipes * a.channels_per_pipe
    ttl = a.lease_ttl
    header(
        f"{k} nodes: {a.node_pipes} pipes x {a.channels_per_pipe} channels = {channels} "
        f"channels, threads x {a.node_concurrency} each, load {a.node_rate:g} batches/s, "
        f"lease TTL {ttl:g} s, visibility timeout {a.node_visibility:g} s"
    )
    pipe_names = pipes(a.node_pipes)
    with b.rig(f"nodes{k}", delay, visibility_timeout_seconds=a.node_visibility) as r:
        names = [f"n{i}@bench" for i in range(1, k + 1)]
        nodes = [
            r.start_node(app="worker", name=f"n{i}", concurrency=a.node_concurrency)
            for i in range(1, k + 1)
        ]
        pub = r.get_publisher()
        stop = threading.Event()
        published: dict[int, float] = {}
        longest = a.settle_timeout + ttl + 60.0 + a.after_kill
        source = LazyBatches(int(a.node_rate * longest), a.rows)
        errors: list[str] = []

        def producer() -> None:
            try:
                publish(pub, source, pipe_names, rate=a.node_rate, stop=stop, published=published)
            except Exception as exc:  # noqa: BLE001 (reported below)
                errors.append(repr(exc))

        thread = threading.Thread(target=producer, daemon=True)
        meter = CpuMeter(nodes, r.emu, r.db.client).start()
        t0 = time.monotonic()
        thread.start()
        try:
            # 1. Settle: every channel leased and the split unchanged for 3 s.
            snapshots: list[tuple[float, dict[str, int]]] = []
            settled_at: float | None = None

            def settled() -> bool:
                nonlocal settled_at
                held = leases(r.db.client)
                now = time.monotonic()
                snapshots.append((now, per_node(held, names)))
                if len(held) < channels:
                    return False
                same = [s for t, s in snapshots if now - t <= 3.0]
                if snapshots[0][0] > now - 3.0 or any(s != snapshots[-1][1] for s in same):
                    return False
                settled_at = now - t0
                return True

            is_settled = wait_for(settled, a.settle_timeout, interval=0.5)
            split = snapshots[-1][1] if snapshots else {}
            counts = [split.get(n, 0) for n in names]
            spread = max(counts) - min(counts) if counts and sum(counts) else None
            print(
                f"  leases per node {split} ({sum(counts)}/{channels} channels held; "
                f"{'settled after %.1f s' % settled_at if is_settled else 'NOT SETTLED within %g s' % a.settle_timeout})"  # noqa: E501, UP031
            )
            # 2. Kill -9 the node holding the most leases (the last one when none are held).
            victim_i = max(range(k), key=lambda i: (counts[i], i)) if counts else k - 1
            victim, victim_name = nodes[victim_i], names[victim_i]
            held_before = leases(r.db.client)
            orphaned = sorted(c for c, n in held_before.items() if n == victim_name)
            victim.kill()
            t_kill = time.monotonic()

            def taken_over() -> bool:
                held = leases(r.db.client)
                return all(held.get(c) not in (None, victim_name) for c in orphaned)

            took = wait_for(taken_over, ttl + 30.0, interval=0.1) if orphaned else False
            takeover_s = round(time.monotonic() - t_kill, 2) if took else None
            after = per_node(leases(r.db.client), [n for n in names if n != victim_name])
            print(
                f"  killed {victim_name} holding {len(orphaned)} leases; "
                + (f"all taken over by the survivors after {takeover_s} s"
                   if took else "no leases to take over" if not orphaned
                   else f"NOT taken over within {ttl + 30:g} s")
                + f"; leases now {after}"
            )  # fmt: skip
            # 3. A little more load, then stop publishing and wait for every row.
            time.sleep(a.after_kill)
        finally:
            stop.set()
            thread.join(30)
        sent = len(published)
        total = sent * a.rows
        complete = wait_for(
            lambda: r.emu.stats()["rows_committed"] >= total,
            a.node_visibility + a.timeout, interval=0.25,
        )  # fmt: skip
        meter.stop()
        wait_for(lambda: r.emu.stats()["batches_pending"] == 0, delay + 5.0)
        stats = r.emu.stats()
        check = read_back(r.emu, pipe_names, range(total))
        events = lease_events(r)
        if not complete or not check.exactly_once:
            tail_on_failure(r, "timed out" if not complete else "not exactly once")
    res = {
        "nodes": k,
        "channels": channels,
        "settled": is_settled,
        "settle_s": rnd(settled_at, 1),
        "leases_per_node": split,
        "lease_spread": spread,
        "victim": victim_name,
        "victim_leases": len(orphaned),
        "takeover_s": takeover_s,
        "leases_after_takeover": after,
        "published": sent,
        "publish_errors": errors,
        "complete": complete,
        "rows_committed": stats["rows_committed"],
        "lease_events": events,
        **check.summary(),
        **cpu_json(meter),
    }
    print(
        f"  published {sent} batches; {stats['rows_committed']:,}/{total:,} rows committed"
        f"{'' if complete else ' (TIMED OUT)'}; read back: "
        f"{verdict(check, complete)}; lease events {events}"
    )
    if not check.exactly_once and (complete or check.duplicates or check.unexpected):
        b.failures.append(f"nodes {k}: not exactly once")
    b.goal(Goal(f"{k} nodes: leases max - min", spread, GOAL_LEASE_SPREAD, False), meter)
    b.goal(Goal(f"{k} nodes: takeover of a killed node's channels", takeover_s,
                ttl + GOAL_TAKEOVER_EXTRA_S, False, " s"), meter)  # fmt: skip
    return res


# -- drain ---------------------------------------------------------------------------------------

DRAIN_PHASES = (
    "drain-noop", "drain-6s", "drain-1s", "drain-1000", "drain-6s-ndjson", "drain-1000-ndjson",
)  # fmt: skip
GOAL_DRAIN_SHARE = 0.85
GOAL_DRAIN_CPU_RATIO = 1.25
GOAL_DRAIN_DELAY_RATIO = 0.95
GOAL_DRAIN_MB_PER_S = 40.0
GOAL_DRAIN_CPU_PER_MB_MS = 25.0
MB = 1_000_000
TIMES = "\N{MULTIPLICATION SIGN}"
MB_DEFINITION = (
    "MB = 1e6 bytes of the rows' compact JSON (sum of len(orjson.dumps(row)) + 1 newline)"
)


def row_json_bytes(rows: list[dict[str, Any]]) -> int:
    """Bytes of the rows as compact JSON lines (orjson, one newline each)."""
    return sum(len(orjson.dumps(row)) + 1 for row in rows)


def find_pyspy() -> str | None:
    """py-spy on PATH or next to this interpreter (.venv/bin)."""
    here = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(here) if here.exists() else None)


class PySpy:
    """`py-spy record` of a process tree (GIL holders only, idle threads not sampled) into a
    collapsed-stack file (`--format raw`: open it in speedscope.app or feed it to
    flamegraph.pl); stopped with SIGINT."""

    def __init__(self, exe: str, pid: int, out: Path, label: str, rate: int = 100) -> None:
        self.out, self.label = out, label
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            exe, "record", "--pid", str(pid), "--format", "raw", "--output", str(out),
            "--rate", str(rate), "--gil", "--subprocesses", "--nonblocking",
        ]  # fmt: skip
        self._log = out.with_suffix(".log").open("wb")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()

    def top(self, n: int = 20) -> tuple[int, list[tuple[str, int, int]]]:
        """(samples, [(function (file), own samples, total samples)]) by own samples."""
        own: Counter[str] = Counter()
        incl: Counter[str] = Counter()
        lines: Counter[str] = Counter()
        samples = 0
        if not self.out.exists():
            return 0, []
        for line in self.out.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            k = int(count)
            samples += k
            raw = stack.split(";")
            frames = [frame_name(f) for f in raw]
            own[frames[-1]] += k
            lines[raw[-1]] += k
            for f in set(frames):
                incl[f] += k
        hottest: dict[str, str] = {}
        for frame, _ in lines.most_common():
            hottest.setdefault(frame_name(frame), frame.rpartition(":")[2].rstrip(")"))
        return samples, [
            (f"{f[:-1]}:{hottest.get(f, '?')})" if f.endswith(")") else f, c, incl[f])
            for f, c in own.most_common(n)
        ]


def frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`: one entry per function."""
    name, _, where = frame.partition(" (")
    if not where:
        return frame
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short})"


def run_drain(
    b: Bench,
    phase: str,
    *,
    app: str,
    delay: float,
    n: int,
    rows: int,
    profile: bool = False,
    round_no: int = 0,
    form: str = "rows",
) -> dict[str, Any]:
    """Fill the queue with `n` batches (no worker running), then start one node and time its
    drain: steady rate between 10 % and 90 % done, node start -> last commit (or last task), and
    the CPU of the node's process tree from its start to then."""
    a = b.args
    noop = app == "bench.noop_app"
    total_rows = n * rows
    pipe_names = pipes(a.pipes)
    header(
        f"{phase}: {'plain Celery no-op task' if noop else 'the worker'}, {n:,} batches x "
        f"{rows} rows over {a.pipes} pipes queued first, then one node ({a.pool} x "
        f"{a.concurrency})"
        + (" + a pump-only node" if a.pump_process and not noop else "")
        + ("" if noop else f", commit delay {delay:g} s, rate limit 10/s")
        + (f", published in the {form} form" if form != "rows" else "")
        + (", PROFILED with py-spy" if profile else "")
    )  # fmt: skip
    source = LazyBatches(n, rows)
    tag = phase.replace("-", "_") + (f"_r{round_no}" if round_no else "")
    with b.rig(tag, delay) as r:
        pub = r.get_publisher()
        # 1. Fill the queue: every batch published before any worker runs.
        data_bytes = 0
        t_fill = time.time()
        for bi in range(n):
            batch = source[bi]
            data_bytes += row_json_bytes(batch)
            pub.publish(batch, database=DATABASE, schema=SCHEMA,
                        pipe=pipe_names[bi % len(pipe_names)], batch_id=f"b{bi}",
                        form=form)  # type: ignore[arg-type]  # fmt: skip
        fill_s = time.time() - t_fill
        queued = int(r.db.client.llen(r.queue)) if a.broker == "redis" else None
        print(
            f"  queued {n:,} batches ({data_bytes / MB:.1f} MB of row JSON) in {fill_s:.1f} s"
            + (f"; {queued:,} messages in the Redis list" if queued is not None else "")
        )
        # 2. Start one node and sample its progress.
        if noop:
            target = n

            def progress() -> int:
                return int(r.db.client.get(NOOP_DONE_KEY) or 0)
        else:
            target = total_rows
            http = httpx.Client(base_url=r.emu.url, timeout=5.0)

            def progress() -> int:
                return int(http.get("/_emulator/stats").json()["rows_committed"])

        spies: list[PySpy] = []
        split = a.pump_process and not noop
        meter = CpuMeter([], r.emu, r.db.client).start()
        # The worker's messages taken off the queue and acknowledged (Redis broker: neither in
        # the list nor in kombu's `unacked` hash; a message put back in the queue counts again
        # only when it is taken again): the drain rate in the no-op's own terms.
        taken_client = r.db.client if a.broker == "redis" and not noop else None

        def taken() -> int:
            assert taken_client is not None
            pipe = taken_client.pipeline(transaction=False)
            pipe.llen(r.queue)
            pipe.hlen("unacked")
            queued_now, unacked = pipe.execute()
            return n - int(queued_now) - int(unacked)

        taken_ctx = (
            CountSampler(taken, 0.05) if taken_client is not None else contextlib.nullcontext()
        )
        with CountSampler(progress, 0.05 if noop else 0.1) as sampler, taken_ctx as taken_sampler:
            t_start = time.time()
            if split:
                # The pumps in a node of their own: it consumes only the control queue.
                pump = r.start_node(app=app, name=f"{tag}_pump", concurrency=1, pool="threads",
                                    extra_args=["--exclude-queues", r.queue])  # fmt: skip
                meter.workers.append(pump)
            env = {**r.env, "SNOWPIPE_PUMP_ENABLED": "false"} if split else None
            node = r.start_node(app=app, name=tag, concurrency=a.concurrency, pool=a.pool, env=env)
            meter.workers.append(node)
            t_ready = time.time()
            pids = [w.pid for w in meter.workers]
            cpu_ready = sum(group_cpu(pid) for pid in pids)
            if profile:
                exe = find_pyspy()
                if exe is None:
                    raise RuntimeError(
                        "py-spy not found on PATH or next to this Python: "
                        f"{Path(sys.executable).parent}/pip install py-spy"
                    )
                spies = [PySpy(exe, w.pid, b.profile_dir / f"{phase}-{w.name}.pyspy.txt", w.name)
                         for w in meter.workers]  # fmt: skip
            complete = wait_for(lambda: sampler.latest() >= target, a.drain_timeout + delay)
            cpus_end = {w.name: group_cpu(w.pid) for w in meter.workers}
            cpu_end = sum(cpus_end.values())
            t_seen = time.time()
            meter.stop()
            for spy in spies:
                spy.stop()
            if noop:
                time.sleep(1.0)  # a task run twice would show as a count above n
        if not noop:
            http.close()
        # 3. Read back.
        if noop:
            done = progress()
            once = done == n
            check_text = f"{done:,} task runs for {n:,} messages -> " + (
                "exactly once" if once else f"NOT EXACTLY ONCE ({done - n:+,})"
            )
            last = sampler.reached(n) if complete else None
            done_rows = done * rows
        else:
            wait_for(lambda: r.emu.stats()["batches_pending"] == 0, delay + 5.0)
            stats = r.emu.stats()
            check = read_back(r.emu, pipe_names, range(total_rows))
            once = check.exactly_once
            check_text = (
                f"read back {check.rows:,} rows: {check.duplicates} duplicates, {check.missing} "
                f"missing, {check.unexpected} unexpected -> {verdict(check, complete)}"
            )
            last = check.last_commit() if complete else None
            done_rows = stats["rows_committed"]
        if not complete:
            tail_on_failure(r, "timed out")
    drain_s = (last or t_seen) - t_start
    steady_taken = taken_sampler.steady_rate(n) if taken_sampler is not None else None
    taken_end = taken_sampler.reached(n) if taken_sampler is not None else None
    steady = sampler.steady_rate(target)  # tasks/s (no-op) or rows/s
    window = sampler.window(target)
    steady_batches = steady if noop else (steady / rows if steady else None)
    bytes_per_row = data_bytes / total_rows
    mb = done_rows * bytes_per_row / MB
    res: dict[str, Any] = {
        "phase": phase,
        "app": app,
        "commit_delay_s": None if noop else delay,
        "batches": n,
        "rows_per_batch": rows,
        "pool": a.pool,
        "concurrency": a.concurrency,
        "complete": complete,
        "fill_s": round(fill_s, 2),
        "queued_messages": queued,
        "row_json_mb": round(data_bytes / MB, 2),
        "node_ready_s": round(t_ready - t_start, 2),
        "drain_s": round(drain_s, 2),
        "steady_window_s": rnd(window, 2),
        "steady_batches_per_s": rnd(steady_batches, 1),
        # the worker: batches taken off the queue and acknowledged per s (no-op: = the above)
        "steady_taken_per_s": rnd(steady_batches if noop else steady_taken, 1),
        "queue_empty_s": rnd(taken_end - t_start if taken_end else None, 2),
        "steady_rows_per_s": rnd(steady_batches * rows if steady_batches else None, 0),
        "steady_mb_per_s": rnd(
            steady_batches * rows * bytes_per_row / MB if steady_batches else None, 2
        ),
        "mean_batches_per_s": round(done_rows / rows / drain_s, 1),
        "mean_mb_per_s": round(mb / drain_s, 2),
        "nodes": [w.name for w in meter.workers],
        "worker_cpu_s": round(cpu_end, 2),
        "worker_cpu_s_per_node": {k: round(v, 2) for k, v in cpus_end.items()},
        "worker_cpu_at_ready_s": round(cpu_ready, 2),
        "worker_cpu_per_batch_ms": rnd(1000 * cpu_end / max(1, done_rows / rows), 3),
        "worker_cpu_per_batch_after_ready_ms": rnd(
            1000 * (cpu_end - cpu_ready) / max(1, done_rows / rows), 3
        ),
        "worker_cpu_per_mb_ms": rnd(1000 * cpu_end / mb if mb else None, 2),
        "worker_cpu_percent": round(100 * cpu_end / max(1e-9, t_seen - t_start), 1),
        "exactly_once": once,
        **cpu_json(meter),
    }
    if not noop:
        res.update({
            "appends": stats["appends"], "append_bytes": stats.get("append_bytes"),
            "open_channels": stats["open_channels"], "errors": emulator_errors(stats),
            **check.summary(),
        })  # fmt: skip
    unit = "tasks" if noop else "batches"
    print(
        f"  steady (10-90 %) {res['steady_batches_per_s']} {unit}/s = "
        f"{res['steady_rows_per_s']} rows/s = {res['steady_mb_per_s']} MB/s; node start -> "
        f"last {'task' if noop else 'commit'} {res['drain_s']} s (ready after "
        f"{res['node_ready_s']} s){'' if complete else ', TIMED OUT'}"
    )
    print(
        f"  worker CPU (process tree, node start -> end) {res['worker_cpu_s']} s "
        f"({res['worker_cpu_at_ready_s']} s of it starting up) = "
        f"{res['worker_cpu_per_batch_ms']} ms per batch, {res['worker_cpu_per_mb_ms']} ms per MB"
    )
    if not noop and res["steady_taken_per_s"] is not None:
        print(
            f"  off the queue (10-90 %) {res['steady_taken_per_s']} batches/s taken and "
            f"acknowledged; queue empty {res['queue_empty_s']} s after node start"
        )
    if not noop and window is not None and window < 2 * delay:
        print(
            f"  NOTE: the 10-90 % window ({window:.1f} s) is shorter than twice the commit delay: "
            "the steady rate is that of the commits' bursts more than of the drain (more batches "
            "give a longer drain)"
        )
    if len(cpus_end) > 1:
        print(f"  worker CPU per node: {res['worker_cpu_s_per_node']} s (pump node: consumes no "
              "ingest queue; consumer node: SNOWPIPE_PUMP_ENABLED=false)")  # fmt: skip
    if not noop:
        print(
            f"  emulator: {res['appends']:,} appends on {res['open_channels']} channels, "
            f"errors {res['errors'] or 'none'}"
        )
    print(f"  {check_text}")
    print(f"  {saturation(meter.percents(), b.cores)}")
    if not once and (complete or not noop):
        b.failures.append(f"{phase}: not exactly once")
    elif not complete:
        b.failures.append(f"{phase}: timed out")
    for spy in spies:
        samples, top = spy.top(20)
        res.setdefault("profile", []).append(
            {"file": str(spy.out), "samples": samples, "top_own": [list(t) for t in top]}
        )
        print(
            f"  py-spy of node {spy.label}: "
            f"{samples} samples holding the GIL (100 Hz, over {t_seen - t_start:.1f} s) -> "
            f"{spy.out}\n  top {len(top)} by own time (% of the samples; hottest line):"
        )
        print(f"  {'own %':>6} {'total %':>7}  function (file:line)")
        for f, own, incl in top:
            print(f"  {100 * own / max(1, samples):6.1f} {100 * incl / max(1, samples):7.1f}  {f}")
    res["_meter"] = meter
    return res


@dataclass
class Row:
    """One line of the drain goals table."""

    figure: str
    goal: str
    measured: str
    met: bool | None
    meter: CpuMeter | None = None


def drain_goals(b: Bench) -> list[Row]:
    d = b.results.get("drain") or {}
    noop, d6, d1, d1000, d6n, d1000n = (d.get(p) for p in DRAIN_PHASES)
    rows: list[Row] = []

    def add(figure: str, goal: Goal, shown: str, meter: CpuMeter | None) -> None:
        b.goals.append(goal)
        op = "≥" if goal.higher_is_better else "≤"
        rows.append(Row(figure, f"{op} {goal.target:g}{goal.unit}", shown, goal.met, meter))

    def ratio(x: float | None, y: float | None) -> float | None:
        return rnd(x / y, 3) if x and y else None

    m6 = d6 and d6["_meter"]
    share = ratio(d6 and d6["steady_taken_per_s"], noop and noop["steady_taken_per_s"])
    add("drain rate at 6 s commits ÷ plain Celery no-op's",
        Goal("drain: batches/s off the queue at 6 s / no-op tasks/s", share, GOAL_DRAIN_SHARE,
             True, TIMES),
        f"{share:g}{TIMES} ({d6['steady_taken_per_s']} / {noop['steady_taken_per_s']} per s)"
        if share else "n/a", m6)  # fmt: skip
    cpu = ratio(d6 and d6["worker_cpu_per_batch_ms"], noop and noop["worker_cpu_per_batch_ms"])
    add("CPU per 100-row batch ÷ the no-op's",
        Goal("drain: worker CPU per batch at 6 s / no-op's", cpu, GOAL_DRAIN_CPU_RATIO, False,
             TIMES),
        f"{cpu:g}{TIMES} ({d6['worker_cpu_per_batch_ms']} / {noop['worker_cpu_per_batch_ms']} ms)"
        if cpu else "n/a", m6)  # fmt: skip
    dr = ratio(d6 and d6["steady_rows_per_s"], d1 and d1["steady_rows_per_s"])
    add("committed at 6 s ÷ at 1 s (steady rates)",
        Goal("drain: steady rows/s at 6 s / at 1 s", dr, GOAL_DRAIN_DELAY_RATIO, True),
        f"{dr:g} ({d6['steady_rows_per_s']:,.0f} / {d1['steady_rows_per_s']:,.0f} rows/s)"
        if dr else "n/a", m6)  # fmt: skip
    m1000 = d1000 and d1000["_meter"]
    mbs = d1000 and d1000["steady_mb_per_s"]
    add("1000-row batches at 6 s: MB/s of row JSON by one node",
        Goal("drain: 1000-row batches at 6 s, steady MB/s of row JSON", mbs,
             GOAL_DRAIN_MB_PER_S, True, " MB/s"),
        f"{mbs:g} MB/s ({d1000['steady_rows_per_s']:,.0f} rows/s)" if mbs else "n/a",
        m1000)  # fmt: skip
    per_mb = d1000 and d1000["worker_cpu_per_mb_ms"]
    add("worker CPU per MB of row JSON",
        Goal("drain: worker CPU per MB of row JSON (1000-row batches)", per_mb,
             GOAL_DRAIN_CPU_PER_MB_MS, False, " ms"),
        f"{per_mb:g} ms" if per_mb else "n/a", m1000)  # fmt: skip
    # The same figures for batches published in the NDJSON form (`form="ndjson"`).
    share_n = ratio(d6n and d6n["steady_taken_per_s"], noop and noop["steady_taken_per_s"])
    add("NDJSON form: drain rate at 6 s ÷ the no-op's",
        Goal("drain, ndjson form: batches/s off the queue at 6 s / no-op tasks/s", share_n,
             GOAL_DRAIN_SHARE, True, TIMES),
        f"{share_n:g}{TIMES} ({d6n['steady_taken_per_s']} / {noop['steady_taken_per_s']} "
        "per s)" if share_n else "n/a", d6n and d6n["_meter"])  # fmt: skip
    cpu_n = ratio(d6n and d6n["worker_cpu_per_batch_ms"], noop and noop["worker_cpu_per_batch_ms"])
    add("NDJSON form: CPU per 100-row batch ÷ the no-op's",
        Goal("drain, ndjson form: worker CPU per batch at 6 s / no-op's", cpu_n,
             GOAL_DRAIN_CPU_RATIO, False, TIMES),
        f"{cpu_n:g}{TIMES} ({d6n['worker_cpu_per_batch_ms']} / "
        f"{noop['worker_cpu_per_batch_ms']} ms)" if cpu_n else "n/a",
        d6n and d6n["_meter"])  # fmt: skip
    mbs_n = d1000n and d1000n["steady_mb_per_s"]
    add("NDJSON form: 1000-row batches at 6 s, MB/s of row JSON",
        Goal("drain, ndjson form: 1000-row batches at 6 s, steady MB/s of row JSON", mbs_n,
             GOAL_DRAIN_MB_PER_S, True, " MB/s"),
        f"{mbs_n:g} MB/s ({d1000n['steady_rows_per_s']:,.0f} rows/s)" if mbs_n else "n/a",
        d1000n and d1000n["_meter"])  # fmt: skip
    per_mb_n = d1000n and d1000n["worker_cpu_per_mb_ms"]
    add("NDJSON form: worker CPU per MB of row JSON",
        Goal("drain, ndjson form: worker CPU per MB of row JSON (1000-row batches)", per_mb_n,
             GOAL_DRAIN_CPU_PER_MB_MS, False, " ms"),
        f"{per_mb_n:g} ms" if per_mb_n else "n/a", d1000n and d1000n["_meter"])  # fmt: skip
    ran = [(p, r) for p, r in d.items() if r]
    bad = [p for p, r in ran if not r["exactly_once"]]
    missing = [p for p in b.drain_phases if not d.get(p) or d[p].get("rounds_failed")]
    once = Goal("drain: exactly once in every phase", float(len(bad) + len(missing)), 0, False)
    once_met = once.met if ran else None
    b.goals.append(once)
    rows.append(Row(
        "exactly once in every phase", "always",
        (f"{len(ran) - len(bad)}/{len(ran)} phases"
         + (f" (NOT: {', '.join(bad)})" if bad else "")
         + (f" ({', '.join(missing)} failed)" if missing else "")),
        once_met and not missing,
    ))  # fmt: skip
    return rows


def print_drain_table(b: Bench, rows: list[Row]) -> None:
    header("drain goals (cost per row)")
    verdict_of = {True: "met", False: "NOT MET", None: "not measured"}
    w = max(len(r.figure) for r in rows)
    print(f"  {'figure':<{w}}  {'goal':<10}  measured")
    for r in rows:
        print(f"  {r.figure:<{w}}  {r.goal:<10}  {r.measured} -> {verdict_of[r.met]}")
    rounds = b.args.drain_rounds
    print(
        f"  ({MB_DEFINITION}; rates are steady rates, 10 % -> 90 % of the drain"
        + (f"; figures are medians of {rounds} rounds, the phases interleaved)" if rounds > 1
           else ")")
    )  # fmt: skip
    for r in rows:
        if r.met is False and r.meter is not None and r.meter.used:
            print(f"  not met, {r.figure}: {saturation(r.meter.percents(), b.cores)}")
    print("\n| figure | goal | measured |\n|---|---|---|")
    for r in rows:
        print(f"| {r.figure} | {r.goal} | {r.measured} ({verdict_of[r.met]}) |")


MEDIAN_KEYS = (
    "steady_batches_per_s", "steady_taken_per_s", "queue_empty_s", "steady_rows_per_s",
    "steady_mb_per_s", "drain_s",
    "worker_cpu_s", "worker_cpu_per_batch_ms", "worker_cpu_per_mb_ms",
)  # fmt: skip


def combine(runs: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One phase over its rounds: the median of each figure, exactly once only if every round
    was; the last round's other fields (and CPU meter). One round: that round as it is."""
    ok = [r for r in runs if r]
    if not ok:
        return None
    if len(runs) == 1:
        return {**ok[0], "rounds_failed": 0}
    out = dict(ok[-1])
    for k in MEDIAN_KEYS:
        values = [r[k] for r in ok if r.get(k) is not None]
        out[k] = round(statistics.median(values), 3) if values else None
    out["exactly_once"] = all(r["exactly_once"] for r in ok)
    out["rounds_failed"] = len(runs) - len(ok)
    out["rounds"] = [
        None if r is None else {k: r.get(k) for k in (*MEDIAN_KEYS, "exactly_once", "cpu_percent")}
        for r in runs
    ]
    return out


def run_drains(b: Bench) -> None:
    a = b.args
    specs = {
        "drain-noop": {"app": "bench.noop_app", "delay": 6.0, "n": a.drain_batches, "rows": 100},
        "drain-6s": {"app": "worker", "delay": 6.0, "n": a.drain_batches, "rows": 100},
        "drain-1s": {"app": "worker", "delay": 1.0, "n": a.drain_batches, "rows": 100},
        "drain-1000": {"app": "worker", "delay": 6.0, "n": a.drain_1000_batches, "rows": 1000},
        "drain-6s-ndjson": {"app": "worker", "delay": 6.0, "n": a.drain_batches, "rows": 100,
                            "form": "ndjson"},
        "drain-1000-ndjson": {"app": "worker", "delay": 6.0, "n": a.drain_1000_batches,
                              "rows": 1000, "form": "ndjson"},
    }  # fmt: skip
    out: dict[str, Any] = {}
    b.results["drain"] = out
    n = a.drain_rounds
    rounds: dict[str, list[dict[str, Any] | None]] = {name: [] for name in b.drain_phases}
    for i in range(1, n + 1):
        if n > 1:
            header(f"drain round {i} of {n} (the phases interleaved)")
        for name in b.drain_phases:
            r = b.phase(
                name if n == 1 else f"{name} round {i}",
                lambda name=name, i=i: run_drain(b, name, round_no=i if n > 1 else 0,
                                                 **specs[name]),
            )  # fmt: skip
            rounds[name].append(r)
    for name, runs in rounds.items():
        out[name] = combine(runs)
    if n > 1:
        header(f"drain: medians of {n} rounds")
        for name, r in out.items():
            if r:
                per = "/".join(str(x["steady_batches_per_s"]) for x in r["rounds"] if x)
                cpu = "/".join(str(x["worker_cpu_per_batch_ms"]) for x in r["rounds"] if x)
                print(
                    f"  {name}: steady {per} -> {r['steady_batches_per_s']} per s; CPU per batch "
                    f"{cpu} -> {r['worker_cpu_per_batch_ms']} ms"
                    + (f"; {r['rounds_failed']} round(s) failed" if r["rounds_failed"] else "")
                )
    for name in a.profile:
        tag = f"{name}-profiled"
        r = b.phase(tag, lambda tag=tag, name=name: run_drain(b, tag, profile=True, **specs[name]))
        if r is not None:
            b.results.setdefault("drain_profile", {})[name] = r


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of ~1-2 min")
    p.add_argument("--only", default=",".join(PHASES),
                   help=f"comma-separated of {PHASES}; `drain` = every drain-* phase")  # fmt: skip
    p.add_argument("--broker", choices=("redis", "amqp"), default="redis")
    p.add_argument("--concurrency", type=int, default=64, help="threads (processes) per worker")
    p.add_argument("--pool", choices=("threads", "prefork"), default="threads",
                   help="pool of the drain phases' nodes (no-op and worker alike)")  # fmt: skip
    p.add_argument("--profile", nargs="?", const="drain-6s", default="",
                   help="run drain-6s (or the drain phases named, comma-separated) once more "
                   "under py-spy: a collapsed-stack file and the top functions by own time "
                   "(py-spy on PATH or in .venv/bin)")  # fmt: skip
    p.add_argument("--profile-dir", help="where the py-spy file goes (default: the work dir, "
                   "deleted at the end unless --keep-logs)")  # fmt: skip
    p.add_argument("--pump-process", action="store_true",
                   help="drain phases of the worker with two nodes: one consuming with "
                   "SNOWPIPE_PUMP_ENABLED=false, one running the pumps and consuming no ingest "
                   "queue (CPU is the sum of both process trees)")  # fmt: skip
    p.add_argument("--drain-batches", type=int, help="batches of 100 rows per drain phase")
    p.add_argument("--drain-1000-batches", type=int, help="batches of 1000 rows (drain-1000)")
    p.add_argument("--drain-rounds", type=int, default=1,
                   help="run the drain phases this many times, interleaved (noop, 6s, 1s, "
                   "1000, noop, ...); the goals use each figure's median")  # fmt: skip
    p.add_argument("--drain-timeout", type=float, help="longest drain of one phase (s)")
    p.add_argument("--rows", type=int, default=100, help="rows per batch")
    p.add_argument("--pipes", type=int, default=10, help="pipes of the single-node phases")
    p.add_argument("--commit-delay", type=float, nargs="+", default=[6.0, 1.0],
                   help="commit delays of the `ours` phase")  # fmt: skip
    p.add_argument(
        "--commit-poll",
        type=float,
        default=None,
        help="SNOWPIPE_COMMIT_POLL_SECONDS (default: the product's)",
    )
    p.add_argument("--channels-per-pipe", type=int, default=4)
    p.add_argument("--lease-ttl", type=float, default=10.0, help="SNOWPIPE_LEASE_TTL_SECONDS")
    p.add_argument("--load", type=float, help="the ceiling (tasks/s) when it is not measured")
    sizes = ", ".join(f"{k} {FULL[k]} (quick {QUICK[k]})" for k in FULL)
    p.add_argument("--ceiling-batches", type=int)
    p.add_argument("--ours-batches", type=int)
    p.add_argument("--latency-seconds", type=float)
    p.add_argument("--backlog-batches", type=int)
    p.add_argument("--backlog-pipes", type=int, default=1)
    p.add_argument("--naive-rounds", type=int, help="batches = rounds x concurrency")
    p.add_argument("--nodes", help="node counts of the nodes phase, e.g. 2,4")
    p.add_argument("--node-pipes", type=int, default=10)
    p.add_argument("--node-concurrency", type=int, default=16)
    p.add_argument("--node-rate", type=float, default=50.0, help="batches/s in the nodes phase")
    p.add_argument("--node-visibility", type=float, default=30.0,
                   help="SNOWPIPE_VISIBILITY_TIMEOUT_SECONDS in the nodes phase")  # fmt: skip
    p.add_argument("--after-kill", type=float, default=5.0, help="seconds of load after takeover")
    p.add_argument("--settle-timeout", type=float)
    p.add_argument("--timeout", type=float, help="longest wait for commits in a phase")
    p.add_argument("--keep-logs", action="store_true")
    p.epilog = f"Sizes (full run): {sizes}."
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    only = [p for x in only for p in (DRAIN_PHASES if x == "drain" else (x,))]
    args.only = [p for p in PHASES if p in only] + [x for x in only if x not in PHASES]
    unknown = [x for x in args.only if x not in PHASES]
    if unknown:
        p.error(f"--only: unknown phase(s) {unknown}; choose from {PHASES}")
    args.node_counts = [int(x) for x in str(args.nodes).split(",") if x.strip()]
    args.profile = [x.strip() for x in args.profile.split(",") if x.strip()]
    if any(x not in DRAIN_PHASES or x == "drain-noop" for x in args.profile):
        p.error(f"--profile: choose from {DRAIN_PHASES[1:]}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    b = Bench(args, workdir, key_pair("bench").write_private(workdir / "key.pem"))
    started = time.monotonic()
    import worker

    print(
        f"bench/throughput.py: {os.cpu_count()} cores, {args.broker} broker, "
        f"{args.pool if b.drain_phases else 'threads'} x {args.concurrency}, {args.rows} rows "
        f"per batch, phases {','.join(args.only)}"
        f"{' (quick)' if args.quick else ''}; worker code from {Path(worker.__file__).parent}"
    )

    phase = b.phase
    try:
        if b.drain_phases:
            run_drains(b)
        if "ceiling" in args.only:
            b.results["ceiling"] = phase("ceiling", lambda: run_ceiling(b))
        if "ours" in args.only:
            runs = [phase(f"ours {d:g}", lambda d=d: run_ours(b, d)) for d in args.commit_delay]
            b.results["ours"] = [r for r in runs if r]
            ours_goals(b)
        if "latency" in args.only:
            b.results["latency"] = phase("latency", lambda: run_latency(b))
        if "backlog" in args.only:
            b.results["backlog"] = phase("backlog", lambda: run_backlog(b))
        if "naive" in args.only:
            b.results["naive"] = phase("naive", lambda: run_naive(b))
            naive_goal(b)
        if "nodes" in args.only:
            b.results["nodes"] = [
                r
                for k in args.node_counts
                if (r := phase(f"nodes {k}", lambda k=k: run_nodes(b, k)))
            ]
    finally:
        if args.keep_logs:
            print(f"\nlogs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    header(f"summary ({time.monotonic() - started:.0f} s)")
    for g in b.goals:
        print(f"  {g.line()}")
    for f in b.failures:
        print(f"  FAILURE {f}")
    if b.drain_phases:
        print_drain_table(b, drain_goals(b))
    for r in [*(b.results.get("ours") or []), *(b.results.get("drain") or {}).values(),
              *(b.results.get("drain_profile") or {}).values()]:  # fmt: skip
        if r:
            r.pop("_meter", None)
    figures = {
        "benchmark": "throughput",
        "cpus": os.cpu_count(),
        "broker": args.broker,
        "pool": args.pool,
        "concurrency": args.concurrency,
        "rows_per_batch": args.rows,
        "quick": args.quick,
        "phases": args.only,
        "elapsed_s": round(time.monotonic() - started, 1),
        "goals": [g.as_json() for g in b.goals],
        "failures": b.failures,
        **b.results,
    }
    print(json.dumps(figures, default=lambda o: None if isinstance(o, float) else str(o)))
    return 1 if b.failures else 0


if __name__ == "__main__":
    sys.exit(main())
