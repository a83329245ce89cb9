"""TokenGuard: a valid token for every request, refreshed ahead of expiry, one refresh at a time.

    guard = TokenGuard(fetch)     # fetch() -> (value, lifetime_seconds) or Token(value, lifetime)
    guard.get()                   # a valid value: fetched on first use, refreshed ahead of expiry

The refresh moment of each token is pinned when it is obtained, in monotonic time
(docs/tokens-and-retries.md#refresh-moment, and the windows below it):

    soft_margin = min(max_margin, fraction * L)        # soft_margin(L): 120 s / 20 % by default
    hard_margin = min(hard_margin_setting, soft_margin / 2)
    refresh_at  = obtained + L - soft_margin (+ a small per-token jitter, still inside the window)
    hard_at     = obtained + L - hard_margin

    now < refresh_at            fast path: one snapshot read and one clock compare, no lock
    refresh_at <= now < hard_at soft window: one caller refreshes (non-blocking try-lock);
                                every other caller keeps the current token without waiting
    now >= hard_at, no token,   hard window: callers wait (with a timeout) for the one refresh,
    or invalidated after a 401  double-checked after acquiring the lock

A failed refresh keeps serving the current token while it is valid and backs off with jitter,
scaled down for short lifetimes; a refresh that does not extend the expiry is a failure; after
`escalate_after` consecutive failures the guard logs `token.refresh.escalated` at ERROR and
reports `healthy = False` until a refresh succeeds. Past expiry with refresh failing, `get()`
raises `TokenUnavailableError`.

Hooks: `adopt()` is asked for a token published by another process before fetching (soft and
hard windows); `publish(token)` is called after each successful own refresh. After `fork()` the
child drops the parent's lock and in-flight state (`os.register_at_fork`) and keeps the token.

Events `token.refresh.start|success|failure|escalated` carry name, reason (initial, soft, hard,
401, beat, shared), lifetime, remaining, duration_ms and outcome; never the token value.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# The guard's errors are part of the one tree (worker/errors.py); importable from here too.
from worker.errors import TokenNotExtendedError as TokenNotExtendedError  # noqa: PLC0414 (re-exported)
from worker.errors import TokenUnavailableError as TokenUnavailableError  # noqa: PLC0414 (re-exported)
from worker.observability import (
    get_logger,
    record_guard_wait,
    record_token_refresh,
    register_secret,
    set_guard_health,
)

if TYPE_CHECKING:
    from worker.settings import Settings

# Defaults mirror worker/settings.py; `TokenGuard.from_settings` is the normal way in.
DEFAULT_MAX_MARGIN = 120.0
DEFAULT_MARGIN_FRACTION = 0.2
DEFAULT_HARD_MARGIN = 10.0
DEFAULT_WAIT_TIMEOUT = 10.0
DEFAULT_BACKOFF_BASE = 1.0
DEFAULT_BACKOFF_CAP = 30.0
DEFAULT_ESCALATE_AFTER = 3
DEFAULT_JITTER_FRACTION = 0.0  # exact threshold unless asked; the shared store spreads processes
# Failure backoff never exceeds this share of the token's lifetime (a 5 s token cannot wait 30 s).
BACKOFF_LIFETIME_FRACTION = 0.1

_NEG_INF = -math.inf
_log = get_logger("worker.auth.guard")


DEFAULT_NAME = "token"


def soft_margin(
    lifetime: float,
    *,
    max_margin: float = DEFAULT_MAX_MARGIN,
    fraction: float = DEFAULT_MARGIN_FRACTION,
) -> float:
    """How long before expiry a token of full lifetime `lifetime` is refreshed: min(120 s, 20 % L).

    The one statement of the rule: the guard pins each token's refresh moment with it, and beat's
    advisory window (worker/tasks.py) starts from it. `max_margin` and `fraction` are
    SNOWPIPE_REFRESH_MAX_MARGIN_SECONDS and SNOWPIPE_REFRESH_MARGIN_FRACTION.
    """
    return min(max_margin, fraction * lifetime)


@dataclass(frozen=True, slots=True, init=False)
class Token:
    """A token value with its full lifetime and its wall-clock expiry; the value is never shown.

    `Token(value, lifetime)` is a token issued just now: its `expires_at` is derived from the
    lifetime (`expiry_derived` is True), and a guard re-derives it from the moment the guard
    obtained the token, on its own wall clock. `Token(value, lifetime, expires_at)` carries the
    issuer's expiry (a JWT's `exp`), which is what processes share.
    """

    value: str = field(repr=False)
    lifetime: float  # seconds: the token's full lifetime L (from its own iat/exp when known)
    expires_at: float  # wall-clock epoch seconds (for sharing between processes)
    expiry_derived: bool = field(init=False, repr=False, compare=False)

    def __init__(self, value: str, lifetime: float, expires_at: float | None = None) -> None:
        if not value:
            raise ValueError("Token value is empty: the token endpoint returned no token")
        if isinstance(lifetime, bool) or not lifetime > 0:
            raise ValueError(f"Token lifetime must be positive, got {lifetime!r}")
        derived = expires_at is None
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "lifetime", float(lifetime))
        object.__setattr__(
            self, "expires_at", time.time() + lifetime if expires_at is None else float(expires_at)
        )
        object.__setattr__(self, "expiry_derived", derived)


# What `fetch()` returns: a freshly issued token, as a `Token` or a `(value, lifetime_seconds)`
# pair. Its lifetime is counted from the moment the guard asked for it (monotonic, so clock skew
# cannot cause refresh loops). Tokens of unknown age come in through `Adopt`.
Fetched = Token | tuple[str, float]
Fetch = Callable[[], Fetched]
Adopt = Callable[[], "Token | None"]
Publish = Callable[[Token], None]


def as_token(fetched: object, obtained_at: float) -> Token:
    """`fetched` (a `Token` or a `(value, lifetime)` pair) as a Token with a wall-clock expiry.

    `obtained_at` is the wall-clock moment the token was asked for: a pair, or a Token built
    without `expires_at`, expires `lifetime` seconds after it. Raises TypeError for other shapes.
    """
    if isinstance(fetched, Token):
        if fetched.expiry_derived:
            return Token(fetched.value, fetched.lifetime, obtained_at + fetched.lifetime)
        return fetched
    if isinstance(fetched, tuple) and len(fetched) == 2:
        value, lifetime = fetched
        if isinstance(value, str) and isinstance(lifetime, int | float):
            return Token(value, lifetime, obtained_at + float(lifetime))
    raise TypeError(
        f"fetch() returned {type(fetched).__name__}, expected a Token or a "
        "(value, lifetime_seconds) pair"
    )


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """One immutable view of the guard's token; replaced whole, read without a lock."""

    value: str
    token: Token | None
    check_at: float  # fast path valid while monotonic now < check_at
    refresh_at: float  # pinned start of the soft window
    hard_at: float
    expires: float  # monotonic expiry
    invalidated: bool = False


