"""What the Snowpipe Streaming endpoints answer, as frozen dataclasses, and the JSON coercion.

Snowflake's answers vary in small ways (a counter as a string, `rows_errors` in the bulk status
docs, `rows_error_count` elsewhere, fields missing): `from_json` reads every observed shape and
never raises on a missing or odd field (docs/protocol.md#bulk-channel-status).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ChannelStatus", "OffsetTokenForm", "OpenChannelResult"]

# How an append names its offsets: startOffsetToken/endOffsetToken, or the older offsetToken.
OffsetTokenForm = Literal["start_end", "legacy"]


@dataclass(frozen=True, slots=True)
class ChannelStatus:
    """A channel's state as Snowflake reports it (open response or bulk status)."""

    database_name: str
    schema_name: str
    pipe_name: str
    channel_name: str
    channel_status_code: str
    last_committed_offset_token: str | None
    rows_inserted: int
    rows_parsed: int
    rows_error_count: int
    last_error_offset_upper_bound: str | None
    last_error_message: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, channel: str = "") -> ChannelStatus:
        """Parse a status object; `rows_errors` (bulk status docs) and `rows_error_count` both
        count errors (docs/protocol.md#bulk-channel-status); missing counters read as 0."""
        errors = data.get("rows_error_count")
        if errors is None:
            errors = data.get("rows_errors")
        return cls(
            database_name=_str(data.get("database_name")) or "",
            schema_name=_str(data.get("schema_name")) or "",
            pipe_name=_str(data.get("pipe_name")) or "",
            channel_name=_str(data.get("channel_name")) or channel,
            channel_status_code=_str(data.get("channel_status_code")) or "",
            last_committed_offset_token=_str(data.get("last_committed_offset_token")),
            rows_inserted=_int(data.get("rows_inserted")),
            rows_parsed=_int(data.get("rows_parsed")),
            rows_error_count=_int(errors),
            last_error_offset_upper_bound=_str(data.get("last_error_offset_upper_bound")),
            last_error_message=_str(data.get("last_error_message")),
        )


@dataclass(frozen=True, slots=True)
class OpenChannelResult:
    """What opening a channel gives: the first continuation token and the channel's status."""

    continuation_token: str
    status: ChannelStatus


def _str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return 0
