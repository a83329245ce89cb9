"""The producer API: `publish_batch(rows, database=..., schema=..., pipe=...) -> batch_id`.

Rows are checked before anything is sent, so a bad batch fails in the producer with an error that
names the row and the fix, instead of becoming a dead letter later:

- the batch is a non-empty list of rows;
- each row meets the row contract, `worker.snowpipe.encoding.encode_row`, the function the
  worker encodes with: a non-empty JSON object with string keys; values JSON, Decimal,
  datetime/date/time or UUID, no NaN or infinity; under the per-request cap on the wire
  (`SNOWPIPE_MAX_REQUEST_BYTES`, 4 MB, after `SNOWPIPE_COMPRESSION`). A refused row raises
  `EncodingError` (an `InvalidBatchError`) with the message a dead letter would carry;
- database, schema and pipe are names Snowflake and the worker can take
  (`worker.identifiers.check_name`: Snowflake's identifier rules, quoted names included; no `|`
  or `.`), the same check the worker applies to every message. A bad name raises
  `InvalidNameError` (an `InvalidBatchError`) naming the rule and the fix.

The batch id (32 hex digits, a random UUID's, unless given) is the dedup key of the whole
pipeline: publishing the same batch id twice commits its rows once.

Two forms of message carry the rows (docs/message-format.md): `rows`, an array of JSON objects
(the default, `SNOWPIPE_PUBLISH_FORM=rows`), or `ndjson`, the rows as one string of NDJSON
lines, encoded here once (one orjson call for the batch, the row contract's own encoding) and
stored by the worker as sent, which saves the worker decoding and encoding every row
(`form="ndjson"`, or `SNOWPIPE_PUBLISH_FORM=ndjson`). Only workers that know the NDJSON form read
it: switch once every worker node runs such a version.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import amqp.exceptions
import kombu.exceptions
import redis

from worker import runtime
from worker.connectivity import broker_error, check_broker
from worker.errors import InvalidBatchError as InvalidBatchError  # noqa: PLC0414 (re-exported)
from worker.identifiers import check_name
from worker.messages import IngestMessage
from worker.settings import Settings
from worker.snowpipe.encoding import encode_row, piece_limit

Form = Literal["rows", "ndjson"]
FORMS: tuple[Form, ...] = ("rows", "ndjson")


def check_names(*, database: str, schema: str, pipe: str) -> None:
    """InvalidBatchError unless database, schema and pipe are names a batch can be sent to."""
    check_name("database", database)
    check_name("schema", schema)
    check_name("pipe", pipe)


def check_batch(
    rows: object, *, database: str, schema: str, pipe: str, settings: Settings
) -> list[dict[str, Any]]:
    """The rows as a list, after every check of the module docstring (or InvalidBatchError)."""
    encode_batch(rows, database=database, schema=schema, pipe=pipe, settings=settings)
    return [dict(row) for row in cast("Sequence[Mapping[str, Any]]", rows)]


def encode_batch(
    rows: object, *, database: str, schema: str, pipe: str, settings: Settings
) -> tuple[bytes, int]:
    """The rows as NDJSON (one line each, as the worker would write them) and their count,
    after every check of the module docstring (or InvalidBatchError naming the row).

    One orjson call encodes the whole batch (worker/batchbytes.py); a batch it cannot vouch for
    is encoded row by row with the row contract, `encode_row`, which names the bad row."""
    from worker.batchbytes import rows_ndjson

    check_names(database=database, schema=schema, pipe=pipe)
    if isinstance(rows, str | bytes | Mapping) or not isinstance(rows, Sequence):
        raise InvalidBatchError(
            f"rows must be a list of dicts, got {type(rows).__name__}: wrap a single row in a list"
        )
    if not rows:
        raise InvalidBatchError("the batch is empty: publish at least one row")
    compression, cap = settings.compression, settings.max_request_bytes
    data = rows_ndjson(rows if type(rows) is list else list(rows))
    if data is None or len(data) > piece_limit(compression, cap):
        # A row the bulk path cannot vouch for, or one that may be over the cap: row by row.
        data = b"".join(
            encode_row(row, index, compression=compression, max_request_bytes=cap)
            for index, row in enumerate(rows)
        )
    return data, len(rows)


class Publisher:
    """Publishes checked batches to the ingest queue of one configuration (thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        from celery import Celery

        from worker.celery_config import build_config, declare_dead_letter_queue

        self.settings = settings
        # A publishing app of its own: no task bodies needed, only the queues and routes.
        self.app = Celery("snowpipe-publisher", set_as_current=False)
        self.app.conf.update(build_config(settings))
        # What kombu raises when the broker is down, refused the credentials or did not confirm
        # (OperationalError, redis/amqp errors, TLS, OSError): the caller gets
        # BrokerUnavailableError, whose message says which (worker/connectivity.py).
        self._broker_errors: tuple[type[BaseException], ...] = (
            kombu.exceptions.OperationalError,
            kombu.exceptions.KombuError,
            *self.app.connection_for_write().connection_errors,
            amqp.exceptions.AMQPError,  # ACCESS_REFUSED is a channel error, not a connection one
            redis.RedisError,  # NOAUTH from a Redis broker is a ResponseError
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
        requeue_of: str | None = None,
        form: Form | None = None,
    ) -> str:
        """Check and publish one batch; its batch id (see `publish_batch`). `requeue_of`: the
        dead letter this publication requeues (`dead-letters requeue`); `form`: "rows" or
        "ndjson" (default: `SNOWPIPE_PUBLISH_FORM`)."""
        from worker.celery_config import INGEST_TASK

        s = self.settings
        form = s.publish_form if form is None else form
        if form not in FORMS:
            raise ValueError(f"form must be 'rows' or 'ndjson', got {form!r}")
        checked: list[dict[str, Any]] = []
        ndjson: str | None = None
        count: int | None = None
        if form == "ndjson":
            data, count = encode_batch(
                rows, database=database, schema=schema, pipe=pipe, settings=s
            )
            ndjson = data.decode("utf-8")
        else:
            checked = check_batch(rows, database=database, schema=schema, pipe=pipe, settings=s)
        if batch_id is None:
            batch_id = uuid.uuid4().hex
        elif (
            not isinstance(batch_id, str)
            or not batch_id
            or any(ord(ch) < 33 or ord(ch) == 127 for ch in batch_id)
        ):
            raise InvalidBatchError(f"batch_id {batch_id!r} must be non-empty, without spaces")
        message = IngestMessage(
            batch_id, database, schema, pipe, checked, attempt, requeue_of=requeue_of,
            ndjson=ndjson, row_count=count,
        )  # fmt: skip
        task_id = batch_id if not attempt else f"{batch_id}:{attempt}"
        if requeue_of is not None:
            task_id = f"{batch_id}:requeue:{requeue_of}"
        try:
            self.app.send_task(
                INGEST_TASK,
                kwargs=message.kwargs(),
                task_id=task_id,
                queue=s.queue_name,
                routing_key=s.queue_name,
            )
        except kombu.exceptions.EncodeError as exc:
            # Nothing was sent: a value the broker's JSON cannot carry (an Enum, a dataclass).
            raise InvalidBatchError(
                f"the batch cannot be serialised for the broker ({exc}): convert such values "
                "to str, int, float, bool, None, list or dict"
            ) from None
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
                runtime.warn_unknown_variables()
                _default = Publisher(runtime.producer_settings())
    return _default


def publish_batch(
    rows: Sequence[Mapping[str, Any]],
    *,
    database: str,
    schema: str,
    pipe: str,
    batch_id: str | None = None,
    form: Form | None = None,
) -> str:
    """Check and publish one batch of rows for `database.schema.pipe`; its batch id.

    `form`: how the message carries the rows, "rows" (an array of objects) or "ndjson" (one
    string of NDJSON lines, encoded here once; the worker stores it as sent); default
    `SNOWPIPE_PUBLISH_FORM` ("rows"). Only workers that know the NDJSON form read it.

    Needs only the broker settings (SNOWPIPE_BROKER_URL), no Snowflake ones. Raises
    InvalidBatchError for bad input, and `worker.connectivity.BrokerUnavailableError` (a
    ConnectionError naming SNOWPIPE_BROKER_URL and the fix) if the broker did not take the message
    (then nothing was published; publishing again with the same batch id is safe).
    """
    return default_publisher().publish(
        rows, database=database, schema=schema, pipe=pipe, batch_id=batch_id, form=form
    )
