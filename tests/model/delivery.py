"""A model of delivery core v2: broker -> tasks -> Redis channel log -> pumps -> Snowflake channel.

What is abstracted:
- One channel. Batches are small integers 0..n-1, all published at the start (plus a budgeted
  duplicate publish of any batch at any time); rows are not modelled, only which batch an entry is.
- Offsets are small counters (1, 2, ...) issued by the log; Snowflake's committed offset is one.
- Every Redis script (LOG_APPEND, ACQUIRE, TRIM, a lease read) is one atomic step; so is each
  Snowflake call (OPEN, APPEND, COMMIT). Everything else interleaves freely.
- The lease's TTL is a nondeterministic EXPIRE: unbudgeted when no live pump believes it holds the
  lease (its holder crashed), budgeted while the holder is alive but slow.
- Lease tokens are random in the design; here a generation number, and a crashed pump restarts with
  empty memory, so it can never again present its old generation.

Failures are budgeted (see `Params`) so the graph is finite and terminal states exist: every action
is enabled only when it changes the state (POLL only when its TRIM removes something, and so on).
One addition to the written design: a pump's commit wait can time out and make it reopen
(`Params.commit_timeout`); the model shows that without it rows can be stranded.

Properties: `invariant` (no batch committed twice, on every state) and `complete` (on terminal
states: every message acked and every batch committed exactly once); the tests also ask the
explorer that a complete terminal state stays reachable from every state (no loss in a loop).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

Entry = tuple[int, int]  # (offset, batch)

QUEUED, APPENDED = 0, 1  # a message's phase: waiting for a task / LOG_APPEND done, not yet acked


class Mutant(enum.Enum):
    """Deliberately broken variants: the model check must find a counterexample for each."""

    REPLAY_FROM_SENT = "replay_from_sent"  # reopen resumes after own sent_upto, not `committed`
    OFFSET_PER_ATTEMPT = "offset_per_attempt"  # LOG_APPEND ignores the dedup map
    TRIM_UNCHECKED = "trim_unchecked"  # TRIM without gen check, by the pump's sent_upto
    OPEN_KEEPS_PENDING = "open_keeps_pending"  # Snowflake OPEN does not discard in-flight rows


@dataclass(frozen=True)
class Params:
    pumps: int = 2
    batches: int = 3
    duplicate_publishes: int = 1  # extra copies of some batch (same batch id)
    task_crashes: int = 1  # before LOG_APPEND or between LOG_APPEND and ack: redelivery
    pump_crashes: int = 1  # in total, at any step
    lease_expiries: int = 1  # while the holder is alive (expiry after a crash is unbudgeted)
    lost_answers: int = 1  # APPEND accepted but answer lost, or request lost (not accepted)
    # The pump gives up waiting for `committed` to reach its sent_upto and reopens (unbudgeted: a
    # timer can fire spuriously). Without it, rows discarded by another pump's OPEN are never
    # resent when nothing new arrives: see test_without_commit_timeout_rows_can_be_stranded.
    commit_timeout: bool = True
    reduce: bool = True  # partial-order reduction of task bookkeeping (see `_bookkeeping`)
    mutant: Mutant | None = None


class Pump(NamedTuple):
    """A pump's local memory for the channel; `Pump()` is a fresh (or crashed) pump."""

    gen: int = 0  # lease generation it believes it holds, 0 = none
    checked: bool = False  # CHECK_LEASE succeeded since the last OPEN
    opened: bool = False  # it has a continuation token it has not seen fail
    token: int = 0  # continuation token (Snowflake's seq at OPEN)
    sent_upto: int = 0  # last offset answered OK (or the replay start after OPEN)


PutPump = Callable[[Pump], tuple[Pump, ...]]  # the state's pumps with one of them replaced


