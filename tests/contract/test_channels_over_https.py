"""test_channels.py re-run against an HTTPS emulator (--certfile/--keyfile, CA in SSL_CERT_FILE)."""

from tests.contract.test_channels import *  # noqa: F403  (its tests and fixtures, collected again)
from tests.support.https_rerun import (  # noqa: F401  (replace the conftest's fixtures)
    emulator,
    https_certificates,
    shared_emulator,
)
