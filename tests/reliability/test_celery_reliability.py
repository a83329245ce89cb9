"""Exactly once despite crashes, redeliveries, invalidated channels, error storms, expiring tokens,
nodes dying or coming and going, and full channel logs: on a Redis and on a RabbitMQ broker.

Real `celery` workers (subprocesses), the emulator over HTTP, the state (channel logs, leases,
counters, dead letters) on a claimed DB of the shared Redis. The broker is that same DB
(`redis`) or the shared RabbitMQ with queues of the test's own (`rabbitmq`, deleted afterwards).
Every check reads the committed rows back from the emulator: each id exactly once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import amqp
import pytest

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    CeleryProcess,
    assert_exactly_once,
    committed_ids,
    delete_rabbit_queues,
    launch_worker,
    make_rows,
    running,
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import RunningEmulator, start_emulator
from tests.support.keys import key_pair
from tests.support.redis import RedisDB, claimed_db
from worker.delivery.channels import CHANNELS_KEY, ChannelRef
from worker.publish import Publisher
from worker.settings import load_settings

PIPES = [f"P{i}" for i in range(4)]
ROWS = 50
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"
# kombu's Redis transport keeps a queue as one list per priority step (0 is the bare name).
REDIS_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")

BROKERS = [
    pytest.param("redis", id="redis"),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
]


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Rig:
    emu: RunningEmulator
    db: RedisDB  # the state store (and the broker, on Redis)
    broker: str
    queue: str
    env: dict[str, str]
    publisher: Publisher
    tmp: Path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, first_batch: int, count: int, **kwargs: str) -> list[str]:
        with self.lock:  # one Publisher, maybe used by a publishing thread of the test
            return [
                self.publisher.publish(
                    make_rows(b * ROWS, ROWS),
                    database=DATABASE,
                    schema=SCHEMA,
                    pipe=PIPES[b % len(PIPES)],
                    **kwargs,
                )
                for b in range(first_batch, first_batch + count)
            ]

    def committed(self) -> int:
        return int(self.emu.stats()["rows_committed"])

    def stat(self, name: str) -> int:
        value = self.db.client.hget("snowpipe:stats", name)
        return int(value) if value else 0

    def channels(self) -> list[str]:
        """Every channel key that ever had a log entry."""
        return sorted(m.decode() for m in self.db.client.smembers(CHANNELS_KEY))

    def lease_holders(self) -> dict[str, str | None]:
        """channel key -> the node named by its lease key (None: nobody holds it)."""
        channels = self.channels()
        if not channels:
            return {}
        values = self.db.client.mget([f"snowpipe:lease:{c}" for c in channels])
        return {
            c: v.decode().split("\t", 1)[0] if v is not None else None
            for c, v in zip(channels, values, strict=True)
        }

    def leases_per_node(self) -> Counter[str | None]:
        return Counter(self.lease_holders().values())

    def queued(self) -> int:
        """Messages ready in the ingest queue (not those a worker holds unacknowledged)."""
        if self.broker == "redis":
            return sum(int(self.db.client.llen(self.queue + s)) for s in REDIS_PRIORITY_SUFFIXES)
        with amqp.Connection("127.0.0.1:5672", userid="guest", password="guest") as conn:
            _, ready, _ = conn.channel().queue_declare(self.queue, passive=True)
            return int(ready)

    def broker_settled(self) -> bool:
        """Nothing left in the ingest queue, and (Redis) nothing unacknowledged either."""
        if self.broker == "redis" and self.db.client.hlen("unacked"):
            return False
        return self.queued() == 0

    def diagnosis(self, total: int) -> str:
        """Where the rows are, for a failure message."""
        ids = set(committed_ids(self.emu, PIPES))
        missing = sorted(set(range(total)) - ids)
        state = self.db.client
        logs = {c: state.xlen(f"snowpipe:log:{c}") for c in self.channels()}
        broker = f"queued {self.queued()}"
        if self.broker == "redis":
            broker += (
                f", unacked {state.hlen('unacked')}, unacked_mutex ttl "
                f"{state.ttl('unacked_mutex')}"
            )
        return (
            f"{len(ids)} ids committed, {len(missing)} missing (batches "
            f"{sorted({i // ROWS for i in missing})[:20]}); {broker}; log entries "
            f"{ {c: n for c, n in logs.items() if n} }; leases {dict(self.leases_per_node())}; "
            f"stats {state.hgetall('snowpipe:stats')}"
        )

    def finish(self, batches: int, workers: list[CeleryProcess], timeout: float = 90) -> None:
        total = batches * ROWS
        try:
            wait_until(
                lambda: self.committed() >= total,
                timeout=timeout,
                what=f"{total} rows committed",
                logs=workers,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnosis(total)}") from None
        wait_until(lambda: self.emu.stats()["batches_pending"] == 0, timeout=10, what="idle")
        assert_exactly_once(self.emu, PIPES, set(range(total)), logs=workers)
        dead = self.db.client.hvals("snowpipe:letters")
        assert dead == [], dead
        for w in workers:
            assert "raised unexpected" not in w.log(), w.log_tail()


@contextmanager
def make_rig(
    tmp_path: Path, broker: str, emu_args: tuple[str, ...], **settings: object
) -> Iterator[Rig]:
    queue = unique_queue(f"rel-{broker}")
    with claimed_db() as db, start_emulator(*emu_args, workdir=tmp_path / "emu") as emu:
        emu.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        key_path = key_pair("celery").write_private(tmp_path / "key.pem")
        broker_url = db.url if broker == "redis" else RABBIT_URL
        env = worker_env(emu, broker_url, key_path, queue=queue, state_url=db.url, **settings)
        publisher = Publisher(load_settings(**settings_overrides(env)))
        try:
            yield Rig(emu, db, broker, queue, env, publisher, tmp_path)
        finally:
            publisher.close()
            if broker == "rabbitmq":
                delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")


class SteadyPublisher:
    """Publishes `per_tick` batches every `interval` seconds in a thread until stopped."""

    def __init__(self, rig: Rig, *, per_tick: int = 2, interval: float = 0.2) -> None:
        self.rig = rig
        self.per_tick = per_tick
        self.interval = interval
        self.batches = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady publish", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.rig.publish(self.batches, self.per_tick)
                self.batches += self.per_tick
                self._stop.wait(self.interval)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def __enter__(self) -> SteadyPublisher:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop publishing; how many batches were published (0 .. n-1)."""
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the publishing thread did not stop"
        if self.error is not None:
            raise AssertionError(f"publishing failed: {self.error!r}") from self.error
        return self.batches

    def __exit__(self, *exc: object) -> None:
        self.stop()


