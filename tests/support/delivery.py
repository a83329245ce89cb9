"""An in-process rig for the delivery core: the real ChannelLog, LeaseTable, ChannelPump and
CommitPoller, a real Redis (a claimed DB) and the emulator over HTTP. Nothing is mocked; the
wrappers here only record calls and let a test inject a failure or a pause at one point.

    with delivery_rig(emu) as rig:
        ref = rig.ref()
        rig.log_batch(ref, "b0", range(10))
        rig.start_pump(ref)
        rig.wait_exactly_once(ref.pipe, set(range(10)))
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from tests.support.emulator import RunningEmulator
from tests.support.keys import key_pair
from tests.support.redis import RedisDB, claimed_db
from worker.deadletter import DeadLetters
from worker.delivery.channels import STATS_KEY, ChannelRef, channel_key, channel_name
from worker.delivery.lease import LeaseTable
from worker.delivery.log import AppendResult, ChannelLog, Entry, Logged, Piece
from worker.delivery.node import Node
from worker.delivery.pump import ChannelPump, CommitPoller, PumpConfig
from worker.delivery.stats import Counters, counters
from worker.retry import RetryPolicy
from worker.settings import Settings, load_settings
from worker.snowpipe.client import OpenChannelResult, SnowpipeClient
from worker.snowpipe.encoding import EncodedRows

ACCOUNT = "TESTACC"
USER = "LOADER"
DATABASE = "DB"
SCHEMA = "PUBLIC"
KEY_NAME = "delivery"
# Arguments of the emulator the rig expects: quick commits, no rate limit, one registered pipe
# (P) so that a pipe that is neither P nor <TABLE>-STREAMING is unknown (404).
EMULATOR_ARGS = ("--commit-delay", "0.2", "--rate-limit", "0", "--pipe", f"{DATABASE}.{SCHEMA}.P")


def ndjson(ids: Iterable[int]) -> bytes:
    """NDJSON rows with these ids (what a task logs for a batch)."""
    return b"".join(orjson.dumps({"id": i, "name": f"row-{i}"}) + b"\n" for i in ids)


@dataclass(frozen=True)
class Sent:
    """One append request a wrapped client sent successfully."""

    channel: str
    first: int
    last: int
    rows: int
    wire_bytes: int
    uncompressed_bytes: int


class RecordingClient:
    """A SnowpipeClient wrapper for one pump: records appends; hooks run before open/append."""

    def __init__(self, inner: SnowpipeClient) -> None:
        self.inner = inner
        self.sent: list[Sent] = []
        self.opens = 0
        # Called before the request is made; may raise (the request is then never sent) or block.
        self.before_open: Callable[[], None] | None = None
        self.before_append: Callable[[int, int], None] | None = None
        self._lock = threading.Lock()

    def open_channel(
        self,
        database: str,
        schema: str,
        pipe: str,
        channel: str,
        *,
        offset_token: str | None = None,
        fail_on_uncommitted_rows: bool = False,
    ) -> OpenChannelResult:
        hook = self.before_open
        if hook is not None:
            hook()
        result = self.inner.open_channel(
            database,
            schema,
            pipe,
            channel,
            offset_token=offset_token,
            fail_on_uncommitted_rows=fail_on_uncommitted_rows,
        )
        with self._lock:
            self.opens += 1
        return result

    def append_rows(
        self,
        database: str,
        schema: str,
        pipe: str,
        channel: str,
        *,
        continuation_token: str,
        payload: EncodedRows,
        start_offset_token: str | None,
        end_offset_token: str,
    ) -> str:
        first = int(start_offset_token) if start_offset_token is not None else -1
        hook = self.before_append
        if hook is not None:
            hook(first, int(end_offset_token))
        token = self.inner.append_rows(
            database,
            schema,
            pipe,
            channel,
            continuation_token=continuation_token,
            payload=payload,
            start_offset_token=start_offset_token,
            end_offset_token=end_offset_token,
        )
        with self._lock:
            self.sent.append(
                Sent(
                    channel,
                    first,
                    int(end_offset_token),
                    payload.row_count,
                    payload.wire_bytes,
                    payload.uncompressed_length,
                )
            )
        return token

    def bulk_channel_status(
        self, database: str, schema: str, pipe: str, channel_names: Sequence[str]
    ) -> Any:
        return self.inner.bulk_channel_status(database, schema, pipe, channel_names)


class FlakyLog(ChannelLog):
    """The real ChannelLog that can fail between a read and the send of what was read.

    Once `fail_after_read` is set, the first read (or wait) that returns entries primes it and
    the next read or wait raises a RedisError: the pump then holds entries it read in its
    buffer and has not sent them.
    """

    def __init__(self, client: redis.Redis, *, dedup_ttl_seconds: int) -> None:
        super().__init__(client, dedup_ttl_seconds=dedup_ttl_seconds)
        self.fail_after_read = threading.Event()
        self.failed = threading.Event()
        self._primed = False

    def _check(self, entries: list[Entry] | None) -> list[Entry]:
        if not self.fail_after_read.is_set():
            return entries or []
        if entries is None:  # before the call: raise if primed
            if self._primed:
                self._primed = False
                self.fail_after_read.clear()
                self.failed.set()
                raise redis.ConnectionError("injected: connection lost on a log read")
            return []
        if entries:
            self._primed = True
        return entries

    def read(self, ref: ChannelRef, after: int, count: int) -> list[Entry]:
        self._check(None)
        return self._check(super().read(ref, after, count))

    def wait(self, ref: ChannelRef, after: int, count: int, block_ms: int) -> list[Entry]:
        self._check(None)
        return self._check(super().wait(ref, after, count, block_ms))


def make_settings(emu: RunningEmulator, db: RedisDB, **overrides: Any) -> Settings:
    """Settings pointing at the emulator and the claimed DB, with quick retries and polls."""
    base: dict[str, Any] = {
        "account": ACCOUNT,
        "user": USER,
        "private_key": key_pair(KEY_NAME).private_pem.decode(),
        "account_url": emu.url,
        "broker_url": db.url,
        "state_url": db.url,
        "commit_poll_seconds": 0.05,
        "retry_base_seconds": 0.01,
        "retry_cap_seconds": 0.2,
        "retry_deadline_seconds": 10.0,
        "lease_ttl_seconds": 3.0,
        "channels_per_pipe": 1,
        "channel_requests_per_second": 200.0,
        "dedup_ttl_seconds": 3600,
    }
    base.update(overrides)
    return load_settings(**base)


@dataclass
class Rig:
    """The rig of one test (see the module docstring)."""

    emu: RunningEmulator
    db: RedisDB
    settings: Settings
    snowpipe: SnowpipeClient
    pipe: str
    log: ChannelLog = field(init=False)
    dead_letters: DeadLetters = field(init=False)
    stats: Counters = field(init=False)
    pumps: list[ChannelPump] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    poller: CommitPoller = field(init=False)

    def __post_init__(self) -> None:
        self.redis = self.db.client
        self.log = ChannelLog(self.redis, dedup_ttl_seconds=self.settings.dedup_ttl_seconds)
        self.dead_letters = DeadLetters(self.redis)
        self.stats = Counters(self.redis)
        self.poller = CommitPoller(
            self.snowpipe,
            lambda: [p for p in self.pumps if p.alive],
            poll_seconds=self.settings.commit_poll_seconds,
        )
        self.poller.start()

    # --- Building ---------------------------------------------------------------------------------

    def ref(self, pipe: str | None = None, index: int = 0) -> ChannelRef:
        """Channel number `index` of the test's pipe (or of `pipe`)."""
        name = channel_name(self.settings.channel_prefix, index)
        return ChannelRef(DATABASE, SCHEMA, pipe or self.pipe, name)

    def config(self, **overrides: Any) -> PumpConfig:
        """The PumpConfig Node builds from the settings, with `overrides`."""
        s = self.settings
        values: dict[str, Any] = {
            "compression": s.compression,
            "max_request_bytes": s.max_request_bytes,
            "coalesce_max_bytes": s.coalesce_max_bytes,
            "requests_per_second": s.channel_requests_per_second,
            "bytes_per_second": s.channel_bytes_per_second,
            "countdown": RetryPolicy.from_settings(s).countdown,
        }
        values.update(overrides)
        return PumpConfig(**values)

    def client(self) -> RecordingClient:
        """A recording wrapper around the rig's one SnowpipeClient."""
        return RecordingClient(self.snowpipe)

    def start_pump(
        self,
        ref: ChannelRef,
        *,
        node: str = "nodeA",
        ttl_seconds: float = 60.0,
        client: RecordingClient | None = None,
        log: ChannelLog | None = None,
        config: PumpConfig | None = None,
        leases: LeaseTable | None = None,
    ) -> ChannelPump:
        """Acquire `ref`'s lease as `node` and start a pump on it (as Node.run_pump does)."""
        leases = leases or LeaseTable(self.redis, node, ttl_seconds=ttl_seconds)
        lease = leases.acquire(ref)
        assert lease is not None, f"{ref} is leased by {leases.holders([ref])}"
        pump = ChannelPump(
            lease,
            leases=leases,
            log=log or self.log,
            client=client or self.client(),
            config=config or self.config(),
            stats=self.stats,
            dead_letters=self.dead_letters,
        )
        self.pumps.append(pump)
        pump.start()
        return pump

    def start_node(self, name: str, *, client: Any = None) -> Node:
        """A whole Node (balancer, poller, pumps) on the rig's settings, started."""
        node = Node(self.settings, name, client=client or self.client())
        self.nodes.append(node)
        node.start()
        return node

    # --- Writing ----------------------------------------------------------------------------------

    def log_batch(
        self, ref: ChannelRef, batch_id: str, ids: Iterable[int], *, pieces: int = 1
    ) -> Logged:
        """Log a batch as `ingest_batch` does (ChannelLog.append), split in `pieces` entries."""
        ids = list(ids)
        step = max(1, -(-len(ids) // pieces))
        parts = [ids[i : i + step] for i in range(0, len(ids), step)]
        self.mark_settled(ref)
        result = self.log.append(ref, batch_id, [Piece(len(p), ndjson(p)) for p in parts])
        assert isinstance(result, Logged), result
        return result

    def append(
        self, ref: ChannelRef, batch_id: str, pieces: Sequence[Piece], **kw: Any
    ) -> AppendResult:
        """`ChannelLog.append` on a channel marked settled first (see `mark_settled`)."""
        self.mark_settled(ref)
        return self.log.append(ref, batch_id, pieces, **kw)

    def mark_settled(self, ref: ChannelRef) -> None:
        """Let tasks log on `ref` before any pump opened it: what a pump's first settle does
        for a channel Snowflake has never seen (committed offset 0). A channel settled already
        is left as it is."""
        mark_settled(self.log, ref)

    # --- Reading back -----------------------------------------------------------------------------

    def committed_ids(self, pipe: str | None = None) -> list[int]:
        """Every committed row id of the pipe, duplicates included."""
        rows = self.emu.rows(DATABASE, SCHEMA, pipe or self.pipe)
        return [int(r["row"]["id"]) for r in rows]

    def stat(self, name: str) -> int:
        value = self.redis.hget(STATS_KEY, name)
        return int(value) if value else 0

    def entries(self, ref: ChannelRef) -> list[Entry]:
        """What the channel's log holds now."""
        return self.log.read(ref, 0, 10_000)

    def wait_exactly_once(
        self,
        expected: set[int],
        *,
        pipe: str | None = None,
        refs: Sequence[ChannelRef] = (),
        timeout: float = 15.0,
    ) -> None:
        """Wait until every id is committed and the logs are trimmed; then exactly once."""
        refs = list(refs) or [self.ref(pipe)]

        def done() -> bool:
            if not expected <= set(self.committed_ids(pipe)):
                return False
            return all(self.log.depth(ref).entries == 0 for ref in refs)

        wait_until(done, timeout=timeout, what=lambda: self.describe(expected, pipe, refs))
        # Nothing may be pending either (a late replay would show up as a duplicate).
        wait_until(lambda: self.emu.stats()["batches_pending"] == 0, timeout=5, what=lambda: "idle")
        assert_exactly_once(self.committed_ids(pipe), expected)

    def describe(self, expected: set[int], pipe: str | None, refs: Sequence[ChannelRef]) -> str:
        ids = self.committed_ids(pipe)
        missing = sorted(expected - set(ids))
        depth = {str(ref): self.log.depth(ref).entries for ref in refs}
        pumps = [
            (str(p.ref), p.alive, p.lost, p.committed, p.sent_upto, p.reopens) for p in self.pumps
        ]
        return (
            f"every id committed and the logs trimmed: {len(missing)} missing "
            f"(e.g. {missing[:10]}), log depth {depth}, pumps (alive, lost, committed, sent, "
            f"opens) {pumps}, stats {counters(self.redis)}"
        )

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        for pump in self.pumps:
            pump.stop(timeout=0)
        for pump in self.pumps:
            pump.stop(timeout=10)
        self.poller.stop()


def assert_exactly_once(ids: Sequence[int], expected: set[int]) -> None:
    """Every id in `expected` exactly once in `ids`, nothing else."""
    seen: dict[int, int] = {}
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
    duplicates = sorted(i for i, n in seen.items() if n > 1)
    missing = sorted(expected - seen.keys())
    extra = sorted(seen.keys() - expected)
    assert not (duplicates or missing or extra), (
        f"not exactly once: {len(duplicates)} duplicated (e.g. {duplicates[:10]}), "
        f"{len(missing)} missing (e.g. {missing[:10]}), {len(extra)} unexpected "
        f"(e.g. {extra[:10]})"
    )


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: Callable[[], str],
    interval: float = 0.05,
) -> None:
    """Poll `condition` until true; on timeout fail with `what()`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what()}")
        time.sleep(interval)


def mark_settled(log: ChannelLog, ref: ChannelRef) -> None:
    """Mark `ref` settled in the store's current incarnation unless it is (see Rig.mark_settled)."""
    incarnation = log.incarnation()
    log.redis.set(channel_key("settled", ref), incarnation, nx=True)
    log.redis.set(channel_key("markinc", ref), incarnation, nx=True)


def lease_key(ref: ChannelRef) -> str:
    return channel_key("lease", ref)


@contextmanager
def delivery_rig(emu: RunningEmulator, **settings: Any) -> Iterator[Rig]:
    """A Rig on a claimed Redis DB and a pipe of its own; everything stopped afterwards."""
    with claimed_db() as db:
        s = make_settings(emu, db, **settings)
        client = SnowpipeClient.from_settings(s)
        pipe = f"D{uuid.uuid4().hex[:8].upper()}-STREAMING"
        rig = Rig(emu, db, s, client, pipe)
        try:
            yield rig
        finally:
            rig.close()
            client.close()
            emu.clear_faults()
            emu.pause_commits(False)
