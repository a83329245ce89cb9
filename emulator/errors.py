"""Error responses in the shapes the real service uses (docs/protocol.md#error-bodies).

Handlers raise `ApiError`; the endpoint wrapper in `emulator.http` turns it into a JSON response.
`reason` is an explanation for the person debugging a client: it goes to the emulator's log and
the `X-Emulator-Reason` header, never into the body, so bodies stay exactly as Snowflake's.
"""

from __future__ import annotations

import uuid
from typing import Any


class ApiError(Exception):
    """An HTTP error with a JSON body, raised anywhere on the request path."""

    def __init__(
        self,
        status: int,
        body: Any,
        *,
        reason: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(reason or str(body))
        self.status = status
        self.body = body
        self.reason = reason
        self.headers = headers or {}


def coded(status: int, code: str, message: str, *, reason: str = "") -> ApiError:
    """The current documented shape: `{"code": ..., "message": ...}`."""
    return ApiError(status, {"code": code, "message": message}, reason=reason)


def jwt_invalid(reason: str) -> ApiError:
    """401 `390144 JWT token is invalid. [<uuid>]`, for key-pair JWTs and scoped tokens alike."""
    return ApiError(
        401,
        {"code": "390144", "message": f"JWT token is invalid. [{uuid.uuid4()}]"},
        reason=reason,
    )


def pipe_not_found(database: str, schema: str, pipe: str) -> ApiError:
    """404 for an unknown pipe, in the older `error_code` shape observed for this error."""
    return ApiError(
        404,
        {
            "error_code": "ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED",
            "code": "ERR_PIPE_DOES_NOT_EXIST_OR_NOT_AUTHORIZED",
            "message": f"Pipe {database}.{schema}.{pipe} does not exist or not authorized.",
        },
        reason=(
            "unknown pipe: register it with --pipe DB.SCHEMA.PIPE or POST /_emulator/pipes, "
            "name it <TABLE>-STREAMING, or start with --accept-any-pipe"
        ),
    )


def channel_not_found(channel: str) -> ApiError:
    """404 for a channel that was never opened (or was dropped)."""
    return coded(
        404,
        "ERR_CHANNEL_DOES_NOT_EXIST_OR_NOT_AUTHORIZED",
        f"Channel {channel} does not exist or not authorized.",
        reason="open the channel (PUT .../channels/{name}) before appending",
    )


def bad_request(code: str, message: str) -> ApiError:
    """400 with a code naming the problem."""
    return coded(400, code, message, reason=message)


RATE_LIMIT_BODY = {"code": "390701", "message": "Request rate exceeds max. Try later."}
STALE_SEQUENCER_MESSAGE = (
    "Channel sequencer in the continuation token is stale. Please reopen the channel"
)