BASE_EMU = ("--commit-delay", "0.5", "--rate-limit", "0", "--accept-any-pipe")


@pytest.mark.slow
def test_kill_9_of_a_pool_child_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path, broker: str
) -> None:
    with make_rig(tmp_path, broker, BASE_EMU) as rig:
        worker = launch_worker(rig.env, tmp_path, name="kchild", pool="prefork", concurrency=4)
        with running(worker):
            rig.publish(0, 40)
            wait_until(lambda: rig.committed() >= 15 * ROWS, timeout=60, what="15 batches",
                       logs=[worker])
            children = worker.children()
            assert children, worker.log_tail()
            os.kill(children[0], signal.SIGKILL)
            # The second half goes through the pool with its child killed (the first half may
            # be all done by now: a fast run logs 40 batches in well under a second).
            rig.publish(40, 40)
            rig.finish(80, [worker])
            # The pool notices the dead child when it next maintains itself (on RabbitMQ that
            # can come after the run has finished).
            wait_until(
                lambda: "WorkerLostError" in worker.log() or "exited with" in worker.log(),
                timeout=30,
                what="the pool to report the killed child",
                logs=[worker],
            )


@pytest.mark.slow
def test_kill_9_of_the_whole_worker_mid_run_then_restart_commits_every_row_once(
    tmp_path: Path, broker: str
) -> None:
    # The dead node's unacknowledged messages come back: on Redis after the visibility timeout
    # (small here, so within the test), on RabbitMQ as soon as its connection drops.
    with make_rig(tmp_path, broker, BASE_EMU, visibility_timeout_seconds=10) as rig:
        first = launch_worker(rig.env, tmp_path, name="kall", pool="threads", concurrency=8)
        with running(first):
            rig.publish(0, 40)
            wait_until(lambda: rig.committed() >= 15 * ROWS, timeout=60, what="15 batches",
                       logs=[first])
            # Rows in flight at the crash stay uncommitted until the new worker has reopened
            # (fenced) the channels, which discards them: their batches must be appended again.
            # The second half is published with commits held, so that some are in flight.
            rig.emu.pause_commits(True)
            rig.publish(40, 40)
            wait_until(lambda: rig.emu.stats()["batches_pending"] >= 2, timeout=30,
                       what="appends in flight", logs=[first])
            first.kill()
        assert rig.committed() < 80 * ROWS, "the run ended before the kill"
        second = launch_worker(rig.env, tmp_path, name="kall", pool="threads", concurrency=8)
        with running(second):
            # Every channel reopened while commits are held: whatever the crash left in flight
            # is discarded (not committed late), so it must be appended again.
            wait_until(lambda: second.log().count("channel.opened") >= len(rig.channels()),
                       timeout=60, what="the new worker to reopen every channel",
                       logs=[second])  # fmt: skip
            rig.emu.pause_commits(False)
            rig.finish(80, [first, second], timeout=120)
            # Every message is acknowledged in the end, including the redelivered ones.
            wait_until(rig.broker_settled, timeout=60, what="no message left in the broker",
                       logs=[second])
            rig.finish(80, [first, second])
            # The crash left rows in flight that the reopen discarded; they were sent again.
            assert rig.emu.stats()["batches_discarded"] > 0
        # After a warm shutdown anything still unacknowledged would be back in the queue.
        assert rig.queued() == 0


