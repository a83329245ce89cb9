"""The producer API: `publish_batch(rows, database=..., schema=..., pipe=...) -> batch_id`.

Rows are checked before anything is sent, so a bad batch fails in the producer with an error that
names the row and the fix, instead of becoming a dead letter later:

- the batch is a non-empty list of rows, each a non-empty JSON object with string keys;
- every value is plain JSON (str, int, float, bool, None, list, dict; no NaN or infinity);
- each row, encoded, is under the per-request cap (`SNOWPIPE_MAX_REQUEST_BYTES`, 4 MB);
- database, schema and pipe are non-empty names without control characters.

The batch id (a UUID unless given) is the dedup key of the whole pipeline: publishing the same
batch id twice commits its rows once.
"""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import kombu.exceptions

from worker import runtime
from worker.connectivity import broker_error, check_broker
from worker.errors import InvalidBatchError as InvalidBatchError  # noqa: PLC0414 (re-exported)
from worker.settings import Settings


def _check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidBatchError(f"{kind} must be a non-empty string, got {value!r}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise InvalidBatchError(
            f"{kind} {value!r} contains a control character (tab, newline, ...): use the "
            "object's plain name"
        )
    return value


def _non_finite(value: Any, path: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return path or "the row"
    if isinstance(value, Mapping):
        for key, item in value.items():
            found = _non_finite(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _non_finite(item, f"{path}[{i}]")
            if found:
                return found
    return None


def check_row(row: object, index: int, max_bytes: int) -> int:
    """Check one row (see the module docstring); its encoded size in bytes."""
    if not isinstance(row, Mapping):
        raise InvalidBatchError(
            f"row {index} is a {type(row).__name__}, not a JSON object: publish each row as a "
            "dict of column name to value"
        )
    if not row:
        raise InvalidBatchError(f"row {index} is empty: every row needs at least one column")
    for key in row:
        if not isinstance(key, str):
            raise InvalidBatchError(
                f"row {index} has a non-string column name {key!r}: use str column names"
            )
    try:
        encoded = json.dumps(row, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        where = _non_finite(row, "")
        raise InvalidBatchError(
            f"row {index}: {where} is NaN or infinite, which JSON cannot carry: send null or a "
            "finite number"
        ) from None
    except TypeError as exc:
        raise InvalidBatchError(
            f"row {index} is not JSON-serialisable ({exc}): convert values to str, int, float, "
            "bool, None, list or dict (e.g. datetime -> isoformat(), Decimal -> str)"
        ) from None
    size = len(encoded.encode())
    if size > max_bytes:
        raise InvalidBatchError(
            f"row {index} is {size} bytes encoded, over the {max_bytes}-byte per-request cap of "
            "Snowpipe Streaming: split the row or store the large value elsewhere"
        )
    return size


def check_batch(
    rows: object, *, database: str, schema: str, pipe: str, settings: Settings
) -> list[dict[str, Any]]:
    """The rows as a list, after every check of the module docstring (or InvalidBatchError)."""
    _check_name("database", database)
    _check_name("schema", schema)
    _check_name("pipe", pipe)
    if isinstance(rows, str | bytes | Mapping) or not isinstance(rows, Sequence):
        raise InvalidBatchError(
            f"rows must be a list of dicts, got {type(rows).__name__}: wrap a single row in a list"
        )
    if not rows:
        raise InvalidBatchError("the batch is empty: publish at least one row")
    for index, row in enumerate(rows):
        check_row(row, index, settings.max_request_bytes)
    return [dict(row) for row in rows]


class Publisher:
    """Publishes checked batches to the ingest queue of one configuration (thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        from celery import Celery

        from worker.celery_config import build_config, declare_dead_letter_queue

        self.settings = settings
        # A publishing app of its own: no task bodies needed, only the queues and routes.
        self.app = Celery("snowpipe-publisher", set_as_current=False)
        self.app.conf.update(build_config(settings))
        # What kombu raises when the broker is down or did not confirm (OperationalError,
        # redis/amqp connection errors, OSError): the caller gets BrokerUnavailableError.
        self._broker_errors: tuple[type[BaseException], ...] = (
            kombu.exceptions.OperationalError,
            kombu.exceptions.KombuError,
            *self.app.connection_for_write().connection_errors,
            OSError,
        )
        try:
            declare_dead_letter_queue(self.app, settings)
        except self._broker_errors as exc:
            raise broker_error(settings, exc) from None

    def publish(
        self,
        rows: Sequence[Mapping[str, Any]],
        *,
        database: str,
        schema: str,
        pipe: str,
        batch_id: str | None = None,
        attempt: int = 0,
    ) -> str:
        """Check and publish one batch; its batch id (see `publish_batch`)."""
        from worker.celery_config import INGEST_TASK

        s = self.settings
        checked = check_batch(rows, database=database, schema=schema, pipe=pipe, settings=s)
        if batch_id is None:
            batch_id = uuid.uuid4().hex
        elif not batch_id or any(ord(ch) < 33 for ch in batch_id):
            raise InvalidBatchError(f"batch_id {batch_id!r} must be non-empty, without spaces")
        kwargs: dict[str, Any] = {
            "batch_id": batch_id,
            "database": database,
            "schema": schema,
            "pipe": pipe,
            "rows": checked,
        }
        if attempt:
            kwargs["attempt"] = attempt
        try:
            self.app.send_task(
                INGEST_TASK,
                kwargs=kwargs,
                task_id=batch_id if not attempt else f"{batch_id}:{attempt}",
                queue=s.queue_name,
                routing_key=s.queue_name,
            )
        except self._broker_errors as exc:
            raise broker_error(s, exc) from None
        return batch_id

    def check_broker(self) -> None:
        """Connect to the broker once, without retries (BrokerUnavailableError if it is down)."""
        check_broker(self.settings)

    def close(self) -> None:
        """Release the broker connections."""
        self.app.close()


_default: Publisher | None = None
_default_lock = threading.Lock()


def default_publisher() -> Publisher:
    """The process's publisher for the configured settings (created on first use)."""
    global _default  # noqa: PLW0603 (one per process, like the settings it uses)
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Publisher(runtime.producer_settings())
    return _default


def publish_batch(
    rows: Sequence[Mapping[str, Any]],
    *,
    database: str,
    schema: str,
    pipe: str,
    batch_id: str | None = None,
) -> str:
    """Check and publish one batch of rows for `database.schema.pipe`; its batch id.

    Needs only the broker settings (SNOWPIPE_BROKER_URL), no Snowflake ones. Raises
    InvalidBatchError for bad input, and `worker.connectivity.BrokerUnavailableError` (a
    ConnectionError naming SNOWPIPE_BROKER_URL and the fix) if the broker did not take the message
    (then nothing was published; publishing again with the same batch id is safe).
    """
    return default_publisher().publish(
        rows, database=database, schema=schema, pipe=pipe, batch_id=batch_id
    )
