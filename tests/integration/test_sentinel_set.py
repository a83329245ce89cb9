"""The Sentinel test set itself (tests/support/sentinel.py): what its faults do, so that the
tests built on it (failover, lagging replica promoted, replication cut) can rely on them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.sentinel import FAILOVER_WAIT, SentinelSet, sentinel_set


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[SentinelSet]:
    with sentinel_set(tmp_path / "ha") as started:
        yield started


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + FAILOVER_WAIT
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_started_set_has_a_primary_and_a_replica_that_sentinel_knows(ha: SentinelSet) -> None:
    primary, replica = ha.master(), ha.replica()
    assert primary.role() == "master" and replica.role() == "slave"
    assert [(r["ip"], int(r["port"])) for r in ha.sentinel_replicas()] == [replica.address]
    assert ha.url(3) == f"sentinel://127.0.0.1:{ha.sentinel.port}/3"
    assert ha.env()["SNOWPIPE_STATE_SENTINEL_MASTER"] == ha.master_name


def test_a_cut_replica_receives_nothing_until_restored(ha: SentinelSet) -> None:
    primary, replica = ha.master(), ha.replica()
    writer, reader = primary.client(), replica.client()
    writer.set("before", 1)
    assert writer.execute_command("WAIT", 1, 5000) == 1
    ha.cut_replication(replica)
    writer.set("during", 1)
    assert writer.execute_command("WAIT", 1, 300) == 0
    assert reader.get("before") == b"1" and reader.get("during") is None
    ha.restore_replication(replica)
    assert writer.execute_command("WAIT", 1, 5000) == 1
    assert reader.get("during") == b"1"


def test_a_cut_replica_is_promoted_without_the_writes_it_missed(ha: SentinelSet) -> None:
    primary, replica = ha.master(), ha.replica()
    writer = primary.client()
    writer.set("acknowledged", 1)
    assert writer.execute_command("WAIT", 1, 5000) == 1
    ha.cut_replication(replica)
    writer.set("missed", 1)
    old = ha.kill_master()
    new = ha.wait_for_master(other_than=old)
    assert new is replica
    promoted = new.client()
    assert promoted.get("acknowledged") == b"1" and promoted.get("missed") is None
    old.start()  # back as an old copy; Sentinel makes it a replica of the new primary
    ha.wait_role(old, "slave")  # its link to the new primary is up: the sync is done
    assert old.client().get("missed") is None  # resynchronised from the new primary


def test_a_paused_replica_acknowledges_nothing_until_resumed(ha: SentinelSet) -> None:
    writer = ha.master().client()
    ha.pause(ha.replica())
    writer.set("k", 1)
    assert writer.execute_command("WAIT", 1, 300) == 0
    ha.resume(ha.replica())
    assert writer.execute_command("WAIT", 1, 5000) == 1


def test_a_forced_failover_swaps_the_roles(ha: SentinelSet) -> None:
    old, replica = ha.master(), ha.replica()
    new = ha.failover()  # waits until the old primary replicates from the new one
    assert new is replica and ha.master() is new
    assert old.role() == "slave" and new.role() == "master"
    writer = new.client()
    writer.set("k", 1)
    assert writer.execute_command("WAIT", 1, 5000) == 1
    wait_for(lambda: old.client().get("k") == b"1", "the write on the old primary")
