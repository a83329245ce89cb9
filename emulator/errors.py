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
    """The documented shape `{"code", "message"}`, plus `error_code` (see `with_error_code`)."""
    return ApiError(status, {"code": code, "message": message}, reason=reason)


def with_error_code(body: Any) -> Any:
    """`body` with `error_code` next to `code`: clients of the older revision read that key.

    Every error body the emulator builds goes through here; bodies without a code (and bodies a
    fault rule gives explicitly) are sent as they are.
    """
    if isinstance(body, dict) and "code" in body and "error_code" not in body:
        return {"code": body["code"], "error_code": body["code"], **body}
    return body


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


CHANNEL_NOT_FOUND_CODE = "ERR_CHANNEL_DOES_NOT_EXIST_OR_IS_NOT_AUTHORIZED"
LEGACY_CHANNEL_NOT_FOUND_CODE = "ERR_CHANNEL_DOES_NOT_EXIST_OR_NOT_AUTHORIZED"


def channel_not_found(channel: str, *, legacy: bool = False) -> ApiError:
    """A channel that was never opened (or was dropped).

    As the live service was recorded answering: 400, the `_IS_` spelling, an empty message.
    `legacy` (--legacy-channel-not-found) gives the emulator's former 404 with the SDK's spelling.
    """
    reason = f"channel {channel!r} is not open: open it (PUT .../channels/{{name}}) first"
    if legacy:
        return coded(
            404, LEGACY_CHANNEL_NOT_FOUND_CODE,
            f"Channel {channel} does not exist or not authorized.", reason=reason,
        )
    return coded(400, CHANNEL_NOT_FOUND_CODE, "", reason=reason)


def pipe_failed_over(pipe: str) -> ApiError:
    """410 after a pipe failed over (the code is the emulator's own: the live one is unknown)."""
    return coded(
        410,
        "ERR_PIPE_FAILED_OVER",
        f"Pipe {pipe} has moved to another ingest host.",
        reason=(
            "the pipe failed over (POST /_emulator/failover): call GET /v2/streaming/hostname "
            "again, exchange a new scoped token, then reopen the channel"
        ),
    )


def bad_request(code: str, message: str) -> ApiError:
    """400 with a code naming the problem."""
    return coded(400, code, message, reason=message)


RATE_LIMIT_BODY = {"code": "390701", "message": "Request rate exceeds max. Try later."}
# The same code for the byte-rate limit (the live service answers both limits with 390701).
BYTE_RATE_LIMIT_BODY = {"code": "390701", "message": "Request rate exceeds max. Try later."}
STALE_SEQUENCER_MESSAGE = (
    "Channel sequencer in the continuation token is stale. Please reopen the channel"
)
