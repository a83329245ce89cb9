"""Exhaustive model check of delivery core v2 (tests/model/delivery.py) and of broken mutants."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import replace

import pytest

from tests.model.conftest import Report
from tests.model.delivery import DeliveryModel, Mutant, Params, State
from tests.model.explorer import Result, explore

# The main scope: 2 pumps, 1 channel, 3 batches, one duplicate publish, two task crashes (before
# LOG_APPEND or before ack), two pump crashes (at any step), one expiry of a live holder's lease,
# one lost APPEND (answer or request). Lease expiry after a crash, Snowflake commits, reopen
# discards and the commit-wait timeout are unbudgeted. Checked: no batch is ever committed twice,
# every terminal state is complete, and from every state a complete terminal state is reachable.
SCOPE = Params(
    pumps=2,
    batches=3,
    duplicate_publishes=1,
    task_crashes=2,
    pump_crashes=2,
    lease_expiries=1,
    lost_answers=1,
)
# Each mutant is caught with 2 batches and every budget at 1 (the figures also hold for SCOPE, at
# several times the cost: trim_unchecked's loss only shows at terminal states, deep in the graph).
MUTANT_SCOPE = Params(batches=2)


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


def test_protocol_is_exactly_once(
    model_report: Report, record_property: Callable[[str, object], None]
) -> None:
    result = check(SCOPE)
    record_property("states", result.states)
    record_property("transitions", result.transitions)
    model_report(f"delivery core v2, {SCOPE}: {describe(result)}")
    assert result.ok, f"{describe(result)}\n{counterexample(result)}"
    assert result.terminal > 0, "no run completes: the budgets leave no terminal state"
    # Guard against the scope silently shrinking (a broken successor function, say).
    assert result.states > 50_000, describe(result)


@pytest.mark.parametrize("mutant", list(Mutant), ids=lambda m: m.value)
def test_mutant_is_caught(mutant: Mutant, model_report: Report) -> None:
    result = check(replace(MUTANT_SCOPE, mutant=mutant))
    model_report(
        f"mutant {mutant.value}: counterexample of {len(result.trace)} steps "
        f"({describe(result)})\n{counterexample(result)}"
    )
    assert not result.ok
    assert result.trace


def test_without_commit_timeout_rows_can_be_stranded(model_report: Report) -> None:
    """Why the model has a commit-wait timeout: a pump whose appended rows are discarded by another
    pump's OPEN (that pump then crashing) sees no error while it has nothing new to send, so
    without a timer it never reopens and its rows are never committed."""
    result = check(replace(MUTANT_SCOPE, commit_timeout=False))
    model_report(
        f"no commit-wait timeout: counterexample of {len(result.trace)} steps\n"
        f"{counterexample(result)}"
    )
    assert not result.ok
    assert result.violation is not None and "terminal state is not complete" in result.violation


SMALL = [
    Params(batches=1, pump_crashes=1),
    Params(batches=2, task_crashes=1, pump_crashes=1, lease_expiries=0, lost_answers=1),
]


@pytest.mark.parametrize("params", SMALL, ids=["1-batch", "2-batches"])
def test_reduction_preserves_terminal_states(params: Params) -> None:
    """Partial-order reduction of task bookkeeping (Params.reduce) against the full graph: the same
    terminal states and the same reachable commit counts."""

    def observe(params: Params) -> tuple[set[Hashable], set[Hashable], int]:
        model = DeliveryModel(params)
        terminal: set[Hashable] = set()
        counts: set[Hashable] = set()

        def invariant(s: State) -> str | None:
            counts.add(tuple(sorted(s.commit_count)))
            return model.invariant(s)

        def complete(s: State) -> str | None:
            terminal.add(model.key(s))
            return model.complete(s)

        result = explore(model.initial(), model.successors, invariant, complete, model.key)
        assert result.ok, counterexample(result)
        return terminal, counts, result.states

    full_terminal, full_counts, full_states = observe(replace(params, reduce=False))
    terminal, counts, states = observe(params)
    assert terminal == full_terminal
    assert counts == full_counts
    assert states < full_states


@pytest.mark.parametrize("mutant", list(Mutant), ids=lambda m: m.value)
def test_mutants_are_caught_without_reduction(mutant: Mutant) -> None:
    result = check(Params(batches=1, mutant=mutant, reduce=False))
    assert not result.ok, describe(result)
