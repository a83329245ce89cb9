"""kombu's Redis transport, made safe for a broker restart: the worker keeps running, and no
message is lost while it is handed over.

**Taking a message.** kombu takes a message off its queue with BRPOP and records it as
unacknowledged (the `unacked` hash, which the visibility sweep restores from) in a second command.
A message whose BRPOP reply never reaches the process (the broker killed after it popped, a
connection torn down with the reply unread) exists nowhere any more: it is lost. Seen here in
about one Redis restart in three. So this transport takes messages with one Lua script that pops
the oldest message of the consumed queues *and* records it as unacknowledged, atomically; the
script also notes, under a key of this process, the delivery tag it claimed last. A reply lost
now leaves the message in the `unacked` hash: the next connection of the same process finds the
tag it never received and puts that message straight back on its queue (any other consumer's
visibility sweep would too, after the visibility timeout). It may then run twice; the batch id
makes the second run a no-op. When the queues are empty the consumer blocks on
`BLMOVE q q LEFT LEFT` (pops the head and pushes it back where it was: "wait until q has a
message" without taking it), then claims. The claim also replaces kombu's separate write of the
unacked record, so a delivery costs one round trip instead of two.

Consumers without acknowledgements (`no_ack`, e.g. the replies of `celery inspect`) and a
`global_keyprefix` keep kombu's own path.

**A detached channel.** When the broker goes away while messages are delivered but not yet
acknowledged, Celery closes the consumer's connection and opens a new one. kombu (5.7) can then
still use a channel of the old connection: its `close()` tries to put the unacknowledged messages
back, and a task that finishes afterwards acknowledges on it (the threads pool acknowledges from
the task's thread). That channel has dropped its connection pool and its transport is detached
from the connection, so rebuilding the pool raises `AttributeError: 'NoneType' object has no
attribute 'hostname'` (or `... 'client'`) from `Channel._connparams`. Celery treats that as
unrecoverable and the worker node exits; a connection error in the same place is expected and
handled ("Couldn't ack", a failed restore). So a detached channel raises `redis.ConnectionError`
instead. Nothing is lost by it: the messages stay in the `unacked` hash, and the periodic sweep
puts them back after the visibility timeout.

**kombu's own path** (no_ack, a key prefix) keeps a message whose unacknowledged record could not
be written in memory and pushes it back onto its queue once the broker answers.

Celery selects this transport for `redis://` broker URLs through `broker_transport`
(worker/celery_config.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from queue import Empty
from time import monotonic, time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils import encoding
from kombu.utils import json as kombu_json

from worker import serialization
from worker.intake import UNREADABLE_CONTENT_TYPE, UNREADABLE_HEADER

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
# Messages taken off a queue whose unacknowledged record could not be written: (raw message,
# exchange, routing key), to be pushed back onto their queue once the broker answers.
_orphans: list[tuple[Any, str, str]] = []
_orphans_lock = threading.Lock()

# KEYS: the unacked hash, its index, this process's claim marker, then the queue keys in the order
# to take from (priority first). ARGV: the time (kombu's clock: the client's), the marker's TTL, a
# fresh delivery tag, then the queue name of each queue key (ARGV[i] is KEYS[i]'s queue, i >= 4).
# Pops the oldest message, records it as unacknowledged exactly as kombu does
# (`[message, exchange, routing_key]` under its delivery tag), and returns
# `[queue key, message, delivery tag]` (BRPOP's reply and the tag). An item that is not a kombu
# envelope (not JSON, or no properties with a delivery tag and delivery info) would stop the
# consumer: it is recorded and returned as an envelope under the fresh tag, with the header
# `x-snowpipe-unreadable` (why) and the item hex-encoded as its body, for the worker to
# dead-letter (worker/intake.py).
CLAIM_SCRIPT = """
local function hex(s)
  local out = {}
  for i = 1, #s, 4000 do
    local j = math.min(i + 3999, #s)
    out[#out + 1] = string.format(string.rep('%02x', j - i + 1), string.byte(s, i, j))
  end
  return table.concat(out)
end
for i = 4, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, message = pcall(cjson.decode, item)
    local why = 'not-json'
    local tag, info
    if ok then
      why = 'not-envelope'
      if type(message) == 'table' and type(message['properties']) == 'table' then
        tag = message['properties']['delivery_tag']
        info = message['properties']['delivery_info']
      end
    end
    if type(tag) ~= 'string' or type(info) ~= 'table' then
      tag = ARGV[3]
      info = {exchange = '', routing_key = ARGV[i]}
      item = cjson.encode({
        body = hex(item),
        ['content-encoding'] = 'binary',
        ['content-type'] = 'application/x-snowpipe-unreadable',
        headers = {['x-snowpipe-unreadable'] = why},
        properties = {delivery_tag = tag, delivery_info = info, priority = 0}
      })
    end
    local record = '[' .. item .. ',' .. cjson.encode(info['exchange'] or '') .. ','
      .. cjson.encode(info['routing_key'] or '') .. ']'
    redis.call('ZADD', KEYS[2], ARGV[1], tag)
    redis.call('HSET', KEYS[1], tag, record)
    redis.call('SET', KEYS[3], tag, 'EX', ARGV[2])
    return {KEYS[i], item, tag}
  end
end
return false
"""
CLAIM_MARKER_TTL = 7 * 24 * 3600

_process_lock = threading.Lock()
_process: dict[str, Any] = {}  # pid, marker key, the last tag this process received


def unreadable_envelope(raw: bytes, *, tag: str, queue: str, why: str) -> dict[str, Any]:
    """The envelope a Redis item that is not a kombu message is handed over in (as the claim
    script builds it): the worker dead-letters it with `raw` as its body (worker/intake.py)."""
    return {
        "body": raw.hex(),
        "content-encoding": "binary",
        "content-type": UNREADABLE_CONTENT_TYPE,
        "headers": {UNREADABLE_HEADER: why},
        "properties": {
            "delivery_tag": tag,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
        },
    }


class Message(virtual.Message):
    """kombu's message of a Redis envelope; an envelope kombu cannot read (a bad body encoding,
    headers that are not a table, no delivery tag) becomes an unreadable one instead of an
    exception inside the consumer (the same delivery tag, so acknowledging it works)."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        init: Any = super().__init__
        try:
            init(payload, channel, **kwargs)
        except Exception:  # noqa: BLE001 (whatever kombu cannot read is handed over as unreadable)
            init(_unreadable_payload(payload), channel, **kwargs)


def _unreadable_payload(payload: Any) -> dict[str, Any]:
    """The unreadable envelope of an envelope kombu's Message refused."""
    props = payload.get("properties") if isinstance(payload, dict) else None
    props = props if isinstance(props, dict) else {}
    info = props.get("delivery_info")
    tag = props.get("delivery_tag")
    queue = info.get("routing_key") if isinstance(info, dict) else ""
    try:
        raw = kombu_json.dumps(payload).encode()  # type: ignore[no-untyped-call]
    except Exception:  # noqa: BLE001 (not JSON-able: its repr is what there is)
        raw = repr(payload).encode()
    return unreadable_envelope(
        raw,
        tag=tag if isinstance(tag, str) else uuid.uuid4().hex,
        queue=str(queue or ""),
        why="not-envelope",
    )


def _text(value: Any) -> str:
    text: str = encoding.bytes_to_str(value)  # type: ignore[no-untyped-call]
    return text


def _claim_marker() -> str:
    """This process's claim marker key (a new one after a fork)."""
    with _process_lock:
        if _process.get("pid") != os.getpid():
            ident = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
            _process.update(pid=os.getpid(), marker=f"_snowpipe.claim.{ident}", received=None)
        marker: str = _process["marker"]
        return marker


def _received(tag: str) -> None:
    with _process_lock:
        _process["received"] = tag


def _last_received() -> str | None:
    with _process_lock:
        tag: str | None = _process.get("received")
        return tag


class QoS(kombu_redis.QoS):
    """Skips the unacked record the claim script already wrote; on kombu's own path, keeps a
    message whose record failed and pushes it back later."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        channel: Any = self.channel
        claimed: set[str] = channel._claimed
        if delivery_tag in claimed:
            claimed.discard(delivery_tag)
            keep: Any = virtual.QoS.append
            keep(self, message, delivery_tag)
            return
        record: Any = super().append
        try:
            record(message, delivery_tag)
        except _CONNECTION_ERRORS:
            delivery = message.delivery_info
            with _orphans_lock:
                _orphans.append((message._raw, delivery["exchange"], delivery["routing_key"]))
            log.warning(
                "the broker went away while handing over a message: it runs now and goes back "
                "onto its queue when the broker answers (a second run is deduplicated)"
            )
            keep = virtual.QoS.append
            keep(self, message, delivery_tag)
            return
        self.requeue_orphans()

    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        self.requeue_orphans()
        restore: Any = super().restore_visible
        return restore(*args, **kwargs)

    def requeue_orphans(self) -> None:
        """Push the messages kept by `append` back onto their queues (if the broker answers)."""
        with _orphans_lock:
            pending = list(_orphans)
            _orphans.clear()
        if not pending:
            return
        try:
            with self.channel.conn_or_acquire() as client, client.pipeline() as pipe:
                for raw, exchange, routing_key in pending:
                    self.channel._do_restore_message(raw, exchange, routing_key, pipe)
                pipe.execute()
        except _CONNECTION_ERRORS:
            with _orphans_lock:
                _orphans[:0] = pending
            return
        log.warning(
            "pushed %d message(s) back onto their queue after a broker restart", len(pending)
        )


class Channel(kombu_redis.Channel):
    """The Redis channel: atomic claims, and a connection error once detached."""

    QoS = QoS
    Message = Message

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._claimed: set[str] = set()
        self._noack: set[str] = set()
        self._claim_idle = False  # the last claim found every queue empty: wait next
        self._claim_waiting = False  # the command in flight is the wait, not a claim
        self._claim_inflight = False  # the command in flight is ours (not kombu's BRPOP)
        self._claim_checked = False  # this channel looked for a claim a lost reply left behind
        self._deliveries: dict[str, int] = {}  # messages claimed, by queue key
        self._claim_keys: list[str] = []
        self._claim_queues: list[str] = []  # the queue of each claim key
        self._server_claims: bool | None = None
        init: Any = super().__init__
        init(*args, **kwargs)

    def _connparams(self, asynchronous: bool = False) -> Any:
        transport = getattr(self, "connection", None)
        if transport is None or getattr(transport, "client", None) is None:
            raise redis.ConnectionError(
                "this broker channel belongs to a connection that was closed (broker restart)"
            )
        connparams: Any = super()._connparams
        return connparams(asynchronous=asynchronous)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._noack.add(queue)
        consume: Any = super().basic_consume
        return consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        cancel: Any = super().basic_cancel
        result = cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._noack.discard(queue)
        return result

    def _claims(self) -> bool:
        """Whether this channel takes messages with the claim script."""
        if self.global_keyprefix or self._noack & set(self._active_queues):
            return False
        if self._server_claims is None:
            self._server_claims = self._server_has_blmove()
        return self._server_claims

    def _server_has_blmove(self) -> bool:
        """BLMOVE came with Redis 6.2; an older server keeps kombu's own path."""
        try:
            with self.conn_or_acquire() as client:
                version = str(client.info("server").get("redis_version", "0"))
        except _CONNECTION_ERRORS:
            raise
        except redis.RedisError:
            return True  # INFO refused (managed Redis): assume a current server
        parts = [int(p) if p.isdigit() else 0 for p in version.split(".")[:2]]
        if tuple(parts) >= (6, 2):
            return True
        log.warning(
            "the Redis broker is version %s: without BLMOVE (6.2+) a message whose hand-over is "
            "cut off by a broker restart can be lost; upgrade the broker to Redis 6.2 or newer",
            version,
        )
        return False

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._claims():
            self._claim_inflight = False
            start: Any = super()._brpop_start
            start(timeout)
            return
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        if not self._claim_checked:
            self._claim_checked = True
            self._restore_lost_claim()
        key_of: Any = self._q_for_pri
        keys = [key_of(queue, pri) for pri in self.priority_steps for queue in queues]
        self._claim_queues = [queue for _ in self.priority_steps for queue in queues]
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        self._claim_inflight = True
        if self._claim_idle:
            # Wait for a message without taking it: the head is popped and pushed back in place.
            # Wait on the queue that delivered most (the others are claimed from after each
            # wait, at least every `brpop_timeout`).
            key = max(keys, key=lambda k: self._deliveries.get(k, 0))
            self._claim_waiting = True
            connection.send_command("BLMOVE", key, key, "LEFT", "LEFT", timeout or 0)
            return
        self._claim_waiting = False
        self._send_claim(keys)

    def _send_claim(self, keys: list[str]) -> None:
        self._claim_keys = keys
        self.client.connection.send_command(
            "EVAL",
            CLAIM_SCRIPT,
            3 + len(keys),
            self.unacked_key,
            self.unacked_index_key,
            _claim_marker(),
            *keys,
            repr(time()),
            CLAIM_MARKER_TTL,
            str(uuid.uuid4()),
            *self._claim_queues,
        )

    def _brpop_read(self, **options: Any) -> bool:
        if not self._claim_inflight:
            read: Any = super()._brpop_read
            result: bool = read(**options)
            return result
        try:
            reply = self._read_reply("BLMOVE" if self._claim_waiting else "EVAL", options)
            if self._claim_waiting:
                if reply is None:
                    # The wait timed out: claim next (from every queue, not only the one waited on).
                    self._claim_idle = False
                    raise Empty()
                # A message arrived: claim it now, on the same connection.
                self._claim_idle = self._claim_waiting = False
                self._send_claim(self._claim_keys)
                reply = self._read_reply("EVAL", options)
            if not reply:
                self._claim_idle = True
                raise Empty()
            key, item, tag = reply
            key = _text(key)
            dest = key.rsplit(self.sep, 1)[0]
            tag = _text(tag)
            message = _envelope(item)
            if message is None:  # JSON to the claim script, not to Python (bad UTF-8, say)
                message = unreadable_envelope(bytes(item), tag=tag, queue=dest, why="not-json")
            self._claimed.add(tag)
            _received(tag)
            self._deliveries[key] = self._deliveries.get(key, 0) + 1
            self._queue_cycle.rotate(dest)
            self.connection._deliver(message, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._claim_inflight = self._claim_waiting = False
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _read_reply(self, command: str, options: dict[str, Any]) -> Any:
        try:
            return self.client.parse_response(self.client.connection, command, **options)
        except self.connection_errors:
            # Disconnect, so that the next round reconnects.
            self.client.connection.disconnect()
            raise

    def _restore_lost_claim(self) -> None:
        """Put back the message this process claimed last if its reply never arrived (the
        connection that carried it was lost)."""
        try:
            with self.conn_or_acquire() as client:
                tag = client.get(_claim_marker())
                if tag is None:
                    return
                tag = _text(tag)
                if tag == _last_received():
                    return
                if not client.hexists(self.unacked_key, tag):
                    return
                self.qos.restore_by_tag(tag, client=client)
        except _CONNECTION_ERRORS:
            self._claim_checked = False  # try again with the next claim
            return
        log.warning(
            "put back a message whose delivery was cut off by a lost broker connection "
            "(a second run is deduplicated)"
        )


def _envelope(item: Any) -> dict[str, Any] | None:
    """The decoded envelope `item`, or None if Python cannot decode it as a JSON object."""
    try:
        message = serialization.loads(item)
    except Exception:  # noqa: BLE001 (any decoding failure: handed over as unreadable)
        return None
    return message if isinstance(message, dict) else None


class Transport(kombu_redis.Transport):
    """The Redis transport, with the channel above."""

    Channel = Channel
