"""TLS servers for tests: certificates made here, a TLS `redis-server`, a TLS terminator.

    files = make_certificates(tmp_path, names=["localhost"])    # a CA and a server certificate
    with tls_redis(tmp_path / "redis", files) as server:
        server.url(host="localhost")       # rediss://localhost:<port>/0: the name it was made for
        server.url(host="127.0.0.1")       # the same server under a name it was not made for
    with TlsTerminator(files, "127.0.0.1", 5672) as front:  # amqps:// in front of RabbitMQ
        f"amqps://guest:guest@localhost:{front.port}//"

`redis-server` speaks TLS itself (`--tls-port`); RabbitMQ is shared by every test and is not
restarted, so `TlsTerminator` stands in front of it: it does the server side of the TLS handshake
with the certificate made here and passes the bytes on to RabbitMQ's plain port. What the client
sees is what a TLS listener of RabbitMQ would show it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.redis import free_port

HOST = "127.0.0.1"
START_TIMEOUT = 20.0


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certificates(directory: Path, *, names: Sequence[str]) -> TlsFiles:
    """A throwaway CA and a server certificate it signed, valid for `names` (DNS names or IPs)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("snowpipe test CA"))
        .issuer_name(_name("snowpipe test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )
    files.server_key.chmod(0o600)
    return files


class TlsRedis:
    """A `redis-server` of one test that speaks only TLS, with the certificate of `files`."""

    def __init__(self, data_dir: Path, files: TlsFiles) -> None:
        self.data_dir = data_dir
        self.files = files
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "redis-server.log"

    def url(self, db: int = 0, *, host: str = "localhost") -> str:
        return f"rediss://{host}:{self.port}/{db}"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server", "--port", "0", "--tls-port", str(self.port),
            "--bind", HOST, "-::1", "--dir", str(self.data_dir), "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
            "--logfile", str(self.log_path),
            "--tls-cert-file", str(self.files.server_cert),
            "--tls-key-file", str(self.files.server_key),
            "--tls-ca-cert-file", str(self.files.ca_cert),
            "--tls-auth-clients", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"TLS redis-server on :{self.port} did not start\n{log}")
            time.sleep(0.05)

    def answers(self) -> bool:
        probe = redis.Redis.from_url(
            self.url(), ssl_ca_certs=str(self.files.ca_cert), socket_connect_timeout=0.5,
            socket_timeout=0.5,
        )  # fmt: skip
        try:
            return bool(probe.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            probe.close()

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@contextmanager
def tls_redis(data_dir: Path, files: TlsFiles) -> Iterator[TlsRedis]:
    server = TlsRedis(data_dir, files)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class TlsTerminator:
    """Accept TLS on 127.0.0.1:<port> (and ::1) with `files`' certificate; forward the plain
    bytes to (host, target_port). One thread per direction per connection; `close()` ends all."""

    def __init__(self, files: TlsFiles, host: str, target_port: int) -> None:
        self.target = (host, target_port)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(files.server_cert, files.server_key)
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._start(self._accept_loop)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                raw, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self._start(self._serve, raw)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            client = self._context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()  # the client refused our certificate: what the test looks for
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        with self._lock:
            self._sockets += [client, upstream]
        self._start(self._pump, client, upstream)
        self._start(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(0.2)
        while not self._closed.is_set():
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except (ssl.SSLWantReadError, ssl.SSLError, OSError):
                break
            if not data:
                break
            try:
                sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> TlsTerminator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
