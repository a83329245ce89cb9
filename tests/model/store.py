"""The state store of the delivery model: one channel's keys, and the Lua scripts of
worker/delivery/log.py mirrored as pure functions on them.

Each `Store` is an immutable snapshot of the keys the scripts touch (one channel, so no channel
key): the log stream, `next`, the dedup records, `settled`, `committed` + `errors`, `sent`, the
held stream and its windows (`heldinfo`), `refused`, the lease and the dead letters. Each
function below names the script it mirrors and follows it branch by branch, small enough to
check against the Lua by eye. What the scripts do that decides nothing here (the stats hash, the
`bytes` counter, the `channels` set, timestamps, TTLs) is left out.

Offsets are plain integers: the Lua works on decimal strings only to stay exact above 2^53.
"""

from __future__ import annotations

from typing import NamedTuple


class LogEntry(NamedTuple):
    """One entry of the log (or of the held stream)."""

    offset: int
    batch: int
    piece: int  # its index among the pieces of this logging of the batch
    pieces: int
    row: int  # the model's row: which original piece of which batch the entry carries

    @property
    def first(self) -> int:
        """The first offset of this logging of the batch (`Entry.batch_offsets`)."""
        return self.offset - self.piece


class Record(NamedTuple):
    """A dedup record `batch:{id}`: `chan TAB first TAB last`, plus `TAB D TAB letter`."""

    first: int
    last: int
    letter: str = ""  # "" while live; the letter id once dead-lettered from the log


class Window(NamedTuple):
    """A held window (`heldinfo:{chan}` field `total`): entries (after, upto] committed while
    Snowflake's error count rose by `errors` to `total`."""

    after: int
    upto: int
    errors: int
    total: int


class Letter(NamedTuple):
    """A dead letter: its id, kind ("failed" or "row_errors"), batch and rows."""

    letter_id: str
    kind: str
    batch: int
    rows: tuple[int, ...]


class Store(NamedTuple):
    log: tuple[LogEntry, ...] = ()  # in offset order
    next: int = 0
    records: tuple[Record | None, ...] = ()  # by batch
    settled: int = 0  # the incarnation of the last settle (0: none)
    marked: int = 0  # the incarnation of the last settle, kept by REFUSE (`markinc:{chan}`)
    committed: int | None = None  # absent until the first confirmation
    errors: int | None = None
    sent: int = 0
    held: tuple[LogEntry, ...] = ()
    held_top: int = 0  # the held stream's last id (XADD needs a greater one)
    windows: tuple[Window, ...] = ()  # by total
    refused: bool = False
    lease: int = 0  # the lease value (0: no lease)
    letters: tuple[Letter, ...] = ()  # by letter id


LEASE_LOST, STORE_CHANGED = -1, -2


def _record(store: Store, batch: int, record: Record | None) -> tuple[Record | None, ...]:
    records = list(store.records)
    records[batch] = record
    return tuple(records)


def add_letters(letters: tuple[Letter, ...], new: tuple[Letter, ...]) -> tuple[Letter, ...]:
    """HSET letters id JSON for each of `new` (a letter with the same id is replaced)."""
    ids = {letter.letter_id for letter in new}
    return tuple(sorted((*(x for x in letters if x.letter_id not in ids), *new)))


def session(store: Store, lease: int, incarnation: int) -> int:
    """`_SESSION`: 0, or LEASE_LOST, or STORE_CHANGED (not settled in this incarnation)."""
    if store.lease != lease:
        return LEASE_LOST
    if store.settled != incarnation:
        return STORE_CHANGED
    return 0


def append(store: Store, batch: int, rows: tuple[int, ...]) -> tuple[Store, Record]:
    """`_APPEND`, the branch that logs: pieces at next+1 .. next+k (the clock never helps:
    `max(next + 1, clock)` with the clock at or below `next`), `next` = last, the live record.
    The dedup, gate and cap branches are decided by the caller (see `DeliveryModel._log`)."""
    first = store.next + 1
    k = len(rows)
    entries = tuple(LogEntry(first + i, batch, i, k, row) for i, row in enumerate(rows))
    record = Record(first, first + k - 1)
    return (
        store._replace(
            log=store.log + entries, next=record.last, records=_record(store, batch, record)
        ),
        record,
    )


