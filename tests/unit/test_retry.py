"""The one RetryPolicy: classification, backoff numbers, Retry-After, deadline and budget."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from tests.support.clock import FakeClock
from worker.retry import RetryBudget, RetryPolicy, classify, is_retryable
from worker.snowpipe import errors as e


@pytest.fixture
def fake() -> FakeClock:
    """The fake clock (starting at 1000 s); the policy's sleeps move it on."""
    return FakeClock(1000.0)


def policy(fake: FakeClock, *, rng: float = 1.0, **kw: Any) -> RetryPolicy:
    return RetryPolicy(sleep=fake.sleep, clock=fake, rng=lambda: rng, **kw)


def failing(*errors: BaseException, result: str = "ok") -> tuple[Callable[[], str], list[int]]:
    """A function that raises `errors` in turn, then returns `result`; and its call count."""
    calls = [0]
    it: Iterator[BaseException] = iter(errors)

    def fn() -> str:
        calls[0] += 1
        err = next(it, None)
        if err is not None:
            raise err
        return result

    return fn, calls


def status_error(status: int, body: str = "") -> e.SnowpipeError:
    return e.error_from_response(status, body)


# --- classification ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (e.TransportError("refused"), True),
        (e.RequestTimeoutError("slow"), True),
        (httpx.ConnectError("refused"), True),
        (httpx.ReadTimeout("slow"), True),
        (httpx.RemoteProtocolError("eof"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (status_error(408), True),
        (status_error(429), True),
        (status_error(500), True),
        (status_error(502), True),
        (status_error(503), True),
        (status_error(504), True),
        (status_error(503, '"ERR_GENERAL_EXCEPTION_RETRY_REQUEST"'), True),
        (status_error(409, '{"code":"ERR_OPEN_CHANNEL_IN_PROGRESS"}'), True),
        (status_error(400), False),
        (status_error(401), False),
        (status_error(403), False),
        (status_error(404), False),
        (status_error(409), False),
        (status_error(413), False),
        (status_error(400, '{"code":"STALE_CONTINUATION_TOKEN_SEQUENCER"}'), False),
        (status_error(409, '{"code":"ERR_CHANNEL_HAS_UNCOMMITTED_DATA"}'), False),
        (ValueError("a bug"), False),
    ],
)
def test_classification_table(exc: BaseException, retry: bool) -> None:
    assert is_retryable(exc) is retry


def test_unwrapped_http_status_errors_are_classified_by_status() -> None:
    request = httpx.Request("GET", "https://x.invalid/")

    def err(status: int) -> httpx.HTTPStatusError:
        response = httpx.Response(status, request=request)
        return httpx.HTTPStatusError("e", request=request, response=response)

    assert [is_retryable(err(s)) for s in (408, 429, 500, 503, 400, 404)] == [True] * 4 + [
        False
    ] * 2


def test_classify_names_what_to_do() -> None:
    assert classify(status_error(503)) == "retry"
    assert classify(status_error(400, '{"code":"STALE_CONTINUATION_TOKEN_SEQUENCER"}')) == "reopen"
    assert classify(status_error(401)) == "auth"
    assert classify(status_error(404)) == "permanent"
    assert classify(KeyError("bug")) == "permanent"


# --- numbers -------------------------------------------------------------------------------------


def test_default_numbers_match_the_spec() -> None:
    p = RetryPolicy()
    assert (p.attempts, p.base, p.multiplier, p.cap) == (4, 0.2, 1.8, 5.0)
    assert [round(p.ceiling(n), 4) for n in (1, 2, 3, 4)] == [0.2, 0.36, 0.648, 1.1664]
    assert p.ceiling(50) == 5.0
    assert p.ceiling(10_000) == 5.0  # no overflow


def test_full_jitter_spans_zero_to_the_ceiling(fake: FakeClock) -> None:
    assert policy(fake, rng=0.0).backoff(3) == 0.0
    assert policy(fake, rng=0.5).backoff(3) == pytest.approx(0.324)
    assert policy(fake, rng=1.0).backoff(3) == pytest.approx(0.648)


