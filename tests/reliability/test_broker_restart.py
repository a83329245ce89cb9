"""The worker survives its broker going away mid-run, and every row is still committed once.

Black-box: real `celery -A worker worker` processes, batches published with `Publisher`, rows read
back from the emulator. Nothing here looks at how a batch is delivered inside the worker.

- Redis: a private `redis-server` (AOF, fsync always) is both broker and state store; it is
  killed with SIGKILL mid-run and started again on the same port with the same data dir. The
  shared Redis on 6379 is never touched.
- RabbitMQ: the worker reaches the shared RabbitMQ through a loopback TCP proxy of the test,
  which cuts every connection mid-run and then lets the worker reconnect. The server is never
  restarted; the test's queues have unique names and are deleted afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.support.celery import (
    ACCOUNT,
    DATABASE,
    SCHEMA,
    USER,
    CeleryProcess,
    assert_exactly_once,
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
from tests.support.redis import PrivateRedis, claimed_db, private_redis
from tests.support.tcpproxy import TcpProxy
from worker.publish import Publisher
from worker.settings import load_settings

PIPES = [f"P{i}" for i in range(4)]
ROWS = 50
EMU = ("--commit-delay", "0.5", "--rate-limit", "0", "--accept-any-pipe")
DEAD_KEY = "snowpipe:letters"  # the dead letters (worker/deadletter.py)
# Small, so that messages of tasks cancelled at the connection loss (prefork) are swept back to
# the queue by the unacked restore within the test.
VISIBILITY_TIMEOUT = 10
# Publishing while the broker is down fails; the producer retries until it is back.
PUBLISH_DEADLINE = 30.0


@dataclass
class Rig:
    emu: RunningEmulator
    env: dict[str, str]
    publisher: Publisher
    state: redis.Redis  # the state store
    published: set[int] = field(default_factory=set)
    publish_failures: int = 0

    def publish(self, first_batch: int, count: int) -> None:
        """Publish batches first_batch.., retrying each until the broker takes it (bounded)."""
        for b in range(first_batch, first_batch + count):
            deadline = time.monotonic() + PUBLISH_DEADLINE
            while True:
                try:
                    self.publisher.publish(
                        make_rows(b * ROWS, ROWS),
                        database=DATABASE,
                        schema=SCHEMA,
                        pipe=PIPES[b % len(PIPES)],
                        batch_id=f"batch-{b}",  # a retried publish is deduplicated downstream
                    )
                    break
                except Exception:  # the broker's error while it is down: retry
                    self.publish_failures += 1
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            self.published.update(range(b * ROWS, (b + 1) * ROWS))

    def committed(self) -> int:
        return int(self.emu.stats()["rows_committed"])

    def finish(
        self,
        workers: list[CeleryProcess],
        timeout: float = 45,
    ) -> None:
        total = len(self.published)
        wait_until(
            lambda: self.committed() >= total,
            timeout=timeout,
            what=f"{total} rows committed",
            logs=workers,
        )
        wait_until(lambda: self.emu.stats()["batches_pending"] == 0, timeout=10, what="idle")
        assert_exactly_once(self.emu, PIPES, self.published, logs=workers)
        dead = self.state.hvals(DEAD_KEY)
        assert dead == [], dead


def assert_survived(worker: CeleryProcess) -> None:
    log = worker.log()
    assert worker.process.poll() is None, f"the worker exited\n{worker.log_tail()}"
    assert "Unrecoverable error" not in log, worker.log_tail()
    assert "raised unexpected" not in log, worker.log_tail()


@contextmanager
def emulator_and_key(tmp_path: Path) -> Iterator[tuple[RunningEmulator, Path]]:
    with start_emulator(*EMU, workdir=tmp_path / "emu") as emu:
        emu.register_key(ACCOUNT, USER, key_pair("celery").public_pem)
        yield emu, key_pair("celery").write_private(tmp_path / "key.pem")


@contextmanager
def redis_rig(tmp_path: Path) -> Iterator[tuple[Rig, PrivateRedis]]:
    with private_redis(tmp_path / "redis") as server, emulator_and_key(tmp_path) as (emu, key):
        env = worker_env(
            emu,
            server.url(0),
            key,
            queue=unique_queue("brk"),
            state_url=server.url(0),
            visibility_timeout_seconds=VISIBILITY_TIMEOUT,
        )
        publisher = Publisher(load_settings(**settings_overrides(env)))
        state = server.client(0)
        try:
            yield Rig(emu, env, publisher, state), server
        finally:
            publisher.close()
            state.close()


def _logged(state: redis.Redis) -> int:
    """How many batches the workers wrote to channel logs (the `logged` counter)."""
    try:
        value = state.hget("snowpipe:stats", "logged")
    except redis.RedisError:
        return 0
    return int(value) if value else 0


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_redis_broker_restarted_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path, pool: str
) -> None:
    _restart_mid_run(tmp_path, pool, kill=False)


@pytest.mark.slow
def test_a_redis_broker_killed_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    _restart_mid_run(tmp_path, "threads", kill=True)


def _restart_mid_run(tmp_path: Path, pool: str, *, kill: bool) -> None:
    """A Redis broker that goes away mid-run, with messages being handed over and tasks running:
    the worker keeps running and every row is committed exactly once. (kombu's own transport
    loses a message whose BRPOP reply was unread when the connection was torn down; the
    project's transport claims each message atomically, worker/broker.py.)"""
    with redis_rig(tmp_path) as (rig, server):
        worker = launch_worker(rig.env, tmp_path, name=f"brk-{pool}", pool=pool, concurrency=4)
        with running(worker):
            # Commits held back: batches sit in the channel logs while the broker goes away.
            rig.emu.pause_commits(True)
            rig.publish(0, 30)
            wait_until(lambda: _logged(rig.state) >= 5, timeout=30, what="5 batches logged",
                       logs=[worker])
            # kill -9 with batches in flight; publish while it is down; start it again.
            server.stop(kill=kill)
            during = threading.Thread(target=rig.publish, args=(30, 5), daemon=True)
            during.start()
            time.sleep(2)
            server.start()
            during.join(PUBLISH_DEADLINE + 10)
            assert not during.is_alive(), "publishing did not resume after the restart"
            rig.publish(35, 15)
            wait_until(lambda: worker.log().count('"Connected to ') >= 2, timeout=30,
                       what="the worker to reconnect", logs=[worker])
            rig.emu.pause_commits(False)
            rig.finish([worker])
            assert_survived(worker)
            assert "Connection to broker lost" in worker.log(), worker.log_tail()


@pytest.mark.slow
def test_a_cut_rabbitmq_connection_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    queue = unique_queue("brk")
    with (
        claimed_db() as db,
        emulator_and_key(tmp_path) as (emu, key),
        TcpProxy("127.0.0.1", 5672) as proxy,
    ):
        direct = "amqp://guest:guest@127.0.0.1:5672//"
        proxied = f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
        env = worker_env(emu, proxied, key, queue=queue, state_url=db.url)
        # The producer publishes straight to RabbitMQ: only the worker's connection is cut.
        publisher = Publisher(load_settings(**{**settings_overrides(env), "broker_url": direct}))
        rig = Rig(emu, env, publisher, db.client)
        try:
            worker = launch_worker(env, tmp_path, name="brk-amqp", pool="threads", concurrency=4)
            with running(worker):
                rig.emu.pause_commits(True)
                rig.publish(0, 30)
                wait_until(lambda: _logged(rig.state) >= 5, timeout=30,
                           what="5 batches logged", logs=[worker])
                assert proxy.active > 0, "the worker does not go through the proxy"
                accepted = proxy.accepted
                proxy.cut()
                rig.publish(30, 5)
                time.sleep(3)
                proxy.restore()
                wait_until(lambda: proxy.accepted > accepted, timeout=30,
                           what="the worker to reconnect through the proxy", logs=[worker])
                rig.publish(35, 15)
                rig.emu.pause_commits(False)
                rig.finish([worker])
                assert_survived(worker)
                assert "Connection to broker lost" in worker.log(), worker.log_tail()
        finally:
            publisher.close()
            delete_rabbit_queues(queue, f"{queue}.control", f"{queue}.dead", f"{queue}.dlx")


def _reply_fault(rig: Rig, proxy: TcpProxy, worker: CeleryProcess, during: int = 0) -> None:
    """Swallow the broker's replies for a moment (publishing `during` batches meanwhile), then
    cut the worker's connections and let it reconnect."""
    proxy.mute()
    rig.publish(len(rig.published) // ROWS, during)
    time.sleep(1.5)
    proxy.cut()
    time.sleep(1)
    accepted = proxy.accepted
    proxy.restore()
    wait_until(lambda: proxy.accepted > accepted, timeout=30,
               what="the worker to reconnect through the proxy", logs=[worker])


@pytest.mark.slow
def test_replies_a_redis_broker_sent_that_never_arrived_lose_and_duplicate_nothing(
    tmp_path: Path,
) -> None:
    """The worker's broker connection goes through a proxy that forwards the worker's commands
    but swallows the broker's replies, then cuts the connection; twice: once while the worker
    works through a backlog (the message it was taking is off its queue on the server and never
    reached the worker), once while it waits on an empty queue and batches are published
    (kombu's own transport loses the first of them: its BRPOP took it)."""
    queue = unique_queue("brk")
    with (
        claimed_db() as db,
        emulator_and_key(tmp_path) as (emu, key),
        TcpProxy("127.0.0.1", 6379) as proxy,
    ):
        proxied = f"redis://127.0.0.1:{proxy.port}/{db.number}"
        env = worker_env(
            emu, proxied, key, queue=queue, state_url=db.url,
            visibility_timeout_seconds=VISIBILITY_TIMEOUT,
        )
        # The producer publishes straight to Redis: only the worker's connections are affected.
        publisher = Publisher(load_settings(**{**settings_overrides(env), "broker_url": db.url}))
        rig = Rig(emu, env, publisher, db.client)
        try:
            worker = launch_worker(env, tmp_path, name="brk-mute", pool="threads", concurrency=4)
            with running(worker):
                rig.emu.pause_commits(True)
                rig.publish(0, 120)
                wait_until(lambda: _logged(rig.state) >= 10, timeout=30,
                           what="10 batches logged", logs=[worker])
                assert db.client.llen(queue) > 0, "the queue drained before the fault"
                _reply_fault(rig, proxy, worker)  # busy
                wait_until(lambda: db.client.llen(queue) == 0 and _logged(rig.state) >= 120,
                           timeout=60, what="the backlog taken", logs=[worker])
                _reply_fault(rig, proxy, worker, during=5)  # idle, batches arriving
                rig.publish(len(rig.published) // ROWS, 5)
                rig.emu.pause_commits(False)
                rig.finish([worker], timeout=60)
                assert_survived(worker)
        finally:
            publisher.close()
