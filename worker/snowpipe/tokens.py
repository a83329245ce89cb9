"""The two tokens of a process, how each is fetched, and what to say when Snowflake refuses them.

    jwt     key-pair JWT, minted locally (KeyPairJWT), for the account host
    scoped  scoped token for the ingest host: JWT -> GET /v2/streaming/hostname (once, cached)
            -> POST /oauth/token (scope = ingest host [+ " session:role:R"]); its lifetime comes
            from the scoped token's own `exp` (read without verification; 55 min if absent)

`SnowflakeTokens` owns both `TokenGuard`s and the ingest host. The HTTP calls themselves belong
to the client (one `httpx.Client` per process, `worker.snowpipe.http`); it hands them in as two
functions, so this module stays free of transport details. Parsing of the hostname answer (plain
text, JSON string or JSON object, with `_` turned into `-`, docs/protocol.md#hostname), the
ingest base URL (the account URL's scheme and port) and the hints of a refused token
(`SnowflakeTokens.rejected`: which key, account and user were sent) live here too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import orjson

from worker.auth.guard import Adopt, Publish, Token, TokenGuard
from worker.auth.keypair import KeyPairJWT, normalize_account, token_from_jwt
from worker.errors import AuthError, InvalidJWTError, ProtocolError, SnowpipeError

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = [
    "GRANT_TYPE",
    "SCOPED_TOKEN_FALLBACK_SECONDS",
    "SnowflakeTokens",
    "ingest_base_url",
    "parse_hostname",
    "token_scope",
]

GRANT_TYPE: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# The scoped token's lifetime is undocumented; clients that cannot read `exp` assume 55 minutes
# (docs/protocol.md#scoped-token).
SCOPED_TOKEN_FALLBACK_SECONDS: Final = 55 * 60
# Differences below this are clock noise, not the whole-second truncation of `iat`.
_LIFETIME_SLACK: Final = 0.01
# A host name never contains these; their presence means the answer was not a host name.
_NOT_HOST_CHARS: Final = frozenset(" \t\r\n/?#@{}[]\"'<>\\")


def parse_hostname(body: bytes) -> str:
    """The ingest host from the hostname endpoint's answer, `_` replaced by `-`.

    Accepts plain text (what the service sends), a JSON string and `{"hostname": ...}` (what
    the docs show). Raises `ProtocolError` when the answer holds no usable host name.
    """
    text = body.decode("utf-8", errors="replace").strip()
    value: Any = text
    if text[:1] in ('"', "{"):
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            value = text.strip('"')
    if isinstance(value, dict):
        value = value.get("hostname")
    if not isinstance(value, str):
        raise ProtocolError(
            f"the hostname endpoint answered {text[:120]!r}, which holds no host name",
            op="hostname",
        )
    host = value.strip().strip('"').strip()
    if "://" in host:  # tolerate a full URL
        host = urlsplit(host).netloc
    host = host.rstrip("/")
    if not host or any(c in _NOT_HOST_CHARS for c in host):
        raise ProtocolError(
            f"the hostname endpoint answered {text[:120]!r}, which is not a host name",
            op="hostname",
        )
    # Snowflake: an account name with `_` gives a host that must use `-` for every later call
    # (docs/protocol.md#hosts).
    return host.replace("_", "-")


def ingest_base_url(account_url: str, host: str) -> str:
    """`scheme://host[:port]` for the ingest host: the account URL's scheme, and its port unless
    the host names one (the official SDK does the same, docs/protocol.md#hosts)."""
    parts = urlsplit(account_url)
    if _has_port(host):
        return f"{parts.scheme}://{host}"
    if parts.port is not None:
        return f"{parts.scheme}://{host}:{parts.port}"
    return f"{parts.scheme}://{host}"


def _has_port(host: str) -> bool:
    if host.startswith("["):  # [v6]:port
        return "]:" in host
    return host.count(":") == 1 and host.rsplit(":", 1)[1].isdigit()


def token_scope(host: str, role: str | None) -> str:
    """The `scope` form value for the token exchange: the ingest host, then the role if any."""
    return f"{host} session:role:{role}" if role else host


class SnowflakeTokens:
    """The key-pair JWT guard and the scoped-token guard of one process, and the ingest host.

    `fetch_hostname()` and `exchange(scope)` are the client's HTTP calls: each sends with a JWT
    from `jwt` (through its `GuardAuth`, which handles a 401 by resending once). The
    adopt/publish hooks apply to the scoped token, the one worth sharing between processes (the
    JWT is minted locally in ~0.3 ms).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        minter: KeyPairJWT,
        fetch_hostname: Callable[[], str],
        exchange: Callable[[str], str],
        adopt: Adopt | None = None,
        publish: Publish | None = None,
        **guard_overrides: Any,
    ) -> None:
        self.minter = minter
        self.role = settings.role
        self._settings = settings
        self._fetch_hostname = fetch_hostname
        self._exchange = exchange
        self._host: str | None = None
        self._host_lock = threading.Lock()
        self.jwt = TokenGuard.from_settings(settings, self._mint_jwt, name="jwt", **guard_overrides)
        self.scoped = TokenGuard.from_settings(
            settings,
            self._fetch_scoped,
            name="scoped",
            adopt=adopt,
            publish=publish,
            **guard_overrides,
        )

    @property
    def identity(self) -> str:
        """`ACCOUNT.USER` as sent in the JWT (for error messages)."""
        return self.minter.subject

    @property
    def fingerprint(self) -> str:
        """The `SHA256:` fingerprint of the configured key (for error messages)."""
        return self.minter.fingerprint

    @property
    def known_host(self) -> str | None:
        """The ingest host if it is known (no request), else None."""
        return self._host

    def ingest_host(self) -> str:
        """The ingest host (fetched once per process, then cached)."""
        host = self._host
        if host is None:
            with self._host_lock:
                host = self._host
                if host is None:
                    host = self._host = self._fetch_hostname()
        return host

    def forget_ingest_host(self) -> None:
        """Ask the account host again on the next scoped-token fetch."""
        self._host = None

    def set_ingest_host(self, host: str) -> None:
        """Use `host` without asking (a host shared by another process, or a test)."""
        self._host = host

    def refresh(self, reason: str = "beat") -> Token:
        """A new scoped token now (beat, tests), installed in the scoped guard."""
        return self.scoped.refresh(reason)

    def _mint_jwt(self) -> Token:
        token = self.minter.token()
        current = self.jwt.current()
        if current is not None and current.value == token.value:
            # RS256 is deterministic: the same claims within one second give the same JWT. After
            # a 401 the resend must carry a different one (the guard insists), so step `iat` (and
            # `exp`) back one second.
            now = time.time() - 1
            exp = float(self.minter.claims(now)["exp"])
            token = Token(self.minter.mint(now), float(self.minter.lifetime), exp)
        return token

    def _fetch_scoped(self) -> Token:
        host = self.ingest_host()
        value = self._exchange(token_scope(host, self.role))
        token = token_from_jwt(value, fallback_lifetime=SCOPED_TOKEN_FALLBACK_SECONDS)
        # `iat` is whole seconds, so `exp - iat` can overstate what is left by up to a second
        # (a lot for a short-lived token): count the lifetime from now when that is shorter.
        remaining = token.expires_at - time.time()
        if 0 < remaining < token.lifetime - _LIFETIME_SLACK:
            token = Token(token.value, remaining, token.expires_at)
        return token

    # -- Refused tokens ----------------------------------------------------------------------------

    def rejected(self, err: SnowpipeError, guard: TokenGuard) -> SnowpipeError:
        """The error for a request `guard`'s token got refused (401/403) even after the one
        resend with a fresh token: what Snowflake said, and what to check."""
        if guard is self.jwt:
            return InvalidJWTError(
                f"Snowflake rejected the key-pair JWT for {self.identity}: {err.message}",
                status=err.status,
                code=err.code,
                request_id=err.request_id,
                op=err.op,
                hint=self.jwt_hint(),
            )
        if isinstance(err, AuthError):
            if err.status == 401:
                err.hint = (
                    "the ingest host rejected a freshly exchanged scoped token: check "
                    "SNOWPIPE_ROLE and the role's grants on the pipe"
                )
            return err
        return AuthError(
            err.message, status=err.status, code=err.code, request_id=err.request_id, op=err.op
        )

    def jwt_hint(self) -> str:
        """What to check when the key-pair JWT is refused, with the values actually sent."""
        s = self._settings
        account_url = s.account_url.rstrip("/")
        sent_account, sent_user = self.identity.split(".", 1)
        checks = [
            f"check the key: the public key with fingerprint {self.fingerprint} must be "
            f"registered for user {sent_user} (DESCRIBE USER shows RSA_PUBLIC_KEY_FP; "
            "SNOWPIPE_PRIVATE_KEY_PATH must hold its private key)",
            f"check the account: SNOWPIPE_ACCOUNT={s.account!r} is sent as "
            f"{sent_account!r} and must be the account of "
            f"SNOWPIPE_ACCOUNT_URL={account_url!r}",
            f"check the user: SNOWPIPE_USER={s.user!r}",
        ]
        url_account = _account_in_url(account_url)
        if url_account is not None and url_account != sent_account.replace("_", "-"):
            # The likeliest cause comes first.
            checks.insert(
                0,
                f"the account is the likely culprit: SNOWPIPE_ACCOUNT gives {sent_account!r} "
                f"but SNOWPIPE_ACCOUNT_URL names {url_account!r}",
            )
        return "; ".join(checks)


def _account_in_url(url: str) -> str | None:
    """The account named by a `<account>[.region].snowflakecomputing.com` URL, normalised."""
    host = (urlsplit(url).hostname or "").lower()
    if not host.endswith((".snowflakecomputing.com", ".snowflakecomputing.cn")):
        return None
    try:
        return normalize_account(host.split(".", 1)[0]).replace("_", "-")
    except ValueError:
        return None