def test_retries_transient_errors_then_returns_the_result(fake: FakeClock) -> None:
    fn, calls = failing(status_error(503), e.TransportError("reset"), status_error(429))
    assert policy(fake).call(fn, op="t") == "ok"
    assert calls[0] == 4
    assert fake.sleeps == pytest.approx([0.2, 0.36, 0.648])


def test_gives_up_after_four_attempts_with_the_last_error(fake: FakeClock) -> None:
    errs = [status_error(503) for _ in range(5)]
    fn, calls = failing(*errs)
    with capture_logs() as logs, pytest.raises(e.ServerError) as info:
        policy(fake).call(fn, op="append_rows")
    assert calls[0] == 4
    assert info.value is errs[3]
    assert len(fake.sleeps) == 3
    exhausted = [x for x in logs if x["event"] == "retry.exhausted"]
    assert exhausted == [
        {
            "event": "retry.exhausted",
            "log_level": "error",
            "op": "append_rows",
            "attempts": 4,
            "reason": "attempts",
            "elapsed": pytest.approx(sum(fake.sleeps)),
            "error": "ServerError",
            "status": 503,
            "code": None,
            "request_id": None,
        }
    ]
    assert any("gave up" in note for note in getattr(info.value, "__notes__", []))


def test_permanent_errors_are_raised_at_once(fake: FakeClock) -> None:
    fn, calls = failing(status_error(400, '{"code":"STALE_CONTINUATION_TOKEN_SEQUENCER"}'))
    with capture_logs() as logs, pytest.raises(e.StaleContinuationTokenError):
        policy(fake).call(fn, op="t")
    assert calls[0] == 1
    assert fake.sleeps == []
    assert not [x for x in logs if x["event"].startswith("retry.")]


def test_retry_scheduled_event_describes_the_error_without_secrets(fake: FakeClock) -> None:
    fn, _ = failing(status_error(429, '{"code":"390701","message":"Bearer eyJabcd.efgh.ijkl"}'))
    with capture_logs() as logs:
        policy(fake).call(fn, op="open_channel")
    scheduled = [x for x in logs if x["event"] == "retry.scheduled"]
    assert len(scheduled) == 1
    event = scheduled[0]
    assert event["op"] == "open_channel"
    assert event["attempt"] == 1
    assert event["delay"] == pytest.approx(0.2)
    assert (event["error"], event["status"], event["code"]) == ("RateLimitedError", 429, "390701")
    assert "eyJ" not in repr(event)


# --- Retry-After ---------------------------------------------------------------------------------


def test_retry_after_longer_than_backoff_is_honoured(fake: FakeClock) -> None:
    err = e.error_from_response(429, "{}", headers={"Retry-After": "3"})
    fn, _ = failing(err)
    policy(fake).call(fn, op="t")
    assert fake.sleeps == [3.0]


def test_backoff_longer_than_retry_after_wins(fake: FakeClock) -> None:
    errs = [e.error_from_response(503, "x", headers={"Retry-After": "0.1"}) for _ in range(3)]
    fn, _ = failing(*errs)
    policy(fake).call(fn, op="t")
    assert fake.sleeps == pytest.approx([0.2, 0.36, 0.648])


def test_retry_after_http_date_is_honoured(fake: FakeClock) -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=4), usegmt=True)
    fn, _ = failing(e.error_from_response(503, "x", headers={"retry-after": when}))
    policy(fake).call(fn, op="t")
    assert len(fake.sleeps) == 1
    assert 2.5 < fake.sleeps[0] <= 4.0


def test_retry_after_beyond_the_deadline_gives_up_immediately(fake: FakeClock) -> None:
    err = e.error_from_response(429, "{}", headers={"Retry-After": "120"})
    fn, calls = failing(err)
    with capture_logs() as logs, pytest.raises(e.RateLimitedError):
        policy(fake, deadline=30.0).call(fn, op="t")
    assert calls[0] == 1
    assert fake.sleeps == []  # never slept towards a wait it could not finish
    assert [x["reason"] for x in logs if x["event"] == "retry.exhausted"] == [
        "retry_after_beyond_deadline"
    ]


