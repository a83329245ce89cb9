"""Reaching the broker and the state store, with errors an operator can act on.

`BrokerUnavailableError` and `StateStoreUnavailableError` (both `UnreachableError`) name the
setting (`SNOWPIPE_BROKER_URL`, `SNOWPIPE_STATE_URL`), the address (password masked), what went
wrong and the fix, in one line. What went wrong is one of (`diagnose`):

- **credentials**: the server refused the user or password (RabbitMQ `ACCESS_REFUSED`, Redis
  `WRONGPASS`/`NOAUTH`): fix them in the URL;
- **permission**: the user is known but may not do this (RabbitMQ `NOT_ALLOWED` on the vhost,
  Redis `NOPERM` from its ACL): grant it;
- **tls**: the server's certificate was not accepted (unknown CA, wrong host name):
  `SNOWPIPE_CA_FILE`, or connect by a name the certificate lists;
- **unreachable**: anything else (refused, timed out, unknown host): start it, or fix the URL.

The CLI prints them as one line; `publish_batch` raises them instead of kombu's errors.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from typing import Any, Literal

import redis

from worker.errors import BrokerUnavailableError as BrokerUnavailableError  # noqa: PLC0414 (re-exported)
from worker.errors import StateStoreUnavailableError as StateStoreUnavailableError  # noqa: PLC0414 (re-exported)
from worker.errors import UnreachableError as UnreachableError  # noqa: PLC0414 (re-exported)
from worker.redisurl import redact_url as redact_url  # noqa: PLC0414 (re-exported)
from worker.settings import Settings

CONNECT_TIMEOUT_SECONDS = 3.0

Problem = Literal["credentials", "permission", "tls", "unreachable"]

# Redis answers (first word of the error) and what they mean.
_REDIS_CREDENTIALS = ("WRONGPASS", "NOAUTH", "INVALID USERNAME-PASSWORD", "AUTHENTICATION REQUIRED",
                      "HELLO MUST BE CALLED WITH THE CLIENT ALREADY AUTHENTICATED")  # fmt: skip
_REDIS_PERMISSION = ("NOPERM",)
# py-amqp's reply codes: 403 ACCESS_REFUSED (login), 530 NOT_ALLOWED (vhost access).
_AMQP_ACCESS_REFUSED = 403
_AMQP_NOT_ALLOWED = 530
_AMQP_PREFIX = re.compile(r"^\(\d+, \d+\): \(\d+\) ")
_VERIFY_FAILED = re.compile(r"certificate verify failed:\s*([^(]+)", re.IGNORECASE)
_TLS_MARKERS = ("CERTIFICATE_VERIFY_FAILED", "CERTIFICATE VERIFY FAILED", "HOSTNAME MISMATCH",
                "WRONG_VERSION_NUMBER", "SSL:", "TLSV1_ALERT")  # fmt: skip


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it was raised from (kombu wraps the transport's)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__


def _diagnose_one(cause: BaseException) -> tuple[Problem, str] | None:
    """The problem `cause` itself shows, if it shows one."""
    code = getattr(cause, "reply_code", None) or getattr(cause, "code", None)
    text = _first_line(cause)
    upper = text.upper()
    if type(cause).__module__.startswith("amqp") and code in (
        _AMQP_ACCESS_REFUSED,
        _AMQP_NOT_ALLOWED,
    ):
        reason = _AMQP_PREFIX.sub("", text).split(". For details", 1)[0].rstrip(".")
        return ("credentials" if code == _AMQP_ACCESS_REFUSED else "permission"), reason
    if upper.startswith(("NOAUTH", "AUTHENTICATION REQUIRED", "HELLO MUST")):
        return "credentials", "NOAUTH: the server requires a password"
    if isinstance(cause, redis.AuthenticationError) or upper.startswith(_REDIS_CREDENTIALS):
        return "credentials", text.rstrip(".")
    if upper.startswith(_REDIS_PERMISSION):
        return "permission", text.rstrip(".")
    if isinstance(cause, ssl.SSLError) or any(marker in upper for marker in _TLS_MARKERS):
        verified = _VERIFY_FAILED.search(text)
        # "certificate verify failed: self-signed certificate ...", without the C file and line
        reason = f"certificate verify failed: {verified.group(1).strip()}" if verified else text
        return "tls", reason.rstrip(".")
    return None


def diagnose(exc: BaseException) -> tuple[Problem, str]:
    """What kind of failure `exc` is (see the module docstring), and its reason in a few words."""
    for cause in _chain(exc):
        found = _diagnose_one(cause)
        if found is not None:
            return found
    return "unreachable", _first_line(exc).rstrip(".")


def _credentials_form(url: str) -> str:
    if url.startswith(("amqp", "pyamqp")):
        return "amqp://USER:PASSWORD@HOST:PORT/VHOST"
    return "redis://USER:PASSWORD@HOST:PORT/DB, or redis://:PASSWORD@HOST:PORT/DB"


def _message(
    what: str, setting: str, url: str, kind: str, exc: BaseException | None, *, note: str = ""
) -> str:
    """One line: what failed at which address (setting), why, and the fix."""
    where = f"{what} at {redact_url(url)} ({setting}{note})"
    problem, reason = diagnose(exc) if exc is not None else ("unreachable", "")
    if problem == "credentials":
        return (
            f"{where} refused the credentials ({reason}); set the user and password {kind} "
            f"expects in {setting}: {_credentials_form(url)}"
        )
    if problem == "permission":
        grant = (
            "rabbitmqctl set_permissions -p VHOST USER '.*' '.*' '.*'"
            if url.startswith(("amqp", "pyamqp"))
            else "the user's rules in the Redis ACL"
        )
        return f"{where} does not allow this user ({reason}); grant it ({grant}), or name " \
               f"another user in {setting}"  # fmt: skip
    if problem == "tls":
        return (
            f"{where} failed the TLS check ({reason}); point SNOWPIPE_CA_FILE at the CA "
            "certificate that signed the server's certificate, and connect by a host name the "
            "certificate lists"
        )
    why = f": {reason}" if reason else ""
    return f"cannot reach {where}{why}; start {kind} there, or point {setting} at a running one"


def broker_error(settings: Settings, exc: BaseException | None = None) -> BrokerUnavailableError:
    """The error for a broker that cannot be used (or did not confirm a message)."""
    kind = "Redis" if settings.broker_is_redis else "RabbitMQ"
    return BrokerUnavailableError(
        _message("the broker", "SNOWPIPE_BROKER_URL", settings.broker_url, kind, exc)
    )


def state_error(settings: Settings, exc: BaseException | None = None) -> StateStoreUnavailableError:
    """The error for a state Redis that cannot be used."""
    note = ""
    if settings.state_url == settings.broker_url:
        note = ", which defaults to SNOWPIPE_BROKER_URL"
    url = settings.state_url
    if settings.state_is_sentinel:
        problem, reason = diagnose(exc) if exc is not None else ("unreachable", "")
        if problem == "unreachable":
            why = f": {reason}" if reason else ""
            return StateStoreUnavailableError(
                f"cannot reach the state store through the Sentinels at {redact_url(url)} "
                f"(SNOWPIPE_STATE_URL, master {settings.state_sentinel_master!r}){why}; check "
                "that the Sentinels run and monitor a primary under "
                "SNOWPIPE_STATE_SENTINEL_MASTER (SENTINEL MASTERS lists the names), and that the "
                "primary answers"
            )
    return StateStoreUnavailableError(
        _message("the state store", "SNOWPIPE_STATE_URL", url, "Redis", exc, note=note)
    )


def broker_connection(settings: Settings, *, timeout: float = CONNECT_TIMEOUT_SECONDS) -> Any:
    """A kombu connection to the broker (not yet connected), with the broker's TLS options."""
    from kombu import connection

    from worker.tls import broker_ssl_options

    factory: Any = connection.Connection
    ssl = broker_ssl_options(settings.broker_url, settings.ca_file)
    return factory(settings.broker_url, connect_timeout=timeout, ssl=ssl or False)


def check_broker(settings: Settings, *, timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
    """Connect to the broker once (no retries); BrokerUnavailableError if it cannot be used."""
    conn = broker_connection(settings, timeout=timeout)
    try:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
        # RabbitMQ checks a user's access to the vhost when a channel opens.
        conn.default_channel  # noqa: B018 (opens the channel)
    except Exception as exc:  # noqa: BLE001 (any failure to connect is reported)
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
