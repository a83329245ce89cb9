"""Fixtures that re-run a contract-test module against an HTTPS emulator instead of plain HTTP.

A module `test_X_over_https.py` star-imports `test_X` (its tests and fixtures) and then these
fixtures, which replace the conftest's `emulator` and `shared_emulator`: the same tests then talk
to an emulator started with `--certfile/--keyfile` (a certificate made here, signed by a test CA,
so `--certfile` is covered too), and every httpx client in the process trusts that CA through
`SSL_CERT_FILE` for the duration of the module (httpx reads it when `verify` is left at True).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.emulator import RunningEmulator, start_emulator

# Same as the conftest's, so the re-run tests see the timing they were written for.
TEST_COMMIT_DELAY = "0.2"
CERT_VALIDITY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class HttpsCertificates:
    """A CA and a server certificate for IP:127.0.0.1 signed by it (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(directory: Path) -> HttpsCertificates:
    """Write a throwaway CA and a 127.0.0.1 server certificate into `directory`."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + CERT_VALIDITY
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "contract tests CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = HttpsCertificates(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@pytest.fixture(scope="module")
def https_certificates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsCertificates]:
    """Test certificates, trusted by every httpx client of this process while the module runs."""
    files = make_certificates(tmp_path_factory.mktemp("https-certs"))
    previous = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(files.ca)
    try:
        yield files
    finally:
        if previous is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = previous


def _start_https(
    certs: HttpsCertificates, workdir: Path
) -> contextlib.AbstractContextManager[RunningEmulator]:
    return start_emulator(
        "--commit-delay", TEST_COMMIT_DELAY,
        "--certfile", str(certs.cert),
        "--keyfile", str(certs.key),
        workdir=workdir,
    )


@pytest.fixture
def emulator(
    https_certificates: HttpsCertificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningEmulator]:
    """A fresh HTTPS emulator for one test (replaces the conftest's plain-HTTP one)."""
    with _start_https(https_certificates, tmp_path_factory.mktemp("emulator")) as emu:
        assert emu.url.startswith("https://"), emu.url
        yield emu


@pytest.fixture(scope="module")
def shared_emulator(
    https_certificates: HttpsCertificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningEmulator]:
    """One HTTPS emulator shared by the module's tests (replaces the conftest's)."""
    with _start_https(https_certificates, tmp_path_factory.mktemp("emulator")) as emu:
        assert emu.url.startswith("https://"), emu.url
        yield emu
