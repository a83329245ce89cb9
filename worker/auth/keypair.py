"""Snowflake key-pair authentication: load the RSA key once, fingerprint it, mint JWTs.

Loading validates the RSA key (~36 ms with OpenSSL 3), so a process loads it once and keeps the
key object; `jwt.encode` is always given that object, never PEM text (PEM would be parsed and
validated again on every token, ~40 ms each). See docs/protocol.md#key-pair-jwt.

Error messages name the problem and the fix; they never contain key material or a passphrase.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from worker.auth.guard import Token
from worker.errors import KeyPairError as KeyPairError  # noqa: PLC0414 (re-exported)
from worker.observability import register_secret

if TYPE_CHECKING:
    from worker.settings import Settings

# Snowflake rejects key-pair JWTs older than one hour whatever `exp` says; stay a minute below.
MAX_JWT_LIFETIME_SECONDS = 59 * 60
MIN_JWT_LIFETIME_SECONDS = 1

_PASSPHRASE_FIX = "set SNOWPIPE_PRIVATE_KEY_PASSPHRASE to the key's passphrase"  # noqa: S105


def _pem_label(data: bytes) -> str | None:
    start = data.find(b"-----BEGIN ")
    if start < 0:
        return None
    end = data.find(b"-----", start + 11)
    if end < 0:
        return None
    return data[start + 11 : end].decode("ascii", errors="replace").strip()


def _describe_key(key: object) -> str:
    kinds: tuple[tuple[type, str], ...] = (
        (ec.EllipticCurvePrivateKey, "an EC key"),
        (ed25519.Ed25519PrivateKey, "an Ed25519 key"),
        (ed448.Ed448PrivateKey, "an Ed448 key"),
        (dsa.DSAPrivateKey, "a DSA key"),
    )
    for kind, label in kinds:
        if isinstance(key, kind):
            return label
    return f"a {type(key).__name__}"


def load_private_key(
    data: bytes | str, passphrase: bytes | str | None = None, *, source: str = "the private key"
) -> rsa.RSAPrivateKey:
    """The RSA private key in `data`: PEM (PKCS#8, encrypted or not, or PKCS#1) or base64 DER.

    `source` names where the key came from in error messages (a path or a setting name).
    Raises `KeyPairError` for a wrong or missing passphrase, data that is not a private key, or a
    key that is not RSA. Costs ~36 ms (key validation): call it once per process.
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
    if secret is not None:
        register_secret(secret)
    if not secret:
        secret = None  # an empty passphrase means "none" (an unset variable exported as "")
    raw = raw.strip()
    if not raw:
        raise KeyPairError(f"{source} is empty: provide an RSA private key in PEM format")

    label = _pem_label(raw)
    if label is not None and "PRIVATE KEY" not in label:
        what = "a public key" if "PUBLIC KEY" in label else f"a PEM {label!r} block"
        raise KeyPairError(
            f"{source} is {what}, not a private key: provide the RSA private key "
            "(-----BEGIN PRIVATE KEY----- or -----BEGIN ENCRYPTED PRIVATE KEY-----)"
        )
    if label is None:
        key = _load_der(_decode_base64_der(raw, source), secret, source)
    else:
        key = _load_pem(raw, label, secret, source)

    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyPairError(
            f"{source} is {_describe_key(key)}; Snowflake key-pair authentication needs an RSA "
            "key: generate one with `openssl genrsa 2048 | openssl pkcs8 -topk8 -v2 aes-256-cbc`"
        )
    return key


def _load_pem(raw: bytes, label: str, secret: bytes | None, source: str) -> object:
    encrypted = label == "ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in raw
    if encrypted and secret is None:
        raise KeyPairError(f"{source} is encrypted and no passphrase is set: {_PASSPHRASE_FIX}")
    try:
        # A passphrase set for an unencrypted key is ignored rather than refused.
        return serialization.load_pem_private_key(raw, password=secret if encrypted else None)
    except ValueError:
        if encrypted:
            # cryptography's own text ("Bad decrypt. Incorrect password?") never holds the secret,
            # but ours says what to do.
            raise KeyPairError(
                f"cannot decrypt {source}: the passphrase is wrong ({_PASSPHRASE_FIX})"
            ) from None
        raise KeyPairError(_not_a_key(source)) from None
    except UnsupportedAlgorithm:
        raise KeyPairError(_unsupported(source)) from None


def _load_der(der: bytes, secret: bytes | None, source: str) -> object:
    # Base64 DER has no header saying whether it is encrypted: try as given, then the other way.
    try:
        return serialization.load_der_private_key(der, password=secret)
    except TypeError:
        if secret is None:
            raise KeyPairError(
                f"{source} is encrypted and no passphrase is set: {_PASSPHRASE_FIX}"
            ) from None
        try:
            return serialization.load_der_private_key(der, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyPairError(_not_a_key(source)) from None
    except ValueError:
        raise KeyPairError(
            f"{source} is not a readable private key, or the passphrase is wrong: provide an "
            f"RSA private key in PEM format (PKCS#8 or PKCS#1) and {_PASSPHRASE_FIX}"
            if secret is not None
            else _not_a_key(source)
        ) from None
    except UnsupportedAlgorithm:
        raise KeyPairError(_unsupported(source)) from None


def _unsupported(source: str) -> str:
    return (
        f"{source} uses an algorithm or cipher this build of cryptography does not support: "
        "re-export it as PKCS#8 (openssl pkcs8 -topk8 -v2 aes-256-cbc)"
    )


def _not_a_key(source: str) -> str:
    return (
        f"{source} is not a readable private key: provide an RSA private key in PEM format "
        "(PKCS#8 or PKCS#1), or check that the file is complete"
    )


def _decode_base64_der(raw: bytes, source: str) -> bytes:
    compact = b"".join(raw.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise KeyPairError(_not_a_key(source)) from None


def public_key_fingerprint(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> str:
    """`SHA256:<base64>` of the DER SubjectPublicKeyInfo: Snowflake's `RSA_PUBLIC_KEY_FP`."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def normalize_account(account: str) -> str:
    """The account as Snowflake expects it in JWT claims (docs/protocol.md#key-pair-jwt).

    Upper case; a locator's region is dropped (`xy12345.us-east-1` -> `XY12345`); with `.global`
    (replication) only the part before the first `-` is kept, as Snowflake's connector does.
    A full host name or URL is accepted and reduced the same way.
    """
    text = account.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0]
    cut = text.find("-") if ".global" in text else text.find(".")
    if cut >= 0:
        text = text[:cut]
    if not text:
        raise KeyPairError(
            f"account {account!r} is empty after normalisation: set SNOWPIPE_ACCOUNT to your "
            "account identifier, e.g. myorg-myaccount or xy12345.us-east-1"
        )
    return text.upper()


def normalize_user(user: str) -> str:
    """The user name as Snowflake expects it in JWT claims: stripped, upper case."""
    name = user.strip()
    if not name:
        raise KeyPairError("user is empty: set SNOWPIPE_USER to the Snowflake user name")
    return name.upper()


def clamp_jwt_lifetime(seconds: float) -> int:
    """`seconds` as a whole JWT lifetime within Snowflake's limit (1 s .. 59 min)."""
    return int(max(MIN_JWT_LIFETIME_SECONDS, min(float(seconds), MAX_JWT_LIFETIME_SECONDS)))


class KeyPairJWT:
    """Mints Snowflake key-pair JWTs (RS256) from a key loaded once.

    Claims: `iss = ACCOUNT.USER.SHA256:<fp>`, `sub = ACCOUNT.USER`, `iat`, `exp = iat + lifetime`
    (at most 59 min) and, with a role, `scp = "session:role:<ROLE>"`.
    `token()` has the `Fetch` shape, so a `TokenGuard(jwt.token, name="jwt")` caches minted JWTs.
    """

    __slots__ = ("_key", "_wall_clock", "fingerprint", "issuer", "lifetime", "role", "subject")

    def __init__(
        self,
        private_key: rsa.RSAPrivateKey,
        *,
        account: str,
        user: str,
        role: str | None = None,
        lifetime_seconds: float = MAX_JWT_LIFETIME_SECONDS,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise KeyPairError(
                "KeyPairJWT needs a loaded RSA private key object, got "
                f"{type(private_key).__name__}: load it once with load_private_key()"
            )
        self._key = private_key
        self._wall_clock = wall_clock
        self.fingerprint = public_key_fingerprint(private_key)
        self.subject = f"{normalize_account(account)}.{normalize_user(user)}"
        self.issuer = f"{self.subject}.{self.fingerprint}"
        self.role = role.strip() if role and role.strip() else None
        self.lifetime = clamp_jwt_lifetime(lifetime_seconds)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, wall_clock: Callable[[], float] = time.time
    ) -> KeyPairJWT:
        """A minter for the configured account, user, role and key (loads the key: ~36 ms)."""
        source = (
            str(settings.private_key_path)
            if settings.private_key_path is not None
            else "SNOWPIPE_PRIVATE_KEY"
        )
        key = load_private_key(settings.private_key_pem(), settings.passphrase(), source=source)
        return cls(
            key,
            account=settings.account,
            user=settings.user,
            role=settings.role,
            lifetime_seconds=settings.jwt_lifetime_seconds,
            wall_clock=wall_clock,
        )

    def claims(self, now: float | None = None) -> dict[str, Any]:
        """The claims of a JWT issued at `now` (wall-clock epoch seconds; default: now)."""
        iat = int(self._wall_clock() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": self.subject,
            "iat": iat,
            "exp": iat + self.lifetime,
        }
        if self.role is not None:
            claims["scp"] = f"session:role:{self.role}"
        return claims

    def mint(self, now: float | None = None) -> str:
        """A signed JWT (RS256, ~0.26 ms) issued at `now` (default: now)."""
        value = jwt.encode(self.claims(now), self._key, algorithm="RS256")
        register_secret(value, transient=True)
        return value

    def token(self) -> Token:
        """A freshly minted JWT as a `Token` (its lifetime and wall-clock expiry)."""
        claims = self.claims()
        value = jwt.encode(claims, self._key, algorithm="RS256")
        register_secret(value, transient=True)
        return Token(value=value, lifetime=float(self.lifetime), expires_at=float(claims["exp"]))

    def __repr__(self) -> str:
        return f"KeyPairJWT(issuer={self.issuer!r}, role={self.role!r}, lifetime={self.lifetime})"


def token_from_jwt(
    value: str,
    *,
    fallback_lifetime: float = 55 * 60,
    wall_clock: Callable[[], float] = time.time,
) -> Token:
    """A `Token` for a JWT received from a server (e.g. the scoped token), read without verifying.

    The lifetime is `exp - iat` from the token itself (immune to clock skew between us and the
    server); without `iat` it is `exp - now`; without `exp` (or an unreadable token)
    `fallback_lifetime` from now. Registers the value for log redaction.
    """
    register_secret(value, transient=True)
    now = wall_clock()
    try:
        claims = jwt.decode(value, options={"verify_signature": False})
    except jwt.PyJWTError:
        claims = {}
    exp = claims.get("exp")
    iat = claims.get("iat")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        if isinstance(iat, int | float) and not isinstance(iat, bool) and exp > iat:
            return Token(value=value, lifetime=float(exp - iat), expires_at=float(exp))
        if exp > now:
            return Token(value=value, lifetime=float(exp - now), expires_at=float(exp))
    return Token(value=value, lifetime=float(fallback_lifetime), expires_at=now + fallback_lifetime)
