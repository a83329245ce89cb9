"""Refusals: what a pump dead-letters when Snowflake refuses for good, and when.

Nothing that may still commit is dead-lettered:

- A request refused for good (400, 413, rejected rows) is sent again one entry per request to
  find the batch at fault (`ChannelOffsets.refused`); that batch is dead-lettered only after the
  next open and settle (`dead_letter_refused`), when Snowflake's committed offset C is known and
  nothing is in flight: every piece of it still in the log lies above C and can never commit.
  Its letter holds all those pieces, whatever the read paging; pieces already committed are
  named in the letter, not included.
- An open refused for good (an unknown pipe, a 4xx with an unknown code) settles nothing: any
  entry some pump may have sent (at or below the channel's sent mark) may still commit, so it
  stays in the log until an open succeeds. Batches wholly above the sent mark were never sent:
  they are dead-lettered at once (`refused_open`), and the channel's gate is closed with the
  reason, so tasks dead-letter new batches for it instead of logging them.
"""

from __future__ import annotations

import time
from typing import Any

from worker.delivery.channels import ChannelRef
from worker.delivery.letters import batch_letter, failed_letter_id
from worker.delivery.log import ChannelLog, Entry, MaybeSent
from worker.delivery.offsets import READ_COUNT, Refusal
from worker.observability import get_logger, record_dead_letter

_log = get_logger("worker.delivery.refusals")

# How long a refused open keeps the channel's gate closed (renewed at every refused open).
REFUSED_GATE_SECONDS = 120.0


class Refusals:
    """Dead-lettering for one channel's pump (see the module docstring)."""

    def __init__(
        self,
        log: ChannelLog,
        ref: ChannelRef,
        *,
        stats: Any,
        replicas: int = 0,
        replica_timeout_ms: int = 0,
    ) -> None:
        self._log = log
        self._ref = ref
        self._stats = stats
        self._replicas = replicas
        self._timeout_ms = replica_timeout_ms

    def dead_letter_refused(self, lease: str, refusal: Refusal) -> int:
        """After a settle: dead-letter every piece of the refused batch still in the log (one
        letter); how many entries it took."""
        entry = refusal.entry
        first, last = entry.batch_offsets
        parts = [e for e in self._log.entries_of(self._ref, first, last)
                 if e.batch_id == entry.batch_id]  # fmt: skip
        if not parts:
            return 0  # committed or dead-lettered meanwhile
        reason = (
            f"Snowflake refused the batch for good: {refusal.reason}; fix the rows (or the pipe), "
            "then `snowpipe-worker dead-letters requeue`"
        )
        removed = self._store(lease, parts, reason, settled=True)
        _log.error("append.refused", channel=self._ref.channel, batch_id=entry.batch_id,
                   detail=refusal.reason, pieces=len(parts))  # fmt: skip
        return removed

    def refused_open(self, lease: str, reason: str) -> tuple[int, int]:
        """After an open was refused for good: close the channel's gate and dead-letter the
        batches no pump ever sent; (entries dead-lettered, entries kept until an open works)."""
        self._log.refuse(self._ref, lease, reason, REFUSED_GATE_SECONDS)
        mark = self._log.sent_mark(self._ref)
        why = (
            f"Snowflake refuses to open channel {self._ref.channel} of pipe "
            f"{'.'.join(self._ref.target)}: {reason}; create the pipe or grant the role access "
            "to it, then `snowpipe-worker dead-letters requeue`"
        )
        taken = kept = 0
        after = 0
        done: set[int] = set()
        while True:
            page = self._log.read(self._ref, after, READ_COUNT)
            if not page:
                break
            after = page[-1].offset
            for entry in page:
                first, last = entry.batch_offsets
                if first <= mark:
                    kept += 1  # this piece may have been sent: its batch waits for an open
                    continue
                if first in done:
                    continue
                done.add(first)
                parts = [e for e in self._log.entries_of(self._ref, first, last)
                         if e.batch_id == entry.batch_id]  # fmt: skip
                try:
                    taken += self._store(lease, parts, why, settled=False)
                except MaybeSent:
                    kept += len(parts)  # the mark moved meanwhile: keep it
                after = max(after, last)
        if taken:
            _log.error("channel.refused", channel=self._ref.channel, pipe=self._ref.pipe,
                       detail=reason, dead_lettered=taken, kept_until_open=kept,
                       sent_mark=mark)  # fmt: skip
        return taken, kept

    def _store(self, lease: str, parts: list[Entry], reason: str, *, settled: bool) -> int:
        letter = batch_letter(self._ref, parts, reason, letter_id=failed_letter_id(parts[0]))
        removed = self._log.dead_letter(
            self._ref, lease, parts, letter.letter_id, letter.dumps(),
            settled=settled, now_ms=int(time.time() * 1000),
            replicas=self._replicas, timeout_ms=self._timeout_ms,
        )  # fmt: skip
        if removed:
            self._stats.count("dead_letter")
            record_dead_letter("failed")
        return removed