# --- deadline ------------------------------------------------------------------------------------


def test_deadline_stops_before_a_sleep_that_would_pass_it(fake: FakeClock) -> None:
    # Attempts take 1 s each; backoff ceilings 0.2, 0.36, ...; deadline 2.5 s.
    calls = [0]

    def slow_failure() -> str:
        calls[0] += 1
        fake.now += 1.0
        raise e.ServerError("down", status=503)

    with capture_logs() as logs, pytest.raises(e.ServerError):
        policy(fake, deadline=2.5).call(slow_failure, op="t")
    # 1 s + 0.2 s sleep + 1 s = 2.2 s; the next 0.36 s sleep would end at 2.56 s > 2.5 s.
    assert calls[0] == 2
    assert fake.sleeps == pytest.approx([0.2])
    assert [x["reason"] for x in logs if x["event"] == "retry.exhausted"] == ["deadline"]


def test_per_call_deadline_overrides_the_policy_default(fake: FakeClock) -> None:
    fn, calls = failing(status_error(503), status_error(503))
    with pytest.raises(e.ServerError):
        policy(fake, deadline=60.0).call(fn, op="t", deadline=0.1)
    assert calls[0] == 1


# --- budget --------------------------------------------------------------------------------------


def test_budget_exhaustion_fails_fast(fake: FakeClock) -> None:
    budget = RetryBudget(2.0, cost=1.0, refill=0.5)
    p = policy(fake, budget=budget)
    fn, calls = failing(*[status_error(503) for _ in range(10)])
    with capture_logs() as logs, pytest.raises(e.ServerError):
        p.call(fn, op="t")
    # Two retries paid for, the third refused: 3 attempts instead of 4.
    assert calls[0] == 3
    assert budget.tokens == 0.0
    assert [x["reason"] for x in logs if x["event"] == "retry.exhausted"] == ["budget"]

    # A drained budget means the next failing call is not retried at all.
    fn2, calls2 = failing(status_error(503))
    with pytest.raises(e.ServerError):
        p.call(fn2, op="t")
    assert calls2[0] == 1


def test_successes_refill_the_budget_up_to_capacity(fake: FakeClock) -> None:
    budget = RetryBudget(2.0, cost=1.0, refill=0.5)
    assert budget.try_spend() and budget.try_spend()
    assert not budget.try_spend()
    p = policy(fake, budget=budget)
    for _ in range(3):
        p.call(lambda: 1, op="t")
    assert budget.tokens == 1.5
    for _ in range(10):
        budget.record_success()
    assert budget.tokens == 2.0


def test_budget_rejects_nonsense_sizes() -> None:
    with pytest.raises(ValueError, match="SNOWPIPE_RETRY_BUDGET_CAPACITY"):
        RetryBudget(0)


# --- structure -----------------------------------------------------------------------------------


def test_a_call_inside_a_call_is_not_retried_twice(fake: FakeClock) -> None:
    p = policy(fake)
    inner_calls = [0]

    def inner() -> str:
        inner_calls[0] += 1
        raise status_error(503)

    def outer() -> str:
        return p.call(inner, op="inner")

    with pytest.raises(e.ServerError):
        p.call(outer, op="outer")
    # One retry layer: 4 outer attempts, each running inner once (not 4 x 4).
    assert inner_calls[0] == 4


def test_concurrent_calls_keep_their_own_state() -> None:
    p = RetryPolicy(sleep=lambda s: None, rng=lambda: 0.0)
    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def worker(i: int) -> None:
        fn, calls = failing(*([status_error(503)] * (i % 4)))
        barrier.wait()
        try:
            p.call(fn, op=f"t{i}")
            results.append(calls[0])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == sorted((i % 4) + 1 for i in range(16))


