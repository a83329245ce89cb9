"""Shared pieces of the benchmarks that drive real `celery` workers against the emulator.

Processes (emulator, celery nodes), a claimed Redis DB and a unique queue per rig, publishing,
CPU accounting from /proc, committed-row read-back from `/_emulator/rows`, bounded waits.
Nothing here waits without a timeout; everything started here is stopped here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.celery import (  # noqa: E402
    ACCOUNT,
    USER,
    CeleryProcess,
    delete_rabbit_queues,
    unique_queue,
    worker_env,
)
from tests.support.emulator import RunningEmulator, launch_emulator  # noqa: E402
from tests.support.keys import key_pair  # noqa: E402
from tests.support.redis import RedisDB, claimed_db  # noqa: E402
from worker.publish import Publisher  # noqa: E402
from worker.settings import Settings, load_settings  # noqa: E402

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
DATABASE, SCHEMA = "BENCH", "PUBLIC"
POLL_SECONDS = 0.05
READY_TIMEOUT = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- waiting and statistics ------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = POLL_SECONDS) -> bool:
    """Poll `condition` until true (True) or until `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank; None without values (inf counts as a value)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rnd(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# -- CPU from /proc ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds_with_reaped(pid: int) -> float:
    """User + system CPU seconds of a process plus those of its children it has reaped (a
    prefork pool child that was replaced); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def group_cpu(pid: int) -> float:
    """CPU seconds of a whole process tree since it started: the process (with its reaped
    children) and every live descendant (with theirs)."""
    return cpu_seconds_with_reaped(pid) + sum(cpu_seconds_with_reaped(d) for d in descendants(pid))


def descendants(pid: int) -> list[int]:
    """Every descendant of a process (prefork children and theirs), from /proc."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in out:
                    out.append(kid)
                    todo.append(kid)
    return out


def machine_busy() -> float:
    """CPU seconds every process on the machine used so far (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu() -> float:
    """CPU seconds of this process (the publisher and the polling)."""
    t = os.times()
    return t.user + t.system


def redis_cpu(client: Any) -> float:
    """CPU seconds of the Redis server so far (shared with other users of it)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass
class CpuMeter:
    """CPU seconds per role between `start()` and `stop()`: worker mains, their descendants
    (prefork pool children), the emulator, the shared Redis and this process (the publisher)."""

    workers: list[CeleryProcess]
    emulator: RunningEmulator
    redis: Any
    used: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    _base: dict[str, float] = field(default_factory=dict)
    _kids0: dict[int, float] = field(default_factory=dict)
    _t0: float = 0.0

    def _kids(self) -> dict[int, float]:
        return {k: cpu_seconds(k) for w in self.workers for k in descendants(w.pid)}

    def _sample(self) -> dict[str, float]:
        return {
            "worker_main": sum(cpu_seconds(w.pid) for w in self.workers),
            "emulator": cpu_seconds(self.emulator.process.pid),
            "redis": redis_cpu(self.redis),
            "publisher": own_cpu(),
            "machine": machine_busy(),
        }

    def start(self) -> CpuMeter:
        self._kids0 = self._kids()
        self._base = self._sample()
        self._t0 = time.monotonic()
        return self

    def stop(self) -> dict[str, float]:
        end = self._sample()
        kids = self._kids()
        self.wall = time.monotonic() - self._t0
        self.used = {k: max(0.0, end[k] - self._base[k]) for k in end}
        # Children born meanwhile count from 0; one that died meanwhile is not counted.
        self.used["worker_children"] = sum(
            max(0.0, cpu - self._kids0.get(pid, 0.0)) for pid, cpu in kids.items()
        )
        # Everything else on the machine (other users of the shared cores and of Redis).
        machine = self.used.pop("machine")
        self.used["others"] = max(0.0, machine - sum(self.used.values()))
        return self.used

    @property
    def worker_total(self) -> float:
        return self.used.get("worker_main", 0.0) + self.used.get("worker_children", 0.0)

    def percents(self) -> dict[str, float]:
        """CPU% per role over the window (100 = one core)."""
        wall = self.wall or 1e-9
        return {k: round(100 * v / wall, 1) for k, v in self.used.items()}


def saturation(percents: dict[str, float], cores: int) -> str:
    """Which process(es) look saturated: ~one core for a single Python process (GIL), or the
    machine when all roles together use nearly every core."""
    roles = {k: v for k, v in percents.items() if k not in ("redis", "others")}
    busiest = max(roles, key=lambda k: roles[k]) if roles else "?"
    total = sum(percents.values())
    parts = [f"{k} {v:.0f}%" for k, v in sorted(percents.items(), key=lambda kv: -kv[1])]
    verdict = []
    if total >= 0.9 * 100 * cores:
        verdict.append(f"the machine ({total:.0f}% of {100 * cores}%)")
    for k, v in percents.items():
        if v >= 85 and k not in ("worker_children", "others"):
            verdict.append(f"{k} ({v:.0f}% ~ one core)")
    others = percents.get("others", 0.0)
    if not verdict and others >= 50 and total >= 0.75 * 100 * cores:
        # Other users of the shared cores took a large share: the bench's processes were short
        # of CPU without any one of them reaching a core.
        verdict.append(
            f"the machine, shared ({total:.0f}% of {100 * cores}%, others {others:.0f}%)"
        )
    what = (
        ", ".join(verdict)
        if verdict
        else (
            f"no process (busiest: {busiest}): the limit is a wait, not a full core (commits, "
            "the rate limit, or a serial path inside one process: round trips, GIL hand-offs)"
        )
    )
    return (
        f"CPU% {', '.join(parts)} (redis is shared; others = the rest of the machine) "
        f"-> saturated: {what}"
    )


# -- rows, emulator, workers ------------------------------------------------------------------


def make_rows(first_id: int, count: int) -> list[dict[str, Any]]:
    """`count` event rows (~110 bytes of JSON each, not trivially compressible), ids from
    `first_id`: the same message size for every phase."""
    rows = []
    for i in range(first_id, first_id + count):
        digest = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=12).hexdigest()
        rows.append(
            {
                "id": i,
                "ts": "2026-01-01T00:00:00.000000Z",
                "tenant": f"tenant-{i % 7}",
                "kind": "page_view",
                "value": i * 0.5,
                "token": digest,
            }
        )
    return rows


def batch_rows(batches: int, rows: int, first_batch: int = 0) -> list[list[dict[str, Any]]]:
    """Batches of `rows` rows; batch b holds ids b*rows .. b*rows + rows - 1."""
    return [make_rows(b * rows, rows) for b in range(first_batch, first_batch + batches)]


def start_emulator(
    workdir: Path, commit_delay: float, *, rate_limit: float = 10.0
) -> RunningEmulator:
    """The emulator (any pipe accepted, per-channel rate limit) with the bench key registered."""
    emu = launch_emulator(
        "--rate-limit", f"{rate_limit:g}", "--accept-any-pipe",
        "--commit-delay", f"{commit_delay:g}",
        workdir=workdir / f"emulator-{time.time_ns()}",
    )  # fmt: skip
    emu.register_key(ACCOUNT, USER, key_pair("bench").public_pem)
    return emu


def launch_node(
    env: dict[str, str],
    workdir: Path,
    *,
    app: str,
    name: str,
    concurrency: int,
    pool: str = "threads",
    extra_args: Sequence[str] = (),
) -> CeleryProcess:
    """`celery -A <app> worker --hostname <name>@bench [extra_args]`, waited for until ready
    (bounded)."""
    log_path = workdir / f"worker-{name}-{time.time_ns()}.log"
    cmd = [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "--pool", pool, "--concurrency", str(concurrency),
        "--hostname", f"{name}@bench", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat", *extra_args,
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    node = CeleryProcess(process, log_path, name)
    ready = wait_for(lambda: "ready." in node.log() or process.poll() is not None, READY_TIMEOUT)
    if not ready or process.poll() is not None:
        node.stop()
        raise RuntimeError(f"worker {name} did not become ready\n{node.log_tail()}")
    return node


def known_settings(env: dict[str, str]) -> dict[str, str]:
    """SNOWPIPE_* of `env` that this checkout's Settings knows (a worker process ignores unknown
    variables; `load_settings(**kw)` refuses unknown keywords): settings of a newer core can
    always be set in the environment."""
    fields = Settings.model_fields
    out = {}
    for k, v in env.items():
        if k.startswith("SNOWPIPE_") and k != "SNOWPIPE_CONFIG":
            name = k.removeprefix("SNOWPIPE_").lower()
            if name in fields:
                out[name] = v
    return out


@dataclass
class Rig:
    """One phase's private resources: emulator, claimed Redis DB, queue, environment."""

    emu: RunningEmulator
    db: RedisDB
    queue: str
    env: dict[str, str]
    broker: str
    workdir: Path
    nodes: list[CeleryProcess] = field(default_factory=list)
    publisher: Publisher | None = None

    def settings(self) -> Settings:
        return load_settings(**known_settings(self.env))

    def get_publisher(self) -> Publisher:
        if self.publisher is None:
            self.publisher = Publisher(self.settings())
        return self.publisher

    def start_node(
        self,
        *,
        app: str,
        name: str,
        concurrency: int,
        pool: str = "threads",
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> CeleryProcess:
        node = launch_node(
            env or self.env, self.workdir, app=app, name=name, concurrency=concurrency,
            pool=pool, extra_args=extra_args,
        )  # fmt: skip
        self.nodes.append(node)
        return node


@contextlib.contextmanager
def rig(
    workdir: Path,
    *,
    commit_delay: float,
    broker: str,
    key_path: Path,
    prefix: str,
    settings: dict[str, Any],
    rate_limit: float = 10.0,
) -> Iterator[Rig]:
    """Emulator + claimed DB + unique queue; everything stopped, deleted and released after."""
    emu = start_emulator(workdir, commit_delay, rate_limit=rate_limit)
    try:
        with claimed_db() as db:
            queue = unique_queue(f"bench-{prefix}")
            broker_url = db.url if broker == "redis" else RABBIT_URL
            env = worker_env(emu, broker_url, key_path, queue=queue, state_url=db.url, **settings)
            r = Rig(emu, db, queue, env, broker, workdir)
            try:
                yield r
            finally:
                for node in r.nodes:
                    node.stop()
                if r.publisher is not None:
                    r.publisher.close()
                if broker == "amqp":
                    delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")
    finally:
        emu.stop()


# -- publishing ----------------------------------------------------------------------------------


def pipes(n: int) -> list[str]:
    return [f"P{i}" for i in range(n)]


def publish(
    publisher: Publisher,
    batches: Sequence[list[dict[str, Any]]],
    pipe_names: Sequence[str],
    *,
    rate: float | None = None,
    stop: threading.Event | None = None,
    published: dict[int, float] | None = None,
) -> dict[int, float]:
    """Publish batches round-robin over the pipes; batch index -> wall-clock publish time.

    With `rate`, paced at that many batches/s (on a fixed schedule, so a slow call is caught up);
    `stop` ends early. `published` is filled as it goes (readable from another thread).
    """
    out = {} if published is None else published
    t0 = time.monotonic()
    for b, rows in enumerate(batches):
        if stop is not None and stop.is_set():
            break
        if rate:
            ahead = t0 + b / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        publisher.publish(
            rows,
            database=DATABASE,
            schema=SCHEMA,
            pipe=pipe_names[b % len(pipe_names)],
            batch_id=f"b{b}",
        )
        out[b] = time.time()
    return out


# -- committed rows ---------------------------------------------------------------------------


class CountSampler:
    """A thread sampling a count (`read()`, e.g. tasks done or rows committed) every `interval`
    seconds: (wall-clock time, count) pairs."""

    def __init__(self, read: Callable[[], int], interval: float = 0.1) -> None:
        self._read = read
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.time(), int(self._read())))
            self._stop.wait(self._interval)

    def __enter__(self) -> CountSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def latest(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def reached(self, count: float) -> float | None:
        """Wall-clock time of the first sample at or above `count`."""
        return next((t for t, n in self.samples if n >= count), None)

    def window(self, total: int, lo: float = 0.1, hi: float = 0.9) -> float | None:
        """Seconds between the first samples at lo and at hi of `total` (None if not reached)."""
        a, z = self.reached(lo * total), self.reached(hi * total)
        return None if a is None or z is None else z - a

    def steady_rate(self, total: int, lo: float = 0.1, hi: float = 0.9) -> float | None:
        """Count/s between the first samples at lo and at hi of `total` (the expected final count;
        None when hi was not reached)."""
        a = next((s for s in self.samples if s[1] >= lo * total), None)
        z = next((s for s in self.samples if s[1] >= hi * total), None)
        if a is None or z is None or z[0] <= a[0]:
            return None
        return (z[1] - a[1]) / (z[0] - a[0])


class CommitSampler(CountSampler):
    """A thread sampling the emulator's `rows_committed` every `interval` seconds."""

    def __init__(self, emu: RunningEmulator, interval: float = 0.2) -> None:
        import httpx

        self._http = httpx.Client(base_url=emu.url, timeout=5.0)
        super().__init__(self._rows_committed, interval)

    def _rows_committed(self) -> int:
        return int(self._http.get("/_emulator/stats").json()["rows_committed"])

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._http.close()

    def steady_rows_per_s(self, lo: float = 0.2, hi: float = 0.8) -> float | None:
        """Rows/s between the moments the count first reached lo and hi of its final value."""
        final = self.latest()
        return self.steady_rate(final, lo, hi) if final > 0 else None


@dataclass
class ReadBack:
    """Every committed row of the pipes: exactly-once counts and commit times per id."""

    rows: int
    duplicates: int
    missing: int
    unexpected: int
    committed_at: dict[int, float]  # id -> first commit time (wall clock, seconds)

    @property
    def exactly_once(self) -> bool:
        return self.duplicates == 0 and self.missing == 0 and self.unexpected == 0

    def summary(self) -> dict[str, Any]:
        return {
            "rows_read_back": self.rows,
            "duplicates": self.duplicates,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "exactly_once": self.exactly_once,
        }

    def last_commit(self) -> float | None:
        return max(self.committed_at.values(), default=None)


def read_back(emu: RunningEmulator, pipe_names: Sequence[str], expected: range) -> ReadBack:
    seen: Counter[int] = Counter()
    at: dict[int, float] = {}
    for pipe in pipe_names:
        for r in emu.rows(DATABASE, SCHEMA, pipe):
            i = int(r["row"]["id"])
            seen[i] += 1
            if i not in at:
                at[i] = int(r.get("committed_at_ms") or 0) / 1000
    return ReadBack(
        rows=sum(seen.values()),
        duplicates=sum(n - 1 for n in seen.values() if n > 1),
        missing=sum(1 for i in expected if i not in seen),
        unexpected=sum(1 for i in seen if i not in expected),
        committed_at=at,
    )


def emulator_errors(stats: dict[str, Any]) -> dict[str, int]:
    """Error responses by endpoint and status (e.g. {"append 429": 12})."""
    out: dict[str, int] = {}
    for endpoint, by_status in stats["requests"].items():
        for status, n in by_status.items():
            if int(status) >= 400:
                out[f"{endpoint} {status}"] = n
    return out
