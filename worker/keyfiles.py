"""Key files on disk: a throwaway RSA key pair written so that no one else can read the key.

`ensure_key(directory)` gives `snowpipe_key.pem` (PKCS#8, unencrypted) and `snowpipe_key.pub`
under `directory`, creating them if absent (`snowpipe-worker keygen`, the local stack):

- the private key is written to a new file created with mode 0600 in the call that creates it
  (O_CREAT|O_EXCL|O_NOFOLLOW, then fchmod: whatever the umask), never readable by others, then
  linked into place: link() never follows or replaces what is at the path;
- an existing key is kept; a key path that is a symbolic link is refused (the key would be read
  or written wherever it points);
- the public key (not a secret) is written 0644 the same way and renamed into place.
"""

from __future__ import annotations

import os
import secrets
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


def _read_private(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _temporary(directory: Path, name: str) -> Path:
    return directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"


def ensure_key(directory: Path) -> tuple[Path, Path]:
    """A throwaway RSA key pair under `directory` (created once): (private PEM, public PEM).

    Safe from several processes at once (the Procfile's lines each run `keygen` as they start):
    each writes its key to a file of its own (0600 from its creation) and links it into place,
    which only the first manages (link() fails on any existing name, a link included); the
    public key is derived from whichever private key is in place, so the two always match.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private, public = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    _refuse_link(private)
    _refuse_link(public)
    if not private.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        mine = _temporary(directory, PRIVATE_NAME)
        _write(mine, pem, PRIVATE_MODE, exclusive=True)
        try:
            os.link(mine, private)
        except FileExistsError:
            _refuse_link(private)  # planted meanwhile; else another process was first: its key
        finally:
            mine.unlink()
    if public.exists():
        return private, public
    try:
        loaded: Any = serialization.load_pem_private_key(_read_private(private), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyPairError(
            f"cannot derive {public.name} from {private}: {exc}; remove both and run again"
        ) from None
    spki = loaded.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mine = _temporary(directory, PUBLIC_NAME)
    _write(mine, spki, PUBLIC_MODE, exclusive=True)
    os.replace(mine, public)  # rename never follows a link at `public`: it replaces the name
    return private, public
