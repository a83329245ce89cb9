"""The Celery configuration: delivery settings, queues, routes and the beat schedule.

Pure functions of `Settings` (no app is built here), shared by the worker's app and by
publishers (docs/delivery.md explains what each one guards against):

- a message is acknowledged only after the task returns (`task_acks_late`), and the task returns
  only once its batch is in a channel log (or dead-lettered); a killed child's message is
  requeued (`task_reject_on_worker_lost`); one message reserved per process (prefetch 1);
- one visibility timeout, set in all three places Celery reads it (the shortest one wins);
  the unacked sweep runs every few seconds so a dead node's messages come back promptly;
- a hard time limit requeues instead of acknowledging (`task_acks_on_timeout=False`); the task
  itself never raises (it dead-letters or re-publishes explicitly);
- running tasks are cancelled on broker connection loss instead of running twice;
- RabbitMQ: quorum queues with a declared dead-letter exchange and queue, publisher confirms;
- remote control scoped to the deployment (its queue name), TLS checked (worker/tls.py).
"""

from __future__ import annotations

from typing import Any

from kombu import entity

from worker.settings import Settings
from worker.tls import broker_ssl_options

# kombu ships no annotations for these: use them as Any rather than sprinkle ignores.
Exchange: Any = entity.Exchange
Queue: Any = entity.Queue

# Share of the visibility timeout a task may run: it must finish (or be killed and requeued)
# well before the broker would hand its message to someone else.
SOFT_LIMIT_SHARE = 0.5
HARD_LIMIT_SHARE = 0.6
# RabbitMQ: after this many deliveries a message goes to the dead-letter queue (poison loops).
DELIVERY_LIMIT = 20
INGEST_TASK = "snowpipe.ingest_batch"
REFRESH_TASK = "snowpipe.refresh_tokens"
# Internal: never published; the consumer hands a malformed message to the pool as a call of it
# (worker/intake.py), which stores its dead letter.
MALFORMED_TASK = "snowpipe.dead_letter_message"


def soft_time_limit(settings: Settings) -> float:
    """The tasks' soft time limit (prefork enforces it; the threads pool does not)."""
    return max(1.0, SOFT_LIMIT_SHARE * settings.visibility_timeout_seconds)


def control_queue_name(settings: Settings) -> str:
    """The queue of control tasks (token refresh), beside the ingest queue."""
    return f"{settings.queue_name}.control"


def dead_queue(settings: Settings) -> Any:
    """RabbitMQ: the queue that receives messages the broker dead-letters."""
    dlx = Exchange(f"{settings.queue_name}.dlx", type="direct", durable=True)
    name = f"{settings.queue_name}.dead"
    return Queue(
        name, dlx, routing_key=name, durable=True, queue_arguments={"x-queue-type": "quorum"}
    )


def _queues(settings: Settings) -> list[Any]:
    ingest = settings.queue_name
    control = control_queue_name(settings)
    if settings.broker_is_redis:
        return [Queue(ingest, routing_key=ingest), Queue(control, routing_key=control)]
    dead = dead_queue(settings)
    assert dead.exchange is not None
    arguments = {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": dead.exchange.name,
        "x-dead-letter-routing-key": dead.routing_key,
        # At-least-once dead-lettering needs reject-publish overflow (RabbitMQ >= 3.10).
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": DELIVERY_LIMIT,
    }
    return [
        Queue(
            ingest,
            Exchange(ingest, type="direct", durable=True),
            routing_key=ingest,
            durable=True,
            queue_arguments=arguments,
        ),
        Queue(
            control,
            Exchange(control, type="direct", durable=True),
            routing_key=control,
            durable=True,
            queue_arguments={"x-queue-type": "quorum"},
        ),
    ]


def build_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for `settings`."""
    vt = settings.visibility_timeout_seconds
    control = control_queue_name(settings)
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Redis has no dead-letter exchange: the task dead-letters explicitly and never raises.
        # On RabbitMQ a failure that escapes anyway goes to the declared dead-letter queue.
        "task_acks_on_failure": settings.broker_is_redis,
        "task_acks_on_timeout": False,  # a hard time-limit kill requeues, never acks
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_hijack_root_logger": False,
        "task_soft_time_limit": soft_time_limit(settings),
        "task_time_limit": max(2.0, HARD_LIMIT_SHARE * vt),
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 10,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 5,
        },
        # Remote control (`snowpipe-worker health`, `status`, `celery inspect`, Flower) on
        # exchanges of this deployment's own (`<queue>.pidbox`): a broadcast reaches only the
        # nodes of this queue name, not another deployment's on the same vhost or database.
        "control_exchange": settings.queue_name,
        "task_queues": _queues(settings),
        "task_default_queue": settings.queue_name,
        "task_routes": {
            INGEST_TASK: {"queue": settings.queue_name, "routing_key": settings.queue_name},
            REFRESH_TASK: {"queue": control, "routing_key": control},
        },
        "beat_schedule": {
            "snowpipe-refresh-tokens": {
                "task": REFRESH_TASK,
                "schedule": settings.beat_refresh_seconds,
                # A tick that waited longer than one period is useless: the next one is due.
                "options": {"queue": control, "expires": settings.beat_refresh_seconds},
            }
        },
        "visibility_timeout": vt,
        "result_backend_transport_options": {"visibility_timeout": vt},
    }
    if settings.broker_is_redis:
        # kombu's Redis transport, with the fix that keeps a broker restart from stopping the
        # worker (worker/broker.py).
        if settings.broker_url.startswith("redis://"):
            config["broker_transport"] = "worker.broker:Transport"
        config["broker_transport_options"] = {
            "visibility_timeout": vt,
            # Sweep for a dead node's unacked messages every few seconds (kombu 5.7 defaults to
            # ~100 s), at most a fifth of the visibility timeout.
            "unacked_restore_interval": max(1, min(10, vt // 5)),
            "unacked_restore_throttle": 1,
            # The sweep holds a lock; a node killed while holding it would block every other
            # node's sweep for kombu's default 300 s.
            "unacked_mutex_expire": 30,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "retry_on_timeout": True,
            "health_check_interval": 25,
        }
    else:
        config["broker_transport_options"] = {"confirm_publish": True}
    tls = broker_ssl_options(settings.broker_url, settings.ca_file)
    if tls is not None:
        # rediss:// and amqps://: the certificate and the host name are checked (worker/tls.py).
        config["broker_use_ssl"] = tls
    return config


def declare_dead_letter_queue(celery_app: Any, settings: Settings) -> None:
    """RabbitMQ: declare the dead-letter exchange and queue (undeclared, dead letters vanish)."""
    if settings.broker_is_redis:
        return
    with celery_app.connection_for_write() as conn:
        dead_queue(settings)(conn.default_channel).declare()


