"""TLS to the broker and the state store: the server's certificate and host name are checked.

A `redis-server` of the test speaks only TLS with a certificate made here for `localhost`, signed
by a CA made here too. Without SNOWPIPE_CA_FILE the certificate is refused (the CLI says so in one
line); with it, everything works, a real worker included; under a name the certificate does not
list (127.0.0.1), it is refused again. RabbitMQ (shared, not restarted) is reached through a TLS
terminator with the same kind of certificate (tests/support/tls.py).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.celery import (
    ACCOUNT,
    USER,
    delete_rabbit_queues,
    launch_worker,
    running,
    settings_overrides,
    unique_queue,
    wait_until,
    worker_env,
)
from tests.support.emulator import REPO_ROOT, RunningEmulator
from tests.support.keys import key_pair
from tests.support.tls import TlsFiles, TlsRedis, TlsTerminator, make_certificates, tls_redis
from worker.connectivity import BrokerUnavailableError, check_broker
from worker.publish import Publisher
from worker.settings import load_settings


def cli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", *args],
        input=stdin, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60,
        check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_certificates(tmp_path_factory.mktemp("tls"), names=["localhost"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, certificates: TlsFiles) -> Iterator[TlsRedis]:
    with tls_redis(tmp_path_factory.mktemp("tls-redis"), certificates) as running_server:
        yield running_server


def producer_env(server: TlsRedis, *, host: str = "localhost", ca: Path | None) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT),
           "SNOWPIPE_BROKER_URL": server.url(1, host=host),
           "SNOWPIPE_STATE_URL": server.url(2, host=host),
           "SNOWPIPE_QUEUE_NAME": unique_queue("tls")}  # fmt: skip
    if ca is not None:
        env["SNOWPIPE_CA_FILE"] = str(ca)
    return env


def test_a_self_signed_certificate_is_refused_then_accepted_with_the_ca_file(
    server: TlsRedis, certificates: TlsFiles
) -> None:
    rows = '{"id": 1}\n'
    untrusted = producer_env(server, ca=None)
    for args in (("publish", "--database", "D", "--schema", "S", "--pipe", "P", "-"),
                 ("stats",), ("dead-letters", "list")):  # fmt: skip
        refused = cli(untrusted, *args, stdin=rows)
        assert refused.returncode == 3, refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        assert "failed the TLS check (certificate verify failed" in lines[0]
        assert "SNOWPIPE_CA_FILE" in lines[0] and "Traceback" not in refused.stderr

    trusted = producer_env(server, ca=certificates.ca_cert)
    published = cli(trusted, "publish", "--database", "D", "--schema", "S", "--pipe", "P", "-",
                    stdin=rows)  # fmt: skip
    assert published.returncode == 0, published.stderr
    assert cli(trusted, "stats").returncode == 0


def test_a_certificate_for_another_host_name_is_refused(
    server: TlsRedis, certificates: TlsFiles
) -> None:
    # The certificate names `localhost`; the same server as 127.0.0.1 is not who it claims to be.
    mismatch = producer_env(server, host="127.0.0.1", ca=certificates.ca_cert)
    for args in (("stats",), ("status", "--no-snowflake")):
        refused = cli(mismatch, *args)
        assert refused.returncode == 3, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "failed the TLS check" in refused.stderr
        assert "mismatch" in refused.stderr.lower()


def test_a_worker_delivers_over_rediss_broker_and_state_store(
    server: TlsRedis, certificates: TlsFiles, emulator: RunningEmulator, tmp_path: Path
) -> None:
    pair = key_pair("tls")
    emulator.register_key(ACCOUNT, USER, pair.public_pem)
    env = worker_env(emulator, server.url(3), pair.write_private(tmp_path / "key.pem"),
                     queue=unique_queue("tlsw"), state_url=server.url(4),
                     ca_file=certificates.ca_cert)  # fmt: skip
    worker = launch_worker(env, tmp_path, name="tls", concurrency=2)
    with running(worker):
        publisher = Publisher(load_settings(**settings_overrides(env)))
        try:
            publisher.publish([{"id": 7}], database="DB", schema="PUBLIC", pipe="TLS-STREAMING")
        finally:
            publisher.close()
        wait_until(lambda: len(emulator.rows("DB", "PUBLIC", "TLS-STREAMING")) == 1,
                   timeout=30, what="the row committed over TLS", logs=[worker])  # fmt: skip
    assert "insecure" not in worker.log().lower()  # kombu's CERT_NONE fallback warns so


@pytest.mark.rabbitmq
def test_amqps_checks_the_certificate_and_the_host_name(certificates: TlsFiles) -> None:
    queue = unique_queue("amqps")
    with TlsTerminator(certificates, "127.0.0.1", 5672) as front:

        def settings(host: str, ca: Path | None) -> object:
            return load_settings(
                require_identity=False, broker_url=f"amqps://guest:guest@{host}:{front.port}//",
                state_url="redis://127.0.0.1:6379/0", queue_name=queue, ca_file=ca,
            )  # fmt: skip

        with pytest.raises(BrokerUnavailableError, match="failed the TLS check"):
            check_broker(settings("localhost", None))  # type: ignore[arg-type]
        with pytest.raises(BrokerUnavailableError, match=r"failed the TLS check.*mismatch"):
            check_broker(settings("127.0.0.1", certificates.ca_cert))  # type: ignore[arg-type]
        trusted = settings("localhost", certificates.ca_cert)
        check_broker(trusted)  # type: ignore[arg-type]
        publisher = Publisher(trusted)  # type: ignore[arg-type]
        try:
            publisher.publish([{"id": 1}], database="D", schema="S", pipe="P")
        finally:
            publisher.close()
            delete_rabbit_queues(queue, f"{queue}.dead", f"{queue}.dlx")
