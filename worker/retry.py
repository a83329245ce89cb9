"""The one retry policy for all outbound calls: capped exponential backoff, full jitter, deadline.

`RetryPolicy.call(fn, op=...)` runs `fn` and retries it while the error is transient
(`is_retryable`): transport errors, timeouts, 408, 429, 5xx, `ERR_GENERAL_EXCEPTION_RETRY_REQUEST`
and `ERR_OPEN_CHANNEL_IN_PROGRESS`. Everything else (other 4xx, stale channels, auth) is raised at
once. Numbers (defaults from the spec, knobs in `worker/settings.py`):

- at most `attempts` (4) attempts;
- before attempt n+1 wait `uniform(0, min(cap, base * multiplier ** (n - 1)))` (full jitter;
  base 200 ms, multiplier 1.8, cap 5 s);
- a `Retry-After` from the server raises the wait to `max(backoff, retry_after)`;
- an overall deadline (`retry_deadline_seconds`): a wait that would end past it is never started,
  the call gives up at once instead (tenacity's `stop_before_delay` semantics);
- a process-wide `RetryBudget` (token bucket): each retry costs `retry_budget_cost_per_retry`, each
  successful call refills `retry_budget_refill_per_success`; when it is empty the call fails fast,
  so a failure storm cannot multiply the load on Snowflake.

Tenacity does the looping. The policy holds one `Retrying` template and runs each retried call on
a fresh `copy()` with per-call stop/wait hooks: a shared tenacity object keeps per-call state and
corrupts it across threads. The first attempt runs directly (the hot path: most calls succeed at
once and then cost no tenacity objects); a failure the policy retries enters tenacity's loop as its
first attempt, so attempts, budget, deadline, Retry-After and events are as if tenacity had run it.

Exactly one retry layer: a `call()` made while another `call()` is running on the same thread (a
token fetch inside an append's attempt) runs its function once; the outer call owns the retries.
When the policy gives up, a Celery task may run again later with `countdown()`: the same numbers,
continued.

Events (structlog): `retry.scheduled` (op, attempt, delay, error type/status/code, budget) and
`retry.exhausted` (op, attempts, reason, elapsed, error). Never a token or a URL. Metrics
(`worker.observability`): `snowpipe_retries_total{op,error_type}`,
`snowpipe_retries_exhausted_total{op,reason}` and the `snowpipe_retry_budget_tokens` gauge (the
process budget's level, published when it changes).
"""

from __future__ import annotations

import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, TypeVar

import httpx
from tenacity import RetryCallState, Retrying

from worker.errors import (
    AuthError,
    ChannelReopenRequired,
    RetryableError,
    SnowpipeError,
)
from worker.observability import (
    get_logger,
    record_retry,
    record_retry_budget,
    record_retry_exhausted,
)

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = [
    "Disposition",
    "RetryBudget",
    "RetryPolicy",
    "classify",
    "is_retryable",
    "process_budget",
]

T = TypeVar("T")

log = get_logger("worker.retry")

Disposition = Literal["retry", "reopen", "auth", "permanent"]

# Statuses that are worth retrying when an HTTP error arrives unwrapped (httpx.HTTPStatusError).
_RETRY_STATUSES: Final = frozenset({408, 429})


def classify(exc: BaseException) -> Disposition:
    """What the worker should do about `exc`: retry, reopen the channel, fix auth, or give up."""
    if is_retryable(exc):
        return "retry"
    if isinstance(exc, ChannelReopenRequired):
        return "reopen"
    if isinstance(exc, AuthError):
        return "auth"
    return "permanent"


def is_retryable(exc: BaseException) -> bool:
    """True when `exc` is transient: the same request may succeed if sent again later."""
    if isinstance(exc, RetryableError):
        return True
    if isinstance(exc, SnowpipeError):
        return False
    if isinstance(exc, httpx.TransportError):  # includes every httpx timeout
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return status in _RETRY_STATUSES or status >= 500
    return isinstance(exc, ConnectionError | TimeoutError)


