"""Exhaustive model check of delivery protocol v2.1 (tests/model/delivery.py) and of mutants.

Each scope is explored breadth-first to the end, with three checks: on every state the
invariant (`DeliveryModel.invariant`), on every terminal state completion
(`DeliveryModel.complete`), and from every state a complete terminal state must stay reachable
(no loss hidden in a cycle). Every figure (states, transitions, terminal states, seconds) and
every mutant's counterexample is printed in the "delivery model check" section of `make test`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import replace

import pytest

from tests.model.conftest import Report
from tests.model.delivery import DeliveryModel, Mutant, Params, State
from tests.model.explorer import Result, explore


def check(params: Params) -> Result[State]:
    model = DeliveryModel(params)
    return explore(
        model.initial(), model.successors, model.invariant, model.complete, model.key, progress=True
    )


def describe(result: Result[State]) -> str:
    return (
        f"{result.states} states, {result.transitions} transitions, "
        f"{result.terminal} terminal, {result.seconds:.1f} s"
    )


def counterexample(result: Result[State]) -> str:
    steps = "\n".join(f"  {i:2}. {label}" for i, label in enumerate(result.trace, 1))
    return f"{result.violation}\n{steps}"


def verify(name: str, params: Params, report: Report, *, at_least: int) -> None:
    result = check(params)
    report(f"{name} [{params}]: {describe(result)}")
    assert result.ok, f"{describe(result)}\n{counterexample(result)}"
    assert result.terminal > 0, "no run completes: the budgets leave no terminal state"
    # Guard against a scope silently shrinking (a broken successor function, say).
    assert result.states >= at_least, describe(result)


def test_the_core_paths_commit_every_row_exactly_once(model_report: Report) -> None:
    """v2's paths on v2.1: 2 pumps, a batch of two pieces and one of one (so requests hold one
    entry or two: `ChannelOffsets` decides, under a two-entry byte limit), one duplicate
    publish, two task crashes between the log write and the ack (a crash before it is a no-op),
    two pump crashes at any step, one expiry of a live holder's lease (between its lease check
    and its open, too), one lost append answer or lost request; Snowflake's open discards what
    is in flight, a commit wait may time out (a reopen) at any time."""
    scope = Params(
        pumps=2, batches=(2, 1), duplicate_publishes=1, task_crashes=2, pump_crashes=2,
        lease_expiries=1, lost_answers=1,
    )  # fmt: skip
    verify("core", scope, model_report, at_least=150_000)


REFUSALS = {
    # One pump at a time (a crash hands the channel over), the whole story.
    "requeue": Params(
        pumps=2, batches=(2, 1), poison=(1,), open_refusals=1, duplicate_publishes=1,
        pump_crashes=1,
    ),
    # A live holder whose lease expired meanwhile (two pumps at once).
    "stale holder": Params(
        pumps=2, batches=(2,), poison=(1,), open_refusals=1, duplicate_publishes=1,
        pump_crashes=1, lease_expiries=1,
    ),
    # The pipe missing from the start: the gate closes before anything is logged; the
    # operator's requeue may die between its publish and the letter's removal.
    "missing pipe": Params(
        pumps=1, batches=(2, 1), poison=(1,), pipe_missing=True, duplicate_publishes=1,
        requeue_crashes=1,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_batches_and_opens_are_dead_lettered_once_and_requeued_exactly_once(
    name: str, model_report: Report
) -> None:
    """Refusal -> dead letter -> requeue. The second piece of the two-piece batch is refused
    (400) until the operator fixes the table: a coalesced request holding it makes the pump
    isolate (one entry per request); the entry refused alone is remembered and its batch
    dead-lettered after the next settle, in one letter with every piece still in the log (the
    first piece may have committed: the letter names it and leaves it out). Opens may be
    refused for good (the pipe missing, or a 4xx mid-run): the gate closes (tasks dead-letter
    new batches at once) and only batches above the sent mark are dead-lettered. The operator
    fixes what is broken and requeues every "failed" letter as its batch with requeue_of = the
    letter id; a duplicate of an original message may arrive at any time (answered "in dead
    letters" while its letter waits, "already logged" once requeued). Checked: every row is
    committed exactly once in the end, never twice, and no letter leaves a piece of its
    batch's logging in the log."""
    verify(f"refusals, {name}", REFUSALS[name], model_report, at_least=10_000)


ROW_ERRORS = {
    # A rejected row in each batch (the two-piece one's second piece); owners change between a
    # commit and its status poll (a crash, an expiry); the error table may lag.
    "owners": Params(
        pumps=2, batches=(2, 1), rejected=(1, 2), pump_crashes=1, lease_expiries=1,
        lost_answers=1, error_table_lag=True,
    ),
    # With MIN_REPLICAS: a refused batch's dead letter whose WAIT times out during the open
    # that also holds a window.
    "refusal": Params(
        pumps=1, batches=(2, 1), poison=(1,), rejected=(2,), min_replicas=True,
        replica_timeouts=1, pump_crashes=1,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ROW_ERRORS))
def test_every_batch_with_a_rejected_row_gets_exactly_one_row_errors_letter(
    name: str, model_report: Report
) -> None:
    """Row errors are attributed exactly (the error table names each rejected row's offset):
    the trim or settle that sees Snowflake's error count rise above the stored one holds the
    entries committed since the stored offset; whoever owns the channel then stores one
    letter per batch with a rejected row, under a deterministic id, and releases them. Checked:
    every batch with a rejected row ends with exactly one row_errors letter, and no other
    batch ever gets one."""
    verify(f"row errors, {name}", ROW_ERRORS[name], model_report, at_least=10_000)


WITH_REPLICAS = {
    "failover": Params(
        pumps=2, batches=(2, 1), losses=1, min_replicas=True, replica_timeouts=2,
        pump_crashes=1,
    ),
    "refusals": Params(
        pumps=1, batches=(2,), poison=(1,), open_refusals=1, losses=1, min_replicas=True,
        replica_timeouts=1,
    ),
    "row errors": Params(
        pumps=2, batches=(1, 1), rejected=(0,), losses=1, min_replicas=True,
        replica_timeouts=1, pump_crashes=1,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(WITH_REPLICAS))
def test_with_min_replicas_a_failover_loses_and_duplicates_nothing(
    name: str, model_report: Report
) -> None:
    """SNOWPIPE_STATE_MIN_REPLICAS=1 and one replica, which a failover promotes (LOSS: the
    store comes back as what the replica holds, in a new incarnation; the replica lags
    arbitrarily, WAITs time out). A task acknowledges only after a WAIT covered its write, a
    pump appends only what a WAIT covered (its MARK_SENT's, or the barrier after each open),
    dead letters are WAITed. Checked with the full properties, nothing excused: no row is
    committed twice, every row is committed exactly once at the end, every rejected row's batch
    gets one row_errors letter."""
    verify(f"min replicas, {name}", WITH_REPLICAS[name], model_report, at_least=10_000)


WITHOUT_REPLICAS = {
    "loss": Params(pumps=1, batches=(2, 1), losses=1, pump_crashes=1),
    "lease rollback": Params(pumps=2, batches=(1, 1), losses=1, lease_expiries=1),
    "refusals": Params(pumps=1, batches=(2,), poison=(1,), open_refusals=1, losses=1),
    "row errors": Params(
        pumps=2, batches=(1, 1), rejected=(0,), losses=1, pump_crashes=1, error_table_lag=True
    ),
}


@pytest.mark.parametrize("name", list(WITHOUT_REPLICAS))
def test_a_store_that_loses_writes_loses_or_duplicates_only_the_batches_whose_writes_it_lost(
    name: str, model_report: Report
) -> None:
    """Without MIN_REPLICAS (appendfsync everysec and a power loss, a restart from an older
    RDB, a lagging replica promoted, a restart from empty): LOSS rolls the store back to any
    prefix of its writes (the durable copy: PERSIST moves it up at any time), in a new
    incarnation, once. The property this design supports, and the model checks:

    - a row is committed twice only if the LOSS took its batch's log write (the entries with
      their dedup record): a later copy of the message (a redelivery, a duplicate publish, the
      retry of a task) logs the batch again, and it commits again if it had committed;
    - a row is lost (never committed, in no letter) only if the LOSS took its batch's log write
      (acknowledged before it was durable) or the writing of one of its dead letters (the
      entries come back; at or below C they are trimmed as committed);
    - a batch with a rejected row ends without its row_errors letter, or with two, only under
      the same conditions; no other batch ever gets one;
    - nothing else: every other batch is committed exactly once (the sent mark, the settle, the
      held windows and the leases lost with the suffix never cause a duplicate or a loss)."""
    verify(f"no replicas, {name}", WITHOUT_REPLICAS[name], model_report, at_least=10_000)


# Each mutant with the smallest scope that reaches its counterexample.
MUTANTS = {
    Mutant.REPLAY_FROM_SENT: Params(
        pumps=2, batches=(2, 1), pump_crashes=1, lease_expiries=1, lost_answers=1
    ),
    Mutant.OFFSET_PER_ATTEMPT: Params(pumps=1, batches=(1, 1), task_crashes=1),
    Mutant.TRIM_UNCHECKED: Params(pumps=2, batches=(2, 1), pump_crashes=1, lease_expiries=1),
    Mutant.OPEN_KEEPS_PENDING: Params(pumps=1, batches=(1,), lost_answers=1),
    Mutant.OLDER_STATE_MOVES: Params(pumps=1, batches=(1, 1), losses=1),
    Mutant.UNREPLICATED_SENDS: Params(
        pumps=1, batches=(1, 1), losses=1, min_replicas=True, replica_timeouts=1
    ),
    Mutant.SPLIT_LETTERS: Params(pumps=1, batches=(2,), poison=(1,)),
    Mutant.REFUSED_OPEN_DEAD_LETTERS_ALL: Params(pumps=1, batches=(1,), open_refusals=1),
    Mutant.ERRORS_IN_MEMORY: Params(pumps=1, batches=(1,), rejected=(0,), pump_crashes=1),
}


@pytest.mark.parametrize("mutant", list(Mutant), ids=lambda m: m.value)
def test_mutant_is_caught(mutant: Mutant, model_report: Report) -> None:
    result = check(replace(MUTANTS[mutant], mutant=mutant))
    model_report(
        f"mutant {mutant.value}: counterexample of {len(result.trace)} steps "
        f"({describe(result)})\n{counterexample(result)}"
    )
    assert not result.ok
    assert result.trace


@pytest.mark.parametrize("mutant", list(Mutant), ids=lambda m: m.value)
def test_mutants_are_caught_without_reduction(mutant: Mutant) -> None:
    result = check(replace(MUTANTS[mutant], mutant=mutant, reduce=False))
    assert not result.ok, describe(result)


def test_without_commit_timeout_rows_can_be_stranded(model_report: Report) -> None:
    """Why the model has a commit-wait timeout: a pump whose appended rows are discarded by
    another pump's open (that pump then crashing) sees no error while it has nothing new to
    send, so without a timer it never reopens and its rows are never committed."""
    result = check(
        Params(pumps=2, batches=(1, 1), pump_crashes=1, lease_expiries=1, commit_timeout=False)
    )
    model_report(
        f"no commit-wait timeout: counterexample of {len(result.trace)} steps\n"
        f"{counterexample(result)}"
    )
    assert not result.ok
    assert result.violation is not None and "terminal state is not complete" in result.violation


SMALL = {
    "1 batch": Params(pumps=2, batches=(1,), task_crashes=1, pump_crashes=1),
    "2 batches": Params(
        pumps=2, batches=(2, 1), duplicate_publishes=1, task_crashes=1, pump_crashes=1
    ),
    "refusal": Params(pumps=1, batches=(2, 1), poison=(1,), duplicate_publishes=1),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_reduction_preserves_terminal_states(name: str) -> None:
    """Partial-order reduction of task bookkeeping (Params.reduce) against the full graph: the
    same terminal states and the same reachable commit counts."""

    def observe(params: Params) -> tuple[set[Hashable], set[Hashable], int]:
        model = DeliveryModel(params)
        terminal: set[Hashable] = set()
        counts: set[Hashable] = set()

        def invariant(s: State) -> str | None:
            counts.add(s.commits)
            return model.invariant(s)

        def complete(s: State) -> str | None:
            terminal.add(model.key(s))
            return model.complete(s)

        result = explore(model.initial(), model.successors, invariant, complete, model.key)
        assert result.ok, counterexample(result)
        return terminal, counts, result.states

    params = SMALL[name]
    full_terminal, full_counts, full_states = observe(replace(params, reduce=False))
    terminal, counts, states = observe(params)
    assert terminal == full_terminal
    assert counts == full_counts
    assert states < full_states