class State(NamedTuple):
    messages: tuple[tuple[int, int], ...]  # broker: sorted multiset of (batch, phase)
    log: tuple[Entry, ...]  # Redis channel log
    next_offset: int  # last issued offset
    dedup: tuple[int, ...]  # batch -> offset, 0 = absent
    holder: int  # lease holder's generation, 0 = free
    gen: int  # lease generation counter
    pumps: tuple[Pump, ...]
    seq: int  # Snowflake's client sequencer
    pending: tuple[tuple[Entry, ...], ...]  # appended, not yet committed requests
    committed: int  # Snowflake's committed offset
    commit_count: tuple[int, ...]  # batch -> times committed
    dups: int  # remaining budgets
    task_crashes: int
    pump_crashes: int
    expiries: int
    lost: int


def _replace_at(items: tuple[int, ...], index: int, value: int) -> tuple[int, ...]:
    return (*items[:index], value, *items[index + 1 :])


def _span(entries: tuple[Entry, ...]) -> str:
    first, last = entries[0][0], entries[-1][0]
    return f"{first}" if first == last else f"{first}..{last}"


class DeliveryModel:
    def __init__(self, params: Params) -> None:
        self.params = params
        self.mutant = params.mutant

    def initial(self) -> State:
        p = self.params
        return State(
            messages=tuple((b, QUEUED) for b in range(p.batches)),
            log=(),
            next_offset=0,
            dedup=(0,) * p.batches,
            holder=0,
            gen=0,
            pumps=(Pump(),) * p.pumps,
            seq=0,
            pending=(),
            committed=0,
            commit_count=(0,) * p.batches,
            dups=p.duplicate_publishes,
            task_crashes=p.task_crashes,
            pump_crashes=p.pump_crashes,
            expiries=p.lease_expiries,
            lost=p.lost_answers,
        )

    # -- properties ---------------------------------------------------------------------------

    @staticmethod
    def invariant(s: State) -> str | None:
        twice = [b for b, n in enumerate(s.commit_count) if n > 1]
        return f"batch(es) {twice} committed more than once" if twice else None

    @staticmethod
    def complete(s: State) -> str | None:
        if s.messages:
            return f"messages not acked: {s.messages}"
        missing = [b for b, n in enumerate(s.commit_count) if n != 1]
        return f"batch(es) {missing} not committed exactly once" if missing else None

    # -- transitions --------------------------------------------------------------------------

    def successors(self, s: State) -> list[tuple[str, State]]:
        quiet = list(self._bookkeeping(s))
        if quiet and self.params.reduce:
            return quiet
        moves = [*quiet, *self._log_appends(s), *self._lease(s), *self._snowflake(s)]
        for i, pump in enumerate(s.pumps):
            moves.extend(self._pump(s, i, pump))
        return moves

    def _bookkeeping(self, s: State) -> Iterator[tuple[str, State]]:
        """Task steps that change only the broker and the task budgets: acks, crashes between
        LOG_APPEND and ack (redelivery), a LOG_APPEND that hits the dedup map, duplicate publishes.

        With `Params.reduce` (partial-order reduction), a state with any of these enabled is
        expanded by these alone. Sound: they commute with, and neither enable nor disable, any
        other step (pumps, Snowflake, the lease and effective LOG_APPENDs touch other variables or
        another batch's messages); they never change `commit_count`; and they strictly decrease
        (task budgets + dups, number of messages + queued messages), which no step increases, so
        they lie on no cycle. Hence every terminal state and every violation of the invariant
        stays reachable (test_reduction_preserves_terminal_states checks this on a small scope)."""
        for msg in sorted(set(s.messages)):
            b, phase = msg
            rest = list(s.messages)
            rest.remove(msg)
            if phase == APPENDED:
                yield f"task b{b}: ack", s._replace(messages=tuple(rest))
                if s.task_crashes:
                    yield (
                        f"task b{b}: crash before ack (redelivered)",
                        s._replace(
                            messages=tuple(sorted((*rest, (b, QUEUED)))),
                            task_crashes=s.task_crashes - 1,
                        ),
                    )
            elif s.dedup[b] and self.mutant is not Mutant.OFFSET_PER_ATTEMPT:
                yield (
                    f"task b{b}: LOG_APPEND (dedup: no change)",
                    s._replace(messages=tuple(sorted((*rest, (b, APPENDED))))),
                )
        if s.dups:
            for b in range(self.params.batches):
                yield (
                    f"broker: b{b} published again",
                    s._replace(messages=tuple(sorted((*s.messages, (b, QUEUED)))), dups=s.dups - 1),
                )

    def _log_appends(self, s: State) -> Iterator[tuple[str, State]]:
        """A task is two steps, LOG_APPEND then ack (see `_bookkeeping`), each its own transition
        because a crash can fall before either. A crash before LOG_APPEND leaves exactly the same
        state (the message is redelivered): a self-loop, so it needs no budget."""
        for msg in sorted(set(s.messages)):
            b, phase = msg
            if phase != QUEUED:
                continue
            yield f"task b{b}: crash before LOG_APPEND (redelivered)", s
            if s.dedup[b] and self.mutant is not Mutant.OFFSET_PER_ATTEMPT:
                continue  # a dedup hit: bookkeeping
            rest = list(s.messages)
            rest.remove(msg)
            yield (
                f"task b{b}: LOG_APPEND",
                self._log_append(s, b)._replace(messages=tuple(sorted((*rest, (b, APPENDED))))),
            )

    def _log_append(self, s: State, b: int) -> State:
        """LOG_APPEND of a batch not in the dedup map (or any batch, in OFFSET_PER_ATTEMPT)."""
        offset = s.next_offset + 1
        return s._replace(
            next_offset=offset, log=(*s.log, (offset, b)), dedup=_replace_at(s.dedup, b, offset)
        )

    def _lease(self, s: State) -> Iterator[tuple[str, State]]:
        if not s.holder:
            return
        if all(p.gen != s.holder for p in s.pumps):
            yield "redis: lease expires (holder crashed)", s._replace(holder=0)
        elif s.expiries:
            yield (
                "redis: lease expires (holder alive but slow)",
                s._replace(holder=0, expiries=s.expiries - 1),
            )

    def _snowflake(self, s: State) -> Iterator[tuple[str, State]]:
        if not s.pending:
            return
        request, *rest = s.pending
        counts = list(s.commit_count)
        for _offset, b in request:
            counts[b] += 1
        yield (
            f"snowflake: COMMIT {_span(request)}",
            s._replace(pending=tuple(rest), committed=request[-1][0], commit_count=tuple(counts)),
        )

    def _pump(self, s: State, i: int, p: Pump) -> Iterator[tuple[str, State]]:
        """ACQUIRE, CHECK_LEASE and OPEN are separate steps: the lease may expire (and be taken)
        between any two of them, and a pump never re-reads the lease before APPEND or POLL."""
        name = f"pump{i}"

        def put(pump: Pump) -> tuple[Pump, ...]:
            return (*s.pumps[:i], pump, *s.pumps[i + 1 :])

        if not p.gen and not s.holder:
            gen = s.gen + 1
            yield (
                f"{name}: ACQUIRE (gen {gen})",
                s._replace(gen=gen, holder=gen, pumps=put(Pump(gen=gen))),
            )
        if p.gen and not p.checked and not p.opened:
            if s.holder == p.gen:
                yield f"{name}: CHECK_LEASE ok", s._replace(pumps=put(p._replace(checked=True)))
            else:
                yield f"{name}: CHECK_LEASE lost, drops the channel", s._replace(pumps=put(Pump()))
        if p.checked and not p.opened:
            yield f"{name}: OPEN", self._open(s, p, put)
        if p.opened:
            yield from self._append(s, name, p, put)
            if self.params.commit_timeout and p.sent_upto > s.committed:
                yield (
                    f"{name}: commit wait times out, reopens",
                    s._replace(pumps=put(p._replace(opened=False, token=0))),
                )
        yield from self._poll(s, name, p, put)
        if p != Pump() and s.pump_crashes:
            yield f"{name}: crash", s._replace(pumps=put(Pump()), pump_crashes=s.pump_crashes - 1)

    def _open(self, s: State, p: Pump, put: PutPump) -> State:
        seq = s.seq + 1
        pending = s.pending if self.mutant is Mutant.OPEN_KEEPS_PENDING else ()
        replay = s.committed
        if self.mutant is Mutant.REPLAY_FROM_SENT and p.sent_upto:
            replay = p.sent_upto
        after = p._replace(opened=True, checked=False, token=seq, sent_upto=replay)
        return s._replace(seq=seq, pending=pending, pumps=put(after))

    def _append(self, s: State, name: str, p: Pump, put: PutPump) -> Iterator[tuple[str, State]]:
        """One APPEND of the entries after sent_upto: the first one, or all of them (coalesced).
        Any failure (STALE, outcome unknown) closes the pump's view: it must CHECK_LEASE and OPEN
        again, which replays from Snowflake's committed offset."""
        entries = tuple(e for e in s.log if e[0] > p.sent_upto)
        if not entries:
            return
        failed = s._replace(pumps=put(p._replace(opened=False, token=0)))
        if p.token != s.seq:
            yield f"{name}: APPEND {_span(entries[:1])} -> STALE", failed
            return
        for chunk in dict.fromkeys((entries[:1], entries)):
            span = _span(chunk)
            accepted = (*s.pending, chunk)
            yield (
                f"{name}: APPEND {span} -> OK",
                s._replace(pending=accepted, pumps=put(p._replace(sent_upto=chunk[-1][0]))),
            )
            if s.lost:
                yield (
                    f"{name}: APPEND {span} accepted, answer lost",
                    failed._replace(pending=accepted, lost=s.lost - 1),
                )
                yield f"{name}: APPEND {span} request lost", failed._replace(lost=s.lost - 1)

    def _poll(self, s: State, name: str, p: Pump, put: PutPump) -> Iterator[tuple[str, State]]:
        """POLL reads `committed` and TRIMs the log up to it (a gen-checked script). It is a
        transition only when the TRIM removes something: a refused or empty TRIM, like a POLL that
        sees no progress, changes nothing (a stutter), and leaving it out keeps terminal states."""
        if not p.gen:
            return
        if self.mutant is Mutant.TRIM_UNCHECKED:
            upto, allowed = p.sent_upto, True
        else:
            upto, allowed = s.committed, s.holder == p.gen
        if allowed and s.log and s.log[0][0] <= upto:
            yield (
                f"{name}: POLL, TRIM <={upto}",
                s._replace(log=tuple(e for e in s.log if e[0] > upto)),
            )

    # -- symmetry -----------------------------------------------------------------------------

    def key(self, s: State) -> Hashable:
        """s's class under the model's symmetries, for the explorer's visited set.

        - Generations and tokens are fresh names only ever compared with the current holder and
          `seq`: a pump's generation becomes 0 (none), 1 (the holder's) or 2 (a stale one; a new
          lease always gets a fresh one, so stale ones never match again), a token current or not.
        - sent_upto of a closed pump is overwritten by its next OPEN (except in the mutants that
          use it), so it is forgotten.
        - Pumps are interchangeable: sorted. Batches are too: renamed in order of their offset
          (unlogged ones, which appear nowhere else, by how many copies are queued)."""
        remember_sent = self.mutant in (Mutant.REPLAY_FROM_SENT, Mutant.TRIM_UNCHECKED)
        pumps = sorted(
            (
                0 if not p.gen else 1 if p.gen == s.holder else 2,
                p.checked,
                p.opened,
                p.opened and p.token == s.seq,
                p.sent_upto if p.opened or remember_sent else 0,
            )
            for p in s.pumps
        )
        order = sorted(
            range(self.params.batches),
            key=lambda b: (s.dedup[b] == 0, s.dedup[b], s.messages.count((b, QUEUED))),
        )
        name = [0] * len(order)
        for new, old in enumerate(order):
            name[old] = new
        return (
            tuple(sorted((name[b], phase) for b, phase in s.messages)),
            tuple((offset, name[b]) for offset, b in s.log),
            tuple(tuple((offset, name[b]) for offset, b in req) for req in s.pending),
            tuple(s.dedup[b] for b in order),
            tuple(s.commit_count[b] for b in order),
            tuple(pumps),
            s.holder != 0,
            s.next_offset,
            s.committed,
            (s.dups, s.task_crashes, s.pump_crashes, s.expiries, s.lost),
        )
