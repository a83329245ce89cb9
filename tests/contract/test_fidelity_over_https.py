"""test_fidelity.py re-run against HTTPS emulators (--certfile/--keyfile, CA in SSL_CERT_FILE)."""

from __future__ import annotations

import contextlib

import pytest

from emulator.tls import TlsFiles
from tests.contract.test_fidelity import *  # noqa: F403  (its tests and fixtures, collected again)
from tests.contract.test_fidelity import TEST_COMMIT_DELAY, Starter
from tests.support.emulator import RunningEmulator, start_emulator
from tests.support.https_rerun import (  # noqa: F401  (replace the conftest's fixtures)
    emulator,
    https_certificates,
    shared_emulator,
)


@pytest.fixture(scope="module")
def start_switched(
    https_certificates: TlsFiles, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
) -> Starter:
    """Start an HTTPS emulator with extra switches."""

    def start(*args: str) -> contextlib.AbstractContextManager[RunningEmulator]:
        return start_emulator(
            "--commit-delay", TEST_COMMIT_DELAY,
            "--certfile", str(https_certificates.server_cert),
            "--keyfile", str(https_certificates.server_key),
            *args,
            workdir=tmp_path_factory.mktemp("emu"),
        )

    return start
