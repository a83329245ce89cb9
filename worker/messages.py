"""The one message type of the ingest queue: `IngestMessage`, the `snowpipe.ingest_batch` task's
keyword arguments.

The publisher builds it (`Publisher.publish`), the task unpacks it (`ingest_batch`) and puts it
back in the queue with a higher `attempt` (`tasks._retry_later`), and a dead letter is made from
it (`DeadLetter.of`). Its fields are the task's keyword arguments, so a message published by
another producer with the same keywords is read the same way:

    batch_id, database, schema, pipe, rows       always
    attempt                                      re-publications so far (absent: 0)
    outage_since                                 epoch seconds the state store first failed this
                                                 batch (only while an outage is ridden out)
    requeue_of                                   the dead letter this message requeues (its
                                                 letter id; only from `dead-letters requeue`)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["IngestMessage"]


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

    def kwargs(self) -> dict[str, Any]:
        """The task's keyword arguments (`attempt`, `outage_since`, `requeue_of` only when set)."""
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