def test_a_batch_published_twice_with_one_id_is_logged_and_sent_once(
    tmp_path: Path, broker: str
) -> None:
    fast = ("--commit-delay", "0.2", "--rate-limit", "0", "--accept-any-pipe")
    with make_rig(tmp_path, broker, fast) as rig:
        worker = launch_worker(rig.env, tmp_path, name="redeliver", pool="threads", concurrency=4)
        with running(worker):
            rig.publish(0, 1, batch_id="batch-once")
            rig.finish(1, [worker])
            appends = rig.emu.stats()["appends"]
            # The same batch again, as the broker would redeliver it.
            rig.publish(0, 1, batch_id="batch-once")
            wait_until(lambda: rig.stat("already_logged") == 1, timeout=30,
                       what="the redelivery to be acknowledged", logs=[worker])
            assert rig.emu.stats()["appends"] == appends
            rig.finish(1, [worker])


def test_a_channel_invalidated_mid_run_is_reopened_and_replayed_exactly_once(
    tmp_path: Path, broker: str
) -> None:
    with make_rig(tmp_path, broker, BASE_EMU) as rig:
        worker = launch_worker(rig.env, tmp_path, name="inval", pool="threads", concurrency=8)
        with running(worker):
            rig.emu.pause_commits(True)
            rig.publish(0, 8)
            # Every channel that logged a batch has an append in flight (coalesced: maybe one).
            wait_until(lambda: rig.emu.stats()["batches_pending"] >= 1
                       and rig.emu.stats()["batches_pending"]
                       == rig.db.client.scard("snowpipe:channels"),
                       timeout=30, what="appends in flight on every channel", logs=[worker])
            # In-flight rows are discarded by the invalidation.
            for member in rig.db.client.smembers("snowpipe:channels"):
                ref = ChannelRef.from_key(member.decode())
                rig.emu.invalidate(ref.database, ref.schema, ref.pipe, ref.channel)
            rig.emu.pause_commits(False)
            rig.publish(8, 32)
            rig.finish(40, [worker])
            # Each invalidated channel was reopened: a second open per channel at least.
            assert worker.log().count("channel.opened") >= 2 * len(PIPES), worker.log_tail()


