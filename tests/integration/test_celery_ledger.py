"""The ledger's Lua scripts, dead letters and token store against the real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.redis import RedisDB, claimed_db
from worker.deadletter import DeadLetter, DeadLetters
from worker.ledger import Allocated, ChannelRef, Conflict, Fenced, Ledger
from worker.tokenstore import SharedToken, TokenStore

A = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_node_0")
B = ChannelRef("DB", "PUBLIC", "P1", "snowpipe_node_1")


@pytest.fixture
def db() -> Iterator[RedisDB]:
    with claimed_db() as claimed:
        yield claimed


@pytest.fixture
def ledger(db: RedisDB) -> Ledger:
    return Ledger(db.client)


def test_allocate_records_consecutive_offsets_per_chunk(ledger: Ledger) -> None:
    gen = ledger.fence(A, 0)
    result = ledger.allocate(A, gen, "b1", [None, None, None], expected=None)
    assert isinstance(result, Allocated)
    assert [c.offset for c in result.entry.chunks] == [1, 2, 3]
    assert {c.ref for c in result.entry.chunks} == {A}
    assert ledger.entry("b1") == result.entry
    second = ledger.allocate(A, gen, "b2", [None], expected=None)
    assert isinstance(second, Allocated)
    assert second.entry.chunks[0].offset == 4


def test_offsets_are_never_reused_after_a_fence(ledger: Ledger) -> None:
    gen = ledger.fence(A, 0)
    ledger.allocate(A, gen, "b1", [None, None], expected=None)  # offsets 1, 2
    gen2 = ledger.fence(A, 1)  # the open reported 1 committed: 2 was discarded
    assert gen2 == gen + 1
    assert ledger.lost(A, [1, 2]) == [False, True]
    result = ledger.allocate(A, gen2, "b3", [None], expected=None)
    assert isinstance(result, Allocated)
    assert result.entry.chunks[0].offset == 3


def test_a_stale_generation_cannot_allocate(ledger: Ledger) -> None:
    old = ledger.fence(A, 0)
    ledger.fence(A, 0)
    assert isinstance(ledger.allocate(A, old, "b1", [None], expected=None), Fenced)
    assert ledger.entry("b1") is None


def test_compare_and_set_lets_one_process_take_a_batch_over(ledger: Ledger) -> None:
    gen_a = ledger.fence(A, 0)
    first = ledger.allocate(A, gen_a, "b1", [None, None], expected=None)
    assert isinstance(first, Allocated)
    gen_b = ledger.fence(B, 0)
    kept = first.entry.chunks[0]
    # Chunk 0 committed on A; chunk 1 is re-appended on B.
    moved = ledger.allocate(B, gen_b, "b1", [kept, None], expected=first.entry.raw)
    assert isinstance(moved, Allocated)
    assert moved.entry.chunks[0] == kept
    assert moved.entry.chunks[1].ref == B
    # A second taker that read the old entry loses.
    late = ledger.allocate(B, gen_b, "b1", [kept, None], expected=first.entry.raw)
    assert isinstance(late, Conflict)
    assert late.current == moved.entry


def test_fence_after_state_loss_moves_the_counter_past_the_committed_offset(
    ledger: Ledger,
) -> None:
    gen = ledger.fence(A, 41)  # Snowflake knows offset 41; Redis had nothing
    result = ledger.allocate(A, gen, "b1", [None], expected=None)
    assert isinstance(result, Allocated)
    assert result.entry.chunks[0].offset == 42


def test_overlapping_lost_ranges_are_all_found(ledger: Ledger) -> None:
    gen = ledger.fence(A, 4)
    ledger.allocate(A, gen, "x", [None] * 6, expected=None)  # 5..10
    gen = ledger.fence(A, 4)  # lost 5:10
    ledger.allocate(A, gen, "y", [None] * 2, expected=None)  # 11..12
    ledger.fence(A, 4)  # lost 5:12
    assert ledger.lost(A, [4, 5, 9, 12, 13]) == [False, True, True, True, False]


def test_dead_letters_keep_rows_and_requeue_then_remove_them(db: RedisDB) -> None:
    dead = DeadLetters(db.client)
    dead.add(DeadLetter("b1", "D", "S", "P", "unknown pipe", [{"id": 1}]))
    dead.add(DeadLetter("b2", "D", "S", "P", "rows in error", [], kind="row_errors"))
    assert [s.letter.batch_id for s in dead.entries()] == ["b1", "b2"]
    published: list[DeadLetter] = []
    assert dead.requeue(published.append) == (1, 1)
    assert [p.rows for p in published] == [[{"id": 1}]]
    assert [s.letter.batch_id for s in dead.entries()] == ["b2"]
    assert dead.drop() == 1
    assert dead.count() == 0


def test_token_store_keeps_the_later_token_and_expires_it(db: RedisDB) -> None:
    store = TokenStore(db.client, "ACC.USER")
    now = time.time()
    store.save(SharedToken("later", 30, now + 30))
    store.save(SharedToken("earlier", 30, now + 20))
    loaded = store.load()
    assert loaded is not None and loaded.value == "later"
    ttl = db.client.pttl(store.key)
    assert 0 < ttl <= 30_000
    assert "later" not in repr(loaded)


def test_token_lock_has_one_owner_at_a_time(db: RedisDB) -> None:
    store = TokenStore(db.client, "ACC.USER")
    owner = store.acquire(5)
    assert owner is not None
    assert store.acquire(5) is None
    store.release("not-the-owner")
    assert store.acquire(5) is None
    store.release(owner)
    assert store.acquire(5) is not None
