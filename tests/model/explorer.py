"""A small generic explicit-state explorer (breadth-first, so counterexamples are shortest).

A model is a hashable immutable initial state plus `successors(state) -> [(label, next)]`.
`invariant(state)` is checked on every reachable state and `complete(state)` on every terminal one
(a state with no successors); each returns None when fine or a description of the violation.
With `progress=True` the explorer also requires that every reachable state can still reach a
complete terminal state, so that a loss cannot hide in a cycle that never terminates (for example
a retry loop): a stronger check, which keeps the graph's reverse edges in memory.

`key(state)` names the state's class for the visited set: by default the state itself; a model
with symmetry returns a canonical form (interchangeable processes sorted, fresh identifiers and
irrelevant fields renumbered). States with one key must have successors with the same keys, and
both checks must give the same answer for them. Each class is expanded once, from the first state
of it reached. A counterexample is replayed from the initial state through the classes on its path,
so its labels describe one concrete run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

S = TypeVar("S", bound=Hashable)
Key = Callable[[Any], Hashable]

Successors = Callable[[S], Iterable[tuple[str, S]]]
Check = Callable[[S], str | None]


class StateLimitExceeded(RuntimeError):
    """The graph grew past `max_states`: the budgets do not make it small enough."""


@dataclass(frozen=True)
class Result(Generic[S]):
    states: int  # distinct states (classes of equal key) reached
    transitions: int  # edges followed, including those into already-seen states
    terminal: int  # states with no successor (each one checked for completion)
    seconds: float
    violation: str | None = None  # None: every property holds on the whole graph
    trace: tuple[str, ...] = ()  # action labels from the initial state to the violating state
    state: S | None = None  # the violating state, as reached by replaying `trace`

    @property
    def ok(self) -> bool:
        return self.violation is None


def _identity(state: Hashable) -> Hashable:
    return state


def explore(
    initial: S,
    successors: Successors[S],
    invariant: Check[S],
    complete: Check[S],
    key: Key = _identity,
    progress: bool = False,
    max_states: int = 5_000_000,
) -> Result[S]:
    """Visit every state reachable from `initial`; stop at the first violation found."""
    started = time.perf_counter()
    first = key(initial)
    parent: dict[Hashable, Hashable] = {first: None}
    queue: deque[tuple[Hashable, S]] = deque([(first, initial)])
    transitions = terminal = 0
    predecessors: dict[Hashable, list[Hashable]] = {}
    complete_terminals: list[Hashable] = []

    def stop(bad: Hashable, violation: str) -> Result[S]:
        trace, state = _replay(initial, _path(parent, bad), successors, key)
        elapsed = time.perf_counter() - started
        return Result(len(parent), transitions, terminal, elapsed, violation, trace, state)

    if (problem := invariant(initial)) is not None:
        return stop(first, problem)
    while queue:
        here, state = queue.popleft()
        has_successor = False
        for _label, nxt in successors(state):
            has_successor = True
            transitions += 1
            k = key(nxt)
            if progress:
                predecessors.setdefault(k, []).append(here)
            if k in parent:
                continue
            parent[k] = here
            if (problem := invariant(nxt)) is not None:
                return stop(k, problem)
            if len(parent) > max_states:
                raise StateLimitExceeded(f"more than {max_states} states")
            queue.append((k, nxt))
        if not has_successor:
            terminal += 1
            if (problem := complete(state)) is not None:
                return stop(here, f"terminal state is not complete: {problem}")
            complete_terminals.append(here)
    if progress:
        can_finish = set(complete_terminals)
        todo = list(complete_terminals)
        while todo:
            for prev in predecessors.get(todo.pop(), ()):
                if prev not in can_finish:
                    can_finish.add(prev)
                    todo.append(prev)
        # dicts keep insertion order, which is BFS order: the first one is the closest.
        stuck = next((k for k in parent if k not in can_finish), None)
        if stuck is not None:
            return stop(stuck, "no complete terminal state is reachable from here")
    return Result(len(parent), transitions, terminal, time.perf_counter() - started)


def _path(parent: dict[Hashable, Hashable], last: Hashable) -> list[Hashable]:
    path = [last]
    while (prev := parent[path[-1]]) is not None:
        path.append(prev)
    path.reverse()
    return path


def _replay(
    initial: S, path: list[Hashable], successors: Successors[S], key: Key
) -> tuple[tuple[str, ...], S]:
    """Labels of one concrete run through the classes of `path` (path[0] is the initial class)."""
    labels: list[str] = []
    state = initial
    for target in path[1:]:
        for label, nxt in successors(state):
            if key(nxt) == target:
                labels.append(label)
                state = nxt
                break
        else:  # pragma: no cover - only if `key` does not respect `successors`
            raise AssertionError(f"cannot replay the counterexample after {labels}")
    return tuple(labels), state
