"""The state Redis's one client factory, `state_redis(settings)`, and its replication view.

Every client of the state store (tasks' `Runtime`, the node, beat's token store, health, status,
doctor, the CLI, the demo) is built here, from `SNOWPIPE_STATE_URL`:

- `redis://` / `rediss://`: a plain client of that Redis;
- `sentinel://...` (`worker.redisurl`): a client of the primary that Sentinel names for
  `SNOWPIPE_STATE_SENTINEL_MASTER`, which follows a failover by itself (below).

Both have the same explicit timeouts (the threads pool has no time limits) and, after a
connection error or a timeout, reconnect and retry a command once, at once.

Following a failover. redis-py's `Sentinel.master_for()` asks Sentinel for the primary's address
whenever its pool opens a connection, but (redis-py 8.x, checked in its source):

1. a command retried after a connection error reconnects to the address the connection had
   (`send_packed_command` reconnects without asking Sentinel; redis-py issue #3874). After a
   kill -9 that address is dead; a primary restarted there is an old copy until Sentinel
   demotes it;
2. an open connection stays with the old primary as long as it works. A forced failover
   (`SENTINEL FAILOVER`) leaves the old primary a primary, accepting writes, until Sentinel
   reconfigures it, about 10 s after the switch (measured here with Redis 7.0);
3. it asks `SENTINEL MASTERS`, whose address changes only when the failover ends, after every
   other replica was pointed at the new primary, and which gives `MasterNotFoundError` while the
   primary is reported down (#3731).

So `FailoverConnection` reconnects through Sentinel every time (1) and checks `ROLE`,
`FailoverPool` asks Sentinel where the primary is at most every `MASTER_CHECK_SECONDS` while
the client is in use, dropping its connections to a primary that is no longer the one (2), and
`FollowingSentinel` asks `SENTINEL GET-MASTER-ADDR-BY-NAME`, which names the promoted replica as
soon as it is a primary (3); `MasterNotFoundError` (a `ConnectionError`) then means that no
Sentinel answered. A demoted primary's `READONLY` reply (a write or a script that writes) is
turned by redis-py into a `ConnectionError` after dropping that connection, so it is retried
through Sentinel like any other. Callers see ordinary `redis.RedisError`s (`ConnectionError`,
`TimeoutError`, `MasterNotFoundError`) while the failover lasts, and none once the client
reached the new primary.

Scripts (`register_script`) are not replicated (Redis 7 keeps them per server): the first call on
a new primary gets NOSCRIPT and redis-py's `Script` loads it there and runs it again; a pipeline
loads its scripts before it runs (`SCRIPT EXISTS` / `SCRIPT LOAD`), and `StatePipeline` loads
them again when it retries on a new connection.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import redis
from redis.client import Pipeline
from redis.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)

from worker.redisurl import parse_sentinel_url, redact_url
from worker.settings import Settings
from worker.tls import redis_ssl_kwargs

REDIS_SOCKET_TIMEOUT_SECONDS = 10.0
REDIS_CONNECT_TIMEOUT_SECONDS = 5.0
REDIS_HEALTH_CHECK_SECONDS = 25
# Each Sentinel's answer: a Sentinel that does not answer in time is skipped for the next one.
SENTINEL_SOCKET_TIMEOUT_SECONDS = 2.0
SENTINEL_CONNECT_TIMEOUT_SECONDS = 1.0
# A client in use asks Sentinel where the primary is at most this often (one SENTINEL MASTERS).
MASTER_CHECK_SECONDS = 1.0

_TIMEOUTS: dict[str, Any] = {
    "socket_timeout": REDIS_SOCKET_TIMEOUT_SECONDS,
    "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_SECONDS,
    "health_check_interval": REDIS_HEALTH_CHECK_SECONDS,
    "retry_on_timeout": True,  # with the default: one retry, at once, on a new connection
}


def redis_client(
    url: str, *, password: str | None = None, ca_file: Path | None = None
) -> redis.Redis:
    """A client of the Redis at `url` (`redis://`, `rediss://`) with the explicit timeouts; for
    `rediss://` the server's certificate and host name are checked, `ca_file`
    (SNOWPIPE_CA_FILE) trusted besides the system's CAs (worker/tls.py)."""
    kwargs = {**_TIMEOUTS, **redis_ssl_kwargs(url, ca_file)}
    if password is not None:
        kwargs["password"] = password
    return StateRedis.from_url(url, **kwargs)


