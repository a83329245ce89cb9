"""Dead letters made from log entries: a batch's rows back from the NDJSON the log holds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.deadletter import DeadLetter, Kind
from worker.delivery.channels import ChannelRef
from worker.delivery.log import Entry
from worker.messages import IngestMessage
from worker.snowpipe.encoding import decode_exact


def rows_of(parts: Sequence[Entry]) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON-object rows of `parts`, and (as text) the lines that are not JSON objects.

    A line that is not a JSON object is what Snowflake reports as a row error: a dead letter
    must keep it, not fail on it (the row error report would be lost with it).
    """
    rows: list[dict[str, Any]] = []
    unparsed: list[str] = []
    for entry in parts:
        for line in entry.data.splitlines():
            if not line.strip():
                continue
            try:
                row = decode_exact(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                unparsed.append(line.decode("utf-8", "replace"))
    return rows, unparsed


def batch_letter(
    ref: ChannelRef,
    parts: Sequence[Entry],
    reason: str,
    *,
    kind: Kind = "failed",
    letter_id: str,
    detail: dict[str, Any] | None = None,
) -> DeadLetter:
    """The letter of one batch's `parts` (its pieces still in the log, in order). Pieces of the
    batch that are not in `parts` were committed: the letter names them."""
    rows, unparsed = rows_of(parts)
    extra: dict[str, Any] = {"channel": ref.channel, "offsets": [e.offset for e in parts]}
    if parts:
        pieces = parts[0].pieces
        present = {e.piece for e in parts}
        extra["pieces"] = pieces
        missing = [i for i in range(pieces) if i not in present]
        if missing:
            extra["committed_pieces"] = missing
    if unparsed:
        extra["unparsed_lines"] = unparsed
    extra.update(detail or {})
    message = IngestMessage(parts[0].batch_id, *ref.target, rows)
    return DeadLetter.of(message, reason, kind=kind, detail=extra, letter_id=letter_id)


def group_by_batch(entries: Sequence[Entry]) -> dict[str, list[Entry]]:
    """Entries by batch id, each batch's in offset order (dicts keep first-seen order)."""
    by_batch: dict[str, list[Entry]] = {}
    for entry in entries:
        by_batch.setdefault(entry.batch_id, []).append(entry)
    return by_batch


def failed_letter_id(entry: Entry) -> str:
    """The id of the "failed" letter of `entry`'s batch as logged at these offsets (one per
    logging of a batch: a requeued batch gets new offsets, so a new letter id)."""
    return f"{entry.batch_id}@{entry.batch_offsets[0]}"


def row_errors_letter_id(entry: Entry, total: int) -> str:
    """The id of the "row_errors" letter of `entry`'s batch for the error window ending at
    Snowflake's error count `total` (deterministic: attributing a window twice stores one)."""
    return f"{entry.batch_id}@{entry.batch_offsets[0]}:rows:{total}"
