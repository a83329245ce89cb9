"""How much a crash of the state Redis can lose: the durability window of acknowledged batches.

`ingest_batch` acknowledges a batch once it is in its channel log on the state Redis; until
Snowflake commits it, that log is its only copy. This bench kills the state Redis mid-run
(SIGKILL), starts it again on the same port and data dir (it replays its AOF), lets the worker
carry on, and counts the acknowledged batches whose rows never reached Snowflake.

Setup per scenario: a private `redis-server` as the STATE store only (`--appendonly yes
--appendfsync <policy> --save ""`), the Celery broker on a claimed DB of the shared Redis (the
kill does not touch the queue), the emulator with commits paused during each cycle (so batches
sit in the logs when the state Redis dies), one real worker (threads pool).

Each cycle: pause commits; publish batches with known ids at a steady rate; after `--before`
seconds kill -9 the state Redis; keep publishing; start it again after `--down` seconds; stop
publishing `--after` seconds later; wait until every published batch was acknowledged (the
worker's `Task snowpipe.ingest_batch[...] succeeded ...: {'batch_id': ..., 'outcome': 'logged'}`
lines); resume commits; wait until the logs are empty; read the committed rows back.

Scenarios:

- `everysec-kill`, `always-kill`: a process crash (kill -9). What Redis had written to the AOF
  is in the kernel's page cache and survives a process crash whatever the fsync policy.
- `everysec-powerloss`: a simulated power loss (or kernel crash) under `everysec`: besides the
  kill -9, the AOF is cut back to the length it had `--unsynced` seconds (1 s) before the kill,
  the most an `everysec` fsync leaves unsynced on a healthy disk (it may reach 2 s when the
  disk stalls). Under `always` every acknowledged write was fsynced before Redis answered it,
  so a power loss cuts nothing that was acknowledged: `always-kill` stands for it.

Per cycle it prints the batches acknowledged in the last second before the kill, the lost
(acknowledged, never committed) and the duplicated batches, then the max per scenario and one
JSON line. Exit status 1 if anything is lost or duplicated under `always`, or a wait times out.

    .venv/bin/python bench/durability.py                 # all three scenarios, 3 kills each
    .venv/bin/python bench/durability.py --scenarios always-kill --kills 1 --rate 100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._harness import (  # noqa: E402
    DATABASE,
    SCHEMA,
    known_settings,
    launch_node,
    make_rows,
    start_emulator,
    wait_for,
)
from tests.support.celery import CeleryProcess, unique_queue, worker_env  # noqa: E402
from tests.support.emulator import RunningEmulator  # noqa: E402
from tests.support.keys import key_pair  # noqa: E402
from tests.support.redis import PrivateRedis, claimed_db  # noqa: E402
from worker.publish import Publisher  # noqa: E402
from worker.settings import load_settings  # noqa: E402

SCENARIOS = ("everysec-kill", "everysec-powerloss", "always-kill")
ACK_TIMEOUT = 90.0
DRAIN_TIMEOUT = 90.0
AOF_SAMPLE_SECONDS = 0.01
# "[2026-01-01 12:00:00,123: INFO/MainProcess] Task snowpipe.ingest_batch[id] succeeded in
# 0.004s: {'batch_id': 'x', 'outcome': 'logged', ...}" (or the same fields as JSON).
SUCCEEDED = re.compile(
    r"Task snowpipe\.ingest_batch\[[^\]]+\] succeeded in [0-9.e-]+s: "
    r"\{['\"]batch_id['\"]: ['\"]([^'\"]+)['\"], ['\"]outcome['\"]: ['\"]([a-z_]+)['\"]"
)
STAMP = re.compile(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d+Z?)")
ACKED = ("logged", "already_logged")


# -- acknowledgements from the worker log ------------------------------------------------------


def parse_stamp(line: str) -> float | None:
    """The wall-clock time of a log line (the worker's JSON `timestamp`, UTC with a Z; a plain
    Celery stamp is local time)."""
    found = STAMP.findall(line)
    if not found:
        return None
    text = found[-1].replace(",", ".")
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(text).timestamp()
    return None


def acknowledgements(worker: CeleryProcess) -> dict[str, float]:
    """batch id -> when the worker first acknowledged it (logged or found already logged)."""
    out: dict[str, float] = {}
    for line in worker.log().splitlines():
        m = SUCCEEDED.search(line)
        if m and m.group(2) in ACKED and m.group(1) not in out:
            out[m.group(1)] = parse_stamp(line) or 0.0
    return out


# -- the state Redis and its AOF ---------------------------------------------------------------


def aof_tail(server: PrivateRedis) -> Path | None:
    """The AOF file Redis appends to (7.x: the last `*.incr.aof` of appendonlydir)."""
    files = sorted(
        (server.data_dir / "appendonlydir").glob("*.incr.aof"),
        key=lambda p: int(p.name.split(".")[-3]),
    )
    return files[-1] if files else None


class AofSampler:
    """A thread recording (time, length) of the AOF every 10 ms."""

    def __init__(self, server: PrivateRedis) -> None:
        self._server = server
        self.samples: list[tuple[float, Path, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            path = aof_tail(self._server)
            if path is not None:
                with contextlib.suppress(OSError):
                    self.samples.append((time.time(), path, path.stat().st_size))
            self._stop.wait(AOF_SAMPLE_SECONDS)

    def __enter__(self) -> AofSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def length_at(self, when: float) -> tuple[Path, int] | None:
        """The AOF file and its length at the last sample taken at or before `when`."""
        before = [s for s in self.samples if s[0] <= when]
        return (before[-1][1], before[-1][2]) if before else None


def log_entries(client: Any) -> int:
    """Entries left in every channel log."""
    return sum(int(client.xlen(k)) for k in client.scan_iter("snowpipe:log:*", count=500))


# -- one scenario -------------------------------------------------------------------------------


@dataclass
class Cycle:
    """One kill and what it lost."""

    published: int
    acked: int
    acked_last_second: int
    lost: int
    lost_rows: int
    duplicated: int
    duplicate_rows: int
    aof_cut_bytes: int
    write_rate: float  # batches acknowledged per second before the kill
    lost_ids: list[str] = field(default_factory=list)
    # When the lost batches were acknowledged, in seconds relative to the kill (min, max).
    lost_acked_from: float | None = None
    lost_acked_to: float | None = None

    def as_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["lost_ids"] = self.lost_ids[:10]
        return out


@dataclass
class Scenario:
    name: str
    fsync: str
    power_loss: bool
    cycles: list[Cycle] = field(default_factory=list)
    error: str | None = None

    def max(self, key: str) -> int:
        return max((int(getattr(c, key)) for c in self.cycles), default=0)


@contextlib.contextmanager
def state_redis(workdir: Path, fsync: str) -> Iterator[PrivateRedis]:
    server = PrivateRedis(workdir / f"state-{fsync}-{time.time_ns()}", appendfsync=fsync)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def publish_steady(
    publisher: Publisher,
    ids: list[str],
    rows: int,
    first_row: int,
    pipes: list[str],
    rate: float,
    stop: threading.Event,
    published: list[str],
) -> None:
    """Publish batch ids at `rate`/s until `stop`; rows of batch i are first_row + i*rows ..."""
    t0 = time.monotonic()
    for i, batch_id in enumerate(ids):
        if stop.is_set():
            return
        ahead = t0 + i / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        publisher.publish(
            make_rows(first_row + i * rows, rows),
            database=DATABASE,
            schema=SCHEMA,
            pipe=pipes[i % len(pipes)],
            batch_id=batch_id,
        )
        published.append(batch_id)


def run_scenario(name: str, args: argparse.Namespace, workdir: Path, key: Path) -> Scenario:
    fsync, _, kind = name.partition("-")
    sc = Scenario(name, fsync, kind == "powerloss")
    pipes = [f"D{i}" for i in range(args.pipes)]
    emu = start_emulator(workdir, args.commit_delay, rate_limit=10.0)
    worker: CeleryProcess | None = None
    publisher: Publisher | None = None
    try:
        with state_redis(workdir, fsync) as server, claimed_db() as broker:
            env = worker_env(
                emu,
                broker.url,
                key,
                queue=unique_queue("dur"),
                state_url=server.url(0),
                channels_per_pipe=2,
            )
            publisher = Publisher(load_settings(**known_settings(env)))
            worker = launch_node(env, workdir, app="worker", name=f"dur-{name}", concurrency=8)
            state = server.client(0, socket_timeout=5)
            try:
                warm_up(args, emu, state, publisher, pipes, name)
                for k in range(args.kills):
                    cycle = run_cycle(sc, k, args, emu, server, state, worker, publisher, pipes)
                    sc.cycles.append(cycle)
                    print_cycle(sc, k, cycle)
                if worker.process.poll() is not None:
                    sc.error = "the worker exited"
            finally:
                state.close()
    except TimeoutError as exc:
        sc.error = str(exc)
        if worker is not None:
            print(worker.log_tail(), file=sys.stderr)
    finally:
        if worker is not None:
            worker.stop()
        if publisher is not None:
            publisher.close()
        emu.stop()
    return sc


def warm_up(
    args: argparse.Namespace,
    emu: RunningEmulator,
    state: Any,
    publisher: Publisher,
    pipes: list[str],
    name: str,
) -> None:
    """Log a few batches on every channel and wait until they commit: the pumps are running."""
    for i in range(40):
        publisher.publish(
            make_rows(900_000_000 + i * args.rows, args.rows),
            database=DATABASE,
            schema=SCHEMA,
            pipe=pipes[i % len(pipes)],
            batch_id=f"{name}-warm-{i}",
        )

    def committed() -> bool:
        return emu.stats()["rows_committed"] >= 40 * args.rows and log_entries(state) == 0

    if not wait_for(committed, DRAIN_TIMEOUT, interval=0.5):
        raise TimeoutError(f"the warm-up batches did not commit in {DRAIN_TIMEOUT} s")


def run_cycle(
    sc: Scenario,
    k: int,
    args: argparse.Namespace,
    emu: RunningEmulator,
    server: PrivateRedis,
    state: Any,
    worker: CeleryProcess,
    publisher: Publisher,
    pipes: list[str],
) -> Cycle:
    total = int(args.rate * (args.before + args.down + args.after)) + 1
    ids = [f"{sc.name}-k{k}-b{i}" for i in range(total)]
    first_row = k * 10_000_000
    row_of = {bid: first_row + i * args.rows for i, bid in enumerate(ids)}
    emu.pause_commits(True)
    published: list[str] = []
    stop = threading.Event()
    pub = threading.Thread(
        target=publish_steady,
        args=(publisher, ids, args.rows, first_row, pipes, args.rate, stop, published),
        daemon=True,
    )
    cut = 0
    with AofSampler(server) as aof:
        started = time.time()
        pub.start()
        time.sleep(args.before)
        killed = time.time()
        server.stop(kill=True)
    if sc.power_loss:
        cut = cut_aof(aof, killed - args.unsynced)
    time.sleep(args.down)
    server.start()
    time.sleep(args.after)
    stop.set()
    pub.join(30)
    if pub.is_alive():
        raise TimeoutError("publishing did not finish")
    sent = set(published)

    def acked_all() -> bool:
        return sent <= acknowledgements(worker).keys()

    if not wait_for(acked_all, ACK_TIMEOUT, interval=0.5):
        missing = len(sent - acknowledgements(worker).keys())
        raise TimeoutError(f"{missing} of {len(sent)} batches not acknowledged in {ACK_TIMEOUT} s")
    emu.pause_commits(False)

    def drained() -> bool:
        return log_entries(state) == 0 and emu.stats()["batches_pending"] == 0

    if not wait_for(drained, DRAIN_TIMEOUT, interval=0.5):
        raise TimeoutError(f"the channel logs did not drain in {DRAIN_TIMEOUT} s")
    acks = {b: t for b, t in acknowledgements(worker).items() if b in row_of}
    seen: Counter[int] = Counter()
    for pipe in pipes:
        for r in emu.rows(DATABASE, SCHEMA, pipe):
            i = int(r["row"]["id"])
            if first_row <= i < first_row + total * args.rows:
                seen[i] += 1
    lost, dup, lost_rows, dup_rows = [], 0, 0, 0
    for bid in sorted(acks):
        rows = range(row_of[bid], row_of[bid] + args.rows)
        absent = sum(1 for r in rows if seen[r] == 0)
        extra = sum(seen[r] - 1 for r in rows if seen[r] > 1)
        if absent:
            lost.append(bid)
            lost_rows += absent
        if extra:
            dup += 1
            dup_rows += extra
    before_kill = [t for t in acks.values() if started <= t < killed]
    lost_at = [acks[b] - killed for b in lost]
    span = max(1e-9, killed - started)
    return Cycle(
        published=len(sent),
        acked=len(acks),
        acked_last_second=sum(1 for t in before_kill if t >= killed - 1.0),
        lost=len(lost),
        lost_rows=lost_rows,
        duplicated=dup,
        duplicate_rows=dup_rows,
        aof_cut_bytes=cut,
        write_rate=round(len(before_kill) / span, 1),
        lost_ids=lost,
        lost_acked_from=round(min(lost_at), 3) if lost_at else None,
        lost_acked_to=round(max(lost_at), 3) if lost_at else None,
    )


def cut_aof(aof: AofSampler, when: float) -> int:
    """Truncate the AOF to its length at `when` (what a power loss leaves); bytes cut."""
    at = aof.length_at(when)
    if at is None:
        return 0
    path, length = at
    size = path.stat().st_size
    if size <= length:
        return 0
    with path.open("r+b") as f:
        f.truncate(length)
    return size - length


# -- output -------------------------------------------------------------------------------------


def print_cycle(sc: Scenario, k: int, c: Cycle) -> None:
    cut = f", AOF cut by {c.aof_cut_bytes} B" if sc.power_loss else ""
    if c.lost_acked_from is not None:
        cut += f"; the lost were acknowledged {c.lost_acked_from:+.3f} .. {c.lost_acked_to:+.3f} s"
        cut += " from the kill"
    print(
        f"  {sc.name} kill {k + 1}: {c.write_rate:g} batches/s acknowledged before the kill, "
        f"{c.acked_last_second} in its last second; lost {c.lost} batches ({c.lost_rows} rows), "
        f"duplicated {c.duplicated} ({c.duplicate_rows} rows){cut}; "
        f"{c.acked}/{c.published} acknowledged",
        flush=True,
    )


def summary(sc: Scenario) -> dict[str, Any]:
    return {
        "scenario": sc.name,
        "appendfsync": sc.fsync,
        "power_loss_simulated": sc.power_loss,
        "kills": len(sc.cycles),
        "max_acked_last_second": sc.max("acked_last_second"),
        "max_lost": sc.max("lost"),
        "max_duplicated": sc.max("duplicated"),
        "write_rate": max((c.write_rate for c in sc.cycles), default=0.0),
        "cycles": [c.as_json() for c in sc.cycles],
        "error": sc.error,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of {', '.join(SCENARIOS)}",
    )
    p.add_argument("--kills", type=int, default=3, help="kill cycles per scenario (3)")
    p.add_argument("--rate", type=float, default=200.0, help="batches published per second")
    p.add_argument("--rows", type=int, default=10, help="rows per batch (10)")
    p.add_argument("--pipes", type=int, default=2, help="pipes, 2 channels each (2)")
    p.add_argument("--before", type=float, default=3.0, help="publish this long before the kill")
    p.add_argument("--down", type=float, default=1.0, help="the state Redis stays down this long")
    p.add_argument("--after", type=float, default=2.0, help="publish this long after the restart")
    p.add_argument(
        "--unsynced",
        type=float,
        default=1.0,
        help="powerloss: the AOF loses what was written this long before the kill",
    )
    p.add_argument("--commit-delay", type=float, default=0.5, help="emulator commit delay")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    names = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {SCENARIOS}")
    args.scenarios = names
    return args  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-durability-"))
    workdir.mkdir(parents=True, exist_ok=True)
    key = key_pair("bench").write_private(workdir / "key.pem")
    print(
        f"durability of acknowledged batches: state Redis kill -9 + restart, {args.rate:g} "
        f"batches/s x {args.rows} rows, {args.kills} kills per scenario (logs in {workdir})",
        flush=True,
    )
    results = []
    for name in args.scenarios:
        print(f"\n== {name}", flush=True)
        sc = run_scenario(name, args, workdir, key)
        results.append(sc)
        print(
            f"  max over {len(sc.cycles)} kills: {sc.max('acked_last_second')} acknowledged in "
            f"the last second, {sc.max('lost')} lost, {sc.max('duplicated')} duplicated"
            + (f"; ERROR: {sc.error}" if sc.error else ""),
            flush=True,
        )
    ok = True
    for sc in results:
        if sc.error or len(sc.cycles) < args.kills:
            ok = False
        if sc.fsync == "always" and (sc.max("lost") or sc.max("duplicated")):
            ok = False
            print(f"UNEXPECTED: {sc.name} lost or duplicated acknowledged batches", flush=True)
        if any(c.duplicated for c in sc.cycles):
            ok = False
            print(f"UNEXPECTED: {sc.name} duplicated batches", flush=True)
    print(
        json.dumps(
            {
                "bench": "durability",
                "ok": ok,
                "rate": args.rate,
                "rows": args.rows,
                "scenarios": [summary(sc) for sc in results],
            }
        ),
        flush=True,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
