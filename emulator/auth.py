"""Key-pair JWT verification (control plane) and scoped-token issue/verification (data plane).

Key-pair JWTs follow docs/protocol.md#key-pair-jwt: RS256, `iss = ACCOUNT.USER.SHA256:<fp>`,
`sub = ACCOUNT.USER`, upper case, `iat`/`exp` in seconds or milliseconds. A JWT whose `exp` is
further out than an hour (Snowflake's connector mints 24 h) is accepted and treated as valid for
one hour after `iat`, as Snowflake's auth documentation describes.
Programmatic access tokens (PATs, registered through the admin API) are opaque secrets sent as
`Authorization: Bearer` to the account host and the ingest host alike.
Scoped tokens are HS256 JWTs signed with a per-process secret, so a restarted emulator refuses
the old ones (as a real token would eventually be refused) and clients must exchange again.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from emulator.config import JWT_IAT_SKEW_SECONDS, JWT_MAX_LIFETIME_SECONDS
from emulator.errors import jwt_invalid

# Timestamps above this are milliseconds (10^11 s is the year 5138).
_MILLISECONDS_THRESHOLD = 10**11
# Verified scoped tokens are remembered so the hot path skips the HMAC; bounded to stay small.
_SCOPED_CACHE_LIMIT = 50_000


def fingerprint(public_key: rsa.RSAPublicKey) -> str:
    """`SHA256:<base64 of sha256(DER SubjectPublicKeyInfo)>`, as `DESCRIBE USER` shows it."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def user_key(account: str, user: str) -> str:
    """The `ACCOUNT.USER` name a JWT's `sub` must carry (upper case)."""
    return f"{account.strip().upper()}.{user.strip().upper()}"


