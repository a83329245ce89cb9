"""`snowpipe-emulator` / `python -m emulator`: parse options, bind, print `listening on ...`, serve.

The socket is bound (and listening) before the start line is printed, so a script that waits for
the line can connect at once; with `--port 0` the line carries the port the kernel picked.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from emulator import config as defaults
from emulator.config import EmulatorConfig
from emulator.schema import Column, parse_columns


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _public_key(text: str) -> tuple[str, Path]:
    subject, sep, path = text.partition("=")
    if not sep or "." not in subject or not path:
        raise argparse.ArgumentTypeError(
            f"expected ACCOUNT.USER=PEMFILE (e.g. MYORG-ACCT.LOADER=keys/loader.pub), got {text!r}"
        )
    pem = Path(path)
    if not pem.is_file():
        raise argparse.ArgumentTypeError(f"public key file {path!r} does not exist")
    return subject.upper(), pem


@dataclass(frozen=True)
class PipeArg:
    """One `--pipe`: its name, its table's columns, the table it loads, its error logging."""

    database: str
    schema: str
    pipe: str
    columns: list[Column] | None = None
    table: str | None = None
    error_logging: bool | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        """(database, schema, pipe) as written."""
        return (self.database, self.schema, self.pipe)


_PIPE_FORM = (
    "DATABASE.SCHEMA.PIPE[(COL TYPE [NOT NULL], ...)] [TABLE = NAME] [ERROR_LOGGING = TRUE]"
)
_OPTION_RE = re.compile(r'\s*([A-Za-z_]+)\s*=\s*("(?:[^"]|"")*"|[^\s"]+)')


def _split_pipe_arg(text: str) -> tuple[str, str | None, str]:
    """(name, the text inside the parentheses or None, the options after them)."""
    in_quotes = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            in_quotes = not in_quotes
        elif not in_quotes and (ch == "(" or ch.isspace()):
            break
        i += 1
    name, rest = text[:i], text[i:].lstrip()
    if not rest.startswith("("):
        return name, None, rest
    depth = 0
    for j, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return name, rest[1:j], rest[j + 1 :]
    raise argparse.ArgumentTypeError(f"unbalanced parentheses: expected {_PIPE_FORM}, got {text!r}")