def _retry_after(exc: BaseException | None) -> float | None:
    value = getattr(exc, "retry_after", None)
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    return None


# --- Budget ------------------------------------------------------------------------------------

_BUDGETS: weakref.WeakSet[RetryBudget] = weakref.WeakSet()


class RetryBudget:
    """A token bucket of retries shared by every call in the process.

    Starts full. A retry takes `cost` tokens and is refused when fewer are left; a successful
    call puts back `refill` (never above `capacity`). With the defaults (100, 1 per retry, 0.1 per
    success) a storm may spend 100 retries, then retries resume at one per ten successes.
    """

    def __init__(self, capacity: float, *, cost: float = 1.0, refill: float = 0.1) -> None:
        if capacity <= 0 or cost <= 0 or refill < 0:
            raise ValueError(
                "RetryBudget needs capacity > 0, cost > 0 and refill >= 0 "
                "(SNOWPIPE_RETRY_BUDGET_CAPACITY, _COST_PER_RETRY, _REFILL_PER_SUCCESS)"
            )
        self.capacity = float(capacity)
        self.cost = float(cost)
        self.refill = float(refill)
        self._tokens = float(capacity)
        self._lock = threading.Lock()
        self.published = False  # the process budget publishes its level (a metrics gauge)
        _BUDGETS.add(self)

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryBudget:
        """A budget sized by the `retry_budget_*` settings."""
        return cls(
            settings.retry_budget_capacity,
            cost=settings.retry_budget_cost_per_retry,
            refill=settings.retry_budget_refill_per_success,
        )

    @property
    def tokens(self) -> float:
        """Tokens left (a gauge for metrics and tests)."""
        return self._tokens

    def try_spend(self) -> bool:
        """Take the cost of one retry; False (and nothing taken) when the budget is drained."""
        with self._lock:
            if self._tokens < self.cost:
                return False
            self._tokens -= self.cost
            return True

    def record_success(self) -> None:
        """Put back the refill for one successful call."""
        if self.refill == 0.0 or self._tokens >= self.capacity:
            return  # common case: full bucket, no lock
        with self._lock:
            self._tokens = min(self.capacity, self._tokens + self.refill)
        if self.published:
            record_retry_budget(self._tokens)

    def _after_fork(self) -> None:
        # A lock held by another thread at fork() stays held forever in the child.
        self._lock = threading.Lock()


def _reset_budgets_after_fork() -> None:
    for budget in list(_BUDGETS):
        budget._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_budgets_after_fork)


_process_budget: RetryBudget | None = None
_process_budget_lock = threading.Lock()


def process_budget(settings: Settings) -> RetryBudget:
    """The process-wide retry budget (created from `settings` on first use)."""
    global _process_budget  # noqa: PLW0603 - one budget per process is the point
    budget = _process_budget
    if budget is None:
        with _process_budget_lock:
            budget = _process_budget
            if budget is None:
                budget = _process_budget = RetryBudget.from_settings(settings)
                budget.published = True
                record_retry_budget(budget.tokens)
    return budget


def _should_retry(rs: RetryCallState) -> bool:
    outcome = rs.outcome
    if outcome is None or not outcome.failed:
        return False
    exc = outcome.exception()
    return exc is not None and is_retryable(exc)


# --- Policy ------------------------------------------------------------------------------------

_nesting = threading.local()

GiveUpReason = Literal["attempts", "deadline", "retry_after_beyond_deadline", "budget"]


@dataclass(slots=True)
class _CallState:
    """Per-call bookkeeping shared by the stop/wait/before_sleep hooks of one tenacity copy."""

    op: str
    started: float
    deadline: float  # seconds allowed for the whole call, sleeps included
    retry_after: float | None = None
    reason: GiveUpReason | None = None
    delays: list[float] = field(default_factory=list)


