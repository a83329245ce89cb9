"""The shared token store: one scoped token in Redis, adopted by every worker process.

Beat's `refresh_tokens` (or any process that refreshes on its own) publishes the token it got;
every other process's TokenGuard adopts it when it enters its refresh window, so one refresh
serves all processes. The value lives under a key with a TTL (it disappears when the token
expires) and is never logged. A small lock (SET NX PX) keeps two beat refreshes from racing, and
counters per reason (`refreshes`) let operators and tests see where refreshes happen.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import redis

from worker.auth.guard import Token
from worker.delivery.channels import KEY_PREFIX

if TYPE_CHECKING:
    from worker.settings import Settings

# Beat refreshes this many beat intervals before any guard's own soft window opens.
BEAT_LEAD_INTERVALS = 1.5

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class SharedToken:
    """A token as shared between processes (the value is never shown)."""

    value: str = field(repr=False)
    lifetime: float
    expires_at: float  # wall-clock epoch seconds

    def remaining(self, now: float | None = None) -> float:
        """Seconds until it expires."""
        return self.expires_at - (time.time() if now is None else now)


def guard_margin(settings: Settings, lifetime: float) -> float:
    """The guards' soft margin for a token of `lifetime` with these settings (`soft_margin`)."""
    from worker.auth.guard import soft_margin  # the guard's rule, not a copy of it

    return soft_margin(
        lifetime,
        max_margin=settings.refresh_max_margin_seconds,
        fraction=settings.refresh_margin_fraction,
    )


def advisory_window(settings: Settings, lifetime: float) -> float:
    """Beat refreshes the shared token once this little of it is left: the guards' soft margin
    plus 1.5 beat intervals, so beat gets there before any guard refreshes on its own."""
    return guard_margin(settings, lifetime) + BEAT_LEAD_INTERVALS * settings.beat_refresh_seconds


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TokenStore:
    """Read and write the shared token of one identity (account, user, role)."""

    def __init__(self, client: redis.Redis, identity: str, *, prefix: str = KEY_PREFIX) -> None:
        self._redis = client
        self.key = f"{prefix}token:{identity}"
        self.lock_key = f"{prefix}token-lock:{identity}"
        self.counter_key = f"{prefix}token-refreshes:{identity}"
        self._unlock = client.register_script(_UNLOCK)

    def load(self) -> SharedToken | None:
        """The shared token, or None if there is none (or it is unreadable)."""
        raw = self._redis.get(self.key)
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
            token = SharedToken(str(data["value"]), float(data["lifetime"]), float(data["e"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        return token if token.remaining() > 0 else None

    def save(self, token: SharedToken) -> None:
        """Share `token` unless a token expiring later is already shared."""
        ttl_ms = int(token.remaining() * 1000)
        if ttl_ms <= 0:
            return
        current = self.load()
        if current is not None and current.expires_at >= token.expires_at:
            return
        payload = orjson.dumps(
            {"value": token.value, "lifetime": token.lifetime, "e": token.expires_at}
        )
        self._redis.set(self.key, payload, px=ttl_ms)

    def acquire(self, ttl_seconds: float) -> str | None:
        """Take the refresh lock for at most `ttl_seconds`; its owner token, or None if held."""
        owner = secrets.token_hex(8)
        ok = self._redis.set(self.lock_key, owner, nx=True, px=max(1, int(ttl_seconds * 1000)))
        return owner if ok else None

    def release(self, owner: str) -> None:
        """Release the refresh lock if we still own it."""
        self._unlock(keys=[self.lock_key], args=[owner])

    def count_refresh(self, reason: str) -> None:
        """Count one refresh (beat or request_path) for operators and tests."""
        self._redis.hincrby(self.counter_key, reason, 1)

    def refresh_counts(self) -> dict[str, int]:
        """Refreshes counted so far, by reason."""
        raw = self._redis.hgetall(self.counter_key)
        return {_text(k): int(_text(v)) for k, v in raw.items()}


def identity(s: Settings) -> str:
    """The shared-token identity: one token per account, user and role (`ACCOUNT.USER`, or
    `ACCOUNT.USER.ROLE` with a role)."""
    parts = [s.account.upper(), s.user.upper()]
    if s.role:
        parts.append(s.role.upper())
    return ".".join(parts)


_local = threading.local()


@contextmanager
def beat_refresh() -> Iterator[None]:
    """Within this block, a token refresh in this thread is counted as beat's."""
    _local.beat = True
    try:
        yield
    finally:
        _local.beat = False


class TokenHooks:
    """The TokenGuard's adopt/publish hooks on the shared token store."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    def adopt(self) -> Token | None:
        """The token another process shared, if any."""

        shared = self.store.load()
        if shared is None:
            return None
        return Token(shared.value, shared.lifetime, shared.expires_at)

    def publish(self, token: Token) -> None:
        """Share a token this process fetched, and count where the refresh happened."""
        self.store.save(SharedToken(token.value, token.lifetime, token.expires_at))
        reason = "beat" if getattr(_local, "beat", False) else "request_path"
        self.store.count_refresh(reason)


def token_hooks(client: redis.Redis, s: Settings) -> TokenHooks:
    """Adopt/publish hooks for a TokenGuard, sharing tokens through `client`."""
    return TokenHooks(TokenStore(client, identity(s)))