def _pipe(text: str) -> PipeArg:
    name, inside, options = _split_pipe_arg(text.strip())
    columns: list[Column] | None = None
    if inside is not None:
        try:
            columns = parse_columns(inside)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parts = name.split(".")
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"expected {_PIPE_FORM}, got {text!r}")
    table: str | None = None
    error_logging: bool | None = None
    position = 0
    while position < len(options.rstrip()):
        match = _OPTION_RE.match(options, position)
        if match is None:
            raise argparse.ArgumentTypeError(
                f"cannot read {options[position:].strip()!r}: expected {_PIPE_FORM}"
            )
        key, value = match[1].upper(), match[2]
        if key == "TABLE":
            table = value
        elif key == "ERROR_LOGGING" and value.upper() in ("TRUE", "FALSE"):
            error_logging = value.upper() == "TRUE"
        else:
            raise argparse.ArgumentTypeError(
                f"unknown pipe option {match[0].strip()!r}: use TABLE = NAME or "
                "ERROR_LOGGING = TRUE|FALSE"
            )
        position = match.end()
    return PipeArg(parts[0], parts[1], parts[2], columns, table, error_logging)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(
        prog="snowpipe-emulator",
        description="A local emulator of the Snowpipe Streaming REST API (both planes, one port).",
    )
    p.add_argument("--host", default=defaults.DEFAULT_HOST, help="bind address (127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=defaults.DEFAULT_PORT, help="port (8087; 0 = pick a free one)"
    )
    p.add_argument("--db", metavar="PATH", help="SQLite file for committed rows and offsets")
    p.add_argument(
        "--scoped-token-ttl", type=_positive_float, default=defaults.DEFAULT_SCOPED_TOKEN_TTL,
        metavar="SECONDS", help="lifetime of scoped tokens (3600)",
    )
    p.add_argument(
        "--commit-delay", type=_positive_float, default=defaults.DEFAULT_COMMIT_DELAY,
        metavar="SECONDS", help="rows commit this long after their append (1.0)",
    )
    p.add_argument(
        "--rate-limit", type=_positive_float, default=defaults.DEFAULT_RATE_LIMIT, metavar="RPS",
        help="append requests per second per channel (10; 0 = off)",
    )
    p.add_argument(
        "--max-bytes-per-second", type=_positive_float,
        default=defaults.DEFAULT_MAX_BYTES_PER_SECOND, metavar="BYTES",
        help="uncompressed append bytes per second per channel (20 MiB; 0 = off)",
    )
    p.add_argument(
        "--max-request-bytes", type=int, default=defaults.DEFAULT_MAX_REQUEST_BYTES,
        metavar="BYTES", help="largest append body on the wire (4194304)",
    )
    p.add_argument(
        "--public-key", type=_public_key, action="append", default=[],
        metavar="ACCOUNT.USER=PEMFILE", help="register a public key (repeatable)",
    )
    p.add_argument(
        "--pipe", type=_pipe, action="append", default=[], metavar="DB.SCHEMA.PIPE",
        help=(
            "register a pipe (repeatable), optionally with its table's columns, the table it "
            "loads and error logging: 'DB.S.P(ID NUMBER NOT NULL, NAME VARCHAR) TABLE = T "
            "ERROR_LOGGING = TRUE'; <TABLE>-STREAMING pipes need no registration"
        ),
    )
    p.add_argument(
        "--accept-any-pipe", action="store_true", help="create every pipe on first use"
    )
    p.add_argument(
        "--sql-partition-rows", type=int, default=defaults.DEFAULT_SQL_PARTITION_ROWS,
        metavar="N", help="rows per partition of a SQL API result (1000)",
    )
    p.add_argument(
        "--strict", action="store_true",
        help="no effect (kept for old scripts): requests without Accept are refused by default",
    )
    p.add_argument(
        "--allow-missing-accept", action="store_true",
        help="accept requests without an Accept header (the service answers 391902)",
    )
    p.add_argument(
        "--hostname-with-port", action="store_true",
        help="answer the hostname call with host:port (for tutorials that build "
        "https://$INGEST_HOST/...; Snowflake's SDK needs it off)",
    )
    p.add_argument(
        "--case-insensitive-status", action="store_true",
        help="match bulk-status channel names ignoring case (documented: case-sensitive)",
    )
    p.add_argument(
        "--legacy-channel-not-found", action="store_true",
        help="answer a missing channel with 404 ERR_CHANNEL_DOES_NOT_EXIST_OR_NOT_AUTHORIZED "
        "(the service: 400 ERR_CHANNEL_DOES_NOT_EXIST_OR_IS_NOT_AUTHORIZED)",
    )
    p.add_argument(
        "--strict-content-encoding", action="store_true",
        help="refuse a Content-Encoding the body is not in (default: read such a body as is)",
    )
    p.add_argument("--tls", action="store_true", help="serve HTTPS with a generated certificate")
    p.add_argument("--ca-out", type=Path, metavar="PATH", help="with --tls: write the CA PEM here")
    p.add_argument("--certfile", type=Path, help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--keyfile", type=Path, help="the private key for --certfile (PEM)")
    p.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"],
        help="log level (info logs the reason of every refused request)",
    )
    return p


