"""RSA key pairs for tests: generated once per session (2048-bit generation costs ~50 ms)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@dataclass(frozen=True)
class KeyPair:
    private_key: rsa.RSAPrivateKey
    private_pem: bytes  # PKCS#8, unencrypted
    public_pem: bytes  # SubjectPublicKeyInfo

    def write_private(
        self, path: Path, *, passphrase: bytes | None = None, pkcs1: bool = False
    ) -> Path:
        """Write the private key as PEM (PKCS#8 by default, encrypted when given a passphrase)."""
        fmt = (
            serialization.PrivateFormat.TraditionalOpenSSL
            if pkcs1
            else serialization.PrivateFormat.PKCS8
        )
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        path.write_bytes(self.private_key.private_bytes(serialization.Encoding.PEM, fmt, enc))
        return path


def _make() -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return KeyPair(
        private_key=key,
        private_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        public_pem=key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


@functools.cache
def key_pair(name: str = "default") -> KeyPair:
    """A key pair cached by name: the same name gives the same key within a test session."""
    return _make()
