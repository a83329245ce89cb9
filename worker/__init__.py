"""Stream row batches from a message queue into Snowflake through Snowpipe Streaming.

`celery -A worker worker` finds the Celery app as `worker.app`. The app and the producer API are
imported lazily so that importing a submodule (the TokenGuard, the client) does not build a Celery
app or read settings.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["app", "publish_batch"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from worker.settings import SettingsError

        try:
            from worker.celery_app import app
        except SettingsError as exc:
            # `celery -A worker ...` would print a traceback; the message alone says the fix.
            sys.stderr.write(f"snowpipe-worker: {exc}\n")
            raise SystemExit(2) from None
        return app
    if name == "publish_batch":
        from worker.publish import publish_batch

        return publish_batch
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