def parse_config(argv: list[str] | None = None) -> EmulatorConfig:
    """The EmulatorConfig for these arguments (exits with a usage error on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    if args.tls and args.certfile:
        parser.error("use either --tls (generated certificate) or --certfile/--keyfile")
    if args.ca_out and not args.tls:
        parser.error("--ca-out needs --tls")
    if args.max_request_bytes <= 0:
        parser.error("--max-request-bytes must be positive")
    if args.sql_partition_rows <= 0:
        parser.error("--sql-partition-rows must be positive")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    cfg = EmulatorConfig(
        host=args.host,
        port=args.port,
        db_path=args.db,
        scoped_token_ttl=args.scoped_token_ttl,
        commit_delay=args.commit_delay,
        rate_limit=args.rate_limit,
        max_bytes_per_second=args.max_bytes_per_second,
        max_request_bytes=args.max_request_bytes,
        public_keys=list(args.public_key),
        pipes=[a.key for a in args.pipe],
        pipe_columns={a.key: a.columns for a in args.pipe if a.columns},
        pipe_tables={a.key: a.table for a in args.pipe if a.table is not None},
        pipe_error_logging={
            a.key: a.error_logging for a in args.pipe if a.error_logging is not None
        },
        accept_any_pipe=args.accept_any_pipe,
        sql_partition_rows=args.sql_partition_rows,
        strict=args.strict,
        require_accept=not args.allow_missing_accept,
        hostname_with_port=args.hostname_with_port,
        case_insensitive_status=args.case_insensitive_status,
        legacy_channel_not_found=args.legacy_channel_not_found,
        strict_content_encoding=args.strict_content_encoding,
        tls=args.tls,
        ca_out=args.ca_out,
        certfile=args.certfile,
        keyfile=args.keyfile,
        log_level=args.log_level,
    )
    return cfg


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


# The server's own dependencies: the [emulator] extra of snowpipe-worker (pyproject.toml).
SERVER_MODULES = ("starlette", "uvicorn")


def _require_server() -> None:
    import importlib.util

    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        # snowpipe-worker is installed from its source tree or a wheel built from it (not PyPI).
        root = Path(__file__).resolve().parent.parent
        install = (
            f"pip install -e '{root}[emulator]'"
            if (root / "pyproject.toml").is_file()
            else "pip install '/path/to/snowpipe-worker[emulator]' (the project's source tree or "
            "its wheel; it is not on PyPI)"
        )
        sys.stderr.write(
            f"snowpipe-emulator needs the [emulator] extra ({', '.join(missing)} not installed): "
            f"{install}\n"
        )
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Run the emulator until interrupted."""
    cfg = parse_config(argv)  # --help and bad arguments work without the extra
    _require_server()
    import uvicorn

    from emulator.app import create_app
    from emulator.context import Emulator
    from emulator.http import install_log_filter

    level = cfg.log_level
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        emu = Emulator.from_config(cfg)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"snowpipe-emulator: {exc}\n")
        raise SystemExit(2) from None
    certfile, keyfile = cfg.certfile, cfg.keyfile
    tmpdir: Path | None = None
    if cfg.tls:
        from emulator.tls import generate

        tmpdir = Path(tempfile.mkdtemp(prefix="snowpipe-emulator-tls-"))
        files = generate(tmpdir, host=cfg.host)
        certfile, keyfile = files.server_cert, files.server_key
        if cfg.ca_out:
            cfg.ca_out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files.ca_cert, cfg.ca_out)
        else:
            sys.stderr.write(f"snowpipe-emulator: CA certificate at {files.ca_cert}\n")
    try:
        sock = _bind(cfg.host, cfg.port)
    except OSError as exc:
        sys.stderr.write(
            f"snowpipe-emulator: cannot listen on {cfg.host}:{cfg.port}: {exc} "
            "(pick another --port, or 0 for a free one)\n"
        )
        raise SystemExit(2) from None
    port = sock.getsockname()[1]
    install_log_filter()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(cfg, emu),
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_level=level,
            lifespan="on",
            ssl_certfile=str(certfile) if certfile else None,
            ssl_keyfile=str(keyfile) if keyfile else None,
            timeout_keep_alive=30,
            # The client's address is the socket's: X-Forwarded-For/-Proto are ignored whatever
            # FORWARDED_ALLOW_IPS says, so no header can make a remote client look like loopback
            # (the admin API answers loopback only).
            proxy_headers=False,
            # A client that leaves a TLS connection open must not hold up a stop (tests restart
            # emulators often); in-flight requests get this long to finish.
            timeout_graceful_shutdown=1,
        )
    )
    scheme = "https" if certfile else "http"
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    # The one line on stdout: scripts and tests wait for it.
    sys.stdout.write(f"listening on {scheme}://{shown}:{port}\n")
    sys.stdout.flush()
    try:
        server.run(sockets=[sock])
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    main()
