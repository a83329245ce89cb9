"""The Celery app (`worker.app`) and its per-process set-up.

`celery -A worker worker` and `celery -A worker beat` load it; the configuration (and why each
delivery setting is what it is) is in worker/celery_config.py.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, ClassVar

from celery import Celery
from celery.signals import (
    setup_logging,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from celery.worker.consumer import Consumer as CeleryConsumer

from worker import intake, runtime, serialization
from worker.bootsteps import PumpStep
from worker.celery_config import (
    INGEST_TASK,
    MALFORMED_TASK,
    REFRESH_TASK,
    build_config,
    declare_dead_letter_queue,
)
from worker.heartbeat import ConsumerProgress, HeartbeatStep
from worker.settings import Settings

__all__ = ["INGEST_TASK", "MALFORMED_TASK", "REFRESH_TASK", "app", "create_app"]


# Celery includes this consumer step whenever a queue is a quorum queue (ours on RabbitMQ). It
# declares 28 `celery_delayed_*` exchanges and queues, binds our queues to them, and warns at
# every start that our direct exchanges cannot take ETA tasks. The worker publishes no ETA or
# countdown task: a batch put back in the queue is published to run at once (worker/tasks.py),
# beat's refresh task only has an expiry. So the step has nothing to do: leave it out.
DELAYED_DELIVERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer without native delayed delivery (see DELAYED_DELIVERY_STEP), whose
    task messages are checked before Celery reads them: a message the worker cannot run becomes
    a dead letter instead of stopping the node or vanishing (worker/intake.py)."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]
        default_steps: ClassVar[list[str]] = [
            step
            for step in CeleryConsumer.Blueprint.default_steps
            if step != DELAYED_DELIVERY_STEP
        ]

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        return intake.guard(self, super().create_task_handler(*args, **kwargs))

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        if not intake.on_decode_error(self, message, exc):
            super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        intake.on_rejected_by_celery(self, message, "an unknown message")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        intake.on_rejected_by_celery(self, message, f"an unknown task ({exc!r})")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        intake.on_rejected_by_celery(self, message, f"an invalid task message ({exc})")


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from `settings` (default: the process's settings)."""
    settings = settings or runtime.settings()
    celery_app = Celery("worker", include=["worker.tasks"])
    celery_app.conf.update(build_config(settings))
    celery_app.conf.worker_consumer = f"{__name__}:Consumer"
    return celery_app


# Messages of this process decode with orjson (the same values as kombu's decoder).
serialization.install()
app = create_app()
# The node's name, heartbeat file and registration (worker/heartbeat.py), then its channel
# pumps, in the worker's main process (worker/delivery/node.py).
app.steps["worker"].add(HeartbeatStep)
app.steps["worker"].add(PumpStep)
app.steps["consumer"].add(ConsumerProgress)
# `celery -A worker inspect snowpipe_health` (registered by importing it).
import worker.health  # noqa: E402, F401


@setup_logging.connect  # type: ignore[untyped-decorator]
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    # Connected, so Celery leaves logging alone; ours redacts secrets from every logger.
    from worker.observability import configure_logging

    level = loglevel if loglevel is not None else logging.INFO
    configure_logging(level, json=not sys.stderr.isatty())
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    # A configuration error that stops the worker is one line (its traceback at DEBUG only).
    logging.getLogger("celery.worker").addFilter(OneLineFatalErrors(numeric <= logging.DEBUG))
    from worker import runtime

    runtime.warn_unknown_variables()
    # httpx/httpcore log every request at INFO: quiet them unless the worker runs at DEBUG.
    quiet = logging.DEBUG if numeric == logging.DEBUG else logging.WARNING
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(quiet)


class OneLineFatalErrors(logging.Filter):
    """Celery logs an error that stops the worker ("Unrecoverable error") with its traceback.
    For a configuration error (a key that does not load, a setting, a broker that refuses the
    credentials or the certificate) one line names the problem and the fix: the traceback is
    dropped (kept at --loglevel DEBUG)."""

    def __init__(self, keep_traceback: bool) -> None:
        super().__init__()
        self.keep_traceback = keep_traceback

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and not self.keep_traceback:
            message = _configuration_error(error)
            if message is not None:
                record.msg, record.args = "worker.cannot_start: %s", (message,)
                record.exc_info = record.exc_text = None
        return True


def _configuration_error(error: BaseException) -> str | None:
    """The one line for an error that stops the worker and is fixed in its configuration."""
    import redis

    from worker.connectivity import broker_error, diagnose, state_error
    from worker.errors import KeyPairError, SettingsError

    if isinstance(error, KeyPairError | SettingsError):
        return str(error)
    problem, _ = diagnose(error)
    if problem == "unreachable":
        return None
    settings = runtime.settings()
    if isinstance(error, redis.RedisError) and not settings.broker_is_redis:
        return str(state_error(settings, error))
    return str(broker_error(settings, error))


@worker_init.connect  # type: ignore[untyped-decorator]
def _declare_dead_letters(**_: Any) -> None:
    declare_dead_letter_queue(app, runtime.settings())


@worker_ready.connect  # type: ignore[untyped-decorator]
def _startup_checks(**_: Any) -> None:
    # doctor's checks, once, in the background: each failure is logged once, clearly.
    settings = runtime.settings()
    if settings.startup_checks:
        from worker.doctor import start_startup_checks

        start_startup_checks(settings)


@worker_init.connect  # type: ignore[untyped-decorator]
def _start_metrics(sender: Any = None, **_: Any) -> None:
    # Before the pool forks: under prefork every process must write to the node's metric files.
    from worker import metrics
    from worker.observability import serve_pipe_labels

    serve_pipe_labels(runtime.settings().served_pipes())
    metrics.start(
        runtime.settings(),
        nodename=getattr(sender, "hostname", "worker"),
        pool=getattr(sender, "pool_cls", None),
    )


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _reset_process_state(**_: Any) -> None:
    # Prefork children: drop anything inherited (the fork hook does too); nothing blocking here.
    from worker import metrics

    runtime.reset()
    metrics.after_fork_in_child()


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _process_metrics_dead(pid: int | None = None, **_: Any) -> None:
    from worker import metrics

    if pid is not None:
        metrics.process_exited(pid)


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_metrics(**_: Any) -> None:
    from worker import metrics

    metrics.stop()
