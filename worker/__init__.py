"""Stream row batches from a message queue into Snowflake through Snowpipe Streaming.

`celery -A worker worker` finds the Celery app as `worker.app`. The app and the producer API are
imported lazily so that importing a submodule (the TokenGuard, the client) does not build a Celery
app or read settings.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app", "publish_batch"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from worker.celery_app import app

        return app
    if name == "publish_batch":
        from worker.publish import publish_batch

        return publish_batch
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