# name -> (probability of a 503 on append, of a 429 on append, of a 503 on status; seconds)
STORMS = {
    "storm-15s": (0.15, 0.1, 0.1, 15.0),
    "5pct-20s": (0.05, 0.05, 0.05, 20.0),
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("broker", "storm"),
    [
        # 5 % faults on both brokers; the heavier storm tests the pumps, not the broker: once.
        pytest.param("redis", "storm-15s", id="redis-storm-15s"),
        pytest.param("redis", "5pct-20s", id="redis-5pct-20s"),
        pytest.param("rabbitmq", "5pct-20s", id="rabbitmq-5pct-20s", marks=pytest.mark.rabbitmq),
    ],
)
def test_503_and_429_storms_with_5_second_tokens_commit_exactly_once_without_task_failure(
    tmp_path: Path, broker: str, storm: str
) -> None:
    append_503, append_429, status_503, seconds = STORMS[storm]
    emu_args = ("--commit-delay", "0.2", "--rate-limit", "0", "--accept-any-pipe",
                "--scoped-token-ttl", "5")
    with make_rig(tmp_path, broker, emu_args) as rig:
        rig.emu.fault(endpoint="append", status=503, probability=append_503)
        rig.emu.fault(endpoint="append", status=429, probability=append_429, retry_after=0.2,
                      body={"code": "390701", "message": "rate limited"})
        rig.emu.fault(endpoint="status", status=503, probability=status_503)
        rig.emu.fault(endpoint="open", status=503, count=3)
        worker = launch_worker(rig.env, tmp_path, name="storm", pool="threads", concurrency=8)
        with running(worker):
            started = time.monotonic()
            batch = 0
            while time.monotonic() - started < seconds:  # outlive several token lifetimes
                rig.publish(batch, 4)
                batch += 4
                time.sleep(1)
            rig.finish(batch, [worker], timeout=120)
            stats = rig.emu.stats()
            assert stats["tokens_issued"] >= seconds // 5, stats
            assert stats["faults_fired"] > 0, stats


def test_appends_whose_answers_are_lost_are_settled_by_a_reopen_not_resent(
    tmp_path: Path, broker: str
) -> None:
    # The emulator accepts these appends, then drops the connection before the answer: the
    # worker cannot know whether they landed. Resending with the same continuation token could
    # commit them twice; the worker reopens the channel instead and replays what was discarded.
    with make_rig(tmp_path, broker, BASE_EMU) as rig:
        rig.emu.fault(endpoint="append", mode="drop", count=6)
        worker = launch_worker(rig.env, tmp_path, name="lost", pool="threads", concurrency=8)
        with running(worker):
            rig.publish(0, 24)
            rig.finish(24, [worker])
            stats = rig.emu.stats()
            assert stats["faults_fired"] == 6, stats
            assert stats["batches_discarded"] >= 1, stats


ALL_CHANNELS = len(PIPES) * 4  # SNOWPIPE_CHANNELS_PER_PIPE defaults to 4


def node_of(worker: CeleryProcess) -> str:
    """The node name a worker's pump registers under (its --hostname)."""
    return f"{worker.name}@test"


@pytest.mark.slow
def test_a_node_killed_for_good_hands_every_channel_to_the_survivor_within_the_lease_ttl(
    tmp_path: Path, broker: str
) -> None:
    ttl = 3
    with make_rig(tmp_path, broker, BASE_EMU, lease_ttl_seconds=ttl,
                  visibility_timeout_seconds=10) as rig:
        survivor = launch_worker(rig.env, tmp_path, name="survivor", concurrency=4)
        victim = launch_worker(rig.env, tmp_path, name="victim", concurrency=4)
        workers = [survivor, victim]
        with running(*workers), SteadyPublisher(rig) as steady:

            def both_pumping() -> bool:
                counts = rig.leases_per_node()
                return (
                    len(rig.channels()) == ALL_CHANNELS
                    and counts[node_of(survivor)] > 0
                    and counts[node_of(victim)] > 0
                    and rig.committed() >= 10 * ROWS
                )

            wait_until(both_pumping, timeout=60, what="both nodes pumping every channel",
                       logs=workers)
            victim.kill()  # kill -9 of the main process and its children
            killed_at = time.monotonic()
            wait_until(
                lambda: set(rig.lease_holders().values()) == {node_of(survivor)},
                timeout=ttl + 5,
                what=f"every lease held by the survivor (holders: {rig.leases_per_node()})",
                logs=workers,
            )
            handover = time.monotonic() - killed_at
            time.sleep(2)  # the survivor alone goes on taking the steady stream
            batches = steady.stop()
            rig.finish(batches, workers, timeout=120)
            wait_until(rig.broker_settled, timeout=60, what="no message left in the broker",
                       logs=workers)
            print(f"handover after the kill: {handover:.1f} s, {batches} batches")


