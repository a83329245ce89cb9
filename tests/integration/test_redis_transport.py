"""The project's Redis transport (worker/broker.py) against a real Redis: a message is recorded as
unacknowledged in the same step that takes it off its queue, and a message whose hand-over reply
was lost goes back to its queue instead of vanishing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu import Connection, Exchange, Message, Queue

from tests.support.redis import RedisDB
from worker import broker

TRANSPORT = "worker.broker:Transport"


@contextmanager
def connect(url: str, **options: Any) -> Iterator[Connection]:
    conn = Connection(
        url, transport=TRANSPORT, transport_options={"visibility_timeout": 60, **options}
    )
    try:
        yield conn
    finally:
        conn.release()


def queue_named(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def publish(conn: Connection, queue: Queue, body: dict[str, Any]) -> None:
    with conn.Producer() as producer:
        producer.publish(
            body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue]
        )


def receive(conn: Connection, queue: Queue, *, no_ack: bool = False, timeout: float = 5) -> Message:
    got: list[Message] = []
    with conn.Consumer(queue, callbacks=[lambda _body, m: got.append(m)], no_ack=no_ack):
        conn.drain_events(timeout=timeout)
    assert len(got) == 1
    return got[0]


def test_a_taken_message_is_recorded_unacknowledged_until_it_is_acknowledged(db: RedisDB) -> None:
    queue = queue_named("t.claim")
    with connect(db.url) as conn:
        publish(conn, queue, {"n": 1})
        message = receive(conn, queue)
        assert message.payload == {"n": 1}
        assert db.client.llen("t.claim") == 0
        assert db.client.hexists("unacked", message.delivery_tag)
        assert db.client.zscore("unacked_index", message.delivery_tag) is not None
        message.ack()
        assert not db.client.hexists("unacked", message.delivery_tag)
        assert db.client.zscore("unacked_index", message.delivery_tag) is None


def test_a_message_whose_hand_over_was_lost_goes_back_to_its_queue(db: RedisDB) -> None:
    queue = queue_named("t.lost")
    with connect(db.url) as conn:
        publish(conn, queue, {"n": 2})
        # The claim ran on the server but its reply never reached this process (the connection
        # died): the message is off the queue, held only in the unacked hash.
        reply = db.client.eval(
            broker.CLAIM_SCRIPT,
            4,
            "unacked",
            "unacked_index",
            broker._claim_marker(),
            "t.lost",
            repr(time.time()),
            60,
        )
        assert reply is not None
        assert db.client.llen("t.lost") == 0
        # The next connection of this process puts it back and receives it.
        message = receive(conn, queue)
        assert message.payload == {"n": 2}
        message.ack()
        assert db.client.hlen("unacked") == 0
        assert db.client.llen("t.lost") == 0


def test_an_idle_consumer_wakes_for_a_new_message_without_taking_others(db: RedisDB) -> None:
    queue = queue_named("t.wait")
    # The consumer's wait lasts 30 s: receiving sooner shows it woke for the message.
    with connect(db.url) as conn:
        conn.transport.brpop_timeout = 30
        publish(conn, queue, {"n": 0})
        receive(conn, queue).ack()  # declares; the next receive finds the queue empty and waits
        later = threading.Timer(0.3, lambda: _publish_twice(db.url, queue))
        started = time.monotonic()
        later.start()
        first = receive(conn, queue, timeout=20)
        assert time.monotonic() - started < 10
        second = receive(conn, queue, timeout=5)
        assert [first.payload, second.payload] == [{"n": 1}, {"n": 2}]  # order kept
        first.ack()
        second.ack()


def _publish_twice(url: str, queue: Queue) -> None:
    with connect(url) as conn:
        publish(conn, queue, {"n": 1})
        publish(conn, queue, {"n": 2})


def test_a_consumer_without_acknowledgements_leaves_no_unacked_record(db: RedisDB) -> None:
    queue = queue_named("t.noack")
    with connect(db.url) as conn:
        publish(conn, queue, {"n": 3})
        message = receive(conn, queue, no_ack=True)
        assert message.payload == {"n": 3}
        assert db.client.hlen("unacked") == 0
