"""The one message type of the ingest queue: `IngestMessage`, the `snowpipe.ingest_batch` task's
keyword arguments.

The publisher builds it (`Publisher.publish`), the worker reads it from a message
(`IngestMessage.from_kwargs`, in the consumer before Celery builds a request, and again in the
task), the task puts it back in the queue with a higher `attempt` (`tasks._retry_later`), and a
dead letter is made from it (`DeadLetter.of`). Its fields are the task's keyword arguments, so a
message published by another producer with the same keywords is read the same way
(docs/message-format.md):

    batch_id, database, schema, pipe             always
    rows  or  ndjson (+ row_count)               the rows: an array of JSON objects, or one
                                                 string of NDJSON lines (one object per line;
                                                 `row_count`, optional, the number of lines)
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

__all__ = [
    "NDJSON_FIELDS",
    "OPTIONAL_FIELDS",
    "REQUIRED_FIELDS",
    "IngestMessage",
    "check_batch_id",
]

REQUIRED_FIELDS = ("batch_id", "database", "schema", "pipe", "rows")
# `ndjson` (with `row_count`) stands in for `rows`: exactly one of the two.
NDJSON_FIELDS = ("ndjson", "row_count")
OPTIONAL_FIELDS = ("attempt", "outage_since", "requeue_of")
_NAME_FIELDS = ("batch_id", "database", "schema", "pipe")
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
    # The NDJSON form: the rows as one string of lines (`rows` is then empty), and the number
    # of lines the producer said it holds (None: not said). Checked line by line by the task
    # (worker/batchbytes.py), never turned back into objects on the way to Snowflake.
    ndjson: str | None = None
    row_count: int | None = None

    @property
    def form(self) -> str:
        """How the message carries its rows: "rows" or "ndjson"."""
        return "rows" if self.ndjson is None else "ndjson"

    @property
    def size(self) -> int:
        """How many rows the batch holds (for the ndjson form: its newlines, a last line
        without one counted too; exact once the task checked the lines)."""
        if self.ndjson is None:
            return len(self.rows)
        text = self.ndjson
        return text.count("\n") + (1 if text and not text.endswith("\n") else 0)

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
        has_ndjson = "ndjson" in kwargs
        required = _NAME_FIELDS if has_ndjson else REQUIRED_FIELDS
        missing = [name for name in required if name not in kwargs]
        if missing:
            raise MalformedMessageError(
                f"missing keyword argument(s) {', '.join(missing)}: every batch has batch_id, "
                f"database, schema, pipe and rows (or ndjson) ({_FORMAT})"
            )
        known = REQUIRED_FIELDS + NDJSON_FIELDS + OPTIONAL_FIELDS
        unknown = sorted(str(k) for k in kwargs if k not in known)
        if unknown:
            raise MalformedMessageError(
                f"unknown keyword argument(s) {', '.join(unknown)}: ingest_batch takes "
                f"{', '.join(known)} ({_FORMAT})"
            )
        if has_ndjson and "rows" in kwargs:
            raise MalformedMessageError(
                f"the batch has both rows and ndjson: send its rows one way, either an array "
                f"of objects (rows) or NDJSON lines (ndjson) ({_FORMAT})"
            )
        if "row_count" in kwargs and not has_ndjson:
            raise MalformedMessageError(
                f"row_count goes with ndjson only: leave it out of a batch with rows ({_FORMAT})"
            )
        batch_id = check_batch_id(kwargs["batch_id"])
        database, schema, pipe = canonical_target(
            kwargs["database"], kwargs["schema"], kwargs["pipe"]
        )
        ndjson: str | None = None
        row_count: int | None = None
        if has_ndjson:
            rows: Any = []
            ndjson, row_count = _ndjson_fields(kwargs["ndjson"], kwargs.get("row_count"))
        else:
            rows = kwargs["rows"]
            if not isinstance(rows, list):
                raise MalformedMessageError(
                    f"rows must be an array of row objects, got {_type_name(rows)}: wrap a "
                    "single row in an array"
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
            ndjson,
            row_count,
        )

    def kwargs(self) -> dict[str, Any]:
        """The task's keyword arguments (`rows`, or `ndjson` with `row_count` when set;
        `attempt`, `outage_since` and `requeue_of` only when set)."""
        kwargs: dict[str, Any] = {
            "batch_id": self.batch_id,
            "database": self.database,
            "schema": self.schema,
            "pipe": self.pipe,
        }
        if self.ndjson is None:
            kwargs["rows"] = self.rows
        else:
            kwargs["ndjson"] = self.ndjson
            if self.row_count is not None:
                kwargs["row_count"] = self.row_count
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


def _ndjson_fields(ndjson: object, row_count: object) -> tuple[str, int | None]:
    """`ndjson` and `row_count` of a message in the NDJSON form, checked for type only (the
    lines are checked by the task: worker/batchbytes.py)."""
    if not isinstance(ndjson, str):
        raise MalformedMessageError(
            f"ndjson must be a string of NDJSON lines, got {_type_name(ndjson)}: send the rows "
            f"as one string, one JSON object per line ({_FORMAT})"
        )
    if not ndjson:
        raise MalformedMessageError(
            f"ndjson is empty: the batch needs at least one row, one JSON object per line "
            f"({_FORMAT})"
        )
    if row_count is not None and (
        not isinstance(row_count, int) or isinstance(row_count, bool) or row_count < 1
    ):
        raise MalformedMessageError(
            f"row_count must be the number of lines in ndjson (a whole number >= 1) or null, "
            f"got {row_count!r}: send the count or leave it out"
        )
    return ndjson, row_count
