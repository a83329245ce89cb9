"""Authentication: key-pair JWTs (`keypair`) and the per-process token cache (`guard`)."""

from __future__ import annotations

from worker.auth.guard import (
    Token,
    TokenGuard,
    TokenNotExtendedError,
    TokenUnavailableError,
    soft_margin,
)
from worker.auth.keypair import (
    KeyPairError,
    KeyPairJWT,
    load_private_key,
    normalize_account,
    normalize_user,
    public_key_fingerprint,
    token_from_jwt,
)

__all__ = [
    "KeyPairError",
    "KeyPairJWT",
    "Token",
    "TokenGuard",
    "TokenNotExtendedError",
    "TokenUnavailableError",
    "load_private_key",
    "normalize_account",
    "normalize_user",
    "public_key_fingerprint",
    "soft_margin",
    "token_from_jwt",
]
