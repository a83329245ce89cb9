"""Dead letters get ids; which kinds `requeue` sends (row_errors only once the table is fixed)."""

from __future__ import annotations

import fakeredis

from worker.deadletter import DeadLetter, DeadLetters


def letter(batch_id: str, kind: str = "failed", **extra: object) -> DeadLetter:
    return DeadLetter(
        batch_id,
        "DB",
        "SC",
        "T-STREAMING",
        "why",
        [{"ID": 1}],
        kind=kind,
        **extra,  # type: ignore[arg-type]
    )


def test_a_letter_without_an_id_gets_one_and_a_given_id_is_kept(
    fredis: fakeredis.FakeRedis,
) -> None:
    dead = DeadLetters(fredis)
    dead.add(letter("a"))
    dead.add(letter("b", letter_id="b-rejected-0123"))
    a, b = (s.letter for s in dead.entries())
    assert len(a.letter_id) == 32
    assert b.letter_id == "b-rejected-0123"


def test_a_letter_stored_before_ids_existed_reads_with_a_stable_id(
    fredis: fakeredis.FakeRedis,
) -> None:
    dead = DeadLetters(fredis)
    fredis.rpush(dead.key, letter("old").dumps())  # as an older worker stored it: no id
    first = next(dead.entries()).letter.letter_id
    assert first.startswith("letter-")
    assert next(dead.entries()).letter.letter_id == first


def test_row_errors_are_requeued_only_when_the_table_is_fixed_and_malformed_never(
    fredis: fakeredis.FakeRedis,
) -> None:
    dead = DeadLetters(fredis)
    exact = {"rejected": [{"row": 3, "message": "NULL result", "code": "100072"}]}
    dead.add(letter("failed"))
    dead.add(letter("exact", kind="row_errors", detail=exact))
    dead.add(letter("whole batch", kind="row_errors"))  # coarse: its other rows are committed
    dead.add(letter("malformed", kind="malformed"))
    sent: list[str] = []

    def publish(x: DeadLetter) -> None:
        sent.append(x.batch_id)

    assert dead.requeue(publish) == (1, 3)
    assert sent == ["failed"]
    assert dead.requeue(publish, kind="row_errors", table_fixed=True) == (1, 1)
    assert sent == ["failed", "exact"]
    assert [s.letter.batch_id for s in dead.entries()] == ["whole batch", "malformed"]
    assert dead.requeue(publish, table_fixed=True) == (0, 2)


def test_only_a_letter_holding_exactly_the_rejected_rows_is_exact() -> None:
    one = {"rejected": [{"row": 0, "message": "m", "code": None}]}
    assert letter("a", kind="row_errors", detail=one).exact_rows
    assert not letter("a", kind="row_errors").exact_rows
    assert not letter("a", kind="row_errors", detail={"rejected": []}).exact_rows
    assert not letter("a", kind="failed", detail=one).exact_rows
