"""Exactly once at the edges of the delivery core: the five holes an adversarial review found in
v2, each injected into the real code (the ingest task called in-process, real Nodes and pumps,
private `redis-server`s, a replica, the emulator over HTTP), and each failing on v2.

1. the state store restored from an older snapshot: entries Snowflake committed since are back
   in the log, below its committed offset (v2 moved them above it and sent them again);
2. a failover to a replica that missed the last writes, with SNOWPIPE_STATE_MIN_REPLICAS=1 (v2's
   pumps sent what no replica held; the failover took the log and dedup writes back);
3. a batch of many pieces straddling a 256-entry read page when a channel's log is
   dead-lettered (v2 wrote two letters with one batch id; the requeue lost the second's rows);
4. an open refused after appends were accepted (v2 dead-lettered them, they committed anyway,
   and the requeue committed them twice);
5. row errors of a request committed after its pump's last status poll (v2's next owner started
   counting from its open and never attributed them).

The tasks run in this process through `ingest_batch` itself, as Celery would call it; a message
the task puts back in the queue would fail the test (none is expected).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.delivery import (
    ACCOUNT,
    DATABASE,
    EMULATOR_ARGS,
    KEY_NAME,
    SCHEMA,
    USER,
    Rig,
    lease_key,
    make_settings,
    wait_until,
)
from tests.support.emulator import RunningEmulator, start_emulator
from tests.support.keys import key_pair
from tests.support.redis import REDIS_HOST, PrivateRedis, RedisDB, private_redis
from tests.support.tcpproxy import TcpProxy
from worker import runtime
from worker.deadletter import DeadLetter
from worker.snowpipe.client import SnowpipeClient

TYPED = "TYPED"  # a pipe whose table refuses a NULL id: rows in error


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[RunningEmulator]:
    with start_emulator(
        *EMULATOR_ARGS,
        "--pipe", f"{DATABASE}.{SCHEMA}.{TYPED}(ID NUMBER NOT NULL, NAME VARCHAR)",
        workdir=tmp_path / "emulator",
    ) as e:  # fmt: skip
        e.register_key(ACCOUNT, USER, key_pair(KEY_NAME).public_pem)
        yield e


def ids_of(batch: int, rows: int = 10) -> range:
    return range(batch * rows, (batch + 1) * rows)


def all_ids(batches: range | list[int]) -> set[int]:
    return {i for b in batches for i in ids_of(b)}


@contextmanager
def edge_rig(
    emu: RunningEmulator, url: str, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> Iterator[Rig]:
    """A Rig on the state Redis at `url` (not a claimed DB), with the ingest task's runtime on the
    same settings; one channel per pipe."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    db = RedisDB(0, url, client)
    settings = make_settings(emu, db, backpressure_wait_seconds=20.0, **overrides)
    snowpipe = SnowpipeClient.from_settings(settings)
    rig = Rig(emu, db, settings, snowpipe, f"E{uuid.uuid4().hex[:8].upper()}-STREAMING")
    monkeypatch.setattr(runtime, "_settings", settings)
    monkeypatch.setattr(runtime, "_runtime", None)
    from worker import tasks

    def no_requeue(**kwargs: Any) -> None:
        raise AssertionError(f"the task put a batch back in the queue: {kwargs}")

    monkeypatch.setattr(tasks.ingest_batch, "apply_async", no_requeue)
    try:
        yield rig
    finally:
        rig.close()
        snowpipe.close()
        client.close()
        emu.clear_faults()
        emu.pause_commits(False)


def ingest(rig: Rig, batch_id: str, ids: range, *, pipe: str | None = None, **extra: Any) -> Any:
    """Run `ingest_batch` for one batch as Celery would; its summary."""
    from worker import tasks

    rows = [{"id": i, "name": f"row-{i}"} for i in ids]
    return tasks.ingest_batch(
        batch_id=batch_id, database=DATABASE, schema=SCHEMA, pipe=pipe or rig.pipe, rows=rows,
        **extra,
    )  # fmt: skip


# --- Hole 1: the state store comes back older ----------------------------------------------------


