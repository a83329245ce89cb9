"""The emulator's options with their named defaults, shared by the CLI, the app and the state."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from emulator.schema import Column

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8087
# Snowflake does not document the scoped token's lifetime; clients assume about an hour.
DEFAULT_SCOPED_TOKEN_TTL = 3600.0
# Real commits take 5-10 s; one second keeps local runs and tests quick while still being async.
DEFAULT_COMMIT_DELAY = 1.0
# The limitations page states 10 requests per second per channel over REST.
DEFAULT_RATE_LIMIT = 10.0
# 4 MB per append request, measured on the wire after compression.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Uncompressed bytes per second per channel: the service allows about 20 MB/s (429s were
# observed from ~15 MB/s).
DEFAULT_MAX_BYTES_PER_SECOND = 20 * 1024 * 1024
# Rows per partition of a SQL API result (`?partition=N` fetches the others). Snowflake sizes
# partitions by bytes; its first partitions hold a few thousand small rows.
DEFAULT_SQL_PARTITION_ROWS = 1000
# How far in the future a key-pair JWT's `iat` may be (clock skew between client and server).
JWT_IAT_SKEW_SECONDS = 60.0
# "The JWT is valid for at most one hour after the token is issued."
JWT_MAX_LIFETIME_SECONDS = 3600.0


@dataclass
class EmulatorConfig:
    """Everything the app needs to know from the command line (or from a test)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    db_path: str | None = None
    scoped_token_ttl: float = DEFAULT_SCOPED_TOKEN_TTL
    commit_delay: float = DEFAULT_COMMIT_DELAY
    rate_limit: float = DEFAULT_RATE_LIMIT
    max_bytes_per_second: float = DEFAULT_MAX_BYTES_PER_SECOND
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    public_keys: list[tuple[str, Path]] = field(default_factory=list)  # ("ACCOUNT.USER", pem)
    pipes: list[tuple[str, str, str]] = field(default_factory=list)
    # Table columns of pipes given with a schema on the command line.
    pipe_columns: dict[tuple[str, str, str], list[Column]] = field(default_factory=dict)
    # The table a pipe given on the command line loads (`TABLE = T`), and its error logging.
    pipe_tables: dict[tuple[str, str, str], str] = field(default_factory=dict)
    pipe_error_logging: dict[tuple[str, str, str], bool] = field(default_factory=dict)
    accept_any_pipe: bool = False
    sql_partition_rows: int = DEFAULT_SQL_PARTITION_ROWS
    # Switches (docs/emulator.md). The defaults follow the live service or,
    # where that is unknown, Snowflake's documentation.
    require_accept: bool = True  # off: --allow-missing-accept
    strict: bool = False  # no effect any more (the Accept check is on by default)
    hostname_with_port: bool = False
    case_insensitive_status: bool = False
    legacy_channel_not_found: bool = False
    strict_content_encoding: bool = False
    tls: bool = False
    ca_out: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    log_level: str = "warning"
