"""Reaching the broker and the state store, with errors an operator can act on.

`BrokerUnavailableError` and `StateStoreUnavailableError` (both `UnreachableError`) name the
setting (`SNOWPIPE_BROKER_URL`, `SNOWPIPE_STATE_URL`), the address (password masked) and the fix.
The CLI prints them as one line; `publish_batch` raises them instead of kombu's errors.
"""

from __future__ import annotations

from typing import Any

import redis

from worker.errors import BrokerUnavailableError as BrokerUnavailableError  # noqa: PLC0414 (re-exported)
from worker.errors import StateStoreUnavailableError as StateStoreUnavailableError  # noqa: PLC0414 (re-exported)
from worker.errors import UnreachableError as UnreachableError  # noqa: PLC0414 (re-exported)
from worker.redisurl import redact_url as redact_url  # noqa: PLC0414 (re-exported)
from worker.settings import Settings

CONNECT_TIMEOUT_SECONDS = 3.0


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


def broker_error(settings: Settings, exc: BaseException | None = None) -> BrokerUnavailableError:
    """The error for a broker that cannot be reached (or did not confirm a message)."""
    kind = "Redis" if settings.broker_is_redis else "RabbitMQ"
    why = f": {_reason(exc)}" if exc is not None else ""
    return BrokerUnavailableError(
        f"cannot reach the broker at {redact_url(settings.broker_url)} "
        f"(SNOWPIPE_BROKER_URL){why}; start {kind} there, or point SNOWPIPE_BROKER_URL at a "
        "running one"
    )


def state_error(settings: Settings, exc: BaseException | None = None) -> StateStoreUnavailableError:
    """The error for a state Redis that cannot be reached."""
    why = f": {_reason(exc)}" if exc is not None else ""
    default = ""
    if settings.state_url == settings.broker_url:
        default = ", which defaults to SNOWPIPE_BROKER_URL"
    if settings.state_is_sentinel:
        return StateStoreUnavailableError(
            f"cannot reach the state store through the Sentinels at "
            f"{redact_url(settings.state_url)} (SNOWPIPE_STATE_URL, master "
            f"{settings.state_sentinel_master!r}){why}; check that the Sentinels run and monitor "
            "a primary under SNOWPIPE_STATE_SENTINEL_MASTER (SENTINEL MASTERS lists the names), "
            "and that the primary answers"
        )
    return StateStoreUnavailableError(
        f"cannot reach the state store at {redact_url(settings.state_url)} "
        f"(SNOWPIPE_STATE_URL{default}){why}; start Redis there, or point SNOWPIPE_STATE_URL at a "
        "running one"
    )


def broker_connection(settings: Settings, *, timeout: float = CONNECT_TIMEOUT_SECONDS) -> Any:
    """A kombu connection to the broker (not yet connected)."""
    from kombu import connection

    factory: Any = connection.Connection
    return factory(settings.broker_url, connect_timeout=timeout)


def check_broker(settings: Settings, *, timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
    """Connect to the broker once (no retries); BrokerUnavailableError if it does not answer."""
    conn = broker_connection(settings, timeout=timeout)
    try:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 (any failure to connect is "unreachable")
        raise broker_error(settings, exc) from None
    finally:
        conn.release()


def state_client(settings: Settings, *, check: bool = True) -> redis.Redis:
    """A client of the state Redis; with `check`, PINGed once (StateStoreUnavailableError)."""
    from redis.sentinel import MasterNotFoundError

    from worker.statestore import sentinel_problem, state_redis

    if not settings.state_url:
        raise StateStoreUnavailableError(
            "SNOWPIPE_STATE_URL is not set (with a RabbitMQ broker there is no default): set it "
            "to the state Redis, e.g. redis://127.0.0.1:6379/0"
        )
    client = state_redis(settings)
    if check:
        try:
            client.ping()
        except redis.RedisError as exc:
            error = state_error(settings, exc)
            if isinstance(exc, MasterNotFoundError):
                error = state_error(settings, MasterNotFoundError(sentinel_problem(client)))
            client.close()
            raise error from None
    return client