def test_hole1_a_store_restored_from_an_older_snapshot_never_resends_a_committed_batch(
    emu: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On v2: `raise_floor` found the restored counter below Snowflake's committed offset and
    # moved b0 above it: b0 was appended and committed twice (10 rows duplicated).
    with private_redis(tmp_path / "state") as server, \
        edge_rig(emu, server.url(), monkeypatch) as rig:  # fmt: skip
        ref = rig.ref()
        node = rig.start_node("nodeA")
        rig.emu.pause_commits(True)
        assert ingest(rig, "b0", ids_of(0))["outcome"] == "logged"
        server.client().save()  # the snapshot: b0 in the log, not yet committed
        rig.emu.pause_commits(False)
        assert ingest(rig, "b1", ids_of(1))["outcome"] == "logged"
        rig.wait_exactly_once(all_ids(range(2)))  # both committed and trimmed
        node.stop()

        server.restore_snapshot()  # back to the snapshot: b0's trim and b1 are forgotten
        assert [e.batch_id for e in rig.entries(ref)] == ["b0"]
        node = rig.start_node("nodeB")
        wait_until(lambda: any(p.opened for p in node.pumps()), timeout=15,
                   what=lambda: "node B's pump open")  # fmt: skip
        assert ingest(rig, "b2", ids_of(2))["outcome"] == "logged"
        rig.wait_exactly_once(all_ids(range(3)))
        assert rig.stat("log_forgot") == 1  # the counter was below Snowflake's offset


# --- Hole 2: a failover to a replica that missed writes ------------------------------------------


class Replicated:
    """A primary and a replica behind one address (a proxy), as a failover moves it."""

    def __init__(self, tmp_path: Path) -> None:
        self.primary = PrivateRedis(tmp_path / "primary")
        self.primary.start()
        self.replica = PrivateRedis(
            tmp_path / "replica",
            extra_args=("--replicaof", REDIS_HOST, str(self.primary.port)),
        )
        self.replica.start()
        self.proxy = TcpProxy(REDIS_HOST, self.primary.port)
        wait_until(self.in_sync, timeout=20, what=lambda: "the replica in sync")

    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{self.proxy.port}/0"

    def in_sync(self) -> bool:
        info = self.replica.client().info("replication")
        return info.get("master_link_status") == "up"

    def cut(self) -> None:
        """Replication stops: the replica keeps what it has (it follows a master that is not
        there)."""
        self.replica.client().execute_command("REPLICAOF", REDIS_HOST, "1")

    def fail_over(self) -> None:
        """Kill the primary, promote the replica, move the address to it; then the old primary
        comes back as a replica of the new one (what Sentinel does when it restarts), so that
        writes can reach a replica again."""
        self.primary.stop(kill=True)
        self.replica.client().execute_command("REPLICAOF", "NO", "ONE")
        self.proxy.retarget(REDIS_HOST, self.replica.port)
        self.primary.extra_args = ("--replicaof", REDIS_HOST, str(self.replica.port))
        self.primary.start()

    def close(self) -> None:
        self.proxy.close()
        self.replica.stop()
        self.primary.stop()


def test_hole2_a_failover_to_a_replica_that_missed_writes_commits_every_batch_once(
    emu: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On v2: the pump appended b1, which no replica held (its task's WAIT failed), and b0's trim
    # was never waited for; after the failover b0 was moved above the committed offset and sent
    # again, and b1's task, retrying, found no dedup record and logged it again (20 rows twice).
    pair = Replicated(tmp_path)
    try:
        with edge_rig(emu, pair.url(), monkeypatch, state_min_replicas=1,
                      state_replica_timeout_ms=200) as rig:  # fmt: skip
            rig.start_node("nodeA")
            assert ingest(rig, "b0", ids_of(0))["outcome"] == "logged"  # on both
            rig.emu.pause_commits(True)
            wait_until(lambda: rig.emu.stats()["batches_pending"] >= 1, timeout=10,
                       what=lambda: "b0 appended")  # fmt: skip
            pair.cut()
            rig.emu.pause_commits(False)
            wait_until(lambda: rig.log.depth(rig.ref()).entries == 0, timeout=10,
                       what=lambda: "b0 committed and trimmed on the primary only")  # fmt: skip
            # b1 is logged on the primary only: its task holds its message, riding it out.
            outcome: dict[str, Any] = {}
            task = threading.Thread(target=lambda: outcome.update(ingest(rig, "b1", ids_of(1))))
            task.start()
            wait_until(lambda: rig.log.depth(rig.ref()).entries == 1, timeout=10,
                       what=lambda: "b1 in the primary's log")  # fmt: skip
            time.sleep(1.5)  # time for a pump to send b1, if it would
            pair.fail_over()
            task.join(60)
            # Logged again on the promoted replica (found there by a later retry of the WAIT).
            assert outcome.get("outcome") in ("logged", "already_logged"), outcome
            assert ingest(rig, "b2", ids_of(2))["outcome"] == "logged"
            rig.wait_exactly_once(all_ids(range(3)), timeout=30)
    finally:
        pair.close()


# --- Hole 3: a batch straddling a read page is one dead letter -----------------------------------


def test_hole3_a_batch_straddling_a_read_page_is_one_letter_and_its_requeue_loses_no_row(
    emu: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On v2: the "dead-letter everything" path read the log 256 entries at a time and wrote one
    # letter per batch per page: the 30-piece batch became two letters with one batch id, each
    # dropping the dedup record; the requeue logged the first, answered the second
    # already_logged, and lost its rows.
    from worker.delivery.log import Piece

    with private_redis(tmp_path / "state") as server, \
        edge_rig(emu, server.url(), monkeypatch) as rig:  # fmt: skip
        ref = rig.ref()
        pump = rig.start_pump(ref)
        wait_until(lambda: pump.opened, timeout=10, what=lambda: "the first settle")
        pump.stop()
        rig.redis.delete(lease_key(ref))  # as if its lease had expired
        for b in range(250):  # one piece each: the big batch starts at entry 251 of the log
            rig.log_batch(ref, f"s{b}", range(100_000 + b, 100_001 + b))
        big = list(range(30))
        rig.log.append(ref, "big", [Piece(1, f'{{"id":{i},"name":"row-{i}"}}\n'.encode())
                                    for i in big])  # fmt: skip
        assert rig.log.depth(ref).entries == 280
        rig.emu.fault(
            endpoint="open", status=404,
            body={"code": "ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED", "message": "dropped"},
        )  # fmt: skip
        rig.start_pump(ref, node="nodeB")
        wait_until(lambda: rig.dead_letters.count() == 251, timeout=30,
                   what=lambda: f"dead letters ({rig.dead_letters.count()})")  # fmt: skip
        letters = [s.letter for s in rig.dead_letters.entries(batch_id="big")]
        assert len(letters) == 1 and [r["id"] for r in letters[0].rows] == big
        rig.emu.clear_faults()
        # `dead-letters requeue`, through the task: each letter as its batch, once.
        requeued, _ = rig.dead_letters.requeue(
            lambda letter: ingest_letter(rig, letter), batch_id="big"
        )
        assert requeued == 1
        rig.wait_exactly_once(set(big), timeout=30)


def ingest_letter(rig: Rig, letter: DeadLetter) -> None:
    from worker import tasks

    result = tasks.ingest_batch(
        batch_id=letter.batch_id, database=letter.database, schema=letter.schema,
        pipe=letter.pipe, rows=letter.rows, requeue_of=letter.letter_id,
    )  # fmt: skip
    assert result["outcome"] == "logged", result


# --- Hole 4: a refused open keeps what may still commit -------------------------------------------


def test_hole4_an_open_refused_after_accepted_appends_dead_letters_none_of_them(
    emu: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On v2: the fresh pump's refused open dead-lettered everything above its committed offset
    # (0), including the three batches accepted and in flight, which then committed; requeueing
    # their letters committed them a second time (30 rows twice).
    with private_redis(tmp_path / "state") as server, \
        edge_rig(emu, server.url(), monkeypatch) as rig:  # fmt: skip
        ref = rig.ref()
        first = rig.start_pump(ref, ttl_seconds=2.0)
        rig.emu.pause_commits(True)
        for b in range(3):
            assert ingest(rig, f"b{b}", ids_of(b))["outcome"] == "logged"
        wait_until(lambda: first.sent_upto >= rig.log.last_offset(ref), timeout=10,
                   what=lambda: "all three appended")  # fmt: skip
        first.stop()  # the node dies with its appends in flight
        rig.emu.fault(
            endpoint="open", status=404,
            body={"code": "ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED", "message": "not yet"},
            count=3,
        )  # fmt: skip
        time.sleep(2.5)  # its lease expires
        rig.start_pump(ref, node="nodeB")
        wait_until(lambda: rig.emu.stats()["requests"].get("open", {}).get("404", 0) >= 1,
                   timeout=10, what=lambda: "a refused open")  # fmt: skip
        rig.emu.pause_commits(False)  # the accepted appends commit after all
        rig.wait_exactly_once(all_ids(range(3)), timeout=40)
        assert rig.dead_letters.count() == 0


# --- Hole 5: row errors across an owner change ---------------------------------------------------


def test_hole5_row_errors_committed_after_the_owners_last_poll_are_attributed_by_the_next_owner(
    emu: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On v2: the next owner counted errors from its open's rows_error_count and never
    # attributed the one committed while nobody polled: no dead letter.
    with private_redis(tmp_path / "state") as server, \
        edge_rig(emu, server.url(), monkeypatch) as rig:  # fmt: skip
        ref = rig.ref(TYPED)
        first = rig.start_pump(ref, ttl_seconds=2.0)
        rig.emu.pause_commits(True)
        rows = [{"id": 1000, "name": "ok"}, {"id": None, "name": "no id"}]
        from worker import tasks

        summary = tasks.ingest_batch(batch_id="b-null", database=DATABASE, schema=SCHEMA,
                                     pipe=TYPED, rows=rows)  # fmt: skip
        assert summary["outcome"] == "logged"
        wait_until(lambda: first.sent_upto > 0, timeout=10, what=lambda: "b-null appended")
        first.stop()  # dies before any status shows the commit
        rig.emu.pause_commits(False)
        wait_until(lambda: 1000 in rig.committed_ids(TYPED), timeout=10,
                   what=lambda: "b-null committed without its bad row")  # fmt: skip
        time.sleep(2.5)  # the lease expires
        rig.start_pump(ref, node="nodeB")
        wait_until(lambda: rig.dead_letters.count() == 1, timeout=15,
                   what=lambda: "the row_errors letter")  # fmt: skip
        [letter] = [s.letter for s in rig.dead_letters.entries()]
        assert (letter.batch_id, letter.kind) == ("b-null", "row_errors")
        assert "non-nullable" in letter.reason, letter.reason


# --- What an empty restart costs (the documented figures) ----------------------------------------


def test_a_store_restarted_empty_loses_what_waited_in_its_logs_and_logs_a_late_copy_again(
    emu: RunningEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The figures docs/delivery.md gives for a state store without persistence: the batches
    # acknowledged and not yet committed are lost (b1, b2), and a batch whose message comes again
    # after the loss is committed again (b0); nothing else is lost or duplicated (b3).
    import collections
    import shutil

    with private_redis(tmp_path / "state") as server, \
        edge_rig(emu, server.url(), monkeypatch) as rig:  # fmt: skip
        node = rig.start_node("nodeA")
        assert ingest(rig, "b0", ids_of(0))["outcome"] == "logged"
        rig.wait_exactly_once(all_ids([0]))
        node.stop()
        for b in (1, 2):  # acknowledged; no pump runs, so they wait in the log
            assert ingest(rig, f"b{b}", ids_of(b))["outcome"] == "logged"

        server.stop(kill=True)
        shutil.rmtree(server.data_dir / "appendonlydir")  # it comes back empty
        server.start()
        rig.start_node("nodeB")
        assert ingest(rig, "b0", ids_of(0))["outcome"] == "logged"  # its record was lost
        assert ingest(rig, "b3", ids_of(3))["outcome"] == "logged"
        wait_until(lambda: set(ids_of(3)) <= set(rig.committed_ids()), timeout=20,
                   what=lambda: "b3 committed")  # fmt: skip
        wait_until(lambda: rig.emu.stats()["batches_pending"] == 0, timeout=10,
                   what=lambda: "nothing in flight")  # fmt: skip
        seen = collections.Counter(rig.committed_ids())
        assert {i: seen[i] for i in ids_of(0)} == dict.fromkeys(ids_of(0), 2)
        assert not any(seen[i] for i in [*ids_of(1), *ids_of(2)])
        assert {i: seen[i] for i in ids_of(3)} == dict.fromkeys(ids_of(3), 1)
