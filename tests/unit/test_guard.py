"""TokenGuard behaviour with an injected clock: thresholds, windows, failures, 401, hooks."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tests.support.clock import WALL_EPOCH
from tests.support.clock import FakeClock as Clock
from worker.auth.guard import (
    Token,
    TokenGuard,
    TokenNotExtendedError,
    TokenUnavailableError,
    soft_margin,
)


class Issuer:
    """A fetch function: hands out tok-1, tok-2, ... of `lifetime` seconds, counting calls."""

    def __init__(self, clock: Clock, lifetime: float = 60.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.fail: BaseException | None = None
        self.same_expiry = False
        self.gate: threading.Event | None = None  # when set, fetch waits for it
        self.entered = threading.Event()
        self._lock = threading.Lock()
        self._last: Token | None = None

    def __call__(self) -> Token:
        with self._lock:
            self.calls += 1
            n = self.calls
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if self.fail is not None:
            raise self.fail
        if self.same_expiry and self._last is not None:
            return Token(f"tok-{n}", self._last.lifetime, self._last.expires_at)
        token = Token(f"tok-{n}", self.lifetime, self.clock.wall() + self.lifetime)
        self._last = token
        return token


def make_guard(clock: Clock, issuer: Callable[[], Token], **kw: Any) -> TokenGuard:
    kw.setdefault("jitter_fraction", 0.0)  # thresholds below are exact
    kw.setdefault("rng", random.Random(7))
    return TokenGuard(issuer, name=kw.pop("name", "test"), clock=clock, wall_clock=clock.wall, **kw)


def run_threads(n: int, target: Callable[[], None]) -> None:
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
        assert not t.is_alive(), "a caller hung"


# --- Threshold ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime", "margin"),
    [(60.0, 12.0), (600.0, 120.0), (3540.0, 120.0), (3600.0, 120.0), (5.0, 1.0)],
)
def test_refresh_moment_is_lifetime_minus_min_120s_or_20_percent(
    clock: Clock, lifetime: float, margin: float
) -> None:
    issuer = Issuer(clock, lifetime)
    guard = make_guard(clock, issuer)
    assert guard.get() == "tok-1"
    assert guard.seconds_until_refresh() == pytest.approx(lifetime - margin)

    clock.now = lifetime - margin - 0.001
    assert guard.get() == "tok-1"
    assert issuer.calls == 1

    clock.now = lifetime - margin
    assert guard.get() == "tok-2"
    assert issuer.calls == 2


def test_threshold_is_pinned_at_issuance_not_recomputed_from_what_remains(clock: Clock) -> None:
    issuer = Issuer(clock, 3600.0)
    guard = make_guard(clock, issuer)
    guard.get()
    # Step through the whole pre-window life of the token: never a refresh before 3480 s.
    for t in range(0, 3480, 10):
        clock.now = float(t)
        guard.get()
    assert issuer.calls == 1
    clock.now = 3480.0
    guard.get()
    assert issuer.calls == 2


def test_new_token_gets_its_own_pinned_threshold(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    guard = make_guard(clock, issuer)
    guard.get()
    clock.now = 50.0
    assert guard.get() == "tok-2"  # obtained at 50: next refresh at 50 + 48
    assert guard.seconds_until_refresh() == pytest.approx(48.0)
    clock.now = 97.9
    assert guard.get() == "tok-2"
    clock.now = 98.0
    assert guard.get() == "tok-3"


def test_jitter_moves_refresh_later_but_stays_inside_the_soft_window(clock: Clock) -> None:
    for seed in range(50):
        issuer = Issuer(clock, 60.0)
        guard = make_guard(clock, issuer, jitter_fraction=0.5, rng=random.Random(seed))
        clock.now = 0.0
        guard.get()
        # Soft window for L = 60 s: [48, 54); the hard margin is min(10, 12 / 2) = 6 s.
        assert 48.0 <= guard.seconds_until_refresh() < 54.0


# --- Soft and hard windows ------------------------------------------------------------------------


def test_soft_window_one_caller_refreshes_others_keep_current_token(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    guard = make_guard(clock, issuer)
    guard.get()
    clock.now = 50.0  # soft window: [48, 54)
    issuer.gate = threading.Event()
    issuer.entered.clear()
    refresher_got: list[str] = []
    refresher = threading.Thread(target=lambda: refresher_got.append(guard.get()))
    refresher.start()
    assert issuer.entered.wait(5)

    # While the refresh is in flight, other callers return at once with the current token.
    started = time.perf_counter()
    others = [guard.get() for _ in range(100)]
    assert time.perf_counter() - started < 1.0
    assert set(others) == {"tok-1"}

    issuer.gate.set()
    refresher.join(5)
    assert refresher_got == ["tok-2"]
    assert guard.get() == "tok-2"
    assert issuer.calls == 2


def test_hard_window_callers_wait_for_the_one_refresh(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    guard = make_guard(clock, issuer)
    guard.get()
    clock.now = 55.0  # hard window: >= 54
    issuer.gate = threading.Event()
    issuer.entered.clear()
    results: list[str] = []
    done = threading.Event()

    def call() -> None:
        results.append(guard.get())
        if len(results) == 3:
            done.set()

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    assert issuer.entered.wait(5)
    # Nobody returns the old token while the refresh is in flight in the hard window.
    assert not done.wait(0.1)
    assert results == []
    issuer.gate.set()
    for t in threads:
        t.join(5)
    assert results == ["tok-2"] * 3
    assert issuer.calls == 2


def test_hard_window_wait_times_out_with_clear_error_when_token_expired(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    guard = make_guard(clock, issuer, wait_timeout=0.05)
    guard.get()
    clock.now = 61.0
    issuer.gate = threading.Event()
    issuer.entered.clear()
    fetching = threading.Thread(target=guard.get)
    fetching.start()
    assert issuer.entered.wait(5)
    with pytest.raises(TokenUnavailableError, match=r"waited 0\.05 s"):
        guard.get()
    issuer.gate.set()
    fetching.join(5)


@pytest.mark.parametrize("start", [50.0, 58.0, 61.0], ids=["soft", "hard", "expired"])
def test_hundred_threads_cause_one_fetch_and_never_get_an_expired_token(
    clock: Clock, start: float
) -> None:
    issuer = Issuer(clock, 60.0)
    guard = make_guard(clock, issuer)
    guard.get()
    clock.now = start
    issuer.gate = threading.Event()
    issuer.entered.clear()
    barrier = threading.Barrier(100)
    got: list[str] = []
    lock = threading.Lock()

    def call() -> None:
        barrier.wait(10)
        value = guard.get()
        with lock:
            got.append(value)

    def open_gate_when_fetching() -> None:
        issuer.entered.wait(10)
        time.sleep(0.02)  # let the other callers pile up on the in-flight refresh
        assert issuer.gate is not None
        issuer.gate.set()

    opener = threading.Thread(target=open_gate_when_fetching)
    opener.start()
    run_threads(100, call)
    opener.join(10)

    assert issuer.calls == 2  # the initial token and exactly one refresh
    assert len(got) == 100
    if start >= 54.0:
        assert set(got) == {"tok-2"}  # hard window / expired: everyone waited for the new one
    else:
        assert set(got) <= {"tok-1", "tok-2"}  # soft window: tok-1 is still valid at 50 s
    assert guard.get() == "tok-2"


# --- Failures -------------------------------------------------------------------------------------


def test_failed_refresh_keeps_serving_the_valid_token(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    guard = make_guard(clock, issuer)
    guard.get()
    issuer.fail = ConnectionError("token endpoint down")
    clock.now = 50.0
    assert guard.get() == "tok-1"
    clock.now = 55.0  # hard window, still valid, fetch still failing
    assert guard.get() == "tok-1"
    clock.now = 59.9
    assert guard.get() == "tok-1"
    assert issuer.calls >= 2


def test_past_expiry_with_refresh_failing_raises_token_unavailable(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    guard = make_guard(clock, issuer)
    guard.get()
    issuer.fail = ConnectionError("token endpoint down")
    clock.now = 60.0
    with pytest.raises(TokenUnavailableError, match="expired") as info:
        guard.get()
    assert isinstance(info.value.cause, ConnectionError)
    assert info.value.__cause__ is info.value.cause
    assert "tok-1" not in str(info.value)


def test_first_fetch_failing_raises_with_the_cause(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    issuer.fail = PermissionError("JWT rejected: wrong key")
    guard = make_guard(clock, issuer)
    with pytest.raises(TokenUnavailableError, match=r"no token yet.*wrong key") as info:
        guard.get()
    assert isinstance(info.value.cause, PermissionError)


def test_failure_backs_off_before_the_next_attempt(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    guard = make_guard(clock, issuer)
    guard.get()
    issuer.fail = ConnectionError("down")
    clock.now = 50.0
    guard.get()
    assert issuer.calls == 2
    for _ in range(20):  # repeated calls during the backoff do not hit the endpoint
        guard.get()
    assert issuer.calls == 2
    # First backoff: base 1 s, equal jitter -> within [0.5, 1] s.
    clock.now = 51.0
    guard.get()
    assert issuer.calls == 3


def test_backoff_is_scaled_down_for_short_lifetimes(clock: Clock) -> None:
    issuer = Issuer(clock, 5.0)
    guard = make_guard(clock, issuer, backoff_base=1.0, backoff_cap=30.0)
    guard.get()
    issuer.fail = ConnectionError("down")
    clock.now = 4.0  # soft window of a 5 s token: [4, 4.5)
    guard.get()
    assert issuer.calls == 2
    # Cap for L = 5 s is 10 % of L = 0.5 s, so the next attempt comes within 0.5 s.
    clock.now = 4.5
    guard.get()
    assert issuer.calls == 3


def test_hard_window_failure_does_not_stampede_the_endpoint(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    guard = make_guard(clock, issuer)
    guard.get()
    issuer.fail = ConnectionError("down")
    clock.now = 56.0
    got: list[str] = []
    run_threads(50, lambda: got.append(guard.get()))
    assert set(got) == {"tok-1"}  # still valid: served
    assert issuer.calls == 2  # one attempt, then backoff


def test_refresh_that_does_not_extend_expiry_is_a_failure(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    guard = make_guard(clock, issuer)
    guard.get()
    issuer.same_expiry = True
    clock.now = 50.0
    with capture_logs() as logs:
        assert guard.get() == "tok-1"  # the non-extending tok-2 is not adopted
    failures = [e for e in logs if e["event"] == "token.refresh.failure"]
    assert len(failures) == 1
    assert failures[0]["error"] == "TokenNotExtendedError"
    assert guard.consecutive_failures == 1
    with pytest.raises(TokenNotExtendedError):
        guard.refresh("beat")


def _gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("snowpipe_token_guard_healthy", {"name": name})


def test_three_consecutive_failures_escalate_and_a_success_recovers(clock: Clock) -> None:
    issuer = Issuer(clock, 3600.0)
    guard = make_guard(clock, issuer, name="escalation")
    guard.get()
    issuer.fail = ConnectionError("down")
    with capture_logs() as logs:
        for attempt in range(1, 4):
            with pytest.raises(ConnectionError):
                guard.refresh("beat")
            assert guard.healthy is (attempt < 3)
    escalated = [e for e in logs if e["event"] == "token.refresh.escalated"]
    assert len(escalated) == 1
    assert escalated[0]["log_level"] == "error"
    assert escalated[0]["consecutive_failures"] == 3
    assert escalated[0]["name"] == "escalation"
    assert _gauge("escalation") == 0.0

    issuer.fail = None
    clock.now = 10.0
    guard.refresh("beat")
    assert guard.healthy
    assert guard.consecutive_failures == 0
    assert _gauge("escalation") == 1.0


# --- 401 ------------------------------------------------------------------------------------------


def test_invalidate_current_token_makes_next_get_refresh_once(clock: Clock) -> None:
    issuer = Issuer(clock, 3600.0)
    guard = make_guard(clock, issuer)
    rejected = guard.get()
    guard.invalidate(rejected)
    with capture_logs() as logs:
        assert guard.get() == "tok-2"
        assert guard.get() == "tok-2"
    assert issuer.calls == 2
    assert [e["reason"] for e in logs if e["event"] == "token.refresh.success"] == ["401"]


def test_invalidate_with_a_stale_value_does_nothing(clock: Clock) -> None:
    issuer = Issuer(clock, 3600.0)
    guard = make_guard(clock, issuer)
    old = guard.get()
    guard.invalidate(old)
    assert guard.get() == "tok-2"
    guard.invalidate(old)  # a late 401 for a token already replaced
    assert guard.get() == "tok-2"
    assert issuer.calls == 2


def test_concurrent_401s_for_one_token_cause_one_refresh(clock: Clock) -> None:
    issuer = Issuer(clock, 3600.0)
    guard = make_guard(clock, issuer)
    rejected = guard.get()

    def on_401() -> None:
        guard.invalidate(rejected)
        assert guard.get() == "tok-2"

    run_threads(20, on_401)
    assert issuer.calls == 2


def test_invalidated_token_is_not_served_when_refresh_fails(clock: Clock) -> None:
    issuer = Issuer(clock, 3600.0)
    guard = make_guard(clock, issuer)
    rejected = guard.get()
    issuer.fail = ConnectionError("down")
    guard.invalidate(rejected)
    with pytest.raises(TokenUnavailableError, match="rejected"):
        guard.get()


def test_401_replacement_that_is_the_same_token_counts_as_failure(clock: Clock) -> None:
    issuer = Issuer(clock, 3600.0)
    guard = make_guard(clock, issuer)
    rejected = guard.get()
    current = guard.current()
    assert current is not None
    guard._fetch = lambda: current  # the endpoint hands back the token the server just rejected
    guard.invalidate(rejected)
    with pytest.raises(TokenUnavailableError, match="TokenNotExtendedError"):
        guard.get()
    assert guard.consecutive_failures == 1


def test_401_forces_a_refresh_even_during_a_failure_backoff(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    guard = make_guard(clock, issuer)
    rejected = guard.get()
    issuer.fail = ConnectionError("down")
    clock.now = 50.0
    assert guard.get() == "tok-1"  # soft refresh failed: backing off
    issuer.fail = None
    guard.invalidate(rejected)
    assert guard.get() == "tok-3"
    assert issuer.calls == 3


def _auth_client(guard: TokenGuard, answer: Any, **auth_kw: Any) -> tuple[Any, list[str]]:
    """An httpx client whose requests go through `GuardAuth(guard)`; the bearer tokens sent."""
    import httpx

    from worker.snowpipe.http import GuardAuth

    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        token = request.headers["authorization"].removeprefix("Bearer ")
        sent.append(token)
        return httpx.Response(answer(token))

    client = httpx.Client(transport=httpx.MockTransport(handler), auth=GuardAuth(guard, **auth_kw))
    return client, sent


def test_auth_resends_once_then_returns_the_second_401(clock: Clock) -> None:
    issuer = Issuer(clock, 3600.0)
    guard = make_guard(clock, issuer)
    client, sent = _auth_client(guard, lambda token: 401)
    assert client.get("http://x/").status_code == 401
    assert sent == ["tok-1", "tok-2"]  # one resend with a fresh token, then stop
    assert issuer.calls == 2


def test_auth_recovers_from_one_401_and_keeps_the_fresh_token(clock: Clock) -> None:
    issuer = Issuer(clock, 3600.0)
    guard = make_guard(clock, issuer)
    guard.get()
    client, sent = _auth_client(guard, lambda token: 401 if token == "tok-1" else 200)
    assert client.get("http://x/").status_code == 200
    assert client.get("http://x/").status_code == 200
    assert sent == ["tok-1", "tok-2", "tok-2"]
    assert issuer.calls == 2


def test_auth_treats_403_like_401(clock: Clock) -> None:
    issuer = Issuer(clock, 3600.0)
    guard = make_guard(clock, issuer)
    client, sent = _auth_client(guard, lambda token: 403 if token == "tok-1" else 200)
    assert client.get("http://x/").status_code == 200
    assert sent == ["tok-1", "tok-2"]


def test_auth_on_410_reports_the_failover_and_drops_that_token(clock: Clock) -> None:
    issuer = Issuer(clock, 3600.0)
    guard = make_guard(clock, issuer)
    failovers: list[bool] = []
    client, sent = _auth_client(
        guard,
        lambda token: 410 if token == "tok-1" else 200,
        on_failover=lambda: failovers.append(True),
    )
    assert client.get("http://x/").status_code == 410  # returned: the caller reopens
    assert failovers == [True]
    assert client.get("http://x/").status_code == 200  # the next request has a new token
    assert sent == ["tok-1", "tok-2"]


def test_auth_without_a_failover_hook_leaves_410_alone(clock: Clock) -> None:
    issuer = Issuer(clock, 3600.0)
    guard = make_guard(clock, issuer)
    client, sent = _auth_client(guard, lambda token: 410)
    assert client.get("http://x/").status_code == 410
    assert client.get("http://x/").status_code == 410
    assert sent == ["tok-1", "tok-1"]  # the JWT guard's token is not the failed-over one


# --- Hooks and forced refresh ---------------------------------------------------------------------


def test_adopt_hook_supplies_a_fresher_token_instead_of_fetching(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    shared: list[Token] = []
    guard = make_guard(clock, issuer, adopt=lambda: shared[-1] if shared else None)
    guard.get()
    clock.now = 49.0
    # Another process refreshed at 45 s and published its token.
    shared.append(Token("shared-1", 60.0, clock.wall() - 4.0 + 60.0))
    with capture_logs() as logs:
        assert guard.get() == "shared-1"
    assert issuer.calls == 1
    success = [e for e in logs if e["event"] == "token.refresh.success"]
    assert success[0]["reason"] == "shared"
    assert success[0]["trigger"] == "soft"
    # The shared token's own threshold comes from its wall-clock expiry: 45 + 48 = 93 s.
    assert guard.seconds_until_refresh() == pytest.approx(93.0 - 49.0)


def test_adopt_hook_result_not_fresher_is_ignored(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    shared: list[Token] = []
    guard = make_guard(clock, issuer, adopt=lambda: shared[-1] if shared else None)
    guard.get()
    shared.append(Token("older", 60.0, WALL_EPOCH + 55.0))  # expires before tok-1 (60 s)
    clock.now = 50.0
    assert guard.get() == "tok-2"
    assert issuer.calls == 2


def test_adopt_hook_token_already_due_is_not_adopted(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    shared: list[Token] = []
    guard = make_guard(clock, issuer, adopt=lambda: shared[-1] if shared else None)
    guard.get()
    # Expires later than tok-1 (60 s) but is itself in its own refresh window at 50 s.
    shared.append(Token("due", 60.0, WALL_EPOCH + 59.0))
    clock.now = 50.0
    assert guard.get() == "tok-2"


def test_adopt_hook_failure_falls_back_to_fetch(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)

    def broken() -> Token | None:
        raise ConnectionError("redis down")

    guard = make_guard(clock, issuer, adopt=broken)
    assert guard.get() == "tok-1"
    clock.now = 50.0
    assert guard.get() == "tok-2"


def test_adopt_is_used_for_the_first_token_too(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    guard = make_guard(clock, issuer, adopt=lambda: Token("shared", 60.0, clock.wall() + 60.0))
    assert guard.get() == "shared"
    assert issuer.calls == 0


def test_publish_hook_gets_each_own_refresh_but_not_adopted_tokens(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    published: list[Token] = []
    shared: list[Token] = []
    guard = make_guard(
        clock,
        issuer,
        adopt=lambda: shared[-1] if shared else None,
        publish=published.append,
    )
    guard.get()
    clock.now = 50.0
    guard.get()
    assert [t.value for t in published] == ["tok-1", "tok-2"]
    assert published[1].expires_at == clock.wall() + 60.0
    clock.now = 99.0
    shared.append(Token("shared", 60.0, clock.wall() + 60.0))
    assert guard.get() == "shared"
    assert len(published) == 2


def test_publish_hook_failure_does_not_fail_the_refresh(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)

    def broken(_token: Token) -> None:
        raise ConnectionError("redis down")

    guard = make_guard(clock, issuer, publish=broken)
    assert guard.get() == "tok-1"
    assert guard.healthy


def test_forced_refresh_fetches_without_adopting(clock: Clock) -> None:
    issuer = Issuer(clock, 60.0)
    adopted: list[int] = []

    def adopt() -> Token | None:
        adopted.append(1)
        return None

    guard = make_guard(clock, issuer, adopt=adopt)
    guard.get()
    clock.now = 1.0
    with capture_logs() as logs:
        token = guard.refresh("beat")
    assert token.value == "tok-2"
    assert guard.get() == "tok-2"
    assert len(adopted) == 1  # only the initial get() consulted the store
    assert [e["reason"] for e in logs if e["event"] == "token.refresh.success"] == ["beat"]


# --- Events and construction ----------------------------------------------------------------------


def test_events_carry_reason_lifetime_remaining_duration_and_never_the_value(
    clock: Clock,
) -> None:
    issuer = Issuer(clock, 60.0)
    guard = make_guard(clock, issuer)
    with capture_logs() as logs:
        guard.get()
        clock.now = 50.0
        guard.get()
        issuer.fail = ConnectionError("down")
        clock.now = 99.0
        guard.get()
    events = [e["event"] for e in logs]
    assert events == [
        "token.refresh.start",
        "token.refresh.success",
        "token.refresh.start",
        "token.refresh.success",
        "token.refresh.start",
        "token.refresh.failure",
    ]
    initial, soft, failure = logs[1], logs[3], logs[5]
    assert initial["reason"] == "initial" and initial["remaining"] is None
    assert soft["reason"] == "soft"
    assert soft["lifetime"] == 60.0
    assert soft["remaining"] == pytest.approx(10.0)
    assert soft["outcome"] == "success"
    assert "duration_ms" in soft
    assert failure["outcome"] == "failure" and failure["reason"] == "soft"
    rendered = repr(logs)
    assert "tok-1" not in rendered and "tok-2" not in rendered


def test_token_repr_hides_the_value() -> None:
    token = Token("secret-token-value", 60.0, WALL_EPOCH)
    assert "secret-token-value" not in repr(token)


@pytest.mark.parametrize(
    ("value", "lifetime"), [("", 60.0), ("x", 0.0), ("x", -1.0)], ids=["empty", "zero", "neg"]
)
def test_token_rejects_empty_value_or_non_positive_lifetime(value: str, lifetime: float) -> None:
    with pytest.raises(ValueError, match="Token"):
        Token(value, lifetime, WALL_EPOCH)


def test_from_settings_uses_the_refresh_knobs(clock: Clock) -> None:
    from worker.settings import Settings

    settings = Settings(
        account="acc",
        user="u",
        private_key="unused",
        refresh_max_margin_seconds=30.0,
        refresh_hard_margin_seconds=5.0,
        refresh_jitter_fraction=0.0,
    )
    issuer = Issuer(clock, 3600.0)
    guard = TokenGuard.from_settings(settings, issuer, name="s", clock=clock, wall_clock=clock.wall)
    guard.get()
    assert guard.seconds_until_refresh() == pytest.approx(3570.0)


# --- The documented shape: TokenGuard(fetch), fetch() -> (value, lifetime) or Token(value, L) ----


class LifetimeIssuer:
    """A fetch in the documented shape: the value and its lifetime, no wall-clock expiry.

    `shape` is "pair" for `(value, lifetime)` or "token" for `Token(value, lifetime)`; `takes`
    moves the clock while the fetch runs (a slow token endpoint).
    """

    def __init__(self, clock: Clock, shape: str, lifetime: float = 60.0, takes: float = 0.0):
        self.clock = clock
        self.shape = shape
        self.lifetime = lifetime
        self.takes = takes
        self.calls = 0

    def __call__(self) -> Token | tuple[str, float]:
        self.calls += 1
        self.clock.now += self.takes
        value = f"tok-{self.calls}"
        if self.shape == "pair":
            return (value, self.lifetime)
        return Token(value, self.lifetime)


SHAPES = pytest.mark.parametrize("shape", ["pair", "token"])


@SHAPES
def test_documented_shape_needs_no_name_and_refreshes_at_min_120s_or_20_percent(
    clock: Clock, shape: str
) -> None:
    for lifetime, margin in [(60.0, 12.0), (3600.0, 120.0)]:
        clock.now = 0.0
        issuer = LifetimeIssuer(clock, shape, lifetime)
        guard = TokenGuard(issuer, clock=clock, wall_clock=clock.wall)  # no name=
        assert guard.name == "token"
        assert guard.get() == "tok-1"
        assert guard.seconds_until_refresh() == pytest.approx(lifetime - margin)
        clock.now = lifetime - margin - 0.001
        assert guard.get() == "tok-1"
        clock.now = lifetime - margin
        assert guard.get() == "tok-2"
        assert issuer.calls == 2


@SHAPES
def test_documented_shape_expiry_is_pinned_when_the_token_is_obtained(
    clock: Clock, shape: str
) -> None:
    clock.now = 100.0
    issuer = LifetimeIssuer(clock, shape, 60.0, takes=2.0)  # the endpoint takes 2 s to answer
    guard = TokenGuard(issuer, clock=clock, wall_clock=clock.wall)
    guard.get()
    token = guard.current()
    assert token is not None and token.lifetime == 60.0
    # Counted from when the guard asked (100), not from the answer (102): never too late.
    assert token.expires_at == pytest.approx(WALL_EPOCH + 100.0 + 60.0)
    assert guard.seconds_until_refresh() == pytest.approx(100.0 + 48.0 - 102.0)
    # The next token's moment is pinned from its own fetch, not from the first one's.
    clock.now = 148.0
    assert guard.get() == "tok-2"
    token = guard.current()
    assert token is not None and token.expires_at == pytest.approx(WALL_EPOCH + 148.0 + 60.0)
    assert guard.seconds_until_refresh() == pytest.approx(148.0 + 48.0 - 150.0)


@SHAPES
def test_documented_shape_publishes_a_token_with_its_wall_clock_expiry(
    clock: Clock, shape: str
) -> None:
    published: list[Token] = []
    guard = TokenGuard(
        LifetimeIssuer(clock, shape, 60.0), clock=clock, wall_clock=clock.wall,
        publish=published.append,
    )  # fmt: skip
    guard.get()
    assert [(t.value, t.lifetime, t.expires_at) for t in published] == [
        ("tok-1", 60.0, WALL_EPOCH + 60.0)
    ]


@SHAPES
def test_documented_shape_past_expiry_with_refresh_failing_raises(
    clock: Clock, shape: str
) -> None:
    issuer = LifetimeIssuer(clock, shape, 60.0)
    guard = TokenGuard(issuer, clock=clock, wall_clock=clock.wall, rng=random.Random(7))
    guard.get()

    def broken() -> Token:
        raise ConnectionError("token endpoint down")

    guard._fetch = broken  # the endpoint goes down after the first token
    clock.now = 60.0
    with pytest.raises(TokenUnavailableError) as info:
        guard.get()
    assert isinstance(info.value.cause, ConnectionError)


@pytest.mark.parametrize(
    "bad", [("only-a-value",), ("v", "60"), (b"v", 60.0), "v", None], ids=repr
)
def test_fetch_of_another_shape_is_a_failed_refresh_naming_the_shapes(
    clock: Clock, bad: object
) -> None:
    guard = TokenGuard(lambda: bad, clock=clock, wall_clock=clock.wall)  # type: ignore[arg-type,return-value]
    with pytest.raises(TokenUnavailableError, match=r"\(value, lifetime_seconds\) pair") as info:
        guard.get()
    assert isinstance(info.value.cause, TypeError)


def test_pair_with_a_non_positive_lifetime_is_refused(clock: Clock) -> None:
    guard = TokenGuard(lambda: ("v", 0.0), clock=clock, wall_clock=clock.wall)
    with pytest.raises(TokenUnavailableError, match="lifetime must be positive"):
        guard.get()


def test_token_without_expires_at_derives_it_from_the_lifetime() -> None:
    before = time.time()
    token = Token("v", 60.0)
    assert token.expiry_derived
    assert before + 60.0 <= token.expires_at <= time.time() + 60.0
    explicit = Token("v", 60.0, WALL_EPOCH)
    assert not explicit.expiry_derived and explicit.expires_at == WALL_EPOCH


def test_existing_shape_keeps_the_issuers_expiry(clock: Clock) -> None:
    # Token(value, lifetime, expires_at) (a JWT's exp): shared as issued, not re-derived.
    guard = TokenGuard(
        lambda: Token("jwt", 60.0, WALL_EPOCH + 59.0), name="jwt", clock=clock,
        wall_clock=clock.wall,
    )  # fmt: skip
    guard.get()
    token = guard.current()
    assert token is not None and token.expires_at == WALL_EPOCH + 59.0
    assert guard.seconds_until_refresh() == pytest.approx(48.0)  # monotonic, from the lifetime


@pytest.mark.parametrize(
    ("lifetime", "margin"), [(5.0, 1.0), (60.0, 12.0), (600.0, 120.0), (3600.0, 120.0)]
)
def test_soft_margin_is_min_120s_or_20_percent_of_the_lifetime(
    lifetime: float, margin: float
) -> None:
    assert soft_margin(lifetime) == pytest.approx(margin)
    assert soft_margin(lifetime, max_margin=30.0, fraction=0.5) == pytest.approx(
        min(30.0, lifetime / 2)
    )


def test_beat_advisory_window_starts_from_the_guards_soft_margin() -> None:
    from worker.settings import Settings
    from worker.tokenstore import advisory_window, guard_margin

    settings = Settings(
        account="acc", user="u", private_key="unused", refresh_max_margin_seconds=30.0,
        refresh_margin_fraction=0.25, beat_refresh_seconds=10.0,
    )  # fmt: skip
    assert guard_margin(settings, 60.0) == soft_margin(60.0, max_margin=30.0, fraction=0.25)
    assert advisory_window(settings, 60.0) == pytest.approx(15.0 + 1.5 * 10.0)
    assert advisory_window(settings, 3600.0) == pytest.approx(30.0 + 1.5 * 10.0)
