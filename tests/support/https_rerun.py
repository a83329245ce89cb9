"""Fixtures that re-run a contract-test module against an HTTPS emulator instead of plain HTTP.

A module `test_X_over_https.py` star-imports `test_X` (its tests and fixtures) and then these
fixtures, which replace the conftest's `emulator` and `shared_emulator`: the same tests then talk
to an emulator started with `--certfile/--keyfile` (a certificate made beforehand with the
emulator's own generator, so `--certfile` is covered too), and every httpx client in the process
trusts that CA through `SSL_CERT_FILE` while the module runs (httpx reads it when `verify` is
left at True).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Certificate making only (not protocol behaviour): the emulator's own generator serves here,
# written to files and passed back through --certfile/--keyfile.
from emulator.tls import TlsFiles, generate
from tests.support.emulator import RunningEmulator, start_emulator

# Same as the conftest's, so the re-run tests see the timing they were written for.
TEST_COMMIT_DELAY = "0.2"


@pytest.fixture(scope="module")
def https_certificates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsFiles]:
    """Test certificates, trusted by every httpx client of this process while the module runs."""
    files = generate(tmp_path_factory.mktemp("https-certs"))
    previous = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(files.ca_cert)
    try:
        yield files
    finally:
        if previous is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = previous


def _start_https(
    certs: TlsFiles, workdir: Path
) -> contextlib.AbstractContextManager[RunningEmulator]:
    return start_emulator(
        "--commit-delay", TEST_COMMIT_DELAY,
        "--certfile", str(certs.server_cert),
        "--keyfile", str(certs.server_key),
        workdir=workdir,
    )


@pytest.fixture
def emulator(
    https_certificates: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningEmulator]:
    """A fresh HTTPS emulator for one test (replaces the conftest's plain-HTTP one)."""
    with _start_https(https_certificates, tmp_path_factory.mktemp("emulator")) as emu:
        assert emu.url.startswith("https://"), emu.url
        yield emu


@pytest.fixture(scope="module")
def shared_emulator(
    https_certificates: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningEmulator]:
    """One HTTPS emulator shared by the module's tests (replaces the conftest's)."""
    with _start_https(https_certificates, tmp_path_factory.mktemp("emulator")) as emu:
        assert emu.url.startswith("https://"), emu.url
        yield emu