_EMPTY = _Snapshot("", None, _NEG_INF, _NEG_INF, _NEG_INF, _NEG_INF)

# Every live guard, so a forked child can reset them all (a lock held at fork stays held).
_GUARDS: weakref.WeakSet[TokenGuard] = weakref.WeakSet()


def _reset_guards_after_fork() -> None:
    for guard in list(_GUARDS):
        guard._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_guards_after_fork)


class TokenGuard:
    """A per-process cache of one token that hands out a valid value and refreshes it in time.

    `fetch()` returns `(value, lifetime_seconds)` or a `Token`; `name` labels logs and metrics
    (one per guard in a process: "jwt", "scoped"). `clock` (monotonic) and `wall_clock` are
    injectable for tests.
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        name: str = DEFAULT_NAME,
        max_margin: float = DEFAULT_MAX_MARGIN,
        margin_fraction: float = DEFAULT_MARGIN_FRACTION,
        hard_margin: float = DEFAULT_HARD_MARGIN,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        escalate_after: int = DEFAULT_ESCALATE_AFTER,
        jitter_fraction: float = DEFAULT_JITTER_FRACTION,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        adopt: Adopt | None = None,
        publish: Publish | None = None,
    ) -> None:
        if not 0 < margin_fraction < 1:
            raise ValueError(f"margin_fraction must be in (0, 1), got {margin_fraction!r}")
        if max_margin < 0 or hard_margin < 0 or wait_timeout <= 0:
            raise ValueError("max_margin and hard_margin must be >= 0 and wait_timeout > 0")
        if backoff_base <= 0 or backoff_cap <= 0 or escalate_after < 1:
            raise ValueError("backoff_base and backoff_cap must be > 0 and escalate_after >= 1")
        if not 0 <= jitter_fraction <= 1:
            raise ValueError(f"jitter_fraction must be in [0, 1], got {jitter_fraction!r}")
        self.name = name
        self._fetch = fetch
        self._max_margin = float(max_margin)
        self._fraction = float(margin_fraction)
        self._hard_margin = float(hard_margin)
        self._wait_timeout = float(wait_timeout)
        self._backoff_base = float(backoff_base)
        self._backoff_cap = float(backoff_cap)
        self._escalate_after = escalate_after
        self._jitter = float(jitter_fraction)
        self._clock = clock
        self._wall = wall_clock
        self._own_rng = rng is None
        self._rng = rng if rng is not None else random.Random()
        self._adopt = adopt
        self._publish = publish

        self._snap: _Snapshot = _EMPTY
        self._lock = threading.Lock()
        self._attempts = 0  # completed refresh attempts: waiters compare it to see one finished
        self._failures = 0  # consecutive failures
        self._retry_at = _NEG_INF  # monotonic: no new attempt before this after a failure
        self._last_error: BaseException | None = None
        self._healthy = True
        _GUARDS.add(self)
        set_guard_health(name, True)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        fetch: Fetch,
        *,
        name: str = DEFAULT_NAME,
        adopt: Adopt | None = None,
        publish: Publish | None = None,
        **overrides: Any,
    ) -> TokenGuard:
        """A guard with the refresh knobs of `settings` (keyword `overrides` win, e.g. clock)."""
        knobs: dict[str, Any] = {
            "max_margin": settings.refresh_max_margin_seconds,
            "margin_fraction": settings.refresh_margin_fraction,
            "hard_margin": settings.refresh_hard_margin_seconds,
            "wait_timeout": settings.refresh_wait_timeout_seconds,
            "backoff_base": settings.refresh_failure_backoff_seconds,
            "backoff_cap": settings.refresh_failure_backoff_cap_seconds,
            "escalate_after": settings.refresh_escalate_after,
            "jitter_fraction": settings.refresh_jitter_fraction,
        }
        knobs.update(overrides)
        return cls(fetch, name=name, adopt=adopt, publish=publish, **knobs)

    # --- The request path ---------------------------------------------------------------------

    def get(self) -> str:
        """A valid token value; refreshes first when due (see the module docstring)."""
        snap = self._snap
        if self._clock() < snap.check_at:
            return snap.value
        started = time.perf_counter()
        try:
            return self._get_slow()
        finally:
            # Off the fast path only (a refresh, a wait for one): the metric costs nothing per call.
            record_guard_wait(self.name, time.perf_counter() - started)

    def invalidate(self, value: str) -> None:
        """Mark `value` rejected (a 401): if it is still current, the next `get()` refreshes."""
        with self._lock_or_none() as locked:
            snap = self._snap
            if snap.token is None or snap.invalidated or snap.value != value:
                return  # stale: a newer token is already in place (or a refresh is pending)
            # Everyone waits for the replacement: the server said this token is no good.
            self._snap = _Snapshot(
                snap.value, snap.token, _NEG_INF, snap.refresh_at, _NEG_INF, snap.expires, True
            )
            self._retry_at = _NEG_INF  # a 401 forces a refresh even during a failure backoff
            if not locked:
                _log.warning("token.invalidate.unlocked", name=self.name)

    def refresh(self, reason: str = "beat") -> Token:
        """Fetch a new token now (beat, tests), without consulting `adopt`; returns it.

        Raises the fetch's own exception (or `TokenNotExtendedError`) on failure, after counting
        it like any other failed refresh; `TokenUnavailableError` if another refresh holds the
        lock longer than the wait timeout.
        """
        if not self._lock.acquire(timeout=self._wait_timeout):
            raise TokenUnavailableError(
                f"{self.name} token: another refresh did not finish within "
                f"{self._wait_timeout:g} s",
                name=self.name,
            )
        try:
            return self._refresh_locked(reason, use_adopt=False)
        finally:
            self._lock.release()

    # --- State for health checks and beat -----------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False after `escalate_after` consecutive refresh failures; True again after a success."""
        return self._healthy

    @property
    def consecutive_failures(self) -> int:
        """How many refreshes in a row have failed."""
        return self._failures

    def current(self) -> Token | None:
        """The token held now (possibly in its refresh window or expired), or None."""
        return self._snap.token

    def seconds_until_refresh(self) -> float:
        """Seconds until the current token's pinned refresh moment (<= 0: due; -inf: no token)."""
        snap = self._snap
        if snap.token is None or snap.invalidated:
            return _NEG_INF
        return snap.refresh_at - self._clock()

    # --- Internals ----------------------------------------------------------------------------

    def _soft_margin(self, lifetime: float) -> float:
        return soft_margin(lifetime, max_margin=self._max_margin, fraction=self._fraction)

    def _get_slow(self) -> str:
        now = self._clock()
        snap = self._snap
        if snap.token is not None and not snap.invalidated and now < snap.hard_at:
            return self._get_soft(snap, now)
        return self._get_hard()

    def _get_soft(self, snap: _Snapshot, now: float) -> str:
        if now < self._retry_at or not self._lock.acquire(blocking=False):
            return snap.value  # backing off, or someone else is refreshing: keep the current one
        try:
            cur = self._snap
            if self._clock() < cur.check_at:
                return cur.value  # refreshed between our check and the lock
            if cur.token is None or cur.invalidated:
                return self._hard_locked(self._attempts)
            try:
                return self._refresh_locked("soft").value
            except Exception:  # noqa: BLE001 (already logged and counted: the current one serves)
                return cur.value
        finally:
            self._lock.release()

    def _get_hard(self) -> str:
        seen = self._attempts
        if not self._lock.acquire(timeout=self._wait_timeout):
            snap = self._snap
            if self._usable(snap, self._clock()):
                return snap.value
            raise TokenUnavailableError(
                f"no valid {self.name} token: waited {self._wait_timeout:g} s for the refresh in "
                "progress (raise SNOWPIPE_REFRESH_WAIT_TIMEOUT_SECONDS if the token endpoint is "
                "slow)",
                name=self.name,
                cause=self._last_error,
            )
        try:
            return self._hard_locked(seen)
        finally:
            self._lock.release()

    def _hard_locked(self, seen: int) -> str:
        snap = self._snap
        now = self._clock()
        if now < snap.check_at:
            return snap.value  # the refresh we waited for succeeded
        if self._attempts != seen or now < self._retry_at:
            # A refresh failed while we waited, or we are backing off: do not hammer the endpoint.
            if self._usable(snap, now):
                return snap.value
            raise self._unavailable(snap, now)
        reason = "initial" if snap.token is None else ("401" if snap.invalidated else "hard")
        try:
            return self._refresh_locked(reason).value
        except Exception:  # noqa: BLE001 (logged and counted; decide what the caller gets)
            snap = self._snap
            now = self._clock()
            if self._usable(snap, now):
                return snap.value
            raise self._unavailable(snap, now) from self._last_error

    @staticmethod
    def _usable(snap: _Snapshot, now: float) -> bool:
        return snap.token is not None and not snap.invalidated and now < snap.expires

    def _unavailable(self, snap: _Snapshot, now: float) -> TokenUnavailableError:
        cause = self._last_error
        if snap.token is None:
            state = "no token yet"
        elif snap.invalidated:
            state = "the token was rejected (401)"
        else:
            state = f"the token expired {now - snap.expires:.1f} s ago"
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        retry_in = max(0.0, self._retry_at - now)
        error = TokenUnavailableError(
            f"no valid {self.name} token: {state} and refreshing failed "
            f"({self._failures} in a row, next attempt in {retry_in:.1f} s){detail}",
            name=self.name,
            cause=cause,
        )
        error.__cause__ = cause
        return error

    def _refresh_locked(self, reason: str, *, use_adopt: bool = True) -> Token:
        """Adopt or fetch a token and install it; the caller holds the lock. Raises on failure."""
        start = self._clock()
        cur = self._snap
        remaining = round(cur.expires - start, 3) if cur.token is not None else None
        _log.debug(
            "token.refresh.start",
            name=self.name,
            reason=reason,
            lifetime=cur.token.lifetime if cur.token is not None else None,
            remaining=remaining,
        )
        if use_adopt and self._adopt is not None:
            adopted = self._try_adopt(cur, start, reason, remaining)
            if adopted is not None:
                return adopted
        wall_start = self._wall()
        try:
            token = as_token(self._fetch(), wall_start)
            if cur.token is not None and not self._extends(cur, token):
                raise TokenNotExtendedError(
                    f"the {self.name} token endpoint returned a token expiring no later than the "
                    "current one (a cached token?)"
                )
        except Exception as exc:
            self._record_failure(reason, exc, start, remaining)
            raise
        register_secret(token.value, transient=True)
        # Counted from before the fetch: the token was issued after `start`, so this is safe.
        self._install(token, start + token.lifetime)
        self._record_success(reason, token, start, remaining, outcome="success")
        if self._publish is not None:
            try:
                self._publish(token)
            except Exception as exc:  # noqa: BLE001 (sharing is an optimisation, never fatal)
                _log.warning("token.publish.failure", name=self.name, error=type(exc).__name__)
        return token

    @staticmethod
    def _extends(cur: _Snapshot, token: Token) -> bool:
        assert cur.token is not None
        if token.expires_at > cur.token.expires_at:
            return True
        # A replacement for a token the server rejected need only be a different token: one
        # minted within the same second carries the same `exp`.
        return cur.invalidated and token.value != cur.value

    def _try_adopt(
        self, cur: _Snapshot, now: float, reason: str, remaining: float | None
    ) -> Token | None:
        assert self._adopt is not None
        try:
            candidate = self._adopt()
        except Exception as exc:  # noqa: BLE001 (the store is optional: fall back to fetching)
            _log.warning("token.adopt.failure", name=self.name, error=type(exc).__name__)
            return None
        if candidate is None:
            return None
        candidate = as_token(candidate, self._wall())
        if cur.token is not None and candidate.expires_at <= cur.token.expires_at:
            return None  # not fresher than ours
        if cur.token is not None and candidate.value == cur.value:
            return None
        # A shared token's age is unknown: its expiry comes from the (shared) wall clock.
        left = min(candidate.lifetime, candidate.expires_at - self._wall())
        expires = now + left
        if now >= expires - self._soft_margin(candidate.lifetime):
            return None  # already due itself: fetch a fresh one instead
        register_secret(candidate.value, transient=True)
        self._install(candidate, expires)
        self._record_success("shared", candidate, now, remaining, outcome="success", trigger=reason)
        return candidate

    def _install(self, token: Token, expires: float) -> None:
        soft = self._soft_margin(token.lifetime)
        hard = min(self._hard_margin, soft / 2)
        refresh_at = expires - soft
        hard_at = expires - hard
        if self._jitter > 0 and hard_at > refresh_at:
            # Later, never earlier, and inside the soft window: forked children that inherited the
            # same token do not all refresh at the same instant.
            refresh_at += self._rng.uniform(0.0, self._jitter * (hard_at - refresh_at))
        self._failures = 0
        self._retry_at = _NEG_INF
        self._last_error = None
        self._attempts += 1
        self._snap = _Snapshot(token.value, token, refresh_at, refresh_at, hard_at, expires)
        if not self._healthy:
            self._healthy = True
            set_guard_health(self.name, True)

    def _backoff(self, lifetime: float | None) -> float:
        cap = self._backoff_cap
        if lifetime is not None:
            cap = min(cap, BACKOFF_LIFETIME_FRACTION * lifetime)
        base = min(self._backoff_base, cap)
        ceiling = min(cap, base * 2.0 ** min(self._failures - 1, 30))
        # Equal jitter: never ~0 (that would hammer the endpoint), spread over the upper half.
        return ceiling / 2 + self._rng.uniform(0.0, ceiling / 2)

    def _record_failure(
        self, reason: str, exc: BaseException, start: float, remaining: float | None
    ) -> None:
        now = self._clock()
        cur = self._snap
        self._failures += 1
        self._attempts += 1
        self._last_error = exc
        lifetime = cur.token.lifetime if cur.token is not None else None
        self._retry_at = now + self._backoff(lifetime)
        if not cur.invalidated:
            check_at = min(max(cur.refresh_at, self._retry_at), cur.hard_at)
            self._snap = _Snapshot(
                cur.value, cur.token, check_at, cur.refresh_at, cur.hard_at, cur.expires
            )
        fields: dict[str, Any] = {
            "name": self.name,
            "reason": reason,
            "lifetime": lifetime,
            "remaining": remaining,
            "duration_ms": round((now - start) * 1000, 3),
            "outcome": "failure",
            "consecutive_failures": self._failures,
            "retry_in": round(self._retry_at - now, 3),
            "error": type(exc).__name__,
            "error_message": str(exc),
        }
        _log.warning("token.refresh.failure", **fields)
        record_token_refresh(self.name, reason, "failure")
        if self._failures >= self._escalate_after:
            _log.error("token.refresh.escalated", **fields)
            if self._healthy:
                self._healthy = False
                set_guard_health(self.name, False)

    def _record_success(
        self,
        reason: str,
        token: Token,
        start: float,
        remaining: float | None,
        *,
        outcome: str,
        trigger: str | None = None,
    ) -> None:
        fields: dict[str, Any] = {
            "name": self.name,
            "reason": reason,
            "lifetime": token.lifetime,
            "remaining": remaining,
            "duration_ms": round((self._clock() - start) * 1000, 3),
            "outcome": outcome,
        }
        if trigger is not None:
            fields["trigger"] = trigger
        _log.info("token.refresh.success", **fields)
        record_token_refresh(self.name, reason, outcome)

    def _lock_or_none(self) -> _MaybeLocked:
        return _MaybeLocked(self._lock, self._wait_timeout)

    def _after_fork_in_child(self) -> None:
        # The parent's lock may have been held by a thread that does not exist here: replace it.
        # The token itself is still valid and is kept.
        self._lock = threading.Lock()
        if self._own_rng:
            self._rng.seed()  # children must not draw the same jitter as their siblings

    def __repr__(self) -> str:
        snap = self._snap
        state = "empty" if snap.token is None else f"expires_in={snap.expires - self._clock():.1f}s"
        return f"TokenGuard(name={self.name!r}, {state}, healthy={self._healthy})"


class _MaybeLocked:
    """Context manager: the lock with a timeout; the body runs either way (reports which)."""

    __slots__ = ("_acquired", "_lock", "_timeout")

    def __init__(self, lock: threading.Lock, timeout: float) -> None:
        self._lock = lock
        self._timeout = timeout
        self._acquired = False

    def __enter__(self) -> bool:
        self._acquired = self._lock.acquire(timeout=self._timeout)
        return self._acquired

    def __exit__(self, *_exc: object) -> None:
        if self._acquired:
            self._lock.release()