def test_countdown_continues_the_same_numbers(fake: FakeClock) -> None:
    p = policy(fake, rng=1.0)
    # Attempt 4 was the last in-call attempt; task retry 1 waits at most ceiling(4).
    assert p.countdown(1) == pytest.approx(p.ceiling(4))
    assert p.countdown(2) == pytest.approx(p.ceiling(5))
    assert p.countdown(30) == 5.0
    low = policy(fake, rng=0.0)
    assert low.countdown(1) == pytest.approx(p.ceiling(4) / 2)  # never straight back
    throttled = e.RateLimitedError("slow down", retry_after=12.0)
    assert p.countdown(1, throttled) == 12.0


def test_from_settings_uses_the_retry_knobs() -> None:
    from worker.settings import Settings

    s = Settings(
        account="acme",
        user="bob",
        private_key="x",
        retry_attempts=6,
        retry_base_seconds=0.1,
        retry_multiplier=2.0,
        retry_cap_seconds=3.0,
        retry_deadline_seconds=12.0,
        retry_budget_capacity=7.0,
    )
    p = RetryPolicy.from_settings(s, budget=RetryBudget.from_settings(s))
    assert (p.attempts, p.base, p.multiplier, p.cap, p.deadline) == (6, 0.1, 2.0, 3.0, 12.0)
    assert p.budget is not None and p.budget.capacity == 7.0


def test_own_layer_calls_are_retried_inside_another_call(fake: FakeClock) -> None:
    p = policy(fake)
    token_calls = [0]

    def fetch_token() -> str:
        token_calls[0] += 1
        if token_calls[0] < 3:
            raise status_error(503)
        return "t"

    def data_call() -> str:
        # A token refresh made on the data call's behalf: a separate request, its own retries.
        return p.call(fetch_token, op="token", own_layer=True)

    assert p.call(data_call, op="append_rows") == "t"
    assert token_calls[0] == 3


def test_retries_and_give_ups_are_counted_in_metrics(fake: FakeClock) -> None:
    from worker.observability import RETRIES, RETRIES_EXHAUSTED

    def value(counter: Any, **labels: str) -> float:
        return float(counter.labels(**labels)._value.get())

    before = value(RETRIES, op="metrics-op", error_type="ServerError")
    exhausted = value(RETRIES_EXHAUSTED, op="metrics-op", reason="attempts")
    fn, _ = failing(*[status_error(503) for _ in range(4)])
    with pytest.raises(e.ServerError):
        policy(fake).call(fn, op="metrics-op")
    assert value(RETRIES, op="metrics-op", error_type="ServerError") - before == 3
    assert value(RETRIES_EXHAUSTED, op="metrics-op", reason="attempts") - exhausted == 1


# --- the fast path (issue 18): identical to tenacity's loop from the first attempt -------------


class _TenacityFromTheStart(RetryPolicy):
    """The policy as it was before the fast path: every call runs in a tenacity copy."""

    def call(
        self, fn: Any, *, op: str, deadline: float | None = None, own_layer: bool = False
    ) -> Any:
        from worker.retry import _CallState

        state = _CallState(
            op=op, started=self._clock(), deadline=self.deadline if deadline is None else deadline
        )
        retrying = self._template.copy(
            wait=lambda rs: self._wait(rs, state),
            stop=lambda rs: self._stop(rs, state),
            before_sleep=lambda rs: self._scheduled(rs, state),
        )
        try:
            result = retrying(fn)
        except BaseException as exc:
            if state.reason is not None:
                self._exhausted(exc, state)
            raise
        if self.budget is not None:
            self.budget.record_success()
        return result


def _scenario_errors(kind: str) -> list[BaseException | None]:
    """A sequence of outcomes per attempt (None: success)."""
    throttled = lambda s: e.RateLimitedError("slow down", retry_after=s)  # noqa: E731
    return {
        "ok": [None],
        "one_503": [status_error(503), None],
        "three_503": [status_error(503)] * 3 + [None],
        "always_503": [status_error(503)] * 9,
        "permanent": [status_error(400)],
        "503_then_permanent": [status_error(503), status_error(400)],
        "retry_after": [throttled(2.0), None],
        "retry_after_far": [throttled(100.0), None],
        "transport": [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), None],
        "keyerror": [KeyError("bug")],
    }[kind]


