"""TLS for every connection the worker makes: the certificate and the host name are checked.

One rule for Snowflake (https), the broker (`rediss://`, `amqps://`) and the state store
(`rediss://`): the server's certificate must chain to a trusted CA and name the host the URL
connects to. Trusted are the system's CA certificates plus, when `SNOWPIPE_CA_FILE` is set, the
certificates in that PEM file (a private CA, a self-signed server certificate).

Each client library takes its TLS options in its own form, so this module gives each one:

- `client_context(ca_file)`: an `ssl.SSLContext` (httpx, the Snowpipe client, doctor);
- `redis_ssl_kwargs(url, ca_file)`: redis-py's `ssl_*` keyword arguments for a `rediss://` URL
  (the state store; kombu's Redis transport takes the same keys as Celery's `broker_use_ssl`);
- `broker_ssl_options(url, ca_file)`: Celery's `broker_use_ssl` for `rediss://` or `amqps://`.
  Without it kombu connects to `rediss://` with `CERT_NONE` (after a warning), and py-amqp checks
  an `amqps://` server's chain but not its host name.

Standard library only: the client layer uses it too.
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TLS_SCHEMES = frozenset({"rediss", "amqps"})


def uses_tls(url: str) -> bool:
    """True when `url` asks for TLS (`rediss://`, `amqps://`)."""
    return urlsplit(url).scheme in TLS_SCHEMES


@functools.cache
def _context(ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()  # the system's CAs, CERT_REQUIRED, check_hostname
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


def client_context(ca_file: Path | str | None = None) -> ssl.SSLContext:
    """A client SSLContext that checks the chain (system CAs + `ca_file`) and the host name.

    Cached per CA file (building one costs ~20 ms); an SSLContext is safe to share between
    threads and to inherit across fork().
    """
    return _context(str(ca_file) if ca_file is not None else None)


def redis_ssl_kwargs(url: str, ca_file: Path | str | None = None) -> dict[str, Any]:
    """redis-py's TLS keyword arguments for `url` (empty unless it is `rediss://`)."""
    if urlsplit(url).scheme != "rediss":
        return {}
    kwargs: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    if ca_file is not None:
        kwargs["ssl_ca_certs"] = str(ca_file)  # redis-py adds it to the system's CAs
    return kwargs


def _amqp_options(url: str, ca_file: str | None) -> dict[str, Any]:
    # py-amqp builds `ssl.create_default_context(**context)` and sets its check_hostname from
    # the same dict. The name to check is the URL's: kombu, given None, would fill in the host it
    # connects to, after turning `localhost` into 127.0.0.1 (None stays for a failover list of
    # URLs, where each connection names its own host). Passing `cafile` alone would replace the
    # system's CAs, so they are named too.
    host = None if ";" in url else urlsplit(url).hostname
    context: dict[str, Any] = {"check_hostname": True}
    if ca_file is not None:
        defaults = ssl.get_default_verify_paths()
        context["cafile"] = defaults.cafile
        context["capath"] = defaults.capath
        context["cadata"] = Path(ca_file).read_text()
    return {"context": context, "server_hostname": host}


def broker_ssl_options(url: str, ca_file: Path | str | None = None) -> dict[str, Any] | None:
    """Celery's `broker_use_ssl` (kombu's `ssl=`) for `url`; None when it is not TLS."""
    scheme = urlsplit(url).scheme
    if scheme == "rediss":
        return redis_ssl_kwargs(url, ca_file)
    if scheme == "amqps":
        return _amqp_options(url, str(ca_file) if ca_file is not None else None)
    return None
