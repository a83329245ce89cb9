"""The one message type of the ingest queue: `IngestMessage`, the `snowpipe.ingest_batch` task's
keyword arguments.

The publisher builds it (`Publisher.publish`), the worker reads it from a message
(`IngestMessage.from_kwargs`, in the consumer before Celery builds a request, and again in the
task), the task puts it back in the queue with a higher `attempt` (`tasks._retry_later`), and a
dead letter is made from it (`DeadLetter.of`). Its fields are the task's keyword arguments, so a
message published by another producer with the same keywords is read the same way
(docs/message-format.md):

    batch_id, database, schema, pipe, rows       always
    attempt                                      re-publications so far (absent: 0)
    outage_since                                 epoch seconds the state store first failed this
                                                 batch (only while an outage is ridden out)
    requeue_of                                   the dead letter this message requeues (its
                                                 letter id; only from `dead-letters requeue`)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker.errors import MalformedMessageError
from worker.identifiers import canonical_target

__all__ = ["OPTIONAL_FIELDS", "REQUIRED_FIELDS", "IngestMessage", "check_batch_id"]

REQUIRED_FIELDS = ("batch_id", "database", "schema", "pipe", "rows")
OPTIONAL_FIELDS = ("attempt", "outage_since", "requeue_of")
_FORMAT = "see docs/message-format.md"
_BAD_ID_CHAR = re.compile(r"[\x00-\x20\x7f]")


def check_batch_id(value: object) -> str:
    """`value` if it is a usable batch id: a non-empty string without spaces or control
    characters (MalformedMessageError otherwise; an InvalidBatchError)."""
    if not isinstance(value, str):
        raise MalformedMessageError(
            f"batch_id must be a string, got {type(value).__name__}: send the batch's id as text"
        )
    if not value or _BAD_ID_CHAR.search(value) is not None:
        raise MalformedMessageError(
            f"batch_id {value!r} must be non-empty, without spaces or control characters"
        )
    return value


def _type_name(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    if value is None:
        return "null"
    return "a number" if isinstance(value, int | float) else type(value).__name__


@dataclass(frozen=True, slots=True)
class IngestMessage:
    """The arguments of one ingest_batch message (see the module docstring)."""

    batch_id: str
    database: str
    schema: str
    pipe: str
    rows: list[dict[str, Any]]
    attempt: int = 0
    outage_since: float | None = None
    requeue_of: str | None = None

    @classmethod
    def from_kwargs(cls, kwargs: object) -> IngestMessage:
        """The message whose keyword arguments are `kwargs`, with its names in their canonical
        spelling (worker/identifiers.py); MalformedMessageError or InvalidNameError (both
        InvalidBatchError) naming what is wrong and the fix.

        Rows are only checked to be an array here: each row is checked when it is encoded
        (the row contract, worker/snowpipe/encoding.py)."""
        if not isinstance(kwargs, Mapping):
            raise MalformedMessageError(
                f"the keyword arguments are {_type_name(kwargs)}, not an object of "
                f"batch_id, database, schema, pipe and rows ({_FORMAT})"
            )
        missing = [name for name in REQUIRED_FIELDS if name not in kwargs]
        if missing:
            raise MalformedMessageError(
                f"missing keyword argument(s) {', '.join(missing)}: every batch has batch_id, "
                f"database, schema, pipe and rows ({_FORMAT})"
            )
        unknown = sorted(str(k) for k in kwargs if k not in REQUIRED_FIELDS + OPTIONAL_FIELDS)
        if unknown:
            raise MalformedMessageError(
                f"unknown keyword argument(s) {', '.join(unknown)}: ingest_batch takes "
                f"{', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)} ({_FORMAT})"
            )
        batch_id = check_batch_id(kwargs["batch_id"])
        database, schema, pipe = canonical_target(
            kwargs["database"], kwargs["schema"], kwargs["pipe"]
        )
        rows = kwargs["rows"]
        if not isinstance(rows, list):
            raise MalformedMessageError(
                f"rows must be an array of row objects, got {_type_name(rows)}: wrap a single "
                "row in an array"
            )
        attempt = kwargs.get("attempt", 0)
        if attempt is None:
            attempt = 0
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
            raise MalformedMessageError(
                f"attempt must be a whole number >= 0, got {attempt!r}: leave it out (0)"
            )
        since = kwargs.get("outage_since")
        if since is not None and (
            not isinstance(since, int | float)
            or isinstance(since, bool)
            or not math.isfinite(since)
        ):
            raise MalformedMessageError(
                f"outage_since must be epoch seconds or null, got {since!r}: leave it out"
            )
        requeue_of = kwargs.get("requeue_of")
        if requeue_of is not None and (not isinstance(requeue_of, str) or not requeue_of):
            raise MalformedMessageError(
                f"requeue_of must be a dead letter's id or null, got {requeue_of!r}: leave it out"
            )
        return cls(
            batch_id,
            database,
            schema,
            pipe,
            rows,
            attempt,
            float(since) if since is not None else None,
            requeue_of,
        )

    def kwargs(self) -> dict[str, Any]:
        """The task's keyword arguments (`attempt`, `outage_since` and `requeue_of` only when
        set)."""
        kwargs: dict[str, Any] = {
            "batch_id": self.batch_id,
            "database": self.database,
            "schema": self.schema,
            "pipe": self.pipe,
            "rows": self.rows,
        }
        if self.attempt:
            kwargs["attempt"] = self.attempt
        if self.outage_since is not None:
            kwargs["outage_since"] = self.outage_since
        if self.requeue_of is not None:
            kwargs["requeue_of"] = self.requeue_of
        return kwargs

    def again(self, *, attempt: int, outage_since: float | None = None) -> IngestMessage:
        """This batch as re-published: attempt `attempt`, outage start `outage_since`."""
        return dataclasses.replace(self, attempt=attempt, outage_since=outage_since)