def _run(policy_cls: type[RetryPolicy], kind: str, attempts: int, deadline: float,
         capacity: float, rng: float) -> dict[str, Any]:  # fmt: skip
    fake = FakeClock(1000.0)
    budget = RetryBudget(capacity, cost=1.0, refill=0.5)
    budget._tokens = capacity - 1.5  # not full: successes refill it
    p = policy_cls(sleep=fake.sleep, clock=fake, rng=lambda: rng, attempts=attempts,
                   deadline=deadline, budget=budget)  # fmt: skip
    outcomes = iter(_scenario_errors(kind))
    calls = [0]

    def fn() -> str:
        calls[0] += 1
        fake.advance(0.7)  # attempts take time: the deadline counts it
        err = next(outcomes, None)
        if err is not None:
            raise err
        return "ok"

    out: dict[str, Any] = {}
    with capture_logs() as logs:
        try:
            out["result"] = p.call(fn, op="op")
        except BaseException as exc:
            out["raised"] = (type(exc).__name__, str(exc), list(getattr(exc, "__notes__", [])))
    out.update(calls=calls[0], sleeps=fake.sleeps, now=fake.now, tokens=budget.tokens,
               logs=[dict(x) for x in logs])  # fmt: skip
    return out


@pytest.mark.parametrize(
    "kind",
    ["ok", "one_503", "three_503", "always_503", "permanent", "503_then_permanent",
     "retry_after", "retry_after_far", "transport", "keyerror"],
)  # fmt: skip
@pytest.mark.parametrize(("attempts", "deadline", "capacity"),
                         [(4, 30.0, 100.0), (1, 30.0, 100.0), (6, 3.0, 100.0), (5, 30.0, 2.0)])
@pytest.mark.parametrize("rng", [0.0, 0.6, 1.0])
def test_the_fast_path_behaves_as_tenacity_from_the_first_attempt(
    kind: str, attempts: int, deadline: float, capacity: float, rng: float
) -> None:
    """Attempts (the first counted), sleeps, deadline, Retry-After, budget, the error raised and
    its note, and every event: the same as running every call in tenacity's loop."""
    assert _run(RetryPolicy, kind, attempts, deadline, capacity, rng) == _run(
        _TenacityFromTheStart, kind, attempts, deadline, capacity, rng
    )


def test_a_first_attempt_that_succeeds_builds_no_tenacity_objects(
    fake: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tenacity

    made: list[str] = []
    real_copy, real_state = tenacity.Retrying.copy, tenacity.RetryCallState.__init__

    def copy(self: Any, *a: Any, **kw: Any) -> Any:
        made.append("Retrying")
        return real_copy(self, *a, **kw)

    def state(self: Any, *a: Any, **kw: Any) -> None:
        made.append("RetryCallState")
        real_state(self, *a, **kw)

    monkeypatch.setattr(tenacity.Retrying, "copy", copy)
    monkeypatch.setattr(tenacity.RetryCallState, "__init__", state)
    p = policy(fake)
    assert p.call(lambda: "ok", op="t") == "ok"
    fn, _ = failing(status_error(400))
    with pytest.raises(e.SnowpipeError):
        p.call(fn, op="t")  # a permanent error: raised at once, no loop either
    assert made == []
    fn, calls = failing(status_error(503))
    assert p.call(fn, op="t") == "ok"  # a retried failure enters tenacity's loop
    assert calls[0] == 2
    assert made.count("Retrying") == 1


def test_a_retried_error_does_not_chain_onto_the_first_attempts(fake: FakeClock) -> None:
    first, last = status_error(503), status_error(502)
    fn, _ = failing(first, last, last, last)
    with pytest.raises(e.ServerError) as info:
        policy(fake).call(fn, op="t")
    assert info.value is last
    assert info.value.__context__ is None
