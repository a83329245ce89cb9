"""Ingest one batch exactly once: consult the ledger, append what is not committed, wait for it.

`Ingestor.ingest(...)` returns only when every chunk of the batch is committed in Snowflake
(then the task returns and Celery acknowledges the message). A batch seen before (a redelivery,
a re-published retry, a requeued dead letter) is looked up in the ledger first:

- chunks on a channel whose commit state is final (fenced since they were appended) are
  committed iff the channel's committed offset passed them and no fence recorded them as lost;
- chunks on a channel with no fence since are made final first by opening (fencing) that
  channel, which stops a dead or stale writer from committing anything more;
- committed chunks are never sent again; the others are appended on this process's channel
  under new offsets, with a compare-and-set on the ledger entry so that only one process does it.

If another process is visibly working on the batch (its ledger entry changed under us), we wait
for its commit before fencing, so two copies of a message do not fence each other in turns.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker.ledger import ChannelRef, ChunkRecord, Ledger, LedgerEntry
from worker.observability import get_logger
from worker.snowpipe.channel import (
    BatchMoved,
    ChannelWriter,
    CommitTimeout,
    CommitTracker,
    PendingBatch,
    StreamingClient,
    committed_offset,
)
from worker.snowpipe.encoding import EncodedRows
from worker.snowpipe.errors import PermanentError

_log = get_logger("worker.ingest")

# How long to watch another process's progress on a batch before fencing its channel.
CONTENDED_WAIT_SECONDS = 10.0


class ChunkingChanged(PermanentError):
    """The batch was appended before with a different split into requests; it cannot be resumed."""

    hint = (
        "SNOWPIPE_MAX_REQUEST_BYTES or SNOWPIPE_COMPRESSION changed while this batch was partly "
        "committed; restore the old values to finish it"
    )


class _EntryChanged(Exception):
    """The batch's ledger entry changed while we evaluated it."""


@dataclass(frozen=True)
class IngestResult:
    """How a batch ended: sent now (and committed) or found already committed."""

    already_committed: bool
    chunks_sent: int
    row_errors: int
    channel: str


class Ingestor:
    """Per process: the ledger, the commit tracker and this process's channel writers."""

    def __init__(
        self,
        client: StreamingClient,
        ledger: Ledger,
        tracker: CommitTracker,
        writer_for: Any,
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._tracker = tracker
        # writer_for(database, schema, pipe) -> this process's ChannelWriter on that pipe
        self._writer_for = writer_for

    def ingest(
        self,
        batch_id: str,
        database: str,
        schema: str,
        pipe: str,
        chunks: Sequence[EncodedRows],
        *,
        deadline: float,
    ) -> IngestResult:
        """Commit the batch exactly once; raises CommitTimeout at `deadline` (monotonic)."""
        writer: ChannelWriter = self._writer_for(database, schema, pipe)
        contended = False
        sent = 0
        while True:
            if time.monotonic() >= deadline:
                raise CommitTimeout(f"batch {batch_id}: not committed within the task's budget")
            pending = writer.find(batch_id)
            ours = pending is None  # else another task of this process is appending it
            if pending is None:
                try:
                    plan = self._plan(writer, batch_id, len(chunks), contended, deadline)
                except _EntryChanged:
                    contended = True  # someone else moved it while we looked: re-read
                    continue
                if plan is None:
                    _log.info("batch.already_committed", batch_id=batch_id)
                    return IngestResult(True, 0, 0, writer.ref.channel)
                entry, template = plan
                pending = PendingBatch(batch_id, chunks, entry)
                try:
                    writer.submit(pending, template)
                except BatchMoved:
                    contended = True
                    continue
                sent += sum(1 for t in template if t is None)
            try:
                done = writer.wait(pending, deadline)
            except BaseException:
                if ours:
                    writer.forget(pending)
                raise
            if done is None:
                contended = True
                continue
            if not ours:
                return IngestResult(True, 0, 0, writer.ref.channel)
            errors = writer.new_row_errors(done.status)
            return IngestResult(False, sent, errors, writer.ref.channel)

    def _plan(
        self, writer: ChannelWriter, batch_id: str, n_chunks: int, contended: bool, deadline: float
    ) -> tuple[LedgerEntry | None, list[ChunkRecord | None]] | None:
        """(ledger entry, template of chunks to append), or None if already committed."""
        entry = self._ledger.entry(batch_id)
        if entry is None:
            return None, [None] * n_chunks
        flags = self._settle(
            writer, entry, fence=not contended or len(entry.chunks) != n_chunks, deadline=deadline
        )
        if self._ledger.entry(batch_id) != entry:
            raise _EntryChanged(batch_id)
        if all(flags):
            return None
        if len(entry.chunks) != n_chunks:
            raise ChunkingChanged(
                f"batch {batch_id} was split into {len(entry.chunks)} requests "
                f"before and into {n_chunks} now"
            )
        return entry, [chunk if ok else None for chunk, ok in zip(entry.chunks, flags, strict=True)]

    def _settle(
        self, writer: ChannelWriter, entry: LedgerEntry, *, fence: bool, deadline: float
    ) -> list[bool]:
        """For each chunk of `entry`: is it committed? Makes the answer final first."""
        committed: dict[ChannelRef, int] = {}
        by_ref: dict[ChannelRef, list[ChunkRecord]] = {}
        for chunk in entry.chunks:
            by_ref.setdefault(chunk.ref, []).append(chunk)
        for ref, chunks in by_ref.items():
            current = self._ledger.generation(ref)
            open_writer = any(c.gen == current for c in chunks)
            if not open_writer:
                # Fenced since: the fate of every chunk is settled; read the committed offset.
                committed[ref] = self._committed_now(ref)
            elif ref == writer.ref:
                committed[ref] = writer.settle()
            else:
                highest = max(c.offset for c in chunks)
                # Contended: watch the other writer first; only a commit seen without a fence is
                # final (its rows cannot be discarded later), anything less needs the fence.
                seen = -1 if fence else self._watch(ref, highest, deadline)
                committed[ref] = seen if seen >= highest else self._fence_foreign(ref)
        flags: list[bool] = []
        lost_by_ref: Mapping[ChannelRef, dict[int, bool]] = {
            ref: dict(
                zip(
                    [c.offset for c in chunks],
                    self._ledger.lost(ref, [c.offset for c in chunks]),
                    strict=True,
                )
            )
            for ref, chunks in by_ref.items()
        }
        for chunk in entry.chunks:
            flags.append(
                committed[chunk.ref] >= chunk.offset and not lost_by_ref[chunk.ref][chunk.offset]
            )
        return flags

    def _committed_now(self, ref: ChannelRef) -> int:
        status = self._client.bulk_channel_status(*ref.target, [ref.channel]).get(ref.channel)
        return committed_offset(status)

    def _fence_foreign(self, ref: ChannelRef) -> int:
        # Opening another process's channel discards its uncommitted rows and stales its writer:
        # after this, nothing more of that writer can commit, so the ledger answer is final.
        result = self._client.open_channel(*ref.target, ref.channel)
        committed = committed_offset(result.status)
        gen = self._ledger.fence(ref, committed)
        _log.info("channel.fenced", channel=ref.channel, committed=committed, generation=gen)
        return committed

    def _watch(self, ref: ChannelRef, offset: int, deadline: float) -> int:
        """Wait a while for another process to commit up to `offset`; the committed offset."""
        until = min(deadline, time.monotonic() + CONTENDED_WAIT_SECONDS)
        try:
            status = self._tracker.wait(ref, offset, until)
        except CommitTimeout:
            return self._committed_now(ref)
        return committed_offset(status)
