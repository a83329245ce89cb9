"""The Starlette app: every route of both planes and the admin API, in one table.

To add an endpoint, write `async def handler(request, emu) -> Response` in a module under
`emulator/routes/` and add one line to `api_routes()` (or `admin_routes()`); the `endpoint`
wrapper gives it fault injection (by its name), the strict Accept check and request counting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route

from emulator.config import EmulatorConfig
from emulator.context import Emulator
from emulator.http import endpoint
from emulator.routes import admin, control, ingest, sdk, statements

_DB = "/v2/streaming/databases/{database}/schemas/{schema}"
_DATA = "/v2/streaming/data/databases/{database}/schemas/{schema}"


def api_routes() -> list[BaseRoute]:
    """The Snowpipe Streaming endpoints (account and ingest plane share one port)."""
    return [
        Route("/v2/streaming/hostname", endpoint("hostname", control.hostname), methods=["GET"]),
        Route("/oauth/token", endpoint("token", control.token), methods=["POST"]),
        # Snowflake's SQL API on the account host: the subset that reads error tables.
        Route(
            "/api/v2/statements", endpoint("statements", statements.submit), methods=["POST"]
        ),
        Route(
            "/api/v2/statements/{handle}",
            endpoint("statement-status", statements.status),
            methods=["GET"],
        ),
        Route(
            _DB + "/pipes/{pipe}/channels/{channel}",
            endpoint("open", ingest.open_channel),
            methods=["PUT"],
        ),
        Route(
            _DB + "/pipes/{pipe}/channels/{channel}",
            endpoint("drop", ingest.drop_channel),
            methods=["DELETE"],
        ),
        Route(
            _DATA + "/pipes/{pipe}/channels/{channel}/rows",
            endpoint("append", ingest.append_rows),
            methods=["POST"],
        ),
        Route(
            _DATA + "/tables/{table}/rows",
            endpoint("append", ingest.append_table_rows),
            methods=["POST"],
        ),
        Route(
            _DB + "/pipes/{pipe}:bulk-channel-status",
            endpoint("status", ingest.bulk_channel_status),
            methods=["POST"],
        ),
        # Only Snowflake's official SDK calls these two (not in the public REST docs).
        Route(
            _DB + "/pipes/{pipe}:pipe-info", endpoint("pipe-info", sdk.pipe_info), methods=["POST"]
        ),
        Route(
            "/telemetry/send/sessionless", endpoint("telemetry", sdk.telemetry), methods=["POST"]
        ),
    ]


def admin_routes() -> list[BaseRoute]:
    """The /_emulator/ admin API."""
    a = admin.admin
    return [
        Route("/_emulator/keys", a(admin.register_key), methods=["POST"]),
        Route("/_emulator/pipes", a(admin.add_pipe), methods=["POST"]),
        Route("/_emulator/pipes", a(admin.list_pipes), methods=["GET"]),
        Route("/_emulator/stats", a(admin.stats), methods=["GET"]),
        Route("/_emulator/rows", a(admin.rows), methods=["GET"]),
        Route("/_emulator/faults", a(admin.add_fault), methods=["POST"]),
        Route("/_emulator/faults", a(admin.list_faults), methods=["GET"]),
        Route("/_emulator/faults", a(admin.clear_faults), methods=["DELETE"]),
        Route("/_emulator/expire-tokens", a(admin.expire_tokens), methods=["POST"]),
        Route("/_emulator/invalidate", a(admin.invalidate), methods=["POST"]),
        Route("/_emulator/commits", a(admin.commits), methods=["POST"]),
        Route("/_emulator/pats", a(admin.issue_pat), methods=["POST"]),
        Route("/_emulator/failover", a(admin.failover), methods=["POST"]),
    ]


def create_app(config: EmulatorConfig, emu: Emulator | None = None) -> Starlette:
    """The ASGI app; the commit pump runs for the app's lifespan."""
    emulator = emu or Emulator.from_config(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        emulator.state.start()
        try:
            yield
        finally:
            await emulator.state.stop()

    app = Starlette(routes=[*api_routes(), *admin_routes()], lifespan=lifespan)
    app.state.emulator = emulator
    return app
