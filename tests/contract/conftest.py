"""Every contract test that talks to an emulator runs twice: over plain HTTP and over HTTPS.

`scheme` is a module-scoped fixture parametrized over `["http", "https"]` (test ids `[http]`,
`[https]`); `emulator`, `shared_emulator` and `emulator_starter` (start one with extra switches)
are built on it and replace the plain-HTTP ones of tests/conftest.py. Over HTTPS the emulator is
started with `--certfile/--keyfile` (a certificate made once per session with the emulator's own
generator, so `--certfile` is covered too), and every httpx client created while the HTTPS half
of a module runs trusts that CA through `SSL_CERT_FILE` (httpx reads it when `verify` is left at
True). pytest keeps one `scheme` per module alive at a time, so the variable is set exactly while
the HTTPS half runs.

Tests that start an emulator of their own without these fixtures (test_options.py,
test_sdk_wire_over_tls.py, test_official_sdk.py) run once, with the TLS setup they name.
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
from tests.support.emulator import TEST_COMMIT_DELAY, RunningEmulator, Starter, start_emulator

SCHEMES = ["http", "https"]


@pytest.fixture(scope="session")
def https_certificates(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1, made once per session."""
    return generate(tmp_path_factory.mktemp("https-certs"))


@contextlib.contextmanager
def _trusting(ca_cert: Path) -> Iterator[None]:
    previous = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(ca_cert)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = previous


@pytest.fixture(scope="module", params=SCHEMES, ids=SCHEMES)
def scheme(request: pytest.FixtureRequest) -> Iterator[str]:
    """"http" or "https"; while "https", the test CA is trusted through SSL_CERT_FILE."""
    if request.param == "http":
        yield "http"
        return
    certs: TlsFiles = request.getfixturevalue("https_certificates")
    with _trusting(certs.ca_cert):
        yield "https"


@pytest.fixture(scope="module")
def emulator_starter(
    scheme: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Starter:
    """`start(*switches)`: a context manager running an emulator over `scheme` with the tests'
    --commit-delay and the extra switches."""
    tls: tuple[str, ...] = ()
    if scheme == "https":
        certs: TlsFiles = request.getfixturevalue("https_certificates")
        tls = ("--certfile", str(certs.server_cert), "--keyfile", str(certs.server_key))

    @contextlib.contextmanager
    def start(*switches: str) -> Iterator[RunningEmulator]:
        with start_emulator(
            "--commit-delay", TEST_COMMIT_DELAY, *tls, *switches,
            workdir=tmp_path_factory.mktemp("emulator"),
        ) as emu:
            assert emu.url.startswith(f"{scheme}://"), emu.url
            yield emu

    return start


@pytest.fixture
def emulator(emulator_starter: Starter) -> Iterator[RunningEmulator]:
    """A fresh emulator for one test, over HTTP and over HTTPS."""
    with emulator_starter() as emu:
        yield emu


@pytest.fixture(scope="module")
def shared_emulator(emulator_starter: Starter) -> Iterator[RunningEmulator]:
    """One emulator shared by the tests of a module (isolate by names), per scheme."""
    with emulator_starter() as emu:
        yield emu