class RetryPolicy:
    """Runs calls with the one backoff policy; see the module docstring for the numbers."""

    def __init__(
        self,
        *,
        attempts: int = 4,
        base: float = 0.2,
        multiplier: float = 1.8,
        cap: float = 5.0,
        deadline: float = 30.0,
        budget: RetryBudget | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if attempts < 1:
            raise ValueError("RetryPolicy needs attempts >= 1 (SNOWPIPE_RETRY_ATTEMPTS)")
        if base < 0 or cap < 0 or multiplier < 1 or deadline <= 0:
            raise ValueError(
                "RetryPolicy needs base >= 0, cap >= 0, multiplier >= 1 and deadline > 0 "
                "(SNOWPIPE_RETRY_BASE_SECONDS, _CAP_SECONDS, _MULTIPLIER, _DEADLINE_SECONDS)"
            )
        self.attempts = attempts
        self.base = base
        self.multiplier = multiplier
        self.cap = cap
        self.deadline = deadline
        self.budget = budget
        self._rng = rng
        self._clock = clock
        # Exposed for callers that wait between calls of their own (SQL API polls) on the same
        # clock as the policy's backoff.
        self.sleep = sleep
        self.clock = clock
        # The template: per-call hooks are swapped in by copy() in call().
        self._template = Retrying(sleep=sleep, reraise=True, retry=_should_retry)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        budget: RetryBudget | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> RetryPolicy:
        """The policy from the `retry_*` settings, sharing the process-wide budget by default."""
        return cls(
            attempts=settings.retry_attempts,
            base=settings.retry_base_seconds,
            multiplier=settings.retry_multiplier,
            cap=settings.retry_cap_seconds,
            deadline=settings.retry_deadline_seconds,
            budget=budget if budget is not None else process_budget(settings),
            sleep=sleep,
            rng=rng,
            clock=clock,
        )

    # -- numbers ---------------------------------------------------------------------------------

    def ceiling(self, attempt: int) -> float:
        """The largest wait after failed attempt `attempt` (1-based): min(cap, base*mult^(n-1))."""
        exponent = max(0, attempt - 1)
        try:
            value = self.base * self.multiplier**exponent
        except OverflowError:
            return self.cap
        return min(self.cap, value)

    def backoff(self, attempt: int) -> float:
        """The full-jitter wait after failed attempt `attempt`: uniform in [0, ceiling]."""
        return self._rng() * self.ceiling(attempt)

    def countdown(self, attempt: int, error: BaseException | None = None) -> float:
        """Seconds before task-level retry number `attempt` (1-based), from the same numbers.

        The backoff continues where the in-call attempts stopped (ceiling of attempt
        `attempts + attempt - 1`) with equal jitter, in [ceiling/2, ceiling], so a task that
        has just used up its in-call retries does not come straight back. A `Retry-After`
        carried by `error` raises it.
        """
        ceiling = self.ceiling(self.attempts + max(1, attempt) - 1)
        delay = ceiling / 2 + self._rng() * ceiling / 2
        retry_after = _retry_after(error)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    # -- running ---------------------------------------------------------------------------------

    def call(
        self,
        fn: Callable[[], T],
        *,
        op: str,
        deadline: float | None = None,
        own_layer: bool = False,
    ) -> T:
        """`fn()`'s result, retrying transient failures; the last error when it gives up.

        `deadline` is the time allowed for the whole call in seconds from now, sleeps included
        (default: the policy's). Inside another `call()` on this thread, `fn` runs once: the
        outer call owns the retries. `own_layer=True` is for a separate request made on the
        outer call's behalf (a token refresh under the guard's single flight): it is retried on
        its own, since retrying the outer call would not repeat it.
        """
        outer = getattr(_nesting, "depth", 0)
        if outer and not own_layer:
            return fn()
        started = self._clock()
        _nesting.depth = outer + 1
        try:
            # The fast path: the first attempt runs directly. Only a failure the policy retries
            # builds tenacity's loop, whose first attempt replays it (attempt 1 of `attempts`).
            first: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:
                if not is_retryable(exc):
                    raise  # what tenacity does with an error `_should_retry` refuses
                first = exc
            if first is not None:  # outside the except: later errors do not chain onto it
                result = self._retry(fn, first, op, started, deadline)
        finally:
            _nesting.depth = outer
        if self.budget is not None:
            self.budget.record_success()
        return result

    def _retry(
        self, fn: Callable[[], T], first: BaseException, op: str, started: float,
        deadline: float | None,
    ) -> T:  # fmt: skip
        """Tenacity's loop over `fn`, whose first attempt already failed with `first`."""
        state = _CallState(
            op=op,
            started=started,
            deadline=self.deadline if deadline is None else deadline,
        )
        retrying = self._template.copy(
            wait=lambda rs: self._wait(rs, state),
            stop=lambda rs: self._stop(rs, state),
            before_sleep=lambda rs: self._scheduled(rs, state),
        )
        replayed = False

        def attempt() -> T:
            nonlocal replayed
            if not replayed:
                replayed = True
                raise first
            return fn()

        try:
            return retrying(attempt)
        except BaseException as exc:
            if state.reason is not None:
                self._exhausted(exc, state)
            raise

    # -- tenacity hooks (each call has its own _CallState) ---------------------------------------

    def _wait(self, rs: RetryCallState, state: _CallState) -> float:
        delay = self.backoff(rs.attempt_number)
        exc = rs.outcome.exception() if rs.outcome is not None else None
        state.retry_after = _retry_after(exc)
        if state.retry_after is not None:
            delay = max(delay, state.retry_after)
        return delay

    def _stop(self, rs: RetryCallState, state: _CallState) -> bool:
        if rs.attempt_number >= self.attempts:
            state.reason = "attempts"
            return True
        elapsed = self._clock() - state.started
        if elapsed + rs.upcoming_sleep > state.deadline:
            # Never start a sleep that ends past the deadline: give up now instead.
            retry_after = state.retry_after
            beyond = retry_after is not None and elapsed + retry_after > state.deadline
            state.reason = "retry_after_beyond_deadline" if beyond else "deadline"
            return True
        if self.budget is not None and not self.budget.try_spend():
            state.reason = "budget"
            return True
        return False

    def _scheduled(self, rs: RetryCallState, state: _CallState) -> None:
        exc = rs.outcome.exception() if rs.outcome is not None else None
        state.delays.append(rs.upcoming_sleep)
        record_retry(
            state.op,
            type(exc).__name__ if exc is not None else "None",
            None if self.budget is None else self.budget.tokens,
        )
        log.warning(
            "retry.scheduled",
            op=state.op,
            attempt=rs.attempt_number,
            delay=round(rs.upcoming_sleep, 4),
            retry_after=state.retry_after,
            budget=None if self.budget is None else round(self.budget.tokens, 2),
            **_error_fields(exc),
        )

    def _exhausted(self, exc: BaseException, state: _CallState) -> None:
        attempts = len(state.delays) + 1
        record_retry_exhausted(state.op, state.reason or "unknown")
        elapsed = self._clock() - state.started
        log.error(
            "retry.exhausted",
            op=state.op,
            attempts=attempts,
            reason=state.reason,
            elapsed=round(elapsed, 4),
            **_error_fields(exc),
        )
        exc.add_note(
            f"retry policy gave up on {state.op} after {attempts} attempt(s) "
            f"in {elapsed:.2f} s: {state.reason}"
        )


def _error_fields(exc: BaseException | None) -> dict[str, object]:
    """Log fields describing `exc` without its message (which may carry a URL)."""
    if exc is None:
        return {}
    fields: dict[str, object] = {"error": type(exc).__name__}
    if isinstance(exc, SnowpipeError):
        fields["status"] = exc.status
        fields["code"] = exc.code
        fields["request_id"] = exc.request_id
    elif isinstance(exc, httpx.HTTPStatusError):
        fields["status"] = exc.response.status_code
    return fields