def load_public_key(pem: bytes) -> rsa.RSAPublicKey:
    """An RSA public key from PEM; ValueError naming the problem otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(
            "public_key_pem is not a PEM public key (expected -----BEGIN PUBLIC KEY-----)"
        ) from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(
            "public_key_pem must be an RSA public key (Snowflake key-pair auth is RSA)"
        )
    return key


class KeyRegistry:
    """Registered public keys by `ACCOUNT.USER`, then by fingerprint."""

    def __init__(self) -> None:
        self._keys: dict[str, dict[str, rsa.RSAPublicKey]] = {}
        self._lock = threading.Lock()

    def register(self, account: str, user: str, pem: bytes) -> str:
        """Register a key for a user; returns its fingerprint. ValueError on a bad PEM."""
        if not account.strip() or not user.strip():
            raise ValueError("account and user must be non-empty")
        key = load_public_key(pem)
        fp = fingerprint(key)
        with self._lock:
            self._keys.setdefault(user_key(account, user), {})[fp] = key
        return fp

    def lookup(self, subject: str, fp: str) -> rsa.RSAPublicKey | None:
        """The key registered for `subject` with fingerprint `fp`, if any."""
        return self._keys.get(subject, {}).get(fp)

    def has_user(self, subject: str) -> bool:
        """Whether any key is registered for `subject`."""
        return subject in self._keys

    def count(self) -> int:
        """How many keys are registered in total."""
        return sum(len(v) for v in self._keys.values())


def _seconds(value: object, claim: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise jwt_invalid(f"claim {claim!r} must be a number (epoch seconds or milliseconds)")
    return value / 1000.0 if value > _MILLISECONDS_THRESHOLD else float(value)


@dataclass(frozen=True, slots=True)
class KeyPairIdentity:
    """Who a verified key-pair JWT belongs to."""

    subject: str  # ACCOUNT.USER
    role: str | None


def verify_keypair_jwt(
    token: str, registry: KeyRegistry, *, now: float | None = None
) -> KeyPairIdentity:
    """The identity of a valid key-pair JWT; raises the 401 `390144` ApiError otherwise."""
    now = time.time() if now is None else now
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise jwt_invalid(f"not a JWT: {type(exc).__name__}") from None
    if header.get("alg") != "RS256":
        raise jwt_invalid(f"key-pair JWT must be signed with RS256, got alg={header.get('alg')!r}")
    sub, iss = claims.get("sub"), claims.get("iss")
    if not isinstance(sub, str) or not isinstance(iss, str):
        raise jwt_invalid("JWT needs string claims 'iss' and 'sub'")
    if sub != sub.upper():
        raise jwt_invalid(f"sub {sub!r} must be upper case (ACCOUNT.USER)")
    prefix = sub + "."
    if not iss.startswith(prefix + "SHA256:"):
        raise jwt_invalid(f"iss must be sub + '.SHA256:<fingerprint>' (sub={sub!r})")
    fp = iss[len(prefix) :]
    if not registry.has_user(sub):
        raise jwt_invalid(
            f"no public key registered for {sub}: use --public-key or POST /_emulator/keys"
        )
    key = registry.lookup(sub, fp)
    if key is None:
        raise jwt_invalid(f"fingerprint {fp} in iss matches no key registered for {sub}")
    try:
        jwt.decode(
            token,
            key,
            algorithms=["RS256"],
            options={
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except jwt.PyJWTError:
        raise jwt_invalid(f"signature does not verify with the key {fp} of {sub}") from None
    if "iat" not in claims or "exp" not in claims:
        raise jwt_invalid("JWT needs 'iat' and 'exp' claims")
    iat, exp = _seconds(claims["iat"], "iat"), _seconds(claims["exp"], "exp")
    if exp <= now:
        raise jwt_invalid(f"JWT expired {now - exp:.0f} s ago")
    if iat > now + JWT_IAT_SKEW_SECONDS:
        raise jwt_invalid(f"iat is {iat - now:.0f} s in the future (allowed skew 60 s)")
    if now > iat + JWT_MAX_LIFETIME_SECONDS:
        # A longer `exp` is fine, but the JWT counts as valid for one hour after issue only.
        raise jwt_invalid(
            f"JWT was issued {now - iat:.0f} s ago; a key-pair JWT is valid for at most one hour "
            "after its iat whatever its exp says: mint a new one"
        )
    scp = claims.get("scp")
    role = scp.split(":", 2)[2] if isinstance(scp, str) and scp.count(":") >= 2 else None
    return KeyPairIdentity(subject=sub, role=role)


PAT_PREFIX = "emupat_"


class PatRegistry:
    """Programmatic access tokens by value: each names the `ACCOUNT.USER` it authenticates."""

    def __init__(self) -> None:
        self._tokens: dict[str, KeyPairIdentity] = {}
        self._lock = threading.Lock()

    def issue(self, account: str, user: str, role: str | None = None) -> str:
        """A new PAT for the user (opaque, never a JWT, so it cannot be taken for one)."""
        if not account.strip() or not user.strip():
            raise ValueError("account and user must be non-empty")
        token = PAT_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = KeyPairIdentity(subject=user_key(account, user), role=role)
        return token

    def lookup(self, token: str) -> KeyPairIdentity | None:
        """The identity of a registered PAT, if `token` is one."""
        return self._tokens.get(token)

    def count(self) -> int:
        """How many PATs were issued."""
        return len(self._tokens)


@dataclass(frozen=True, slots=True)
class ScopedClaims:
    """What the emulator remembers about a scoped token it issued."""

    subject: str
    host: str
    exp: int
    generation: int
    # The failover epoch the subject had discovered (hostname call) when the token was issued.
    epoch: int = 0


class ScopedTokens:
    """Issues and verifies scoped tokens; `expire_all()` expires every token issued so far."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._secret = secrets.token_bytes(32)
        self._generation = 0
        self._cache: dict[str, ScopedClaims] = {}
        self._lock = threading.Lock()
        self.issued = 0
        # Failover: the epoch goes up at each failover; a subject's hostname call records the
        # epoch it has seen, and tokens it is issued afterwards carry that epoch.
        self.epoch = 0
        self._failed_over: dict[tuple[str, str, str] | None, int] = {}
        self._discovered: dict[str, int] = {}

    def fail_over(self, pipe: tuple[str, str, str] | None) -> int:
        """Fail `pipe` (or, with None, every pipe) over: older tokens get 410 until rediscovery."""
        with self._lock:
            self.epoch += 1
            self._failed_over[pipe] = self.epoch
            return self.epoch

    def discovered(self, subject: str) -> None:
        """`subject` asked for the ingest host: tokens issued to it from now on are current."""
        with self._lock:
            self._discovered[subject] = self.epoch

    def epoch_of(self, subject: str) -> int:
        """The failover epoch `subject` last discovered the ingest host in."""
        return self._discovered.get(subject, 0)

    def failed_over_for(self, claims: ScopedClaims, pipe: tuple[str, str, str]) -> bool:
        """Whether `pipe` failed over after the discovery `claims` was issued under."""
        if not self._failed_over:
            return False
        moved = max(self._failed_over.get(pipe, 0), self._failed_over.get(None, 0))
        return claims.epoch < moved

    def issue(self, subject: str, host: str, role: str | None) -> str:
        """A new scoped token (an HS256 JWT whose `exp`, in seconds, is now + ttl)."""
        now = time.time()
        with self._lock:
            self.issued += 1
            serial = self.issued
            generation = self._generation
            epoch = self._discovered.get(subject, 0)
        # exp is an integer number of seconds: Snowflake's SDK reads it as such.
        exp = int(now + self.ttl)
        claims: dict[str, object] = {
            "iss": "snowpipe-emulator",
            "sub": subject,
            "scope": host,
            "iat": int(now),
            "exp": exp,
            "gen": generation,
            "epoch": epoch,
            "jti": f"{serial}-{secrets.token_hex(4)}",
        }
        if role:
            claims["role"] = role
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def expire_all(self) -> None:
        """Every token issued so far is refused from now on."""
        with self._lock:
            self._generation += 1
            self._cache.clear()

    def verify(self, token: str, host: str, *, now: float | None = None) -> ScopedClaims:
        """The claims of a valid, unexpired scoped token for `host`; the 401 ApiError otherwise."""
        now = time.time() if now is None else now
        claims = self._cache.get(token)
        if claims is None:
            claims = self._decode(token)
            if len(self._cache) >= _SCOPED_CACHE_LIMIT:
                self._cache.clear()
            self._cache[token] = claims
        if claims.generation != self._generation:
            raise jwt_invalid("scoped token was expired by POST /_emulator/expire-tokens")
        if now >= claims.exp:
            raise jwt_invalid(f"scoped token expired {now - claims.exp:.0f} s ago")
        if claims.host.lower() != host.lower():
            raise jwt_invalid(
                f"scoped token was issued for host {claims.host!r}, request went to {host!r}"
            )
        return claims

    def _decode(self, token: str) -> ScopedClaims:
        try:
            raw = jwt.decode(
                token, self._secret, algorithms=["HS256"], options={"verify_exp": False}
            )
        except jwt.PyJWTError:
            raise jwt_invalid(
                "not a scoped token issued by this emulator process (exchange a new one at "
                "POST /oauth/token; tokens do not survive a restart)"
            ) from None
        return ScopedClaims(
            subject=str(raw["sub"]),
            host=str(raw["scope"]),
            exp=int(raw["exp"]),
            generation=int(raw["gen"]),
            epoch=int(raw.get("epoch", 0)),
        )
