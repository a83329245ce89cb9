"""Account-host endpoints: GET /v2/streaming/hostname and POST /oauth/token.

See docs/protocol.md#hostname and docs/protocol.md#token-exchange.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import Response

from emulator.auth import KeyPairIdentity, verify_keypair_jwt
from emulator.context import Emulator
from emulator.errors import bad_request, jwt_invalid
from emulator.http import bearer, read_body, request_host, request_port, text

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# The token form is tiny; anything bigger is a client bug.
_MAX_FORM_BYTES = 64 * 1024


def require_keypair_jwt(request: Request, emu: Emulator) -> KeyPairIdentity:
    """The identity behind the request's key-pair JWT or PAT (Authorization: Bearer); 401
    otherwise."""
    token = bearer(request)
    if token is None:
        raise jwt_invalid("missing Authorization: Bearer <key-pair JWT or PAT>")
    pat = emu.pats.lookup(token)
    if pat is not None:
        return pat
    return verify_keypair_jwt(token, emu.keys)


async def hostname(request: Request, emu: Emulator) -> Response:
    """The ingest host as plain text: the same host and port serve both planes.

    Without a port (what Snowflake's SDK requires) unless --hostname-with-port. Asking counts as
    rediscovering the host after a failover: tokens exchanged from now on are current.
    """
    identity = require_keypair_jwt(request, emu)
    emu.scoped.discovered(identity.subject)
    host = request_host(request)
    port = request_port(request)
    if emu.config.hostname_with_port and port is not None:
        return text(f"{host}:{port}")
    return text(host)


async def token(request: Request, emu: Emulator) -> Response:
    """Exchange a key-pair JWT for a scoped token (plain-text JWT with exp = now + ttl)."""
    body = await read_body(request, _MAX_FORM_BYTES)
    form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
    jwt_text = bearer(request) or form.get("assertion")
    if not jwt_text:
        raise jwt_invalid("no JWT: send Authorization: Bearer <jwt> or the form field assertion")
    identity = emu.pats.lookup(jwt_text) or verify_keypair_jwt(jwt_text, emu.keys)
    grant = form.get("grant_type")
    if grant != GRANT_TYPE:
        raise bad_request(
            "ERR_INVALID_GRANT_TYPE", f"grant_type must be {GRANT_TYPE}, got {grant!r}"
        )
    host = request_host(request)
    scope = (form.get("scope") or "").split()
    port = request_port(request)
    if scope and port is not None and scope[0].endswith(f":{port}"):
        # The host:port answer of --hostname-with-port, used as the scope as it came.
        scope[0] = scope[0][: -len(f":{port}")]
    if not scope or scope[0].lower() != host.lower():
        raise bad_request(
            "ERR_INVALID_SCOPE",
            f"scope must be the ingest host {host!r} (optionally followed by "
            f"' session:role:<ROLE>'), got {form.get('scope')!r}",
        )
    role = identity.role
    for extra in scope[1:]:
        if not extra.startswith("session:role:") or len(extra) == len("session:role:"):
            raise bad_request(
                "ERR_INVALID_SCOPE", f"unexpected scope item {extra!r}; only session:role:<ROLE>"
            )
        role = extra[len("session:role:") :]
    return text(emu.scoped.issue(identity.subject, host, role))
