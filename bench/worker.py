"""End-to-end throughput of one `celery -A worker worker`: publish -> append -> commit -> ack.

    .venv/bin/python bench/worker.py [--batches 2000] [--rows 100] [--pipes 10]
        [--concurrency 64] [--commit-delay 1.0 0.2] [--broker redis|amqp]

About 60 s with the defaults (a no-op baseline, then one run per commit delay: 1.0 s, the
emulator's default, and 0.2 s).

The product's target is 100 channels x 500 appends/min (~833 appends/s) with exactly-once
delivery. One run, on loopback only:

1. Baseline: a no-op Celery app (bench/noop_app.py: the product's Celery configuration, the
   task registered under the ingest task's name, its body one Redis INCR) on the same broker,
   pool and concurrency; the same messages are published the same way. Its tasks/s is what
   Celery and the broker can do on this machine at all.
2. For each --commit-delay: the emulator (`--rate-limit 0 --accept-any-pipe`), a claimed Redis
   DB, one real worker (`--pool threads`), B batches of R rows over P pipes published as fast as
   one thread can, a wait until every batch is acknowledged and every row committed, then every
   committed row read back: each id exactly once.

Figures: publish rate; end-to-end batches/s and rows/s (first publish -> last acknowledgement);
appends/s as the emulator counted them and appends per channel per minute; publish -> ack
latency per batch (publish time here, the worker's `ingest.committed` log time there) and the
time inside the task; token refreshes, retries, error responses; CPU seconds of the worker, the
emulator, this process (the publisher) and the shared Redis, read from /proc and INFO. Every
worker's work is in one process (threads pool), so its CPU share shows whether it is CPU-bound.

Stops by itself: every wait is bounded (--timeout). Cleans up: processes stopped, RabbitMQ
queues deleted, the claimed Redis DBs emptied (all their keys were created here) and released.
Prints readable figures, then one JSON line with all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.celery import (  # noqa: E402
    ACCOUNT,
    USER,
    CeleryProcess,
    delete_rabbit_queues,
    make_rows,
    settings_overrides,
    unique_queue,
    worker_env,
)
from tests.support.emulator import RunningEmulator, launch_emulator  # noqa: E402
from tests.support.keys import key_pair  # noqa: E402
from tests.support.redis import RedisDB, claimed_db  # noqa: E402
from worker import runtime  # noqa: E402
from worker.publish import Publisher  # noqa: E402
from worker.settings import Settings, load_settings  # noqa: E402
from worker.tokenstore import TokenStore  # noqa: E402

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
DATABASE, SCHEMA = "BENCH", "PUBLIC"
TARGET_APPENDS_PER_S = 100 * 500 / 60  # 100 channels x 500 appends/min
TARGET_PER_CHANNEL_PER_MIN = 500.0
POLL_SECONDS = 0.02
NOOP_DONE_KEY = "bench:noop:done"  # bench/noop_app.py counts its runs here


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree_cpu(proc: CeleryProcess) -> float:
    """CPU seconds of a celery process and its pool children (none with the threads pool)."""
    return cpu_seconds(proc.pid) + sum(cpu_seconds(kid) for kid in proc.children())


def redis_cpu(db: RedisDB) -> float:
    """CPU seconds of the Redis server so far (shared with other users of it)."""
    info = db.client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def own_cpu() -> float:
    """CPU seconds of this process (the publisher and the polling)."""
    t = os.times()
    return t.user + t.system


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of `values` by nearest rank, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` every POLL_SECONDS until true (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


@dataclass
class Setup:
    """What every phase shares: the options, the key, the directory for logs."""

    args: argparse.Namespace
    key_path: Path
    workdir: Path

    @property
    def pipes(self) -> list[str]:
        return [f"P{i}" for i in range(self.args.pipes)]

    def broker_url(self, db: RedisDB) -> str:
        return db.url if self.args.broker == "redis" else RABBIT_URL

    def env(self, emu: RunningEmulator, db: RedisDB, queue: str) -> dict[str, str]:
        # The product's defaults apart from the identity and URLs (the test helper sets a faster
        # commit poll for tests: put the configured one back).
        return worker_env(
            emu,
            self.broker_url(db),
            self.key_path,
            queue=queue,
            state_url=db.url,
            commit_poll_seconds=self.args.commit_poll,
        )


def launch_celery(env: dict[str, str], setup: Setup, *, app: str, name: str) -> CeleryProcess:
    """`celery -A <app> worker --pool threads`, ready (the flags of tests.support's launcher)."""
    log_path = setup.workdir / f"worker-{name}.log"
    cmd = [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "--pool", "threads", "--concurrency", str(setup.args.concurrency),
        "--hostname", f"{name}@bench", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    worker = CeleryProcess(process, log_path, name)
    if not wait_for(lambda: "ready." in worker.log() or process.poll() is not None, 60.0) or (
        process.poll() is not None
    ):
        worker.stop()
        raise RuntimeError(f"worker {name} did not become ready\n{worker.log_tail()}")
    return worker


def start_emulator(setup: Setup, commit_delay: float) -> RunningEmulator:
    """The emulator with no rate limit, any pipe accepted, and the bench key registered."""
    emu = launch_emulator(
        "--rate-limit", "0", "--accept-any-pipe", "--commit-delay", str(commit_delay),
        workdir=setup.workdir / f"emulator-{commit_delay:g}",
    )  # fmt: skip
    emu.register_key(ACCOUNT, USER, key_pair("bench").public_pem)
    return emu


def publish_all(
    publisher: Publisher, setup: Setup, rows: list[list[dict[str, Any]]]
) -> tuple[dict[str, float], float, float]:
    """Publish every batch round-robin over the pipes; (batch_id -> publish time, start, end).

    Times are wall-clock (they are compared with the worker's log timestamps).
    """
    pipes = setup.pipes
    published: dict[str, float] = {}
    started = time.time()
    for b, batch in enumerate(rows):
        batch_id = publisher.publish(
            batch, database=DATABASE, schema=SCHEMA, pipe=pipes[b % len(pipes)]
        )
        published[batch_id] = time.time()
    return published, started, time.time()


def all_rows(setup: Setup) -> list[list[dict[str, Any]]]:
    """B batches of R rows with unique ids 0 .. B*R - 1 (built before the clock starts)."""
    r = setup.args.rows
    return [make_rows(b * r, r) for b in range(setup.args.batches)]


def cleanup_queues(setup: Setup, queue: str) -> None:
    if setup.args.broker == "amqp":
        delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")


def run_baseline(
    setup: Setup, emu: RunningEmulator, rows: list[list[dict[str, Any]]]
) -> dict[str, Any]:
    """No-op tasks/s on the same broker, pool and concurrency, with the same messages."""
    args = setup.args
    with claimed_db() as db:
        queue = unique_queue("bench-noop")
        env = setup.env(emu, db, queue)
        publisher = Publisher(load_settings(**settings_overrides(env)))
        worker = launch_celery(env, setup, app="bench.noop_app", name="noop")
        try:
            cpu0 = process_tree_cpu(worker)
            _, started, published_at = publish_all(publisher, setup, rows)
            done = wait_for(
                lambda: int(db.client.get(NOOP_DONE_KEY) or 0) >= len(rows), args.timeout
            )
            finished = time.time()
            worker_cpu = process_tree_cpu(worker) - cpu0
            ran = int(db.client.get(NOOP_DONE_KEY) or 0)
        finally:
            worker.stop()
            publisher.close()
            cleanup_queues(setup, queue)
    elapsed = finished - started
    return {
        "tasks": ran,
        "complete": done,
        "publish_per_s": round(len(rows) / (published_at - started), 1),
        "tasks_per_s": round(ran / elapsed, 1),
        "elapsed_s": round(elapsed, 2),
        "worker_cpu_s": round(worker_cpu, 2),
    }


def committed_log_entries(worker: CeleryProcess) -> dict[str, tuple[float, float]]:
    """batch_id -> (wall time of the worker's `ingest.committed` line, seconds inside the task)."""
    entries: dict[str, tuple[float, float]] = {}
    for line in worker.log().splitlines():
        if '"ingest.committed"' not in line or not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
            at = datetime.fromisoformat(record["timestamp"]).timestamp()
        except (ValueError, KeyError):
            continue
        entries[record["batch_id"]] = (at, float(record.get("seconds", 0.0)))
    return entries


def read_back(emu: RunningEmulator, pipes: Sequence[str], total: int) -> dict[str, int]:
    """Every committed row read back: how many ids are duplicated, missing or unexpected."""
    seen: Counter[int] = Counter()
    for pipe in pipes:
        seen.update(int(r["row"]["id"]) for r in emu.rows(DATABASE, SCHEMA, pipe))
    return {
        "rows_read_back": sum(seen.values()),
        "duplicates": sum(n - 1 for n in seen.values() if n > 1),
        "missing": sum(1 for i in range(total) if i not in seen),
        "unexpected": sum(1 for i in seen if not 0 <= i < total),
    }


def run_ingest(
    setup: Setup, emu: RunningEmulator, rows: list[list[dict[str, Any]]], commit_delay: float
) -> dict[str, Any]:
    """The real worker: publish, wait for every ack and commit, verify exactly once."""
    args = setup.args
    batches, total = len(rows), len(rows) * args.rows
    with claimed_db() as db:
        queue = unique_queue("bench-ingest")
        env = setup.env(emu, db, queue)
        settings: Settings = load_settings(**settings_overrides(env))
        publisher = Publisher(settings)
        name = f"ingest{commit_delay:g}".replace(".", "_")
        worker = launch_celery(env, setup, app="worker", name=name)
        try:
            stats0 = emu.stats()
            cpu0 = (
                process_tree_cpu(worker),
                cpu_seconds(emu.process.pid),
                own_cpu(),
                redis_cpu(db),
            )

            def finished() -> bool:
                c = runtime.counters(db.client)
                acked = c.get("committed", 0) + c.get("already_committed", 0)
                return acked + c.get("dead_letter", 0) >= batches

            published, started, published_at = publish_all(publisher, setup, rows)
            acked = wait_for(finished, args.timeout)
            acked_at = time.time()
            committed = wait_for(lambda: emu.stats()["rows_committed"] >= total, 10.0)
            cpu1 = (
                process_tree_cpu(worker),
                cpu_seconds(emu.process.pid),
                own_cpu(),
                redis_cpu(db),
            )
            # A duplicate would still be in flight: let the emulator commit what it holds.
            wait_for(lambda: emu.stats()["batches_pending"] == 0, commit_delay + 5.0)
            stats = emu.stats()
            counters = runtime.counters(db.client)
            refreshes = TokenStore(db.client, runtime.identity(settings)).refresh_counts()
            dead = int(db.client.llen("snowpipe:dead"))
            check = read_back(emu, setup.pipes, total)
        finally:
            worker.stop()
            publisher.close()
            cleanup_queues(setup, queue)
        log = committed_log_entries(worker)

    latencies = [log[b][0] - t for b, t in published.items() if b in log]
    in_task = [seconds for _, seconds in log.values()]
    last_ack = max((at for at, _ in log.values()), default=acked_at)
    elapsed = (last_ack if acked else acked_at) - started
    appends = stats["appends"] - stats0["appends"]
    channels = max(1, int(stats["open_channels"]))
    errors = sum(
        n
        for by_status in stats["requests"].values()
        for status, n in by_status.items()
        if int(status) >= 400
    )
    cpu = [round(b - a, 2) for a, b in zip(cpu0, cpu1, strict=True)]
    mean_in_task = statistics.fmean(in_task) if in_task else 0.0
    per_channel_per_min = appends / channels / (elapsed / 60)
    return {
        "commit_delay_s": commit_delay,
        "complete": acked and committed,
        "exactly_once": acked
        and committed
        and check["duplicates"] == 0
        and check["missing"] == 0
        and check["unexpected"] == 0
        and dead == 0,
        "publish_per_s": round(batches / (published_at - started), 1),
        "publish_s": round(published_at - started, 2),
        "elapsed_s": round(elapsed, 2),
        "batches_per_s": round(batches / elapsed, 1),
        "rows_per_s": round(total / elapsed),
        "appends": appends,
        "appends_per_s": round(appends / elapsed, 1),
        "channels": channels,
        "appends_per_channel_per_min": round(per_channel_per_min, 1),
        "of_target_appends": round(appends / elapsed / TARGET_APPENDS_PER_S, 3),
        "latency_p50_ms": _ms(percentile(latencies, 0.5)),
        "latency_p99_ms": _ms(percentile(latencies, 0.99)),
        "latency_max_ms": _ms(max(latencies, default=None)),
        "in_task_p50_ms": _ms(percentile(in_task, 0.5)),
        "in_task_p99_ms": _ms(percentile(in_task, 0.99)),
        # Little's law: tasks running on average, against the threads available; and the rate
        # the threads allow when every task holds one for the mean time inside the task.
        "running_avg": round(batches / elapsed * mean_in_task, 1),
        "threads_bound_batches_per_s": round(args.concurrency / mean_in_task, 1)
        if mean_in_task
        else None,
        "emulator_commit_lag_avg_ms": stats["commit_lag_avg_ms"],
        "emulator_commit_lag_max_ms": stats["commit_lag_max_ms"],
        "tokens_issued": stats["tokens_issued"],
        "token_refreshes": refreshes,
        "retries_task_level": counters.get("retry_later", 0),
        "already_committed": counters.get("already_committed", 0),
        "error_responses": errors,
        "dead_letters": dead,
        "cpu_worker_s": cpu[0],
        "cpu_emulator_s": cpu[1],
        "cpu_publisher_s": cpu[2],
        "cpu_redis_shared_s": cpu[3],
        **check,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def report(result: dict[str, Any], base: dict[str, Any] | None, args: argparse.Namespace) -> None:
    r = result
    print(
        f"\n== commit delay {r['commit_delay_s']:g} s: {args.batches} batches x {args.rows} rows "
        f"over {args.pipes} pipes, threads pool x {args.concurrency}, {args.broker} broker =="
    )
    print(f"  publish: {r['publish_per_s']} batches/s ({r['publish_s']} s for all, one thread)")
    print(
        f"  end to end: {r['batches_per_s']} batches/s, {r['rows_per_s']:,} rows/s "
        f"({r['elapsed_s']} s first publish -> last ack)"
    )
    print(
        f"  emulator: {r['appends']} appends, {r['appends_per_s']} appends/s = "
        f"{r['of_target_appends']:.0%} of the {TARGET_APPENDS_PER_S:.0f}/s target; "
        f"{r['channels']} channels x {r['appends_per_channel_per_min']} appends/min each "
        f"(target {TARGET_PER_CHANNEL_PER_MIN:.0f}/min on 100 channels)"
    )
    print(
        f"  publish -> ack: p50 {r['latency_p50_ms']} ms, p99 {r['latency_p99_ms']} ms, "
        f"max {r['latency_max_ms']} ms; inside the task p50 {r['in_task_p50_ms']} ms, "
        f"p99 {r['in_task_p99_ms']} ms; emulator commit lag avg "
        f"{r['emulator_commit_lag_avg_ms']} ms"
    )
    print(
        f"  tasks running on average {r['running_avg']} of {args.concurrency} threads; "
        f"{args.concurrency} threads / mean time in task = {r['threads_bound_batches_per_s']} "
        "batches/s at most"
    )
    print(
        f"  tokens issued {r['tokens_issued']}, refreshes {r['token_refreshes'] or 'none'}; "
        f"task-level retries {r['retries_task_level']}, error responses "
        f"{r['error_responses']}, dead letters {r['dead_letters']}"
    )
    wall = r["elapsed_s"]
    print(
        f"  CPU seconds over {wall} s (2 cores = {2 * wall:.0f} CPU-s): worker "
        f"{r['cpu_worker_s']}, emulator {r['cpu_emulator_s']}, publisher "
        f"{r['cpu_publisher_s']}, Redis {r['cpu_redis_shared_s']} (shared)"
    )
    verdict = "exactly once" if r["exactly_once"] else "NOT EXACTLY ONCE"
    print(
        f"  read back {r['rows_read_back']:,} rows: {r['duplicates']} duplicates, "
        f"{r['missing']} missing, {r['unexpected']} unexpected -> {verdict}"
    )
    if base:
        print(
            f"  vs no-op baseline ({base['tasks_per_s']} tasks/s): "
            f"{r['batches_per_s'] / base['tasks_per_s']:.2f}x"
        )


def main() -> int:
    """Run the benchmark and print its figures; 1 if any run was not exactly once."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=100, help="rows per batch")
    parser.add_argument("--pipes", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=64, help="threads of the worker")
    parser.add_argument(
        "--commit-delay",
        type=float,
        nargs="+",
        default=[1.0, 0.2],
        help="emulator commit delay(s); one run per value",
    )
    parser.add_argument(
        "--commit-poll",
        type=float,
        default=0.25,
        help="SNOWPIPE_COMMIT_POLL_SECONDS (the product default is 0.25)",
    )
    parser.add_argument("--broker", choices=("redis", "amqp"), default="redis")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="longest wait for the acks after publishing, per run",
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker logs")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    setup = Setup(args, key_pair("bench").write_private(workdir / "key.pem"), workdir)
    rows = all_rows(setup)
    base: dict[str, Any] | None = None
    results: list[dict[str, Any]] = []
    try:
        for delay in args.commit_delay:
            emu = start_emulator(setup, delay)
            try:
                if base is None and not args.no_baseline:
                    base = run_baseline(setup, emu, rows)
                    print(
                        f"baseline no-op task: {base['tasks_per_s']} tasks/s "
                        f"({base['tasks']} tasks in {base['elapsed_s']} s, worker CPU "
                        f"{base['worker_cpu_s']} s; publish {base['publish_per_s']}/s)"
                    )
                result = run_ingest(setup, emu, rows, delay)
            finally:
                emu.stop()
            results.append(result)
            report(result, base, args)
    finally:
        if args.keep_logs:
            print(f"logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    figures: dict[str, Any] = {
        "benchmark": "worker_end_to_end",
        "cpus": os.cpu_count(),
        "broker": args.broker,
        "pool": "threads",
        "concurrency": args.concurrency,
        "batches": args.batches,
        "rows_per_batch": args.rows,
        "pipes": args.pipes,
        "commit_poll_s": args.commit_poll,
        "target_appends_per_s": round(TARGET_APPENDS_PER_S, 1),
        "baseline": base,
        "runs": results,
    }
    if base:
        for r in results:
            r["ratio_to_baseline"] = round(r["batches_per_s"] / base["tasks_per_s"], 3)
    print(json.dumps(figures))
    return 0 if all(r["exactly_once"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