@pytest.mark.slow
def test_nodes_share_the_channel_leases_evenly_as_they_join_and_leave(tmp_path: Path) -> None:
    # Leases live in the state Redis and the broker takes no part in them: one broker is enough.
    broker = "redis"
    ttl = 9
    tick = 3  # the balancer's tick: a third of the lease TTL, at most 3 s
    with make_rig(tmp_path, broker, BASE_EMU, lease_ttl_seconds=ttl) as rig:
        a = launch_worker(rig.env, tmp_path, name="share-a", concurrency=4)
        b = launch_worker(rig.env, tmp_path, name="share-b", concurrency=4)
        c: CeleryProcess | None = None
        workers = [a, b]
        with running(a, b):
            batch = 0
            while len(rig.channels()) < ALL_CHANNELS:  # every channel has had an entry
                assert batch < 400, f"only {len(rig.channels())} channels logged to"
                rig.publish(batch, 4)
                batch += 4
                time.sleep(0.1)

            def even(*nodes: CeleryProcess) -> bool:
                counts = rig.leases_per_node()
                held = [counts[node_of(n)] for n in nodes]
                return set(counts) == {node_of(n) for n in nodes} and max(held) - min(held) <= 1

            wait_until(lambda: even(a, b), timeout=30,
                       what=f"an even share over two nodes ({rig.leases_per_node()})", logs=workers)
            c = launch_worker(rig.env, tmp_path, name="share-c", concurrency=4)
            workers.append(c)
            with running(c):
                wait_until(lambda: even(a, b, c), timeout=5 * tick + 2,
                           what=f"an even share over three nodes ({rig.leases_per_node()})",
                           logs=workers)
                rig.publish(batch, 16)
                batch += 16
                b.stop()  # SIGTERM: a warm shutdown gives the leases back
                stopped_at = time.monotonic()
                assert b.process.returncode == 0, b.log_tail()
                counts = rig.leases_per_node()
                assert node_of(b) not in counts, f"leases kept after the shutdown: {counts}"
                wait_until(lambda: even(a, c), timeout=ttl - 1,
                           what=f"the two left to take b's channels ({rig.leases_per_node()})",
                           logs=workers)
                handover = time.monotonic() - stopped_at
                rig.publish(batch, 16)
                batch += 16
                rig.finish(batch, workers)
                print(f"handover after the shutdown: {handover:.1f} s")


@pytest.mark.slow
def test_full_channel_logs_push_back_into_the_queue_and_lose_nothing(
    tmp_path: Path, broker: str
) -> None:
    cap = 20000  # about ten batches of 50 rows per channel
    batch_bytes = 2500
    with make_rig(tmp_path, broker, BASE_EMU, log_max_bytes=cap, backpressure_wait_seconds=1,
                  channels_per_pipe=1) as rig:
        worker = launch_worker(rig.env, tmp_path, name="bp", pool="threads", concurrency=8)
        with running(worker):
            rig.emu.pause_commits(True)  # nothing is trimmed: the logs fill up
            rig.publish(0, 80)
            wait_until(lambda: rig.stat("backpressure") >= 20, timeout=60,
                       what="tasks to report backpressure", logs=[worker])
            assert "ingest.backpressure" in worker.log(), worker.log_tail()
            # The queue holds what the logs cannot take; the logs stay near their cap.
            wait_until(lambda: rig.queued() > 0, timeout=10, what="batches waiting in the queue",
                       logs=[worker])
            assert rig.stat("logged") < 80
            for key in rig.channels():
                used = int(rig.db.client.get(f"snowpipe:bytes:{key}") or 0)
                assert used <= cap + batch_bytes, (key, used)
            assert rig.committed() == 0
            assert rig.db.client.hlen("snowpipe:letters") == 0
            rig.emu.pause_commits(False)
            rig.finish(80, [worker], timeout=120)
            assert rig.stat("logged") == 80
            wait_until(rig.broker_settled, timeout=30, what="no message left in the broker",
                       logs=[worker])
