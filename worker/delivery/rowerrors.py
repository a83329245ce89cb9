"""Row errors: which batches hold the rows Snowflake rejected, from the entries the log held.

When Snowflake's `rows_error_count` of a channel rises between two confirmations, the trim keeps
the entries committed in between (a held window, worker/delivery/log.py) instead of deleting
them. Whoever owns the channel then attributes the window's errors and stores the letters
(kind "row_errors") in the same script that drops the held entries:

- exactly, where an `ExactAttribution` is configured (Snowflake's error table names each
  rejected row with the channel and the offset tokens of its request: worker/rejections.py); a
  window it cannot resolve yet (the error table lags) is tried again later, and after
  `EXACT_DEADLINE_SECONDS` falls back to
- coarsely: the batches of the request that holds `last_error_offset_upper_bound` (when the pump
  that sent it still knows the request), else the batch holding that offset. Their letters hold
  all their rows (committed except the rejected ones: so they are not requeued by default).

Because the window and the error count live in the state store, a pump that takes a channel over
attributes errors its previous owner never saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from worker.deadletter import DeadLetter
from worker.delivery.channels import ChannelRef
from worker.delivery.letters import batch_letter, group_by_batch, row_errors_letter_id
from worker.delivery.log import ChannelLog, Entry, HeldWindow
from worker.observability import get_logger

# How long a window waits for the error table to name its rows before coarse attribution.
EXACT_DEADLINE_SECONDS = 120.0
# How often a window the error table cannot resolve yet is asked about again.
EXACT_RETRY_SECONDS = 5.0

_log = get_logger("worker.delivery.rowerrors")


class ExactAttribution(Protocol):
    """Letters naming exactly the rejected rows of a held window (the error table)."""

    def letters(
        self, ref: ChannelRef, window: HeldWindow, entries: Sequence[Entry]
    ) -> list[DeadLetter] | None:
        """The window's letters, or None while the error table does not hold all its rows yet.
        Raises when the error table cannot be read (the caller falls back to coarse)."""
        ...


def coarse_letters(
    ref: ChannelRef,
    window: HeldWindow,
    entries: Sequence[Entry],
    request: tuple[int, int] | None,
) -> list[DeadLetter]:
    """Letters for the batches of `request` (first, last offsets) if known, else for the batch
    whose pieces include the window's upper bound; none if nothing matches."""
    try:
        bound = int(window.upper_bound)
    except ValueError:
        return []
    if request is not None and request[0] <= bound <= request[1]:
        chosen = [e for e in entries if request[0] <= e.offset <= request[1]]
    else:
        holding = next(
            (e for e in entries if e.batch_offsets[0] <= bound <= e.batch_offsets[1]), None
        )
        chosen = [e for e in entries if holding is not None and e.batch_id == holding.batch_id]
    by_batch = group_by_batch(chosen)
    message = window.message or "(no message)"
    letters = []
    for batch_id, parts in by_batch.items():
        reason = (
            f"Snowflake reported {window.errors} row error(s) up to offset {bound} on channel "
            f"{ref.channel} ({len(by_batch)} batch(es) in the request): {message}; the batch is "
            "committed except the rows in error (attributed per request: without the table's "
            "error logging Snowflake does not say which rows)"
        )
        letters.append(
            batch_letter(
                ref, parts, reason, kind="row_errors",
                letter_id=row_errors_letter_id(parts[0], window.total),
                detail={"attribution": "request", "errors_in_window": window.errors},
            )
        )  # fmt: skip
        _log.warning("channel.row_errors", channel=ref.channel, batch_id=batch_id,
                     count=window.errors)  # fmt: skip
    return letters


class RowErrors:
    """Attributes one channel's held windows (used by its pump, in the pump's thread)."""

    def __init__(
        self,
        log: ChannelLog,
        ref: ChannelRef,
        *,
        exact: ExactAttribution | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_letters: Callable[[int, int, bool], None] | None = None,
    ) -> None:
        self._log = log
        self._ref = ref
        self._exact = exact
        self._clock = clock
        self._first_seen: dict[str, float] = {}
        self._retry_at: dict[str, float] = {}
        # Requests known to this pump, by window field: (first, last) of the request holding the
        # upper bound, noted when the window's commit was confirmed.
        self.requests: dict[str, tuple[int, int]] = {}
        # Told of each attributed window: (letters stored, errors in it, attributed to a batch).
        self._on_letters = on_letters

    def note_request(self, total: int, request: tuple[int, int] | None) -> None:
        """The request holding the upper bound of the window ending at error count `total`."""
        if request is not None:
            self.requests[str(total)] = request

    def attribute(self, lease: str) -> bool:
        """Attribute every held window that can be now; whether any is left for later."""
        left = False
        now = self._clock()
        for window in self._log.held_windows(self._ref):
            if now < self._retry_at.get(window.field, 0.0):
                left = True
                continue
            entries = self._log.held_entries(self._ref, window)
            letters = self._letters(window, entries)
            if letters is None:
                self._retry_at[window.field] = now + EXACT_RETRY_SECONDS
                left = True
                continue
            self._retry_at.pop(window.field, None)
            self._log.release_held(
                self._ref, lease, window, entries,
                [(letter.letter_id, letter.dumps()) for letter in letters],
                now_ms=int(time.time() * 1000),
            )  # fmt: skip
            self._first_seen.pop(window.field, None)
            self.requests.pop(window.field, None)
            if not letters:
                _log.error(
                    "channel.row_errors.unattributed", channel=self._ref.channel,
                    count=window.errors, upper_bound=window.upper_bound, message=window.message,
                )  # fmt: skip
            if self._on_letters is not None:
                self._on_letters(len(letters), window.errors, bool(letters))
        return left

    def _letters(self, window: HeldWindow, entries: Sequence[Entry]) -> list[DeadLetter] | None:
        if self._exact is not None:
            first = self._first_seen.setdefault(window.field, self._clock())
            try:
                letters = self._exact.letters(self._ref, window, entries)
            except Exception as exc:  # noqa: BLE001 (the error table is a refinement)
                _log.warning("channel.row_errors.error_table_failed", channel=self._ref.channel,
                             error=type(exc).__name__, detail=str(exc))  # fmt: skip
                letters = None
                first = self._clock() - EXACT_DEADLINE_SECONDS  # fall back now
            if letters is not None:
                return letters
            if self._clock() - first < EXACT_DEADLINE_SECONDS:
                return None
            _log.warning("channel.row_errors.error_table_late", channel=self._ref.channel,
                         waited_s=EXACT_DEADLINE_SECONDS)  # fmt: skip
        return coarse_letters(self._ref, window, entries, self.requests.get(window.field))