def confirm(store: Store, c: int, e: int, e0: int | None = None) -> Store:
    """`_CONFIRM` (inside SETTLE and TRIM): when the error count rose since the stored
    confirmation, copy the entries committed since, (c0, c], to the held stream with a window;
    trim the log up to c; store (c, e). `e0` overrides the stored count (a mutant)."""
    c0 = store.committed if store.committed is not None else c
    if e0 is None:
        e0 = store.errors if store.errors is not None else e
    held, top, windows = store.held, store.held_top, store.windows
    if e > e0:
        if c0 < c:
            moved = tuple(x for x in store.log if c0 < x.offset <= c)
            # XADD with an explicit id fails at or below the stream's top (pcall: skipped).
            assert all(x.offset > top for x in moved), "a held entry would be skipped"
            held = held + moved
            top = max([top, *(x.offset for x in moved)])
        else:
            c0 = c  # nothing committed since: an empty window
        windows = tuple(sorted((*(w for w in windows if w.total != e), Window(c0, c, e - e0, e))))
    committed = c if store.committed is None or store.committed <= c else store.committed
    return store._replace(
        log=tuple(x for x in store.log if x.offset > c),
        held=held,
        held_top=top,
        windows=windows,
        committed=committed,
        errors=e,
    )


def settle(
    store: Store, lease: int, c: int, e: int, incarnation: int, checked_in: int,
    *, e0: int | None = None,
) -> Store | int:  # fmt: skip
    """`_SETTLE`: LEASE_LOST if the lease is not `lease`, STORE_CHANGED if the incarnation is
    not `checked_in` (the one the pump saw before its lease check); else `next` raised to at
    least c, the confirmation, `settled` (and `markinc`) = this incarnation, the gate's refusal
    deleted."""
    if store.lease != lease:
        return LEASE_LOST
    if checked_in != incarnation:
        return STORE_CHANGED
    store = store._replace(next=max(store.next, c))
    store = confirm(store, c, e, e0)
    return store._replace(settled=incarnation, marked=incarnation, refused=False)


def trim(store: Store, lease: int, incarnation: int, c: int, e: int, *, e0: int | None = None
         ) -> Store | int:  # fmt: skip
    """`_TRIM`: the session check, then the confirmation."""
    status = session(store, lease, incarnation)
    return status if status else confirm(store, c, e, e0)


def mark_sent(store: Store, lease: int, incarnation: int, offset: int) -> Store | int:
    """`_MARK_SENT`: the session check, then `sent` = max(sent, offset)."""
    status = session(store, lease, incarnation)
    return status if status else store._replace(sent=max(store.sent, offset))


MAYBE_SENT = -3


def dead_letter(
    store: Store,
    lease: int,
    incarnation: int,
    *,
    settled: bool,
    letter: Letter,
    offsets: tuple[int, ...],
    keep_record: bool = True,
) -> Store | int:
    """`_DEAD_LETTER`: the lease check; mode "settled": settled in this incarnation, mode
    "unsent": every offset above the sent mark (else MAYBE_SENT); then the entries still in the
    log removed, the letter stored and the batch's record marked with its id (0: none left,
    nothing stored). `keep_record=False` deletes the record instead (v2, a mutant)."""
    if store.lease != lease:
        return LEASE_LOST
    if settled:
        if store.settled != incarnation:
            return STORE_CHANGED
    elif store.marked != incarnation or any(offset <= store.sent for offset in offsets):
        # The mark covers every append only if the channel was settled in this incarnation:
        # a store that came back older may have lost the write that raised it.
        return MAYBE_SENT
    wanted = set(offsets)
    found = [x for x in store.log if x.offset in wanted]
    if not found:
        return 0
    store = store._replace(
        log=tuple(x for x in store.log if x.offset not in wanted),
        letters=add_letters(store.letters, (letter,)),
    )
    record = store.records[letter.batch]
    if not keep_record:
        return store._replace(records=_record(store, letter.batch, None))
    if record is not None:  # (the script also checks the record names this channel)
        store = store._replace(
            records=_record(store, letter.batch, record._replace(letter=letter.letter_id))
        )
    return store


def refuse(store: Store, lease: int) -> Store | None:
    """`_REFUSE`: None if the lease is not `lease`; else the gate closed with the reason."""
    if store.lease != lease:
        return None
    return store._replace(settled=0, refused=True)


def release_held(
    store: Store, lease: int, incarnation: int, window: Window, letters: tuple[Letter, ...]
) -> Store | int:
    """`_RELEASE_HELD`: the session check, then the window's letters stored, its held entries
    and its `heldinfo` field deleted."""
    status = session(store, lease, incarnation)
    if status:
        return status
    return store._replace(
        letters=add_letters(store.letters, letters),
        held=tuple(x for x in store.held if not window.after < x.offset <= window.upto),
        windows=tuple(w for w in store.windows if w.total != window.total),
    )
