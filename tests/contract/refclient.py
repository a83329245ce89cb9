"""A minimal Snowpipe Streaming client written from docs/protocol.md, for contract tests.

It deliberately does no retries and no token caching: each call does exactly one HTTP request,
so a test sees the emulator's raw answer. It shares no code with `emulator/` or `worker/`.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import orjson
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def spki_fingerprint(private_key: rsa.RSAPrivateKey) -> str:
    """`SHA256:` + base64(sha256(DER SubjectPublicKeyInfo)) of the key's public half.

    See docs/protocol.md#key-pair-jwt.
    """
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode()


def mint_jwt(
    private_key: rsa.RSAPrivateKey,
    account: str,
    user: str,
    *,
    iat: float | None = None,
    lifetime: float = 3540,
    millis: bool = False,
    fingerprint_of: rsa.RSAPrivateKey | None = None,
    upper: bool = True,
) -> str:
    """A key-pair JWT: iss = ACCOUNT.USER.SHA256:fp, sub = ACCOUNT.USER.

    See docs/protocol.md#key-pair-jwt.
    """
    iat = time.time() if iat is None else iat
    sub = f"{account}.{user}"
    if upper:
        sub = sub.upper()
    fp = spki_fingerprint(fingerprint_of or private_key)
    scale = 1000 if millis else 1
    claims = {
        "iss": f"{sub}.{fp}",
        "sub": sub,
        "iat": int(iat * scale),
        "exp": int((iat + lifetime) * scale),
    }
    return jwt.encode(claims, private_key, algorithm="RS256", headers={"typ": "JWT"})


def segment(name: str) -> str:
    """A URL path segment (identifiers like `T-STREAMING` or quoted names need encoding)."""
    return quote(name, safe="")


@dataclass
class RefClient:
    """One account + user + key against an account URL; the ingest host from the hostname call."""

    url: str
    account: str
    user: str
    private_key: rsa.RSAPrivateKey
    verify: Any = True
    http: httpx.Client = field(init=False)
    ingest_url: str | None = None
    scoped_token: str | None = None

    def __post_init__(self) -> None:
        self.http = httpx.Client(timeout=10.0, verify=self.verify)

    def close(self) -> None:
        """Close the HTTP client."""
        self.http.close()

    def jwt(self, **kw: Any) -> str:
        """A fresh key-pair JWT for this client's user."""
        return mint_jwt(self.private_key, self.account, self.user, **kw)

    def _jwt_headers(self, token: str | None = None) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {token or self.jwt()}",
            "X-Snowflake-Authorization-Token-Type": "KEYPAIR_JWT",
            "Accept": "application/json",
        }

    def _scoped_headers(self) -> dict[str, str]:
        assert self.scoped_token, "call exchange() first"
        return {"Authorization": f"Bearer {self.scoped_token}", "Accept": "application/json"}

    # -- control plane -------------------------------------------------------------------------

    def get_hostname(self, token: str | None = None) -> httpx.Response:
        """GET /v2/streaming/hostname (docs/protocol.md#hostname)."""
        return self.http.get(f"{self.url}/v2/streaming/hostname", headers=self._jwt_headers(token))

    def request_token(self, token: str | None = None, scope: str | None = None) -> httpx.Response:
        """POST /oauth/token with the JWT as Bearer (docs/protocol.md#token-exchange)."""
        form = {"grant_type": GRANT_TYPE, "scope": scope or self.ingest_host()}
        headers = {"Authorization": f"Bearer {token or self.jwt()}", "Accept": "application/json"}
        return self.http.post(f"{self.url}/oauth/token", data=form, headers=headers)

    def ingest_host(self) -> str:
        """The ingest host: plain text from the hostname call, `_` replaced by `-`.

        See docs/protocol.md#hosts.
        """
        response = self.get_hostname()
        assert response.status_code == 200, response.text
        return response.text.strip().replace("_", "-")

    def connect(self) -> RefClient:
        """hostname → token: afterwards ingest calls go to scheme://<host>:<account port>."""
        host = self.ingest_host()
        scheme, rest = self.url.split("://", 1)
        port = rest.rsplit(":", 1)[1]
        self.ingest_url = f"{scheme}://{host}:{port}"
        response = self.request_token(scope=host)
        assert response.status_code == 200, response.text
        self.scoped_token = response.text.strip()
        return self

    # -- ingest plane --------------------------------------------------------------------------

    def _pipe_path(self, db: str, schema: str, pipe: str) -> str:
        return (
            f"/v2/streaming/databases/{segment(db)}/schemas/{segment(schema)}"
            f"/pipes/{segment(pipe)}"
        )

    def open_channel(
        self, db: str, schema: str, pipe: str, channel: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        """PUT .../channels/{channel} (docs/protocol.md#open-channel)."""
        return self.http.put(
            f"{self.ingest_url}{self._pipe_path(db, schema, pipe)}/channels/{segment(channel)}",
            json=body or {},
            headers=self._scoped_headers(),
        )

    def open(self, db: str, schema: str, pipe: str, channel: str, **body: Any) -> dict[str, Any]:
        """Open and return the JSON body, asserting 200."""
        response = self.open_channel(db, schema, pipe, channel, body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def append(
        self,
        db: str,
        schema: str,
        pipe: str,
        channel: str,
        rows: list[dict[str, Any]] | bytes,
        *,
        continuation_token: str | None,
        start: str | None = None,
        end: str | None = None,
        offset_token: str | None = None,
        encoding: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """POST .../channels/{channel}/rows with NDJSON, optionally gzip/zstd.

        See docs/protocol.md#append-rows.
        """
        body = rows if isinstance(rows, bytes) else b"".join(
            orjson.dumps(r) + b"\n" for r in rows
        )
        h = {**self._scoped_headers(), "Content-Type": "application/x-ndjson"}
        if encoding == "gzip":
            body = gzip.compress(body)
            h["Content-Encoding"] = "gzip"
        elif encoding == "zstd":
            body = zstandard.ZstdCompressor().compress(body)
            h["Content-Encoding"] = "zstd"
        h.update(headers or {})
        params: dict[str, str] = {}
        if start is not None:
            params["startOffsetToken"] = start
        if end is not None:
            params["endOffsetToken"] = end
        if offset_token is not None:
            params["offsetToken"] = offset_token
        if continuation_token is not None:
            params["continuationToken"] = continuation_token
        db_s, sc_s, pipe_s = segment(db), segment(schema), segment(pipe)
        url = (
            f"{self.ingest_url}/v2/streaming/data/databases/{db_s}/schemas/{sc_s}"
            f"/pipes/{pipe_s}/channels/{segment(channel)}/rows"
        )
        return self.http.post(url, params=params, content=body, headers=h)

    def status(
        self, db: str, schema: str, pipe: str, names: list[str], *, token: str | None = None
    ) -> httpx.Response:
        """POST .../pipes/{pipe}:bulk-channel-status (docs/protocol.md#bulk-channel-status)."""
        headers = self._scoped_headers()
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.post(
            f"{self.ingest_url}{self._pipe_path(db, schema, pipe)}:bulk-channel-status",
            json={"channel_names": names},
            headers=headers,
        )

    def drop(
        self, db: str, schema: str, pipe: str, channel: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        """DELETE .../channels/{channel} (docs/protocol.md#drop-channel)."""
        return self.http.request(
            "DELETE",
            f"{self.ingest_url}{self._pipe_path(db, schema, pipe)}/channels/{segment(channel)}",
            content=orjson.dumps(body) if body is not None else None,
            headers={**self._scoped_headers(), "Content-Type": "application/json"},
        )

    # -- SQL API (account host) ----------------------------------------------------------------

    def sql_headers(self, token: str | None = None) -> dict[str, str]:
        """The SQL API's headers: the key-pair JWT as Bearer, its type, JSON both ways."""
        return {
            "Authorization": f"Bearer {token or self.jwt()}",
            "X-Snowflake-Authorization-Token-Type": "KEYPAIR_JWT",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "refclient/1.0",
        }

    def statement(
        self,
        statement: str | None,
        *,
        bindings: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        **body: Any,
    ) -> httpx.Response:
        """POST /api/v2/statements with {"statement", "bindings", ...body} (database, schema,
        warehouse, role, timeout, parameters)."""
        payload: dict[str, Any] = {"timeout": 60, **body}
        if statement is not None:
            payload["statement"] = statement
        if bindings is not None:
            payload["bindings"] = bindings
        return self.http.post(
            f"{self.url}/api/v2/statements",
            params=params or {},
            content=orjson.dumps(payload),
            headers={**self.sql_headers(), **(headers or {})},
        )

    def query(self, statement: str, **kw: Any) -> dict[str, Any]:
        """A statement that must succeed (200): its ResultSet."""
        response = self.statement(statement, **kw)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def statement_status(self, url_or_handle: str, **params: str) -> httpx.Response:
        """GET /api/v2/statements/{handle} (or a statementStatusUrl as given)."""
        path = url_or_handle if url_or_handle.startswith("/") else (
            f"/api/v2/statements/{url_or_handle}"
        )
        return self.http.get(f"{self.url}{path}", params=params, headers=self.sql_headers())

    def wait_committed(
        self, db: str, schema: str, pipe: str, channel: str, offset: str, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Poll bulk status until the channel's committed offset token equals `offset`."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            response = self.status(db, schema, pipe, [channel])
            assert response.status_code == 200, response.text
            last = response.json()["channel_statuses"].get(channel, {})
            if last.get("last_committed_offset_token") == offset:
                return last
            time.sleep(0.05)
        raise AssertionError(f"offset {offset} not committed within {timeout} s; last: {last}")
