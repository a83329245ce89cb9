"""Endpoints only Snowflake's official SDK calls: `:pipe-info` and sessionless telemetry.

The public REST API does not document these; the shapes come from running the `snowpipe-streaming`
wheel against a loopback server (docs/protocol.md#snowflakes-sdk). The SDK deserializes
them strictly: a missing field, a number outside a u8/u16 range, or a stage location without cloud
credentials makes the client fail at start, so every field below is present even when the emulator
never uses it (no cloud stage is ever contacted: rows travel inline, in the `/rows` POST).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from emulator.context import Emulator
from emulator.http import JSONResponse, json_body, read_body
from emulator.routes.control import require_keypair_jwt
from emulator.routes.ingest import require_scoped_token

# The SDK flushes a channel's buffer every `max_client_lag_seconds`; one second keeps each flush
# small (rowset mode, well under the ~1.8 MB where it switches to uploading files to a cloud stage
# that does not exist here) and tests quick.
SDK_MAX_CLIENT_LAG_SECONDS = 1
# Rowset-mode thresholds; u16 fields in the SDK, so at most 65535.
SDK_ROWSET_FLUSH_THRESHOLD_KB = 1024
SDK_MAX_BUFFERED_KB_FOR_ROWSET_MODE = 4096
SDK_ROWSET_THRESHOLD_LOOKBACK_SECONDS = 10
# A u8 field (0.5 was rejected), so a whole number.
SDK_ROWSET_THRESHOLD_EWMA_WEIGHT = 50
SDK_TARGET_FILE_SIZE_COMPRESSED_MB = 16
# The SDK slows appends above these watermarks; a local test machine under load must not trip them.
SDK_CPU_THROTTLE_HIGH_WATERMARK_PERCENT = 100
SDK_CPU_THROTTLE_LOW_WATERMARK_PERCENT = 95
SDK_MEM_THROTTLE_HIGH_WATERMARK_PERCENT = 95
SDK_MEM_THROTTLE_LOW_WATERMARK_PERCENT = 90
# The SDK refreshes pipe info before the stage credentials expire; an hour, as the service does.
STAGE_CREDENTIALS_TTL_SECONDS = 3600
# pipe-info and telemetry bodies are small JSON documents.
_MAX_BODY_BYTES = 1024 * 1024
# Dummy cloud stage: the SDK insists on complete S3 credentials even though, in rowset mode, it
# never uploads. These values are not secrets and reach no cloud.
STAGE_BUCKET = "snowpipe-emulator-stage"
STAGE_REGION = "us-west-2"
STAGE_DUMMY_CREDS = {
    "AWS_KEY_ID": "EMULATOR-DUMMY-KEY-ID",
    "AWS_SECRET_KEY": "EMULATOR-DUMMY-SECRET",
    "AWS_TOKEN": "EMULATOR-DUMMY-TOKEN",
}


def sdk_parameters() -> dict[str, int]:
    """The server-pushed tuning parameters the SDK requires in each stage location."""
    return {
        "max_client_lag_seconds": SDK_MAX_CLIENT_LAG_SECONDS,
        "rowset_flush_threshold_kb": SDK_ROWSET_FLUSH_THRESHOLD_KB,
        "max_buffered_kb_for_rowset_mode": SDK_MAX_BUFFERED_KB_FOR_ROWSET_MODE,
        "rowset_threshold_lookback_seconds": SDK_ROWSET_THRESHOLD_LOOKBACK_SECONDS,
        "rowset_threshold_ewma_weight": SDK_ROWSET_THRESHOLD_EWMA_WEIGHT,
        "target_file_size_compressed_mb": SDK_TARGET_FILE_SIZE_COMPRESSED_MB,
        "cpu_throttle_high_watermark_percent": SDK_CPU_THROTTLE_HIGH_WATERMARK_PERCENT,
        "cpu_throttle_low_watermark_percent": SDK_CPU_THROTTLE_LOW_WATERMARK_PERCENT,
        "mem_throttle_high_watermark_percent": SDK_MEM_THROTTLE_HIGH_WATERMARK_PERCENT,
        "mem_throttle_low_watermark_percent": SDK_MEM_THROTTLE_LOW_WATERMARK_PERCENT,
    }


def _stage_location(prefix: str, now_ms: int) -> dict[str, Any]:
    return {
        "expiry_time_ms": now_ms + STAGE_CREDENTIALS_TTL_SECONDS * 1000,
        "location_type": "S3",
        "location": f"{STAGE_BUCKET}/{prefix}",
        "region": STAGE_REGION,
        "use_s3_regional_url": False,
        "storage_account": None,
        "storage_endpoint": None,
        "bucket_name": STAGE_BUCKET,
        "path_prefix": prefix,
        "creds": dict(STAGE_DUMMY_CREDS),
        "parameters": sdk_parameters(),
    }


def _pipe_key(database: str, schema: str, pipe: str) -> str:
    # Stable per pipe (so a refresh returns the same key), 16 bytes for AES-128; the SDK would
    # only use it to encrypt files for a cloud stage, which never happens here.
    digest = hashlib.sha256(f"{database}.{schema}.{pipe}".encode()).digest()
    return base64.b64encode(digest[:16]).decode("ascii")


def pipe_info_body(
    database: str, schema: str, pipe: str, *, now_ms: int | None = None
) -> dict[str, Any]:
    """The `:pipe-info` response for one pipe: stage locations, encryption info and parameters."""
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    base = f"{database}/{schema}/{pipe}".lower()
    return {
        "rowset_stage_location": _stage_location(f"{base}/rowset/", now_ms),
        "durable_stage_location": _stage_location(f"{base}/durable/", now_ms),
        "encryption_info": {
            "pipe_key": _pipe_key(database, schema, pipe),
            "pipe_key_id": 1,
            "diversifier": f"{database}.{schema}.{pipe}",
        },
        "parameter_overrides": {},
    }


def telemetry_body(raw: bytes) -> tuple[int, dict[str, Any]]:
    """The status and JSON answer to `POST /telemetry/send/sessionless` for the given body.

    The SDK posts client metrics every few seconds and requires `data` in the answer. The emulator
    keeps nothing: it only checks that the body is the documented `{"logs": [...]}` envelope, so a
    client sending garbage learns about it.
    """
    try:
        body = json.loads(raw or b"null")
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("logs"), list):
        return 400, {
            "success": False,
            "code": "INVALID_TELEMETRY",
            "message": 'Telemetry body must be a JSON object {"logs": [...]}.',
            "data": None,
        }
    return 200, {"success": True, "data": f"accepted {len(body['logs'])} log(s)"}


async def pipe_info(request: Request, emu: Emulator) -> Response:
    """POST .../pipes/{pipe}:pipe-info: stage locations, encryption info and SDK parameters."""
    require_scoped_token(request, emu)
    # The SDK sends {"generate_new_token": true, "encryption_version": "AES-CTR-128.1"}; neither
    # changes anything here (no file is ever encrypted), but the body must be a JSON object.
    await json_body(request, _MAX_BODY_BYTES)
    p = request.path_params
    database, schema, pipe = emu.state.require_pipe(p["database"], p["schema"], p["pipe"])
    return JSONResponse(pipe_info_body(database, schema, pipe))


async def telemetry(request: Request, emu: Emulator) -> Response:
    """POST /telemetry/send/sessionless: the SDK's metrics accepted (key-pair JWT required)."""
    require_keypair_jwt(request, emu)
    status, body = telemetry_body(await read_body(request, _MAX_BODY_BYTES))
    return JSONResponse(body, status_code=status)
