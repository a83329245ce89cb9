"""Raw messages on the brokers, the way a producer in another language (or a bug) sends them.

    push_envelope(client, queue, body, headers)      # Redis: LPUSH of a kombu envelope
    client.lpush(queue, b"anything")                  # Redis: an item that is no envelope at all
    publish_amqp(queue, body, headers)                # RabbitMQ: basic.publish to the queue

Nothing here checks what it sends: that is the point.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import amqp
import redis

RABBIT_HOST = "127.0.0.1:5672"
JSON = "application/json"


def celery_body(kwargs: Any, args: Any = (), embed: Any = None) -> bytes:
    """A Celery protocol 2 body: `[args, kwargs, embed]` as JSON."""
    return json.dumps([list(args), kwargs, embed if embed is not None else {}]).encode()


def envelope(
    queue: str,
    body: bytes,
    headers: dict[str, Any],
    *,
    content_type: str | None = JSON,
    content_encoding: str = "utf-8",
) -> str:
    """The kombu envelope of a message on the Redis list `queue` (docs/message-format.md)."""
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": {
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def push_envelope(
    client: redis.Redis,
    queue: str,
    body: bytes,
    headers: dict[str, Any],
    *,
    content_type: str | None = JSON,
) -> None:
    """LPUSH one message onto the Redis list `queue`, as kombu's Redis transport would."""
    client.lpush(queue, envelope(queue, body, headers, content_type=content_type))


def publish_amqp(
    queue: str,
    body: bytes,
    headers: dict[str, Any] | None,
    *,
    content_type: str | None = JSON,
) -> None:
    """Publish one persistent message to the exchange named like `queue` (the worker's direct
    exchange, routing key = queue)."""
    properties: dict[str, Any] = {"delivery_mode": 2}
    if content_type is not None:
        properties.update(content_type=content_type, content_encoding="utf-8")
    if headers is not None:
        properties["application_headers"] = headers
    with amqp.Connection(RABBIT_HOST, userid="guest", password="guest") as conn:
        channel = conn.channel()
        channel.confirm_select()
        channel.basic_publish(amqp.Message(body, **properties), exchange=queue, routing_key=queue)


def rabbit_ready(queue: str) -> int:
    """Messages ready in the RabbitMQ queue `queue`."""
    with amqp.Connection(RABBIT_HOST, userid="guest", password="guest") as conn:
        _, count, _ = conn.channel().queue_declare(queue, passive=True)
        return int(count)
