"""Error tables: the rows a table with error logging rejected, in Snowflake's columns.

A table with `ERROR_LOGGING = TRUE` records every row Snowpipe Streaming rejects in its error
table, read with `SELECT ... FROM ERROR_TABLE(<table>)` (docs/emulator.md#error-tables). Each row
has the columns `timestamp`, `query_id`, `error_code`, `error_metadata` and `error_data`; for
streaming, `error_metadata` carries `service: "snowpipe_streaming"` and `details` (pipe, channel,
the append request's start and end offset tokens, the payload's content type) and `error_data`
is `{"$1": <the row's text as sent>}`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

from emulator.ndjson import RejectedRow
from emulator.storage import ErrorRow, TableKey

SERVICE = "snowpipe_streaming"
# Snowflake truncates payloads over 128 MB; an append body is at most a few MB here.
MAX_ERROR_DATA_BYTES = 128 * 1024 * 1024


def payload(row: RejectedRow) -> str:
    """The `$1` text of a rejected row: the row as sent, base64 when it is not UTF-8."""
    raw = row.raw[:MAX_ERROR_DATA_BYTES]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii")


def error_rows(
    table: TableKey,
    rejected: Iterable[RejectedRow],
    *,
    pipe: str,
    channel: str,
    start_offset_token: str | None,
    end_offset_token: str | None,
    timestamp_ns: int,
    query_id: str,
) -> list[ErrorRow]:
    """The error-table rows for the rejected rows of one append request."""
    out = []
    for row in rejected:
        metadata: dict[str, object] = {
            "error_code": row.code,
            "error_message": row.message,
            "error_source": row.source,
            "sql_state": row.sql_state,
            "service": SERVICE,
            "details": {
                "pipe_name": pipe,
                "channel_name": channel,
                "offset_token_lower_bound": start_offset_token,
                "offset_token_upper_bound": end_offset_token,
                "error_data_truncated": len(row.raw) > MAX_ERROR_DATA_BYTES,
                "error_data_content_type": row.content_type,
            },
        }
        out.append(
            ErrorRow(
                *table, timestamp_ns, query_id, row.code, metadata, {"$1": payload(row)}
            )
        )
    return out
