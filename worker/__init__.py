"""Stream row batches from a message queue into Snowflake through Snowpipe Streaming.

The public API:

    app                     the Celery app (`celery -A worker worker` finds it here)
    publish_batch(...)      put one batch of rows on the queue (the producer side)
    wait_for_batches(...)   wait until batches are committed in Snowflake or dead-lettered
    WaitResult              what wait_for_batches returns: each batch id's state
    InvalidBatchError       publish_batch refused the rows or the names (fix the input)
    BrokerUnavailableError  the broker did not take the message (a ConnectionError)
    SnowpipeError           the root of the Snowpipe errors (worker/snowpipe/errors.py)
    __version__             the installed version

Everything is imported on first use (module `__getattr__`), so `import worker` stays cheap and
importing a submodule (the TokenGuard, the client) does not build a Celery app or read settings.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.celery_app import app
    from worker.connectivity import BrokerUnavailableError
    from worker.publish import InvalidBatchError, publish_batch
    from worker.snowpipe.errors import SnowpipeError
    from worker.waiting import WaitResult, wait_for_batches

    __version__: str

__all__ = [
    "BrokerUnavailableError",
    "InvalidBatchError",
    "SnowpipeError",
    "WaitResult",
    "__version__",
    "app",
    "publish_batch",
    "wait_for_batches",
]

DISTRIBUTION = "snowpipe-worker"
# What `__version__` says when the package is imported from a checkout that was never installed.
UNKNOWN_VERSION = "0+unknown"

# name -> the module that defines it (imported on first access).
_LAZY = {
    "publish_batch": "worker.publish",
    "InvalidBatchError": "worker.publish",
    "BrokerUnavailableError": "worker.connectivity",
    "SnowpipeError": "worker.snowpipe.errors",
    "wait_for_batches": "worker.waiting",
    "WaitResult": "worker.waiting",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return UNKNOWN_VERSION


def _app() -> Any:
    from worker.settings import SettingsError

    try:
        from worker.celery_app import app
    except SettingsError as exc:
        # `celery -A worker ...` would print a traceback; the message alone says the fix.
        sys.stderr.write(f"snowpipe-worker: {exc}\n")
        raise SystemExit(2) from None
    return app


def __getattr__(name: str) -> Any:
    if name == "app":
        return _app()
    if name == "__version__":
        value: Any = _version()
    elif name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
