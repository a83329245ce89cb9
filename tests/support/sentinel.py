"""A state Redis behind Redis Sentinel for one test: a primary, a replica and one Sentinel.

    with sentinel_set(tmp_path / "ha") as ha:
        env["SNOWPIPE_STATE_URL"] = ha.url(0)                  # sentinel://127.0.0.1:PORT/0
        env["SNOWPIPE_STATE_SENTINEL_MASTER"] = ha.master_name
        ...
        old = ha.kill_master()          # kill -9 of the current primary (returns its node)
        new = ha.wait_for_master(other_than=old)   # Sentinel promoted the replica
        old.start()                     # back on the same port and AOF; Sentinel demotes it
        ha.wait_replicas_online(1)      # ... and it replicates from the new primary
        ha.failover()                   # SENTINEL FAILOVER: the replica swaps roles with it

Every process runs on a free port of 127.0.0.1 with its files (config, AOF, log) in the test's
tmp dir. The nodes start from `config/redis/replica.conf` (the first primary without its
`replicaof` line) and the Sentinel from `config/redis/sentinel.conf`, with the addresses, the
directories and the timings replaced: `down-after-milliseconds` 2000 (a killed primary is
replaced about 4 s later; 1000 gave spurious failovers on a loaded machine), `failover-timeout`
20000 (how long a cut of replication may last, below), and `repl-diskless-sync-delay 0` on the
nodes (a replica's full sync starts at once instead of after 5 s). Sentinel rewrites its own
file and the nodes' (`CONFIG REWRITE`) as the roles change, so a restarted node keeps its role.

Sentinel's own pace sets what waits cost (measured here, Redis 7.0): a killed primary is replaced
about 4 s later; a node that comes back as an old primary, and the old primary after `SENTINEL
FAILOVER`, are turned into replicas only about 10 s after (a fixed delay of Sentinel's). Wait
for that (`wait_role(node, "slave")`, `failover(demote=True)`) only when the test needs it.

Replication can be cut and restored:

- `cut_replication(node)` points the replica at a port where nothing listens (`REPLICAOF`), so
  it keeps its data and receives nothing after the call returns. Sentinel puts such a replica
  back under the primary `failover-timeout` (20 s) after it notices, so a cut lasts about that
  long at most (`restore_replication` ends it at once). A cut replica can still be promoted:
  that is the "lagging replica promoted" case.
- `pause(node)` / `resume(node)` (SIGSTOP / SIGCONT) freeze a process instead: its clients and
  Sentinel see it hang. It is *not* a cut of replication: what the primary sent before the
  pause sits in the replica's socket buffer and is applied on `resume`, even after the primary
  died.

`start_stale_sentinel(node)` adds a Sentinel that names `node` (say, the replica) as the primary:
what a client meets when the first Sentinel it asks has not seen a failover.

Every wait is bounded and fails with the processes' logs; `close()` (and the context manager)
kills every process this module started, and only those.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import redis

from tests.support.redis import REDIS_HOST, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "config" / "redis"
NODE_CONFIG = CONFIG_DIR / "replica.conf"
SENTINEL_CONFIG = CONFIG_DIR / "sentinel.conf"

MASTER_NAME = "snowpipe-state"
DOWN_AFTER_MS = 2000
FAILOVER_TIMEOUT_MS = 20000
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# A failover: down-after (2 s) + the vote and the promotion (about 2 s) + a wide margin for a
# loaded machine. Waits use it as their bound, never as a sleep.
FAILOVER_WAIT = 30.0
LOG_TAIL_CHARS = 3000
# Directives of the example files that the harness sets itself.
_NODE_OWN = {"port", "bind", "dir", "logfile", "daemonize", "replicaof", "slaveof", "pidfile"}
_SENTINEL_OWN = {"port", "bind", "dir", "logfile", "daemonize", "pidfile"}

T = TypeVar("T")


def directives(path: Path) -> list[list[str]]:
    """The directives of a redis.conf-style file: one list of words per line (quotes honoured),
    comments and blank lines left out."""
    out: list[list[str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append(shlex.split(line))
    return out


def render(lines: list[list[str]]) -> str:
    """Directives back as file text (each word quoted where needed)."""
    return "".join(" ".join(_quote(word) for word in line) + "\n" for line in lines)


def _quote(word: str) -> str:
    if word == "" or any(c.isspace() or c in "\"'" for c in word):
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


class _Process:
    """A `redis-server` process (a node or a Sentinel) with its own config file and log."""

    kind = "redis"

    def __init__(self, name: str, data_dir: Path, port: int) -> None:
        self.name = name
        self.data_dir = data_dir
        self.port = port
        self.conf_path = data_dir / f"{name}.conf"
        self.log_path = data_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (REDIS_HOST, self.port)

    def _args(self) -> list[str]:
        return ["redis-server", str(self.conf_path)]

    def client(self, **kwargs: Any) -> redis.Redis:
        """A plain client of this process (not through Sentinel)."""
        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        return redis.Redis(host=REDIS_HOST, port=self.port, **kwargs)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the process (same port, same files) and wait until it answers PING."""
        assert not self.running, f"{self.name} is already running"
        self.process = subprocess.Popen(
            self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop(kill=True)
                raise AssertionError(
                    f"{self.name} on :{self.port} did not start\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def answers(self) -> bool:
        """True if this process (not another on its port) answers (a node: its AOF loaded)."""
        if self.process is None:
            return False
        probe = self.client(socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return int(probe.info("server")["process_id"]) == self.process.pid
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False
        finally:
            probe.close()

    def signal(self, signum: int) -> None:
        """Send a signal to the process (if it runs)."""
        if self.running:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signum)

    def stop(self, *, kill: bool = False) -> None:
        """SIGKILL (`kill`: a crash) or SIGTERM the process, and wait until it has exited."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        self.signal(signal.SIGCONT)  # a paused process would not act on SIGTERM
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def pause(self) -> None:
        """SIGSTOP: the process hangs (connections stay open, nothing is answered)."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        self.signal(signal.SIGCONT)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            text = self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            text = ""
        return f"--- {self.name} ({self.log_path}) ---\n{text}"

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name} :{self.port}>"


class RedisNode(_Process):
    """A state Redis node: `config/redis/replica.conf` with its own port and data dir."""

    kind = "node"

    def write_config(self, primary: tuple[str, int] | None) -> None:
        """This node's config file: a primary (`primary` None) or a replica of `primary`."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = [d for d in directives(NODE_CONFIG) if d[0].lower() not in _NODE_OWN]
        lines += [
            ["port", str(self.port)], ["bind", REDIS_HOST], ["dir", str(self.data_dir)],
            ["logfile", str(self.log_path)], ["daemonize", "no"],
            # A full sync starts at once (Redis 7 waits 5 s for more replicas to share it).
            ["repl-diskless-sync-delay", "0"],
        ]  # fmt: skip
        if primary is not None:
            lines.append(["replicaof", primary[0], str(primary[1])])
        self.conf_path.write_text(render(lines))

    def replication(self) -> dict[str, Any]:
        """INFO replication of this node."""
        client = self.client()
        try:
            return dict(client.info("replication"))
        finally:
            client.close()

    def role(self) -> str:
        """The role INFO reports: "master" or "slave"."""
        return str(self.replication()["role"])


class SentinelProcess(_Process):
    """One Sentinel: `config/redis/sentinel.conf` monitoring the test's primary."""

    kind = "sentinel"

    def _args(self) -> list[str]:
        return ["redis-server", str(self.conf_path), "--sentinel"]

    def write_config(
        self, name: str, primary: tuple[str, int], *, down_after_ms: int, failover_timeout_ms: int
    ) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines: list[list[str]] = []
        for d in directives(SENTINEL_CONFIG):
            key = d[0].lower()
            if key in _SENTINEL_OWN:
                continue
            if key == "sentinel" and len(d) > 2 and d[1].lower() in (
                "monitor", "down-after-milliseconds", "failover-timeout", "parallel-syncs",
                "auth-pass", "auth-user",
            ):  # fmt: skip
                continue  # per-master lines: written below for the test's master
            lines.append(d)
        lines += [
            ["port", str(self.port)], ["bind", REDIS_HOST], ["dir", str(self.data_dir)],
            ["logfile", str(self.log_path)], ["daemonize", "no"],
            ["sentinel", "monitor", name, primary[0], str(primary[1]), "1"],
            ["sentinel", "down-after-milliseconds", name, str(down_after_ms)],
            ["sentinel", "failover-timeout", name, str(failover_timeout_ms)],
            ["sentinel", "parallel-syncs", name, "1"],
        ]  # fmt: skip
        self.conf_path.write_text(render(lines))


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports on 127.0.0.1 that nothing listens on right now (all held open
    while they are chosen, so that none is handed out twice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((REDIS_HOST, 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _wait(what: str, probe: Callable[[], T | None], timeout: float, logs: Callable[[], str]) -> T:
    """Poll `probe` until it returns something other than None (errors count as None)."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = probe()
        except (redis.RedisError, OSError) as exc:
            value, last_error = None, exc
        if value is not None:
            return value
        if time.monotonic() > deadline:
            why = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{why}\n{logs()}")
        time.sleep(0.05)


class SentinelSet:
    """A primary, a replica and one Sentinel monitoring them (see the module docstring)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        master_name: str = MASTER_NAME,
        down_after_ms: int = DOWN_AFTER_MS,
        failover_timeout_ms: int = FAILOVER_TIMEOUT_MS,
    ) -> None:
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        ports = free_ports(3)
        self.nodes = [
            RedisNode("node-a", data_dir / "node-a", ports[0]),
            RedisNode("node-b", data_dir / "node-b", ports[1]),
        ]
        self.sentinel = SentinelProcess("sentinel", data_dir / "sentinel", ports[2])
        self.data_dir = data_dir
        self.extra_sentinels: list[SentinelProcess] = []
        self._control: redis.Redis | None = None

    # --- Addresses and settings -------------------------------------------------------------

    def url(self, db: int = 0) -> str:
        """SNOWPIPE_STATE_URL for this set: `sentinel://127.0.0.1:<sentinel port>/<db>`."""
        return f"sentinel://{REDIS_HOST}:{self.sentinel.port}/{db}"

    def env(self, db: int = 0) -> dict[str, str]:
        """The worker's settings for this set, as SNOWPIPE_* environment variables."""
        return {
            "SNOWPIPE_STATE_URL": self.url(db),
            "SNOWPIPE_STATE_SENTINEL_MASTER": self.master_name,
        }

    def sentinel_client(self) -> redis.Redis:
        """A client of the Sentinel itself (SENTINEL commands), kept open by the set."""
        if self._control is None:
            self._control = self.sentinel.client(decode_responses=True)
        return self._control

    def logs(self) -> str:
        """Every process's log tail (for failure messages)."""
        return "\n".join(p.log_tail() for p in (*self.nodes, self.sentinel, *self.extra_sentinels))

    # --- Start and stop ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the primary, its replica and the Sentinel; wait until Sentinel sees both."""
        primary, replica = self.nodes
        primary.write_config(None)
        replica.write_config(primary.address)
        primary.start()
        replica.start()
        self.sentinel.write_config(
            self.master_name, primary.address,
            down_after_ms=self.down_after_ms, failover_timeout_ms=self.failover_timeout_ms,
        )  # fmt: skip
        self.sentinel.start()
        self.wait_replicas_online(1)

    def close(self) -> None:
        """Kill every process of the set (and close the control client)."""
        if self._control is not None:
            with contextlib.suppress(redis.RedisError):
                self._control.close()
            self._control = None
        for process in (*self.extra_sentinels, self.sentinel, *self.nodes):
            process.stop(kill=True)

    # --- What Sentinel says -----------------------------------------------------------------

    def master_address(self) -> tuple[str, int]:
        """The primary's address as Sentinel reports it now."""
        answer = self.sentinel_client().execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
        )
        return (str(answer[0]), int(answer[1]))

    def node_at(self, address: tuple[str, int]) -> RedisNode:
        """The node listening at `address`."""
        for node in self.nodes:
            if node.port == int(address[1]):
                return node
        raise AssertionError(f"no node of this set at {address}")

    def master(self) -> RedisNode:
        """The node Sentinel names as the primary."""
        return self.node_at(self.master_address())

    def replica(self) -> RedisNode:
        """The node that is not the primary (by Sentinel's view)."""
        primary = self.master()
        return next(node for node in self.nodes if node is not primary)

    def sentinel_replicas(self) -> list[dict[str, Any]]:
        """SENTINEL REPLICAS <name>: Sentinel's view of every replica it knows."""
        return [dict(r) for r in self.sentinel_client().sentinel_slaves(self.master_name)]

    # --- Waits ------------------------------------------------------------------------------

    def wait_for_master(
        self, *, other_than: RedisNode | None = None, timeout: float = FAILOVER_WAIT
    ) -> RedisNode:
        """Wait until Sentinel names a primary (other than `other_than`) that answers as one."""

        def probe() -> RedisNode | None:
            node = self.master()
            if node is other_than or not node.running or node.role() != "master":
                return None
            return node

        return _wait(f"a new primary (other than {other_than})", probe, timeout, self.logs)

    def wait_replicas_online(self, count: int = 1, *, timeout: float = FAILOVER_WAIT) -> None:
        """Wait until the primary has `count` replicas online (what WAIT counts) and Sentinel
        lists them as healthy replicas (so that it could promote one)."""

        def probe() -> bool | None:
            primary = self.master()
            info = primary.replication()
            online = [
                info[key] for key in info
                if key.startswith("slave") and isinstance(info[key], dict)
                and info[key].get("state") == "online"
            ]  # fmt: skip
            healthy = [
                r
                for r in self.sentinel_replicas()
                if r.get("master-link-status") == "ok"
                and not {"s_down", "o_down", "disconnected"} & set(str(r["flags"]).split(","))
            ]
            return True if len(online) >= count and len(healthy) >= count else None

        _wait(f"{count} replica(s) online", probe, timeout, self.logs)

    def wait_role(self, node: RedisNode, role: str, *, timeout: float = FAILOVER_WAIT) -> None:
        """Wait until `node` reports `role` ("master", or "slave" with its link up)."""

        def probe() -> bool | None:
            info = node.replication()
            if info["role"] != role:
                return None
            if role == "slave" and info.get("master_link_status") != "up":
                return None
            return True

        _wait(f"{node} to be {role}", probe, timeout, self.logs)

    # --- Faults -----------------------------------------------------------------------------

    def kill_master(self) -> RedisNode:
        """kill -9 the current primary; returns its node (`node.start()` brings it back)."""
        node = self.master()
        node.stop(kill=True)
        return node

    def failover(self, *, timeout: float = FAILOVER_WAIT, demote: bool = True) -> RedisNode:
        """`SENTINEL FAILOVER`: promote the replica; returns the new primary. With `demote`,
        also wait until the old primary replicates from it (Sentinel reconfigures it a few
        seconds after the switch; until then it still answers as a primary)."""
        old = self.master()
        deadline = time.monotonic() + timeout

        def start_failover() -> bool | None:
            try:
                self.sentinel_client().execute_command("SENTINEL", "FAILOVER", self.master_name)
            except redis.ResponseError as exc:
                # NOGOODSLAVE: Sentinel has no fresh view of the replica yet; INPROG: one runs.
                if "NOGOODSLAVE" in str(exc) or "INPROG" in str(exc):
                    return None
                raise
            return True

        _wait("Sentinel to accept FAILOVER", start_failover, timeout, self.logs)
        new = self.wait_for_master(other_than=old, timeout=max(1.0, deadline - time.monotonic()))
        if demote and old.running:
            self.wait_role(old, "slave", timeout=max(1.0, deadline - time.monotonic()))
        return new

    def cut_replication(self, node: RedisNode | None = None) -> RedisNode:
        """Stop `node` (default: the replica) receiving anything from the primary; it keeps its
        data and can still be promoted. Lasts until `restore_replication`, or at most
        `failover-timeout` (then Sentinel points it back at the primary)."""
        node = node or self.replica()
        client = node.client()
        try:
            client.execute_command("REPLICAOF", REDIS_HOST, str(free_port()))
        finally:
            client.close()
        return node

    def restore_replication(self, node: RedisNode | None = None, *, wait: bool = True) -> None:
        """Point `node` (default: the replica) back at the current primary; with `wait`, until
        its link is up."""
        node = node or self.replica()
        primary = self.master()
        client = node.client()
        try:
            client.execute_command("REPLICAOF", REDIS_HOST, str(primary.port))
        finally:
            client.close()
        if wait:
            self.wait_role(node, "slave")

    def start_stale_sentinel(self, node: RedisNode) -> SentinelProcess:
        """Start a second Sentinel that names `node` as the primary under the same master name,
        as a Sentinel that has not seen a failover would (both start at config epoch 0, so
        neither takes the other's view). Put it first in a URL: `sentinel://stale;sentinel://
        real/0`. Killed by `close()`."""
        n = len(self.extra_sentinels) + 1
        stale = SentinelProcess(f"stale-{n}", self.data_dir / f"stale-{n}", free_port())
        stale.write_config(
            self.master_name, node.address,
            down_after_ms=self.down_after_ms, failover_timeout_ms=self.failover_timeout_ms,
        )  # fmt: skip
        self.extra_sentinels.append(stale)
        stale.start()
        return stale

    def pause(self, node: RedisNode) -> None:
        """SIGSTOP `node` (see the module docstring: not a cut of replication)."""
        node.pause()

    def resume(self, node: RedisNode) -> None:
        """SIGCONT `node`."""
        node.resume()


@contextmanager
def sentinel_set(
    data_dir: Path,
    *,
    master_name: str = MASTER_NAME,
    down_after_ms: int = DOWN_AFTER_MS,
    failover_timeout_ms: int = FAILOVER_TIMEOUT_MS,
) -> Iterator[SentinelSet]:
    """A started SentinelSet for the block; every process killed afterwards."""
    ha = SentinelSet(
        data_dir,
        master_name=master_name,
        down_after_ms=down_after_ms,
        failover_timeout_ms=failover_timeout_ms,
    )
    try:
        ha.start()
        yield ha
    finally:
        ha.close()
