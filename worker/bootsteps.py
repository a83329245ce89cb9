"""Celery bootsteps of the worker: the node's pumps in the worker's main process."""

from __future__ import annotations

from typing import Any, ClassVar

from celery import bootsteps

from worker.delivery.node import Node
from worker.observability import get_logger

_log = get_logger("worker.bootsteps")


class PumpStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Celery bootstep: runs the node's pumps in the worker's main process."""

    # The heartbeat starts first: it refuses a duplicate node name before any lease is taken.
    requires: ClassVar[set[str]] = {
        "celery.worker.components:Pool",
        "worker.heartbeat:HeartbeatStep",
    }

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.node: Node | None = None

    def start(self, parent: Any) -> None:
        from worker import metrics, runtime

        settings = runtime.settings()
        if not settings.pump_enabled:
            _log.info("node.pump_disabled", node=parent.hostname)
            return
        self.node = Node(settings, parent.hostname)
        self.node.start()
        metrics.watch(self.node)

    def stop(self, parent: Any) -> None:
        from worker import metrics

        node, self.node = self.node, None
        if node is not None:
            metrics.unwatch(node)
            node.stop()

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)
