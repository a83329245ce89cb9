"""Key files on disk: a throwaway RSA key pair written so that no one else can read the key.

`ensure_key(directory)` gives `snowpipe_key.pem` (PKCS#8, unencrypted) and `snowpipe_key.pub`
under `directory`, creating them if absent (`snowpipe-worker keygen`, the local stack):

- the private key file is created with mode 0600 in the same call that creates it
  (O_CREAT|O_EXCL), so it is never readable by others, whatever the umask; O_NOFOLLOW and
  O_EXCL refuse a symbolic link planted at its path (the key would be written wherever it
  points) and a file created there meanwhile;
- an existing key is kept; a path that is a symbolic link is refused, never followed;
- the public key (not a secret) is written 0644, also without following a link.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from worker.errors import KeyPairError

PRIVATE_NAME = "snowpipe_key.pem"
PUBLIC_NAME = "snowpipe_key.pub"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise KeyPairError(
            f"{path} is a symbolic link: refusing to use it for a key file (it would be written "
            "wherever the link points); remove it, or choose another directory"
        )


def _write(path: Path, data: bytes, mode: int, *, exclusive: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | _CLOEXEC
    flags |= os.O_EXCL if exclusive else os.O_TRUNC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise KeyPairError(
            f"{path} appeared while the key was being written: remove it and run again"
        ) from None
    except OSError as exc:
        if path.is_symlink():
            _refuse_link(path)
        raise KeyPairError(f"cannot write {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask took away
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
    finally:
        if fd >= 0:
            os.close(fd)


def ensure_key(directory: Path) -> tuple[Path, Path]:
    """A throwaway RSA key pair under `directory` (created once): (private PEM, public PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private, public = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    _refuse_link(private)
    _refuse_link(public)
    if private.exists():
        if public.exists():
            return private, public
        try:
            key: Any = serialization.load_pem_private_key(private.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise KeyPairError(
                f"cannot derive {public.name} from {private}: {exc}; remove both and run again"
            ) from None
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(private, pem, PRIVATE_MODE, exclusive=True)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(public, public_pem, PUBLIC_MODE, exclusive=False)
    return private, public