def state_redis(settings: Settings) -> redis.Redis:
    """The client of the state store named by the settings (see the module docstring)."""
    url = settings.state_url
    password = (
        settings.state_password.get_secret_value() if settings.state_password is not None else None
    )
    if not settings.state_is_sentinel:
        return redis_client(url, password=password, ca_file=settings.ca_file)
    parsed = parse_sentinel_url(url)
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": SENTINEL_SOCKET_TIMEOUT_SECONDS,
        "socket_connect_timeout": SENTINEL_CONNECT_TIMEOUT_SECONDS,
    }
    if settings.state_sentinel_password is not None:
        sentinel_kwargs["password"] = settings.state_sentinel_password.get_secret_value()
    node_kwargs: dict[str, Any] = {**_TIMEOUTS, "db": parsed.db}
    if parsed.username is not None:
        node_kwargs["username"] = parsed.username
    if password is not None or parsed.password is not None:
        node_kwargs["password"] = password if password is not None else parsed.password
    sentinel = FollowingSentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs)
    client: StateRedis = sentinel.master_for(
        settings.state_sentinel_master,
        redis_class=StateRedis,
        connection_pool_class=FailoverPool,
        **node_kwargs,
    )
    client.sentinel_manager = sentinel
    client.master_name = settings.state_sentinel_master
    return client


class FollowingSentinel(Sentinel):
    """Sentinels asked the way Sentinel's client guidelines say: `GET-MASTER-ADDR-BY-NAME`.

    redis-py asks `SENTINEL MASTERS`, whose address changes only when a failover ends (after
    every other replica was pointed at the new primary, which may take their full syncs);
    `GET-MASTER-ADDR-BY-NAME` names the promoted replica as soon as it is a primary."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        errors: list[str] = []
        for n, node in enumerate(self.sentinels):
            kwargs = node.connection_pool.connection_kwargs
            where = _address(kwargs.get("host"), kwargs.get("port"))
            try:
                answer = node.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL GET-MASTER-ADDR-BY-NAME", service_name
                )
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                errors.append(f"{where}: {exc}")
                continue
            if not answer:
                errors.append(f"{where}: monitors no master named {service_name!r}")
                continue
            # The Sentinel that answered is asked first next time (as redis-py does).
            self.sentinels[0], self.sentinels[n] = node, self.sentinels[0]
            host, port = answer
            return (host.decode() if isinstance(host, bytes) else str(host), int(port))
        raise MasterNotFoundError(f"No master found for {service_name!r}: {'; '.join(errors)}")

    def distrust_first(self) -> None:
        """Ask the first Sentinel last next time (it named a node that is not a primary)."""
        if len(self.sentinels) > 1:
            self.sentinels.append(self.sentinels.pop(0))


class FailoverConnection(SentinelManagedConnection):
    """A connection to the primary that reconnects through Sentinel, retries included, and
    checks that the node Sentinel named is a primary (`ROLE`, as Sentinel's client guidelines
    ask: a Sentinel that has not seen a failover yet names the old primary)."""

    def connect_to(self, address: tuple[str, int]) -> None:
        super().connect_to(address)  # type: ignore[no-untyped-call]
        try:
            self.send_command("ROLE", check_health=False)  # type: ignore[no-untyped-call]
            role = self.read_response()
        except redis.ResponseError:
            return  # ROLE not allowed for this user: the READONLY replies tell instead
        name = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
        if name != "master":
            self.disconnect()  # type: ignore[no-untyped-call]
            manager = self.connection_pool.sentinel_manager
            if isinstance(manager, FollowingSentinel):
                manager.distrust_first()
            raise redis.ConnectionError(
                f"{address[0]}:{address[1]}, named by Sentinel, is not a primary (ROLE {name})"
            )

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            # redis-py would reconnect to the last address here (a retry after an error).
            self.connect()  # type: ignore[no-untyped-call]
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class FailoverPool(SentinelConnectionPool):
    """The pool of a Sentinel-managed client that notices a new primary while it is in use."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        kwargs.setdefault("connection_class", FailoverConnection)
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]

    def reset(self) -> None:
        super().reset()  # type: ignore[no-untyped-call]
        # Also after fork(): a lock held by a parent's thread must not stay held in the child.
        self._check_lock = threading.Lock()
        self._checked_at = time.monotonic()

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self._follow_master()
        return super().get_connection(*args, **kwargs)

    def _follow_master(self) -> None:
        """Ask Sentinel for the primary (at most every MASTER_CHECK_SECONDS); if it moved, the
        pool drops its idle connections and refuses the busy ones back (redis-py's
        `get_master_address` and `owns_connection`). Threads that need a connection while one
        of them asks wait for the answer, so that none takes an idle connection to the old
        primary in the meantime."""
        self._checkpid()  # after fork(): start afresh (reset)
        if time.monotonic() - self._checked_at < MASTER_CHECK_SECONDS:
            return
        with self._check_lock:
            if time.monotonic() - self._checked_at < MASTER_CHECK_SECONDS:
                return  # another thread has just asked
            try:
                if self.master_address is not None:  # else the first connection asks anyway
                    with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                        # No answer now (no Sentinel answers): keep the connections; one that
                        # fails reconnects through Sentinel.
                        self.get_master_address()  # type: ignore[no-untyped-call]
            finally:
                self._checked_at = time.monotonic()


