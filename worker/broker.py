"""kombu's Redis transport with two fixes for a broker restart: the worker keeps running, and a
message being handed over at that instant is not lost.

When the Redis broker goes away while messages are delivered but not yet acknowledged, Celery
closes the consumer's connection and opens a new one. kombu (5.7) can then still use a channel of
the old connection: its `close()` tries to put the unacknowledged messages back, and a task that
finishes afterwards acknowledges on it (the threads pool acknowledges from the task's thread).
That channel has dropped its connection pool and its transport is detached from the connection,
so rebuilding the pool raises `AttributeError: 'NoneType' object has no attribute 'hostname'`
(or `... 'client'`) from `Channel._connparams`. Celery treats that as unrecoverable and the
worker node exits; a connection error in the same place is expected and handled ("Couldn't ack",
a failed restore).

So a detached channel raises `redis.ConnectionError` instead. Nothing is lost by it: the messages
stay in the broker's `unacked` hash, and the periodic sweep of any consumer puts them back after
the visibility timeout; the batches they carry are deduplicated by batch id.

Second: kombu takes a message off the queue (BRPOP) and records it as unacknowledged in a second
command. When the broker stops between the two, the message exists only in this process: kombu
would drop it. Here it is still handed to its task, and kept in memory to be pushed back onto its
queue as soon as the broker answers again (at the next delivery, or the next visibility sweep).
It may then run twice; the batch id makes the second run a no-op.

Celery selects this transport for `redis://` broker URLs through `broker_transport`
(worker/celery_config.py).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
# Messages taken off a queue whose unacknowledged record could not be written: (raw message,
# exchange, routing key), to be pushed back onto their queue once the broker answers.
_orphans: list[tuple[Any, str, str]] = []
_orphans_lock = threading.Lock()


class QoS(kombu_redis.QoS):
    """Keeps a message whose unacknowledged record failed, and pushes it back later."""

    def append(self, message: Any, delivery_tag: Any) -> None:
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
            keep: Any = virtual.QoS.append
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
    """The Redis channel; raises a connection error once detached from its connection."""

    QoS = QoS

    def _connparams(self, asynchronous: bool = False) -> Any:
        transport = getattr(self, "connection", None)
        if transport is None or getattr(transport, "client", None) is None:
            raise redis.ConnectionError(
                "this broker channel belongs to a connection that was closed (broker restart)"
            )
        connparams: Any = super()._connparams
        return connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    """The Redis transport, with the channel above."""

    Channel = Channel
