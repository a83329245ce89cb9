"""A model of delivery protocol v2.1: broker -> tasks -> channel log (state Redis) -> pumps ->
Snowflake channel, with dead letters, row errors, requeue, and a state store that can lose any
suffix of its writes.

What runs is the product's own decision code wherever it has no I/O:
`worker.delivery.offsets.ChannelOffsets` decides what each pump reads, coalesces, sends one entry
at a time while isolating a refusal, and what a status confirms (each pump holds one, copied per
transition); `worker.delivery.letters` builds the letters (`batch_letter`, the deterministic
`failed_letter_id` and `row_errors_letter_id`) from `Entry` objects. The Lua scripts are mirrored
in tests/model/store.py, one function per script; the pump's control flow (worker/delivery/pump.py,
refusals.py, rowerrors.py) and the task's (worker/tasks.py) are mirrored below, stage by stage.

What is abstracted (docs/delivery.md, "The model check", says it for readers):
- One channel. A batch is a few pieces, one entry each; a model row is one original piece
  (batch, piece), so a requeued letter holding some pieces logs exactly those rows again.
- Offsets are `next + 1`: `max(next + 1, clock)` with a clock that never helps, i.e. at or below
  every offset issued (it can have gone back arbitrarily far). The protocol compares offsets and
  never reads the clock otherwise, and a clock ahead only moves new offsets further above C.
- Every Redis script is one atomic step, and so is each Snowflake call. A pump's read of the log
  and its reads before a script (the refused batch's pieces, a held window's entries) are folded
  into the script's step: everything that could change them in between is fenced by the same
  lease and session checks the script makes.
- Time: linger, rates, backoff, the poller's schedule and timeouts are nondeterministic choices;
  a commit-wait timeout and the balancer's incarnation check may reopen at any time (they are
  timers). TTLs: the lease expires nondeterministically; dedup records and the refusal gate never
  expire. The log's byte cap (backpressure) only delays a task and is left out.
- The state store: `durable` is the prefix of its writes that survives (what the AOF on disk or
  a replica holds); PERSIST moves it up to the present (an fsync, a replica catching up), LOSS
  rolls the store back to it and starts a new incarnation (an RDB or AOF restart, a lagging
  replica promoted, a restart from empty when nothing was ever persisted). With
  `Params.min_replicas`, a write followed by a successful WAIT is durable at once (one replica,
  and that replica is the one promoted: SNOWPIPE_STATE_MIN_REPLICAS = the replicas there are).
- Row errors are attributed exactly (the error table names each rejected row's offset); coarse
  attribution letters a superset of batches and is not modelled. A rejected row is one row.
- Lease values are unique (random tokens): a counter outside the store, never rolled back.

Properties (the tests' docstrings say which scope checks which): see `invariant` and `complete`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

from tests.model import store as redis
from tests.model.store import Letter, LogEntry, Store, Window
from worker.delivery.channels import ChannelRef
from worker.delivery.letters import batch_letter, failed_letter_id, row_errors_letter_id
from worker.delivery.log import Entry
from worker.delivery.offsets import ChannelOffsets

REF = ChannelRef("DB", "PUBLIC", "PIPE", "snowpipe_0")


class Mutant(enum.Enum):
    """Deliberately broken variants: the model check must find a counterexample for each."""

    # v2's mistakes the existing check already caught
    REPLAY_FROM_SENT = "replay_from_sent"  # a reopen resumes after its own sent_upto, not C
    OFFSET_PER_ATTEMPT = "offset_per_attempt"  # the log write ignores the dedup record
    TRIM_UNCHECKED = "trim_unchecked"  # TRIM without the session check, up to sent_upto
    OPEN_KEEPS_PENDING = "open_keeps_pending"  # Snowflake's open does not discard in-flight rows
    # the five holes of v2 (issue 15)
    OLDER_STATE_MOVES = "older_state_moves"  # no settle gate; entries <= C moved above C
    UNREPLICATED_SENDS = "unreplicated_sends"  # MARK_SENT without its WAIT (MIN_REPLICAS on)
    SPLIT_LETTERS = "split_letters"  # a letter per read page, each deleting the dedup record
    REFUSED_OPEN_DEAD_LETTERS_ALL = "refused_open_dead_letters_all"  # above in-memory committed
    ERRORS_IN_MEMORY = "errors_in_memory"  # the error baseline is the open's count, not stored


@dataclass(frozen=True)
class Params:
    """A scope: what the model may do, and how often (budgets keep the graph finite)."""

    pumps: int = 2
    batches: tuple[int, ...] = (2, 1)  # pieces per batch
    poison: tuple[int, ...] = ()  # rows Snowflake refuses (400) until the operator fixes them
    rejected: tuple[int, ...] = ()  # rows Snowflake rejects at commit (row errors)
    pipe_missing: bool = False  # opens are refused until the operator creates the pipe
    open_refusals: int = 0  # times Snowflake starts refusing opens mid-run (until fixed)
    duplicate_publishes: int = 0  # extra copies of a batch's original message
    task_crashes: int = 0  # between the log write and the ack (a crash before it is a no-op)
    pump_crashes: int = 0
    lease_expiries: int = 0  # while the holder is alive (after a crash: unbudgeted)
    lost_answers: int = 0  # an append accepted with its answer lost, or the request lost
    losses: int = 0  # LOSS: the state store loses every write after its durable prefix
    min_replicas: bool = False  # SNOWPIPE_STATE_MIN_REPLICAS=1 (WAIT after the writes that need it)
    replica_timeouts: int = 0  # WAITs that time out (with min_replicas)
    error_table_lag: bool = False  # attributing a held window may be put off (table not ready)
    requeue_crashes: int = 0  # the operator's requeue publishes and dies before removing
    coalesce: int = 2  # most entries in one request (SNOWPIPE_COALESCE_MAX_BYTES)
    commit_timeout: bool = True
    reduce: bool = True  # partial-order reduction of task bookkeeping (see `_bookkeeping`)
    mutant: Mutant | None = None
    rows_of: tuple[tuple[int, ...], ...] = field(init=False)  # rows by batch
    batch_of: tuple[int, ...] = field(init=False)  # batch by row

    def __post_init__(self) -> None:
        rows: list[tuple[int, ...]] = []
        batch_of: list[int] = []
        for b, pieces in enumerate(self.batches):
            rows.append(tuple(range(len(batch_of), len(batch_of) + pieces)))
            batch_of.extend([b] * pieces)
        object.__setattr__(self, "rows_of", tuple(rows))
        object.__setattr__(self, "batch_of", tuple(batch_of))

    def __str__(self) -> str:
        shown = []
        for name in self.__dataclass_fields__:
            if name in ("rows_of", "batch_of", "reduce"):
                continue
            value = getattr(self, name)
            default = Params.__dataclass_fields__[name].default
            if name in ("pumps", "batches") or value != default:
                shown.append(f"{name}={value.value if isinstance(value, Mutant) else value}")
        return ", ".join(shown)


# --- The product's objects for the model's entries -----------------------------------------------

_ENTRIES: dict[LogEntry, Entry] = {}
_LOG_ENTRIES: dict[Entry, LogEntry] = {}
ROW_BYTES = len(orjson.dumps({"row": 0})) + 1  # rows 0..9: one size, so coalescing is by count


def product_entry(x: LogEntry) -> Entry:
    """The `Entry` the pump would read for `x` (its NDJSON names the model's row)."""
    entry = _ENTRIES.get(x)
    if entry is None:
        data = orjson.dumps({"row": x.row}) + b"\n"
        entry = Entry(x.offset, f"b{x.batch}", 1, data, 0, x.piece, x.pieces, x.piece)
        _ENTRIES[x] = entry
        _LOG_ENTRIES[entry] = x
    return entry


def model_entry(entry: Entry) -> LogEntry:
    return _LOG_ENTRIES[entry]


def letter_of(parts: list[LogEntry], kind: str, letter_id: str, rows: tuple[int, ...] = ()
              ) -> Letter:  # fmt: skip
    """The product's letter for `parts` (one batch's entries), as the model stores it."""
    entries = [product_entry(x) for x in parts]
    letter = batch_letter(REF, entries, "refused", kind="failed", letter_id=letter_id)
    made = tuple(int(row["row"]) for row in letter.rows)
    return Letter(letter.letter_id, kind, parts[0].batch, rows or made)


# --- State -------------------------------------------------------------------------------------


class Message(NamedTuple):
    """A message in the broker: a batch's rows, the letter it requeues, whether the log answered
    (the ack is pending)."""

    batch: int
    rows: tuple[int, ...]
    requeue_of: str = ""
    answered: bool = False


class Snowflake(NamedTuple):
    seq: int = 0  # the channel's client sequencer: bumped by every open
    committed: int = 0  # C
    errors: int = 0  # E (rows_error_count)
    pending: tuple[tuple[LogEntry, ...], ...] = ()  # accepted requests, not yet committed
    pipe_ok: bool = True  # opens succeed
    fixed: bool = True  # the poison rows are accepted


# A pump's stage: where it is in ChannelPump's loop.
NONE = 0  # no pump for the channel on this node (never started, crashed, or stopped)
HELD = 1  # holds a lease (it thinks), not open: `_open` starts with `holds()`
CHECKED = 2  # holds() said yes: the open is next
OPENED = 3  # Snowflake opened the channel: the settle is next
DEAD_LETTERING = 4  # settled with a refusal pending: `dead_letter_refused` is next
ATTRIBUTING = 5  # settled (or trimmed with errors risen): `RowErrors.attribute` is next
OPEN = 6  # the session: read, mark, append, poll, trim
REFUSING = 7  # the open was refused for good: `refused_open` (REFUSE) is next
UNSENT = 8  # refused_open: dead-lettering the batches above the sent mark



class Pump(NamedTuple):
    """A pump's memory; `Pump()` is no pump (a new one starts with a fresh ChannelOffsets)."""

    stage: int = NONE
    lease: int = 0
    offsets: ChannelOffsets | None = None
    token: int = 0  # Snowflake's seq at its open (the continuation token)
    inc: int = 0  # the incarnation its session settled in (stage CHECKED: of its lease check)
    mark: int = 0  # the sent mark as it knows it
    seen_errors: int = 0  # Snowflake's error count at its last confirmation
    opened_at: tuple[int, int] = (0, 0)  # (C, E) of the open (stage OPENED)
    unreplicated: bool = False  # a write missed its replicas: WAIT first
    held_left: bool = False  # a held window waits for the error table
    refuse_mark: int = 0  # stage UNSENT: the sent mark read after REFUSE
    cursor: int = 0  # stage UNSENT: how far the pages were read


class Budget(NamedTuple):
    dups: int
    task_crashes: int
    pump_crashes: int
    expiries: int
    lost: int
    losses: int
    timeouts: int
    open_refusals: int
    requeue_crashes: int


class State(NamedTuple):
    messages: tuple[Message, ...]  # sorted multiset
    store: Store
    durable: Store | None  # None once no LOSS is left (nothing can be lost any more)
    inc: int  # the state store's incarnation (run_id:master_replid)
    pumps: tuple[Pump, ...]
    sf: Snowflake
    commits: tuple[int, ...]  # by row: times Snowflake committed it
    lost_log: int  # bit b: a LOSS took a log write (the entries, the record) of batch b
    lost_letter: int  # bit b: a LOSS took a dead letter of batch b
    budget: Budget
    leases: int  # lease values issued (fresh values are random tokens in the product)
    task_letters: int  # letters written by tasks (their ids are random in the product)


Move = tuple[str, State]


def _bits(mask: int) -> list[int]:
    return [b for b in range(mask.bit_length()) if mask >> b & 1]


class DeliveryModel:
    def __init__(self, params: Params) -> None:
        self.params = params
        self.mutant = params.mutant
        self.max_bytes = params.coalesce * ROW_BYTES

    def initial(self) -> State:
        p = self.params
        return State(
            messages=tuple(sorted(Message(b, rows) for b, rows in enumerate(p.rows_of))),
            store=Store(records=(None,) * len(p.batches)),
            durable=Store(records=(None,) * len(p.batches)) if p.losses else None,
            inc=1,
            pumps=(Pump(),) * p.pumps,
            sf=Snowflake(pipe_ok=not p.pipe_missing, fixed=not p.poison),
            commits=(0,) * len(p.batch_of),
            lost_log=0,
            lost_letter=0,
            budget=Budget(
                dups=p.duplicate_publishes,
                task_crashes=p.task_crashes,
                pump_crashes=p.pump_crashes,
                expiries=p.lease_expiries,
                lost=p.lost_answers,
                losses=p.losses,
                timeouts=p.replica_timeouts,
                open_refusals=p.open_refusals,
                requeue_crashes=p.requeue_crashes,
            ),
            leases=0,
            task_letters=0,
        )

    # -- properties ---------------------------------------------------------------------------

    def _excused(self, s: State) -> int:
        """Batches a LOSS excuses from exactly once (without MIN_REPLICAS): bit b set when
        the store lost b's log write or one of its dead letters."""
        return 0 if self.params.min_replicas else s.lost_log | s.lost_letter

    def _duplicable(self, s: State) -> int:
        """Batches a LOSS excuses from "never twice": bit b set when the store lost b's log
        write (its dedup record), without MIN_REPLICAS."""
        return 0 if self.params.min_replicas else s.lost_log

    def invariant(self, s: State) -> str | None:
        p = self.params
        duplicable = self._duplicable(s)
        twice = [
            r for r, n in enumerate(s.commits) if n > 1 and not duplicable >> p.batch_of[r] & 1
        ]
        if twice:
            return f"row(s) {twice} committed more than once"
        by_batch: dict[int, int] = {}
        for letter in s.store.letters:
            if letter.kind == "row_errors":
                by_batch[letter.batch] = by_batch.get(letter.batch, 0) + 1
            elif "@" in letter.letter_id:  # a letter from the log: "batch@first"
                first = int(letter.letter_id.split("@")[1])
                if any(x.batch == letter.batch and x.first == first for x in s.store.log):
                    return f"letter {letter.letter_id} was written with pieces left in the log"
        for b, n in by_batch.items():
            if not set(p.rows_of[b]) & set(p.rejected):
                return f"a row_errors letter for b{b}, which has no rejected row"
            if n > 1 and not duplicable >> b & 1:
                return f"{n} row_errors letters for b{b}"
        return None

    def complete(self, s: State) -> str | None:
        p = self.params
        if s.messages:
            return f"messages not acknowledged: {s.messages}"
        failed = [x.letter_id for x in s.store.letters if x.kind == "failed"]
        if failed:
            return f"letters not requeued: {failed}"
        excused = self._excused(s)
        wrong = [
            r for r, n in enumerate(s.commits) if n != 1 and not excused >> p.batch_of[r] & 1
        ]
        if wrong:
            return f"row(s) {wrong} not committed exactly once: {s.commits}"
        lettered = {x.batch for x in s.store.letters if x.kind == "row_errors"}
        for b, rows in enumerate(p.rows_of):
            if set(rows) & set(p.rejected) and b not in lettered and not excused >> b & 1:
                return f"b{b} has a rejected row and no row_errors letter"
        return None

    # -- transitions --------------------------------------------------------------------------

    def successors(self, s: State) -> list[Move]:
        quiet = list(self._bookkeeping(s))
        if quiet and self.params.reduce:
            return quiet
        moves = [*quiet, *self._tasks(s), *self._environment(s), *self._operator(s)]
        for i, pump in enumerate(s.pumps):
            moves.extend(self._pump(s, i, pump))
        return moves

    # -- the store's durability ---------------------------------------------------------------

    def _waited(self, s: State) -> State:
        """A successful WAIT: the replica holds everything the primary holds."""
        return s if s.durable is None else s._replace(durable=s.store)

    def _loss(self, s: State) -> State:
        """LOSS: the store comes back as its durable prefix, in a new incarnation."""
        assert s.durable is not None
        old, new = s.store, s.durable
        lost_log = s.lost_log
        lost_letter = s.lost_letter
        for b, record in enumerate(old.records):
            if record is None:
                continue
            was = new.records[b]
            if was is None or record[:2] != was[:2]:
                lost_log |= 1 << b
            elif record.letter and record.letter != was.letter:
                lost_letter |= 1 << b  # its dead-lettering from the log
        kept = set(new.letters)
        for letter in old.letters:
            if letter.kind == "failed" and letter not in kept:
                lost_letter |= 1 << letter.batch
        losses = s.budget.losses - 1
        return s._replace(
            store=new,
            durable=new if losses else None,
            inc=s.inc + 1,
            lost_log=lost_log,
            lost_letter=lost_letter,
            budget=s.budget._replace(losses=losses),
        )

    def _environment(self, s: State) -> Iterator[Move]:
        st, sf = s.store, s.sf
        if s.durable is not None:
            if s.durable != st:
                yield "state store: the durable copy catches up (fsync, replica)", s._replace(
                    durable=st
                )
            yield "state store: LOSS back to its durable prefix (new incarnation)", self._loss(s)
        if st.lease:
            holder_alive = any(q.stage != NONE and q.lease == st.lease for q in s.pumps)
            if not holder_alive:
                yield "redis: the lease expires (no live holder)", s._replace(
                    store=st._replace(lease=0)
                )
            elif s.budget.expiries:
                yield "redis: the lease expires (holder alive but slow)", s._replace(
                    store=st._replace(lease=0),
                    budget=s.budget._replace(expiries=s.budget.expiries - 1),
                )
        if sf.pending:
            request, *rest = sf.pending
            commits = list(s.commits)
            for x in request:
                commits[x.row] += 1
            errors = sf.errors + sum(1 for x in request if x.row in self.params.rejected)
            yield (
                f"snowflake: COMMIT {_span(request)}",
                s._replace(
                    sf=sf._replace(pending=tuple(rest), committed=request[-1].offset,
                                   errors=errors),
                    commits=tuple(commits),
                ),
            )  # fmt: skip
        if s.budget.open_refusals and sf.pipe_ok:
            yield "snowflake: opens refused from now on (a 4xx)", s._replace(
                sf=sf._replace(pipe_ok=False),
                budget=s.budget._replace(open_refusals=s.budget.open_refusals - 1),
            )

    # -- the operator -------------------------------------------------------------------------

    def _operator(self, s: State) -> Iterator[Move]:
        sf = s.sf
        if not (sf.fixed and sf.pipe_ok):
            yield "operator: fixes the table / creates the pipe", s._replace(
                sf=sf._replace(fixed=True, pipe_ok=True)
            )
            return
        for letter in s.store.letters:
            if letter.kind != "failed":
                continue
            message = Message(letter.batch, letter.rows, letter.letter_id)
            published = s._replace(messages=tuple(sorted((*s.messages, message))))
            left = tuple(x for x in s.store.letters if x != letter)
            yield (
                f"operator: requeue {letter.letter_id}",
                published._replace(store=s.store._replace(letters=left)),
            )
            if s.budget.requeue_crashes:
                yield (
                    f"operator: requeue {letter.letter_id}, dies before removing it",
                    published._replace(
                        budget=s.budget._replace(requeue_crashes=s.budget.requeue_crashes - 1)
                    ),
                )

    # -- tasks --------------------------------------------------------------------------------

    def _answer(self, s: State, m: Message) -> str:
        """The APPEND script's decision for message `m` (worker/delivery/log.py `_APPEND`):
        "already", "dead", "refused", "unsettled" or "log"."""
        record = s.store.records[m.batch]
        if record is not None and self.mutant is not Mutant.OFFSET_PER_ATTEMPT:
            if not record.letter:
                return "already"
            if record.letter != m.requeue_of:
                return "dead"
        if s.store.settled != s.inc and self.mutant is not Mutant.OLDER_STATE_MOVES:
            return "refused" if s.store.refused else "unsettled"
        return "log"

    def _bookkeeping(self, s: State) -> Iterator[Move]:
        """Task steps that change only the broker and the task budgets: acks, crashes between
        the log write and the ack (redelivery), log writes answered by the dedup record while no
        LOSS can still take it, duplicate publishes.

        With `Params.reduce` (partial-order reduction), a state with any of these enabled is
        expanded by these alone. Sound: they commute with every other step and neither enable
        nor disable one (a queued message is inert until a task takes it; a dedup answer, with
        no LOSS left and no WAIT that could move the durable copy, stays a dedup answer: a live
        record only becomes a "D" one, and a requeue's letter id names an older logging); they
        never change commits or the store; and they strictly decrease (budgets, messages,
        unanswered messages), so they lie on no cycle. Every terminal state and every violation
        stays reachable (test_reduction_preserves_terminal_states checks it on small scopes)."""
        quiet = s.budget.losses == 0 and self.mutant not in (
            Mutant.OFFSET_PER_ATTEMPT,
            Mutant.SPLIT_LETTERS,
        )
        for m in sorted(set(s.messages)):
            rest = list(s.messages)
            rest.remove(m)
            if m.answered:
                yield f"task b{m.batch}: ack", s._replace(messages=tuple(rest))
                if s.budget.task_crashes:
                    yield (
                        f"task b{m.batch}: crash before ack (redelivered)",
                        s._replace(
                            messages=tuple(sorted((*rest, m._replace(answered=False)))),
                            budget=s.budget._replace(task_crashes=s.budget.task_crashes - 1),
                        ),
                    )
            elif quiet and self._answer(s, m) in ("already", "dead"):
                yield (
                    f"task b{m.batch}: LOG -> {self._answer(s, m)} (no change)",
                    s._replace(messages=tuple(sorted((*rest, m._replace(answered=True))))),
                )
        if s.budget.dups:
            for b, rows in enumerate(self.params.rows_of):
                yield (
                    f"broker: b{b} published again",
                    s._replace(
                        messages=tuple(sorted((*s.messages, Message(b, rows)))),
                        budget=s.budget._replace(dups=s.budget.dups - 1),
                    ),
                )

    def _tasks(self, s: State) -> Iterator[Move]:
        """`ingest_batch`: the APPEND script (with MIN_REPLICAS, a WAIT on the same connection),
        then the ack. A crash before the script changes nothing (the message is redelivered);
        an UNSETTLED answer puts the batch back in the queue: nothing changes either."""
        p = self.params
        for m in sorted(set(s.messages)):
            if m.answered:
                continue
            answer = self._answer(s, m)
            rest = list(s.messages)
            rest.remove(m)
            answered = s._replace(messages=tuple(sorted((*rest, m._replace(answered=True)))))
            name = f"task b{m.batch}" + (f" (requeue of {m.requeue_of})" if m.requeue_of else "")
            if answer in ("already", "dead"):
                # Bookkeeping when nothing can be lost; otherwise its WAIT moves the durable copy.
                if s.budget.losses == 0 and self.mutant not in (
                    Mutant.OFFSET_PER_ATTEMPT,
                    Mutant.SPLIT_LETTERS,
                ):
                    continue
                if p.min_replicas:
                    yield f"{name}: LOG -> {answer}, WAIT ok", self._waited(answered)
                else:
                    yield f"{name}: LOG -> {answer}", answered
            elif answer == "refused":
                # The gate is closed with a reason: the task dead-letters the batch (a requeue
                # keeps its letter id, so the record's "D" still names it; else a random id),
                # with MIN_REPLICAS WAITs for the letter, then acknowledges.
                letter = Letter(
                    m.requeue_of or f"b{m.batch}#t{s.task_letters + 1}", "failed", m.batch, m.rows
                )
                written = s.store._replace(letters=redis.add_letters(s.store.letters, (letter,)))
                label = f"{name}: LOG -> refused, dead-lettered {letter.letter_id}"
                state = answered._replace(
                    store=written, task_letters=s.task_letters + (not m.requeue_of)
                )
                if not p.min_replicas:
                    yield label, state
                    continue
                yield f"{label}, WAIT ok", self._waited(state)
                if s.budget.timeouts:
                    yield f"{label}, WAIT times out (held, retried)", state._replace(
                        messages=s.messages,
                        budget=s.budget._replace(timeouts=s.budget.timeouts - 1),
                    )
            elif answer == "log":
                st, record = redis.append(s.store, m.batch, m.rows)
                logged = answered._replace(store=st)
                label = f"{name}: LOG at {record.first}..{record.last}"
                if not p.min_replicas:
                    yield label, logged
                    continue
                yield f"{label}, WAIT ok", self._waited(logged)
                if s.budget.timeouts:
                    yield f"{label}, WAIT times out (held, retried)", s._replace(
                        store=st, budget=s.budget._replace(timeouts=s.budget.timeouts - 1)
                    )

    # -- pumps --------------------------------------------------------------------------------

    def _pump(self, s: State, i: int, p: Pump) -> Iterator[Move]:
        name = f"pump{i}"

        def put(q: Pump, state: State = s) -> State:
            return state._replace(pumps=(*state.pumps[:i], q, *state.pumps[i + 1 :]))

        st = s.store
        if p.stage == NONE:
            if not st.lease:
                lease = s.leases + 1
                yield (
                    f"{name}: ACQUIRE the lease",
                    put(
                        Pump(HELD, lease, ChannelOffsets()),
                        s._replace(store=st._replace(lease=lease), leases=lease),
                    ),
                )
            return
        if s.budget.pump_crashes:
            yield f"{name}: crash", put(
                Pump(), s._replace(budget=s.budget._replace(pump_crashes=s.budget.pump_crashes - 1))
            )
        if st.lease != p.lease:
            yield f"{name}: balancer finds the lease lost, stops the pump", put(Pump())
        stage = p.stage
        if stage == HELD:
            if st.lease == p.lease:
                # `_open` reads the incarnation, then checks the lease (a LOSS in between only
                # makes the settle refuse: the same as one right after both).
                yield f"{name}: holds() ok", put(p._replace(stage=CHECKED, inc=s.inc))
        elif stage == CHECKED:
            yield from self._open(s, name, p, put)
        elif stage == OPENED:
            yield from self._settle(s, name, p, put)
        elif stage == DEAD_LETTERING:
            yield from self._dead_letter_refused(s, name, p, put)
        elif stage == ATTRIBUTING:
            yield from self._attribute(s, name, p, put)
        elif stage == OPEN:
            yield from self._session(s, name, p, put)
        elif stage == REFUSING:
            yield from self._refuse(s, name, p, put)
        elif stage == UNSENT:
            yield from self._dead_letter_unsent(s, name, p, put)

    def _failed(self, status: int, p: Pump) -> Pump:
        """A session script refused: LeaseLost stops the pump, StoreChanged reopens."""
        return Pump() if status == redis.LEASE_LOST else p._replace(stage=HELD)

    def _open(self, s: State, name: str, p: Pump, put: Callable[..., State]) -> Iterator[Move]:
        sf = s.sf
        if not sf.pipe_ok:
            yield f"{name}: OPEN -> refused for good", put(p._replace(stage=REFUSING))
            return
        seq = sf.seq + 1
        pending = sf.pending if self.mutant is Mutant.OPEN_KEEPS_PENDING else ()
        yield (
            f"{name}: OPEN (C={sf.committed}, E={sf.errors})",
            put(
                p._replace(stage=OPENED, token=seq, opened_at=(sf.committed, sf.errors)),
                s._replace(sf=sf._replace(seq=seq, pending=pending)),
            ),
        )

    def _settle(self, s: State, name: str, p: Pump, put: Callable[..., State]) -> Iterator[Move]:
        c, e = p.opened_at
        st = s.store
        if self.mutant is Mutant.OLDER_STATE_MOVES and st.lease == p.lease and st.next < c:
            st = _raise_floor(st, c)
        e0 = e if self.mutant is Mutant.ERRORS_IN_MEMORY else None
        settled = redis.settle(st, p.lease, c, e, s.inc, p.inc, e0=e0)
        if isinstance(settled, int):
            yield f"{name}: SETTLE -> {_refusal(settled)}", put(self._failed(settled, p))
            return
        offsets = p.offsets.copy() if p.offsets is not None else ChannelOffsets()
        before = offsets.sent_upto
        offsets.opened(c)
        if self.mutant is Mutant.REPLAY_FROM_SENT and before > c:
            offsets.sent_upto = offsets.read_upto = before
        q = p._replace(
            stage=self._after_settle(offsets, settled),
            offsets=offsets,
            inc=s.inc,
            mark=settled.sent,
            seen_errors=e,
            # With replicas, the stored mark is trusted only after a WAIT (the barrier): the
            # pump that raised it may have died before its own WAIT.
            unreplicated=p.unreplicated or self.params.min_replicas,
        )
        yield f"{name}: SETTLE at C={c}", put(q, s._replace(store=settled))

    @staticmethod
    def _after_settle(offsets: ChannelOffsets, st: Store) -> int:
        if offsets.refusal is not None:
            return DEAD_LETTERING
        return ATTRIBUTING if st.windows else OPEN

    def _dead_letter_refused(
        self, s: State, name: str, p: Pump, put: Callable[..., State]
    ) -> Iterator[Move]:
        """`Refusals.dead_letter_refused`: the refused batch's pieces still in the log, one
        letter, the DEAD_LETTER script in mode "settled"."""
        assert p.offsets is not None and p.offsets.refusal is not None
        entry = p.offsets.refusal.entry
        first, last = entry.batch_offsets
        batch = model_entry(entry).batch
        parts = [x for x in s.store.log if first <= x.offset <= last and x.batch == batch]
        offsets = p.offsets.copy()
        offsets.refusal_settled()
        if not parts:
            yield f"{name}: refused batch b{batch} is gone", put(
                p._replace(stage=self._after_settle(offsets, s.store), offsets=offsets)
            )
            return
        result = self._write_letters(s, p, parts, settled=True)
        if isinstance(result, int):
            label = f"{name}: DEAD_LETTER b{batch} -> {_refusal(result)}"
            yield label, put(self._failed(result, p))
            return
        label = f"{name}: DEAD_LETTER b{batch} ({_span(tuple(parts))})"
        if not self.params.min_replicas:
            yield label, put(
                p._replace(stage=self._after_settle(offsets, result), offsets=offsets),
                s._replace(store=result),
            )
            return
        done = self._waited(s._replace(store=result))
        yield f"{label}, WAIT ok", put(
            p._replace(stage=self._after_settle(offsets, result), offsets=offsets), done
        )
        if s.budget.timeouts:
            # StateNotReplicatedError out of `_open`: the channel stays open (run() sets
            # `_unreplicated`), the refusal stays pending, and the held windows are attributed
            # on a later turn (`_held_left` was set before the refusal was handled).
            yield f"{label}, WAIT times out", put(
                p._replace(stage=OPEN, unreplicated=True, held_left=True),
                s._replace(store=result,
                           budget=s.budget._replace(timeouts=s.budget.timeouts - 1)),
            )  # fmt: skip

    def _write_letters(
        self, s: State, p: Pump, parts: list[LogEntry], *, settled: bool, checked: bool = True
    ) -> Store | int:
        """The DEAD_LETTER script for one batch's `parts` (one letter; in SPLIT_LETTERS one per
        piece, v2's pages, each deleting the dedup record)."""
        st = s.store
        groups = [[x] for x in parts] if self.mutant is Mutant.SPLIT_LETTERS else [parts]
        for group in groups:
            lead = product_entry(group[0])
            letter_id = failed_letter_id(lead)
            if self.mutant is Mutant.SPLIT_LETTERS:
                letter_id = f"b{group[0].batch}@{group[0].offset}"
            letter = letter_of(group, "failed", letter_id)
            result = redis.dead_letter(
                st if checked else st._replace(sent=0, marked=s.inc),
                p.lease,
                s.inc,
                settled=settled,
                letter=letter,
                offsets=tuple(x.offset for x in group),
                keep_record=self.mutant is not Mutant.SPLIT_LETTERS,
            )
            if isinstance(result, int):
                if result == 0:
                    continue
                return result
            st = result if checked else result._replace(sent=st.sent, marked=st.marked)
        return st

    def _attribute(self, s: State, name: str, p: Pump, put: Callable[..., State]) -> Iterator[Move]:
        """`RowErrors.attribute` (exact): each held window's letters (the batches of its held
        entries with a rejected row) stored by RELEASE_HELD; or put off (the error table lags)."""
        st = s.store
        for window in st.windows:
            entries = [x for x in st.held if window.after < x.offset <= window.upto]
            letters = self._row_letters(entries, window)
            result = redis.release_held(st, p.lease, s.inc, window, letters)
            if isinstance(result, int):
                yield f"{name}: RELEASE_HELD -> {_refusal(result)}", put(self._failed(result, p))
                return
            st = result
        ids = ", ".join(x.letter_id for x in st.letters if x not in s.store.letters) or "none"
        yield f"{name}: RELEASE_HELD (letters: {ids})", put(
            p._replace(stage=OPEN, held_left=False), s._replace(store=st)
        )
        if self.params.error_table_lag and s.store.windows:
            yield f"{name}: the error table lags: held windows wait", put(
                p._replace(stage=OPEN, held_left=True)
            )

    def _row_letters(self, entries: list[LogEntry], window: Window) -> tuple[Letter, ...]:
        letters = []
        for batch in sorted({x.batch for x in entries}):
            parts = [x for x in entries if x.batch == batch]
            rejected = tuple(x.row for x in parts if x.row in self.params.rejected)
            if rejected:
                letter_id = row_errors_letter_id(product_entry(parts[0]), window.total)
                letters.append(letter_of(parts, "row_errors", letter_id, rejected))
        return tuple(letters)

    def _session(self, s: State, name: str, p: Pump, put: Callable[..., State]) -> Iterator[Move]:
        """One channel session (ChannelPump.step with the channel open)."""
        assert p.offsets is not None
        offsets, sf, st = p.offsets, s.sf, s.store
        if p.inc != s.inc:
            yield f"{name}: balancer sees a new incarnation, reopens", put(p._replace(stage=HELD))
        if p.unreplicated:
            # The barrier: MARK_SENT of the mark it has, and a WAIT, before anything else.
            result = redis.mark_sent(st, p.lease, s.inc, p.mark)
            if isinstance(result, int):
                label = f"{name}: MARK_SENT (barrier) -> {_refusal(result)}"
                yield label, put(self._failed(result, p))
            else:
                yield f"{name}: MARK_SENT (barrier), WAIT ok", put(
                    p._replace(unreplicated=False), self._waited(s._replace(store=result))
                )
            return
        if offsets.inflight:
            if self.params.commit_timeout:
                yield f"{name}: commit wait times out, reopens", put(p._replace(stage=HELD))
            if sf.committed > offsets.committed or sf.errors > p.seen_errors:
                yield from self._confirm(s, name, p, put)
        if p.held_left:
            yield from self._attribute(s, name, p, put)
        fresh = [x for x in st.log if x.offset > offsets.read_upto]
        if fresh:
            read = offsets.copy()
            read.extend([product_entry(x) for x in fresh], 0.0)
            yield f"{name}: READ {_span(tuple(fresh))}", put(p._replace(offsets=read))
        request = offsets.next_request(self.max_bytes)
        if request:
            yield from self._send(s, name, p, put, request)

    def _confirm(self, s: State, name: str, p: Pump, put: Callable[..., State]) -> Iterator[Move]:
        """`ChannelPump.on_commit` with the status the poller fetched: ChannelOffsets.on_commit,
        then TRIM (which holds the window when E rose), then attribution."""
        assert p.offsets is not None
        c, e = s.sf.committed, s.sf.errors
        offsets = p.offsets.copy()
        offsets.on_commit(c, 0.0)
        e0 = p.seen_errors if self.mutant is Mutant.ERRORS_IN_MEMORY else None
        if self.mutant is Mutant.TRIM_UNCHECKED:
            result: Store | int = redis.confirm(s.store, offsets.sent_upto, e, e0)
        else:
            result = redis.trim(s.store, p.lease, s.inc, offsets.committed, e, e0=e0)
        label = f"{name}: status C={c} E={e}, TRIM"
        if isinstance(result, int):
            yield f"{label} -> {_refusal(result)}", put(self._failed(result, p))
            return
        q = p._replace(offsets=offsets)
        if e > p.seen_errors:
            q = q._replace(seen_errors=e, stage=ATTRIBUTING)
        yield label, put(q, s._replace(store=result))

    def _send(
        self, s: State, name: str, p: Pump, put: Callable[..., State], request: list[Entry]
    ) -> Iterator[Move]:
        """`ChannelPump._send_some`: raise the sent mark first when the request goes past it
        (with MIN_REPLICAS, and a WAIT), then APPEND."""
        assert p.offsets is not None
        first, last = request[0].offset, request[-1].offset
        span = f"{first}" if first == last else f"{first}..{last}"
        if last > p.mark:
            upto = max(last, p.offsets.read_upto)
            result = redis.mark_sent(s.store, p.lease, s.inc, upto)
            label = f"{name}: MARK_SENT {upto}"
            if isinstance(result, int):
                yield f"{label} -> {_refusal(result)}", put(self._failed(result, p))
                return
            marked = s._replace(store=result)
            if not self.params.min_replicas or self.mutant is Mutant.UNREPLICATED_SENDS:
                yield label, put(p._replace(mark=result.sent), marked)
                return
            yield f"{label}, WAIT ok", put(p._replace(mark=result.sent), self._waited(marked))
            if s.budget.timeouts:
                yield f"{label}, WAIT times out", put(
                    p._replace(unreplicated=True),
                    marked._replace(budget=s.budget._replace(timeouts=s.budget.timeouts - 1)),
                )
            return
        sf = s.sf
        label = f"{name}: APPEND {span}"
        if p.token != sf.seq:
            yield f"{label} -> stale token, reopens", put(p._replace(stage=HELD))
            return
        rows = [model_entry(x).row for x in request]
        if not sf.fixed and set(rows) & set(self.params.poison):
            offsets = p.offsets.copy()
            offsets.refused(request, "400")
            yield f"{label} -> refused (400)", put(p._replace(stage=HELD, offsets=offsets))
            return
        accepted = s._replace(
            sf=sf._replace(pending=(*sf.pending, tuple(model_entry(x) for x in request)))
        )
        offsets = p.offsets.copy()
        offsets.sent(request, len(request), 0.0)
        yield f"{label} -> OK", put(p._replace(offsets=offsets), accepted)
        if s.budget.lost:
            budget = s.budget._replace(lost=s.budget.lost - 1)
            yield f"{label} accepted, answer lost", put(
                p._replace(stage=HELD), accepted._replace(budget=budget)
            )
            yield f"{label}: request lost", put(p._replace(stage=HELD), s._replace(budget=budget))

    def _refuse(self, s: State, name: str, p: Pump, put: Callable[..., State]) -> Iterator[Move]:
        """`Refusals.refused_open`, first half: REFUSE closes the gate, then the sent mark is
        read."""
        st = redis.refuse(s.store, p.lease)
        if st is None:
            # LeaseLost out of `_refused_open` ends the pump's thread; the balancer drops it.
            yield f"{name}: REFUSE -> lease lost, stops", put(Pump())
            return
        yield f"{name}: REFUSE (gate closed), sent mark {st.sent}", put(
            p._replace(stage=UNSENT, refuse_mark=st.sent, cursor=0), s._replace(store=st)
        )

    def _dead_letter_unsent(
        self, s: State, name: str, p: Pump, put: Callable[..., State]
    ) -> Iterator[Move]:
        """`Refusals.refused_open`, second half: the next batch wholly above the mark read, by
        the DEAD_LETTER script in mode "unsent" (MaybeSent: kept); then back off and reopen."""
        assert p.offsets is not None
        everything = self.mutant is Mutant.REFUSED_OPEN_DEAD_LETTERS_ALL
        floor = p.offsets.committed if everything else p.refuse_mark
        candidate = next(
            (x for x in s.store.log if x.offset > p.cursor and x.first > floor), None
        )
        if candidate is None:
            yield f"{name}: refused open handled, backs off", put(p._replace(stage=HELD))
            return
        first, last = candidate.first, candidate.first + candidate.pieces - 1
        parts = [
            x for x in s.store.log if first <= x.offset <= last and x.batch == candidate.batch
        ]
        q = p._replace(cursor=max(p.cursor, last, candidate.offset))
        result = self._write_letters(s, p, parts, settled=False, checked=not everything)
        label = f"{name}: DEAD_LETTER unsent b{candidate.batch} ({_span(tuple(parts))})"
        if result == redis.MAYBE_SENT:
            yield f"{label} -> may have been sent, kept", put(q)
            return
        if isinstance(result, int):
            # LeaseLost ends the pump's thread (as in `_refuse`).
            yield f"{label} -> {_refusal(result)}", put(Pump())
            return
        if not self.params.min_replicas:
            yield label, put(q, s._replace(store=result))
            return
        yield f"{label}, WAIT ok", put(q, self._waited(s._replace(store=result)))
        if s.budget.timeouts:
            # StateNotReplicatedError out of `_refused_open` ends the thread; the balancer
            # drops the pump and releases its lease.
            released = result._replace(lease=0) if result.lease == p.lease else result
            yield f"{label}, WAIT times out: the pump's thread ends, lease released", put(
                Pump(),
                s._replace(store=released,
                           budget=s.budget._replace(timeouts=s.budget.timeouts - 1)),
            )  # fmt: skip

    # -- symmetry -----------------------------------------------------------------------------

    def key(self, s: State) -> Hashable:
        """s's class under the model's symmetries, for the explorer's visited set.

        - Lease values, continuation tokens and incarnations are fresh names compared only for
          equality: a lease value becomes 0 (none), 1 (the store's), 2 (the durable copy's: a
          LOSS can bring it back) or 3 (never again anyone's); a token current or not; an
          incarnation current or not (a new one is fresh at every LOSS).
        - A pump that is not in a session forgets what its next open overwrites: of its
          ChannelOffsets only the isolation range and the pending refusal outlive a session.
        - Pumps are interchangeable: sorted."""
        st, durable = s.store, s.durable

        def lease(v: int) -> int:
            if not v:
                return 0
            if v == st.lease:
                return 1
            return 2 if durable is not None and v == durable.lease else 3

        inc = s.inc

        def stored(x: Store | None) -> Hashable:
            if x is None:
                return None
            # Store fields in order, `settled`, `marked` and `lease` as the names they are.
            return (*x[:3], x[3] == inc, x[4] == inc, *x[5:12], lease(x[12]), x[13])

        pumps = []
        for p in s.pumps:
            if p.stage == NONE:
                pumps.append((NONE,))
                continue
            assert p.offsets is not None
            o = p.offsets
            if p.stage in (HELD, CHECKED, REFUSING, UNSENT):
                offsets: Hashable = (o.isolate_until, o.refusal, o.committed)
                session: Hashable = (p.unreplicated, p.refuse_mark, p.cursor)
                if p.stage in (HELD, CHECKED):
                    offsets = (o.isolate_until, o.refusal)
                    session = (p.unreplicated, p.stage == CHECKED and p.inc == s.inc)
                if self.mutant is Mutant.REPLAY_FROM_SENT:
                    offsets = (offsets, o.sent_upto)
            else:
                offsets = o.key()
                session = (
                    p.token == s.sf.seq, p.inc == s.inc, p.mark, p.seen_errors,
                    p.opened_at if p.stage == OPENED else None, p.unreplicated, p.held_left,
                )  # fmt: skip
            pumps.append((p.stage, lease(p.lease), offsets, session))
        pumps.sort(key=hash)  # canonical but for hash collisions (which only cost reduction)
        messages = s.messages
        if s.task_letters:
            # Task letter ids are random names: only equality and their order of birth matter.
            stores = [x for x in (st, durable) if x is not None]
            born = sorted(
                {x.letter_id for y in stores for x in y.letters if "#" in x.letter_id}
                | {m.requeue_of for m in messages if "#" in m.requeue_of},
                key=lambda name: int(name.rsplit("#t", 1)[1]),
            )
            names = {old: f"#{n}" for n, old in enumerate(born)}

            def rename(x: Store) -> Store:
                letters = (y._replace(letter_id=names.get(y.letter_id, y.letter_id))
                           for y in x.letters)  # fmt: skip
                return x._replace(letters=tuple(sorted(letters)))

            messages = tuple(
                sorted(m._replace(requeue_of=names.get(m.requeue_of, m.requeue_of))
                       for m in messages)
            )  # fmt: skip
            st = rename(st)
            durable = rename(durable) if durable is not None else None
        return (
            messages,
            stored(st),
            stored(durable),
            tuple(pumps),
            s.sf._replace(seq=0),
            s.commits,
            s.lost_log,
            s.lost_letter,
            s.budget,
        )


def _raise_floor(st: Store, c: int) -> Store:
    """v2's `raise_floor` (the OLDER_STATE_MOVES mutant): the counter is below C, so every
    entry at or below C is moved above it, in order, and the records follow."""
    moved = [x for x in st.log if x.offset <= c]
    rest = [x for x in st.log if x.offset > c]
    renamed = {x.offset: c + 1 + i for i, x in enumerate(moved)}
    log = tuple(sorted([x._replace(offset=renamed[x.offset]) for x in moved] + rest))
    records = tuple(
        r if r is None else r._replace(first=renamed.get(r.first, r.first),
                                       last=renamed.get(r.last, r.last))
        for r in st.records
    )  # fmt: skip
    return st._replace(log=log, records=records, next=max(st.next, c + len(moved)))


def _refusal(status: int) -> str:
    return {
        redis.LEASE_LOST: "lease lost, stops",
        redis.STORE_CHANGED: "store changed, reopens",
        redis.MAYBE_SENT: "may have been sent",
    }[status]


def _span(entries: tuple[LogEntry, ...]) -> str:
    first, last = entries[0].offset, entries[-1].offset
    return f"{first}" if first == last else f"{first}..{last}"
