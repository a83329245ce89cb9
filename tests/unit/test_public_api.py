"""The public API of `worker`: what it exports, that importing it stays cheap, py.typed."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import worker

REPO = Path(__file__).resolve().parents[2]


def test_all_lists_the_app_the_producer_the_errors_a_caller_catches_and_the_version() -> None:
    assert set(worker.__all__) == {
        "app",
        "publish_batch",
        "wait_for_batches",
        "WaitResult",
        "InvalidBatchError",
        "SnowpipeError",
        "BrokerUnavailableError",
        "__version__",
    }
    assert set(worker.__all__) <= set(dir(worker))


def test_exported_names_are_the_ones_the_modules_define() -> None:
    from worker.connectivity import BrokerUnavailableError
    from worker.publish import InvalidBatchError, publish_batch
    from worker.snowpipe.errors import AuthError, PermanentError, RetryableError, SnowpipeError

    assert worker.publish_batch is publish_batch
    from worker.waiting import WaitResult, wait_for_batches

    assert worker.wait_for_batches is wait_for_batches
    assert worker.WaitResult is WaitResult
    assert worker.InvalidBatchError is InvalidBatchError
    assert worker.BrokerUnavailableError is BrokerUnavailableError
    assert issubclass(BrokerUnavailableError, ConnectionError)
    # The root of the error tree: every branch derives from it.
    assert worker.SnowpipeError is SnowpipeError
    assert all(issubclass(c, SnowpipeError) for c in (RetryableError, AuthError, PermanentError))


def test_version_is_the_installed_distributions() -> None:
    assert worker.__version__ == importlib.metadata.version("snowpipe-worker")


def test_version_falls_back_when_the_package_is_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(_name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(_name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert worker._version() == worker.UNKNOWN_VERSION


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = worker.nope  # type: ignore[attr-defined]


def test_import_worker_loads_neither_celery_nor_the_settings() -> None:
    heavy = ["celery", "kombu", "redis", "pydantic", "httpx", "prometheus_client", "structlog"]
    code = (
        "import sys, worker\n"
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30,
        check=True,
    )  # fmt: skip
    assert done.stdout.strip() == ""


def test_the_packages_are_marked_typed() -> None:
    import emulator

    for package in (worker, emulator):
        assert (Path(package.__file__).parent / "py.typed").is_file()