class StatePipeline(Pipeline):
    """A pipeline whose scripts are loaded again when it is retried on a new connection."""

    _attempts = 0

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        self._attempts = 0
        return super().execute(raise_on_error)

    def _before_attempt(self, connection: Any) -> None:
        self._attempts += 1
        if self._attempts > 1 and self.scripts:
            # A retry runs on a new connection, maybe to a new primary without our scripts.
            for script in self.scripts:
                connection.send_command("SCRIPT", "LOAD", script.script)
                connection.read_response()

    def _execute_pipeline(self, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        self._before_attempt(connection)
        return super()._execute_pipeline(  # type: ignore[no-untyped-call]
            connection, commands, raise_on_error
        )

    def _execute_transaction(self, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        self._before_attempt(connection)
        return super()._execute_transaction(connection, commands, raise_on_error)


class StateRedis(redis.Redis):
    """A state-store client: `StatePipeline`s, and the Sentinel it follows (if any)."""

    sentinel_manager: Sentinel | None = None  # with a sentinel:// URL
    master_name: str = ""

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> StatePipeline:
        return StatePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.sentinel_manager is not None:
                self.sentinel_manager.close()


def sentinel_problem(client: redis.Redis) -> str | None:
    """Why the Sentinels of `client` name no primary, one clause per Sentinel (None for a client
    that does not go through Sentinel). For error messages: redis-py's MasterNotFoundError
    carries the reprs of its Sentinel clients."""
    manager = getattr(client, "sentinel_manager", None)
    if manager is None:
        return None
    name = getattr(client, "master_name", "")
    found = []
    for node in manager.sentinels:
        kwargs = node.connection_pool.connection_kwargs
        where = _address(kwargs.get("host"), kwargs.get("port"))
        try:
            state = node.sentinel_masters().get(name)
        except redis.RedisError as exc:
            lines = str(exc).strip().splitlines()
            found.append(f"{where}: {lines[0].rstrip('.') if lines else type(exc).__name__}")
            continue
        if state is None:
            found.append(f"{where}: monitors no master named {name!r}")
        elif not manager.check_master_state(state, name):
            found.append(f"{where}: reports {name!r} as {state.get('flags')}")
        else:
            found.append(f"{where}: names {state.get('ip')}:{state.get('port')}")
    return " | ".join(found)  # not "; ": doctor splits the message from its fix there


# --- Replication view (doctor, status) ----------------------------------------------------------


def _address(host: Any, port: Any) -> str:
    return f"{host}:{port}"


def replication(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """The state store's primary, its replicas and their lag, as doctor and status show them.

    From the primary's `INFO replication` (replicas connected, their state, acknowledged offset
    and seconds since their last acknowledgement) and, through Sentinel, `SENTINEL REPLICAS`
    (every replica Sentinel knows, its flags and link). `problem` is one line when the store
    cannot take writes as configured (a replica named directly, fewer replicas online than
    SNOWPIPE_STATE_MIN_REPLICAS), else None. Raises `redis.RedisError` if the store does not
    answer.
    """
    sentinel = getattr(client, "sentinel_manager", None)
    out: dict[str, Any] = {
        "via": "sentinel" if sentinel is not None else "direct",
        "url": redact_url(settings.state_url),
        "master_name": settings.state_sentinel_master or None,
        "primary": None,
        "role": None,
        "replicas": [],
        "replicas_online": 0,
        "min_replicas": settings.state_min_replicas,
        "problem": None,
    }
    info = dict(client.info("replication"))
    out["role"] = str(info.get("role"))
    known: dict[str, dict[str, Any]] = {}
    if sentinel is not None:
        host, port = sentinel.discover_master(settings.state_sentinel_master)
        out["primary"] = _address(host, port)
        for entry in _sentinel_replicas(sentinel, settings.state_sentinel_master):
            address = _address(entry.get("ip"), entry.get("port"))
            known[address] = {
                "address": address,
                "state": None,
                "behind_bytes": None,
                "lag_seconds": None,
                "sentinel_flags": str(entry.get("flags", "")),
                "sentinel_link": str(entry.get("master-link-status", "")),
            }
    else:
        kwargs = client.connection_pool.connection_kwargs
        out["primary"] = _address(kwargs.get("host"), kwargs.get("port"))
    if out["role"] != "master":
        out["problem"] = (
            f"SNOWPIPE_STATE_URL reaches a replica (of {info.get('master_host')}:"
            f"{info.get('master_port')}): every write fails with READONLY; point it at the "
            "primary, or at its Sentinels (sentinel://)"
        )
        return out
    master_offset = int(info.get("master_repl_offset", 0))
    for key, value in info.items():
        if not (key.startswith("slave") and isinstance(value, dict)):
            continue
        address = _address(value.get("ip"), value.get("port"))
        entry = known.setdefault(
            address, {"address": address, "sentinel_flags": None, "sentinel_link": None}
        )
        entry["state"] = str(value.get("state"))
        entry["behind_bytes"] = max(0, master_offset - int(value.get("offset", 0)))
        entry["lag_seconds"] = int(value.get("lag", 0))
    for entry in known.values():
        entry.setdefault("state", None)
        entry.setdefault("behind_bytes", None)
        entry.setdefault("lag_seconds", None)
    out["replicas"] = sorted(known.values(), key=lambda e: str(e["address"]))
    online = sum(1 for e in out["replicas"] if e["state"] == "online")
    out["replicas_online"] = online
    wanted = settings.state_min_replicas
    if wanted > online:
        out["problem"] = (
            f"SNOWPIPE_STATE_MIN_REPLICAS is {wanted} but {online} replica(s) are online: no "
            "batch is acknowledged until that many are (tasks hold them as in a state-store "
            "outage); bring replicas up, or lower SNOWPIPE_STATE_MIN_REPLICAS"
        )
    return out


def _sentinel_replicas(sentinel: Sentinel, name: str) -> list[dict[str, Any]]:
    """SENTINEL REPLICAS from the first Sentinel that answers ([] if none does)."""
    for node in sentinel.sentinels:
        try:
            return [dict(entry) for entry in node.sentinel_slaves(name)]
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            continue
    return []


def describe_replicas(view: dict[str, Any]) -> str:
    """One line of the replicas in a `replication()` view, for doctor and status."""
    if not view["replicas"]:
        return "no replicas"
    parts = []
    for entry in view["replicas"]:
        text = f"{entry['address']} {entry['state'] or 'not connected'}"
        if entry["behind_bytes"] is not None:
            text += f", {entry['behind_bytes']} bytes behind, last ack {entry['lag_seconds']} s ago"
        if entry.get("sentinel_flags"):
            text += f", Sentinel: {entry['sentinel_flags']}"
        parts.append(text)
    return "; ".join(parts)
