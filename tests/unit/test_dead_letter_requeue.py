"""Which row_errors letters `requeue` sends (only exact ones, only when asked), and that the
letters of one resolution stored twice are kept once."""

from __future__ import annotations

import fakeredis

from worker.deadletter import DeadLetter, DeadLetters
from worker.delivery.channels import ChannelRef
from worker.delivery.log import Entry
from worker.rejections import match_error_rows, rejected_letters
from worker.snowpipe.encoding import encode_line
from worker.snowpipe.errortable import ErrorRow

EXACT = {"rejected": [{"row": 3, "message": "NULL result", "code": "100072"}]}


def letter(batch_id: str, kind: str = "failed", **extra: object) -> DeadLetter:
    return DeadLetter(
        batch_id,
        "DB",
        "SC",
        "T-STREAMING",
        "why",
        [{"ID": 1}],
        kind=kind,  # type: ignore[arg-type]
        letter_id=f"{batch_id}#1",
        **extra,  # type: ignore[arg-type]
    )


def test_row_errors_are_requeued_only_when_asked_and_only_when_exact(
    fredis: fakeredis.FakeRedis,
) -> None:
    dead = DeadLetters(fredis)
    dead.add(letter("failed"))
    dead.add(letter("exact", kind="row_errors", detail=EXACT))
    dead.add(letter("whole batch", kind="row_errors"))  # coarse: its other rows are committed
    dead.add(letter("malformed", kind="malformed"))
    sent: list[str] = []

    def publish(x: DeadLetter) -> None:
        sent.append(x.batch_id)

    assert dead.requeue(publish) == (1, 3)
    assert sent == ["failed"]
    assert dead.requeue(publish, kinds=("failed", "row_errors")) == (1, 2)
    assert sent == ["failed", "exact"]
    assert sorted(s.letter.batch_id for s in dead.entries()) == ["malformed", "whole batch"]


def test_only_a_letter_holding_exactly_the_rejected_rows_is_exact() -> None:
    assert letter("a", kind="row_errors", detail=EXACT).exact_rows
    assert not letter("a", kind="row_errors").exact_rows
    assert not letter("a", kind="row_errors", detail={"rejected": []}).exact_rows
    assert not letter("a", kind="failed", detail=EXACT).exact_rows


def test_the_letters_of_one_resolution_stored_twice_are_kept_once(
    fredis: fakeredis.FakeRedis,
) -> None:
    ref = ChannelRef("DB", "SC", "T-STREAMING", "snowpipe_0")
    rows = [{"ID": None}, {"ID": 2}]
    entries = [Entry(5, "b", 2, b"".join(encode_line(r) for r in rows), 0)]
    error = ErrorRow("snowpipe_0", "5", "5", '{"ID":null}', "json", False, "m", "1", "ID")
    dead = DeadLetters(fredis)
    for _ in range(2):  # e.g. a new owner of the channel resolves the same window again
        for x in rejected_letters(ref, match_error_rows([error], entries, 1)):
            dead.add(x)
    assert dead.count() == 1
