"""Typed settings: a TOML profile overridden by `SNOWPIPE_*` environment variables.

The one place for configuration and defaults. `load_settings()` returns a validated, frozen
`Settings` or raises `SettingsError`, whose message names each bad setting and how to fix it.

Profile: `SNOWPIPE_CONFIG` is a profile name or a path to a TOML file. Names are the profiles
shipped in the package (`worker/profiles/`, package data: `local` -> `worker/profiles/local.toml`),
found through `importlib.resources`, so an installed wheel has them too. Keys in the file are the
setting names in lower case without the prefix (`account = "..."` for `SNOWPIPE_ACCOUNT`).
Environment variables win over the file.
Secrets (private key, passphrase) come from the environment or from files, never from the repo.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import os
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from worker.errors import InvalidNameError
from worker.errors import SettingsError as SettingsError  # noqa: PLC0414 (re-exported)
from worker.identifiers import parse_pipe_list
from worker.redisurl import is_sentinel_url, parse_sentinel_url, redact_url, url_password

ENV_PREFIX = "SNOWPIPE_"
# The named profiles, shipped as package data (pyproject.toml: [tool.setuptools.package-data]).
PROFILE_DIR = Path(str(importlib.resources.files("worker").joinpath("profiles")))

# Named defaults (docs/delivery.md explains the delivery ones).
DEFAULT_JWT_LIFETIME_SECONDS = 59 * 60  # Snowflake caps key-pair JWTs at one hour
DEFAULT_REFRESH_MAX_MARGIN_SECONDS = 120.0  # refresh at min(120 s, 20 % of L) before expiry
DEFAULT_REFRESH_MARGIN_FRACTION = 0.2
DEFAULT_REFRESH_HARD_MARGIN_SECONDS = 10.0  # closer than this to expiry, callers wait
DEFAULT_REFRESH_JITTER_FRACTION = 0.0  # opt-in: refresh_at later by up to this share of the window
DEFAULT_RETRY_ATTEMPTS = 4
DEFAULT_RETRY_BASE_SECONDS = 0.2
DEFAULT_RETRY_MULTIPLIER = 1.8
DEFAULT_RETRY_CAP_SECONDS = 5.0
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # Snowpipe Streaming's cap per append, on the wire
DEFAULT_QUEUE_NAME = "snowpipe.ingest"  # ingest_batch queue; refresh_tokens uses "<name>.control"
DEFAULT_CHANNELS_PER_PIPE = 4  # channel logs (and Snowflake channels) per pipe
DEFAULT_COMMIT_TIMEOUT_SECONDS = 60.0  # Snowflake commits in 5-10 s; a reopen settles the rest
DEFAULT_LEASE_TTL_SECONDS = 10.0  # a dead node's channels are taken over this long after it died
DEFAULT_LOG_MAX_BYTES = 64 * 1024 * 1024  # per channel log; above it new batches wait
DEFAULT_BACKPRESSURE_WAIT_SECONDS = 5.0  # then the task puts the batch back in the queue
DEFAULT_CHANNEL_REQUESTS_PER_SECOND = 10.0  # Snowflake's documented per-channel request rate
DEFAULT_CHANNEL_BYTES_PER_SECOND = 16 * 1024 * 1024  # under Snowflake's 20 MB/s per channel
DEFAULT_COALESCE_MAX_BYTES = 16 * 1024 * 1024  # uncompressed NDJSON per append request
DEFAULT_APPEND_LINGER_SECONDS = 1.0  # like the SDK's max client lag: a batch waits for others
DEFAULT_STATE_OUTAGE_SECONDS = 300.0  # tasks ride out a state-store outage this long (failover)
DEFAULT_DEDUP_TTL_SECONDS = 7 * 24 * 3600  # how long a batch id is remembered (redelivery horizon)
DEFAULT_SQL_TIMEOUT_SECONDS = 60.0  # a SQL API statement (the error-table query) may run this long

# The metrics endpoint listens on loopback unless SNOWPIPE_METRICS_HOST opens it.
DEFAULT_METRICS_HOST = "127.0.0.1"
# The heartbeat file's period; a probe allows several missed periods (docs/operations.md).
DEFAULT_HEARTBEAT_SECONDS = 5.0

_LOOPBACK_NAMES = {"localhost"}

# What to tell a user about a setting that failed validation.
_FIXES: dict[str, str] = {
    "account": "set SNOWPIPE_ACCOUNT to your account identifier, e.g. myorg-myaccount",
    "user": "set SNOWPIPE_USER to the Snowflake user that owns the registered public key",
    "private_key_path": "point SNOWPIPE_PRIVATE_KEY_PATH at a readable PEM private key file",
    "private_key": "set SNOWPIPE_PRIVATE_KEY to the PEM text of the private key",
    "account_url": (
        "set SNOWPIPE_ACCOUNT_URL to https://<account>.snowflakecomputing.com "
        "(http:// only for 127.0.0.1, ::1 or localhost)"
    ),
    "ca_file": "point SNOWPIPE_CA_FILE at a readable PEM CA bundle, or unset it",
    "broker_url": "use redis://HOST:PORT/DB or amqp://USER:PASS@HOST:PORT/VHOST",
    "state_url": (
        "set SNOWPIPE_STATE_URL to a Redis URL, e.g. redis://127.0.0.1:6379/0, or to its "
        "Sentinels, e.g. sentinel://10.0.0.5:26379;sentinel://10.0.0.6:26379/0 with "
        "SNOWPIPE_STATE_SENTINEL_MASTER"
    ),
    "state_sentinel_master": (
        "set SNOWPIPE_STATE_SENTINEL_MASTER to the name Sentinel monitors the state Redis under "
        "(the NAME of `sentinel monitor NAME HOST PORT QUORUM`)"
    ),
    "error_table": "set SNOWPIPE_ERROR_TABLE to auto (read error tables) or off",
    "pipe_tables": (
        "list SNOWPIPE_PIPE_TABLES as DB.SCHEMA.PIPE=TABLE (or =DB.SCHEMA.TABLE), comma-separated"
    ),
    "metrics_host": "set SNOWPIPE_METRICS_HOST to an address of this host, e.g. 127.0.0.1 or "
    "0.0.0.0",
    "heartbeat_file": "point SNOWPIPE_HEARTBEAT_FILE at a path in a writable directory",
}


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return ENV_PREFIX + field.upper()


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Every knob of the worker, validated at start."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    # The profile file in use, if any (set by the source, not by users).
    toml_path: ClassVar[Path | None] = None

    # --- Identity -------------------------------------------------------------------------------
    # Required by workers (`load_settings()`); producers may omit them (`require_identity=False`).
    account: str = ""
    user: str = ""
    role: str | None = None
    private_key_path: Path | None = None
    private_key: SecretStr | None = None
    private_key_passphrase: SecretStr | None = None
    account_url: str = ""  # default derived from `account`
    ca_file: Path | None = None

    # --- Tokens (TokenGuard) ----------------------------------------------------------------------
    jwt_lifetime_seconds: float = Field(DEFAULT_JWT_LIFETIME_SECONDS, gt=0, le=3600)
    refresh_max_margin_seconds: float = Field(DEFAULT_REFRESH_MAX_MARGIN_SECONDS, ge=0)
    refresh_margin_fraction: float = Field(DEFAULT_REFRESH_MARGIN_FRACTION, gt=0, lt=1)
    refresh_hard_margin_seconds: float = Field(DEFAULT_REFRESH_HARD_MARGIN_SECONDS, ge=0)
    refresh_wait_timeout_seconds: float = Field(10.0, gt=0)
    refresh_failure_backoff_seconds: float = Field(1.0, gt=0)
    refresh_failure_backoff_cap_seconds: float = Field(30.0, gt=0)
    refresh_escalate_after: int = Field(3, ge=1)
    refresh_jitter_fraction: float = Field(DEFAULT_REFRESH_JITTER_FRACTION, ge=0, le=1)

    # --- Retries (RetryPolicy) --------------------------------------------------------------------
    retry_attempts: int = Field(DEFAULT_RETRY_ATTEMPTS, ge=1)
    retry_base_seconds: float = Field(DEFAULT_RETRY_BASE_SECONDS, ge=0)
    retry_multiplier: float = Field(DEFAULT_RETRY_MULTIPLIER, ge=1)
    retry_cap_seconds: float = Field(DEFAULT_RETRY_CAP_SECONDS, ge=0)
    retry_deadline_seconds: float = Field(30.0, gt=0)
    retry_budget_capacity: float = Field(100.0, gt=0)
    retry_budget_refill_per_success: float = Field(0.1, ge=0)
    retry_budget_cost_per_retry: float = Field(1.0, gt=0)

    # --- HTTP -------------------------------------------------------------------------------------
    http_connect_timeout_seconds: float = Field(5.0, gt=0)
    http_timeout_seconds: float = Field(30.0, gt=0)
    compression: Literal["zstd", "gzip", "none"] = "zstd"
    max_request_bytes: int = Field(DEFAULT_MAX_REQUEST_BYTES, gt=1024)

    # --- Celery, state store, shared token store --------------------------------------------------
    broker_url: str = "redis://127.0.0.1:6379/0"
    state_url: str = ""  # default: the broker when it is Redis
    # With a sentinel:// state URL (docs/operations.md, "Sentinel deployment"): the master name,
    # Sentinel's own password (`requirepass` of the Sentinels), and the Redis nodes' password
    # (any state URL; or in the URL itself, as Celery takes it).
    state_sentinel_master: str = ""
    state_sentinel_password: SecretStr | None = None
    state_password: SecretStr | None = None
    beat_refresh_seconds: float = Field(60.0, gt=0)
    visibility_timeout_seconds: int = Field(900, gt=0)

    # --- Delivery: channel logs, pumps, leases (docs/delivery.md) ---------------------------------
    channels_per_pipe: int = Field(DEFAULT_CHANNELS_PER_PIPE, ge=1, le=2000)
    channel_prefix: str = Field("snowpipe", pattern=r"^[A-Za-z0-9_-]+$")
    commit_poll_seconds: float = Field(0.5, gt=0)
    # A request still not committed after this long is replayed (reopen): see docs/delivery.md.
    commit_timeout_seconds: float = Field(DEFAULT_COMMIT_TIMEOUT_SECONDS, gt=0)
    lease_ttl_seconds: float = Field(DEFAULT_LEASE_TTL_SECONDS, ge=1)
    log_max_bytes: int = Field(DEFAULT_LOG_MAX_BYTES, ge=0)  # 0: no cap
    backpressure_wait_seconds: float = Field(DEFAULT_BACKPRESSURE_WAIT_SECONDS, ge=0)
    channel_requests_per_second: float = Field(DEFAULT_CHANNEL_REQUESTS_PER_SECOND, gt=0)
    channel_bytes_per_second: float = Field(DEFAULT_CHANNEL_BYTES_PER_SECOND, gt=0)
    coalesce_max_bytes: int = Field(DEFAULT_COALESCE_MAX_BYTES, gt=1024)
    append_linger_seconds: float = Field(DEFAULT_APPEND_LINGER_SECONDS, ge=0, le=10)
    dedup_ttl_seconds: int = Field(DEFAULT_DEDUP_TTL_SECONDS, ge=60)
    # WAIT for this many replicas of the state Redis after each log write (0: do not wait).
    state_min_replicas: int = Field(0, ge=0)
    state_replica_timeout_ms: int = Field(1000, ge=1)
    # How long a task rides out an unreachable state store with its batch kept in the queue
    # (retrying with capped backoff) before it says so at ERROR; it is never dropped after it
    # either. Longer than a Redis failover (Sentinel's default down-after is 30 s, plus the
    # election and the clients' reconnect).
    state_outage_seconds: float = Field(DEFAULT_STATE_OUTAGE_SECONDS, gt=0)
    pump_enabled: bool = True  # False: this node only takes batches off the queue
    queue_name: str = Field(DEFAULT_QUEUE_NAME, pattern=r"^[A-Za-z0-9_.:-]+$")
    # How producers (publish_batch, `snowpipe-worker publish`, requeues) send a batch's rows: as
    # an array of JSON objects, or as one string of NDJSON lines, checked and encoded once by
    # the producer and stored by the worker as sent (docs/message-format.md). "rows" keeps
    # workers older than the NDJSON form able to read every message.
    publish_form: Literal["rows", "ndjson"] = "rows"
    # Prometheus metrics on this port of every worker node (0: no metrics endpoint), bound to
    # this address: loopback unless an operator opens it (0.0.0.0, or the pod's address).
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = DEFAULT_METRICS_HOST

    # --- Rejected rows: error tables through the SQL API (docs/operations.md) ---------------------
    # auto: find each rejected row in its table's error table (when error logging is on);
    # off: never query, attribute rejected rows to whole batches.
    error_table: Literal["auto", "off"] = "auto"
    sql_warehouse: str | None = None  # the warehouse of the query (default: the user's default)
    sql_timeout_seconds: float = Field(DEFAULT_SQL_TIMEOUT_SECONDS, gt=0, le=604800)
    # The tables of pipes that are neither default pipes nor readable with DESCRIBE PIPE.
    pipe_tables: str = ""

    # --- Operations (docs/operations.md) ----------------------------------------------------------
    # The pipes this deployment serves, DB.SCHEMA.PIPE,...: a batch for any other pipe is
    # dead-lettered (empty: every pipe with a valid name is served). `snowpipe-worker doctor` and
    # the worker's start-up checks probe them.
    pipes: str = ""
    startup_checks: bool = True  # the worker runs doctor's checks at start and logs failures
    # The node's heartbeat file (liveness and readiness probes; docs/operations.md): touched
    # every heartbeat_seconds while the node's consumer and pump balancer make progress.
    heartbeat_file: Path | None = None
    heartbeat_seconds: float = Field(DEFAULT_HEARTBEAT_SECONDS, ge=1, le=60)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = profile_path()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("metrics_host")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        value = value.strip()
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None
        return value

    @field_validator("heartbeat_file")
    @classmethod
    def _writable_dir(cls, value: Path | None) -> Path | None:
        if value is None or not str(value):
            return None
        value = value.expanduser()
        if not value.parent.is_dir() or not os.access(value.parent, os.W_OK):
            raise ValueError(f"{value.parent} is not a writable directory")
        return value

    @field_validator("account", "user")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @field_validator("private_key_path", "ca_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        if not os.access(value, os.R_OK):
            raise ValueError(f"file is not readable: {value}")
        return value

    @model_validator(mode="after")
    def _derive_and_check(self) -> Settings:
        if self.private_key_path is not None and self.private_key is not None:
            raise ValueError(
                "both SNOWPIPE_PRIVATE_KEY_PATH and SNOWPIPE_PRIVATE_KEY are set: keep one"
            )
        self._check_account_url()
        self._check_broker_and_state()
        if self.refresh_hard_margin_seconds >= self.refresh_max_margin_seconds > 0:
            raise ValueError(
                "SNOWPIPE_REFRESH_HARD_MARGIN_SECONDS must be below "
                "SNOWPIPE_REFRESH_MAX_MARGIN_SECONDS, or the soft window is empty"
            )
        return self

    def _check_account_url(self) -> None:
        if not self.account_url and not self.account:
            return  # a producer's settings: no Snowflake identity (identity_problems says so)
        url = (
            self.account_url
            or f"https://{self.account.lower().replace('_', '-')}.snowflakecomputing.com"
        )
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(
                f"SNOWPIPE_ACCOUNT_URL {redact_url(url)!r} is not an http(s) URL: "
                f"{_FIXES['account_url']}"
            )
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError(
                f"SNOWPIPE_ACCOUNT_URL {redact_url(url)!r} uses http:// for a host that is not "
                "loopback; "
                "use https:// (plain http is accepted only for 127.0.0.1, ::1 and localhost)"
            )
        object.__setattr__(self, "account_url", url.rstrip("/"))

    def _check_broker_and_state(self) -> None:
        broker = urlsplit(self.broker_url).scheme
        if broker not in ("redis", "rediss", "amqp", "amqps", "pyamqp"):
            raise ValueError(
                f"SNOWPIPE_BROKER_URL scheme {broker!r} is not supported: {_FIXES['broker_url']}"
            )
        query = {key.lower() for key, _ in parse_qsl(urlsplit(self.broker_url).query)}
        if "password" in query:
            raise ValueError(
                "SNOWPIPE_BROKER_URL carries its password as a query parameter, which kombu "
                "cannot read: put it in the URL's user info instead (redis://:PASSWORD@HOST:PORT/DB"
                " or amqp://USER:PASSWORD@HOST:PORT/VHOST)"
            )
        state = self.state_url
        if not state:
            if not broker.startswith("redis"):
                self._check_sentinel_settings(sentinel=False)
                return  # RabbitMQ without a state URL: enough to publish (identity_problems)
            state = self.broker_url
        sentinel = is_sentinel_url(state)
        if sentinel:
            parse_sentinel_url(state)  # ValueError: the problem and the form, password masked
        elif urlsplit(state).scheme not in ("redis", "rediss"):
            raise ValueError(
                f"SNOWPIPE_STATE_URL {redact_url(state)!r} is not a Redis URL: "
                + _FIXES["state_url"]
            )
        self._check_sentinel_settings(sentinel=sentinel)
        if self.state_password is not None:
            in_url = (
                parse_sentinel_url(state).password if sentinel else url_password(state)
            )
            if in_url is not None:
                raise ValueError(
                    "SNOWPIPE_STATE_PASSWORD is set and SNOWPIPE_STATE_URL has a password too: "
                    "keep one (remove it from the URL, or unset SNOWPIPE_STATE_PASSWORD)"
                )
        object.__setattr__(self, "state_url", state)

    def _check_sentinel_settings(self, *, sentinel: bool) -> None:
        master = self.state_sentinel_master.strip()
        object.__setattr__(self, "state_sentinel_master", master)
        if sentinel and not master:
            raise ValueError(
                "SNOWPIPE_STATE_SENTINEL_MASTER is required with a sentinel:// SNOWPIPE_STATE_URL: "
                + _FIXES["state_sentinel_master"]
            )
        if not sentinel:
            extra = [
                name
                for name, value in (
                    ("SNOWPIPE_STATE_SENTINEL_MASTER", master),
                    ("SNOWPIPE_STATE_SENTINEL_PASSWORD", self.state_sentinel_password),
                )
                if value
            ]
            if extra:
                raise ValueError(
                    f"{' and '.join(extra)} {'is' if len(extra) == 1 else 'are'} set but "
                    "SNOWPIPE_STATE_URL is not a sentinel:// URL: unset "
                    f"{'it' if len(extra) == 1 else 'them'}, or set SNOWPIPE_STATE_URL to the "
                    "Sentinels, e.g. sentinel://10.0.0.5:26379;sentinel://10.0.0.6:26379/0"
                )

    def identity_problems(self) -> list[str]:
        """What a worker needs and these settings lack (account, user, a private key, a state
        URL with RabbitMQ); each line
        names the setting and its fix. Empty for a complete identity."""
        problems = [
            f"{env_name(name)}: is required ({_FIXES[name]})"
            for name in ("account", "user")
            if not getattr(self, name)
        ]
        if not self.state_url:
            problems.append(
                "SNOWPIPE_STATE_URL is required when the broker is RabbitMQ: " + _FIXES["state_url"]
            )
        if self.private_key_path is None and self.private_key is None:
            problems.append(
                "no private key: set SNOWPIPE_PRIVATE_KEY_PATH (a PEM file) or "
                "SNOWPIPE_PRIVATE_KEY (the PEM text)"
            )
        return problems

    @field_validator("pipes")
    @classmethod
    def _pipe_list(cls, value: str) -> str:
        try:
            parse_pipe_list(value)
        except InvalidNameError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("pipe_tables")
    @classmethod
    def _pipe_table_list(cls, value: str) -> str:
        pipe_table_map(value)  # ValueError naming the bad entry
        return value

    @field_validator("sql_warehouse")
    @classmethod
    def _no_blank_warehouse(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    def pipe_tables_map(self) -> dict[tuple[str, str, str], tuple[str, str, str]]:
        """SNOWPIPE_PIPE_TABLES as {(db, schema, pipe): (db, schema, table)}."""
        return pipe_table_map(self.pipe_tables)

    def pipe_names(self) -> list[str]:
        """The pipes of SNOWPIPE_PIPES, as DB.SCHEMA.PIPE strings."""
        return [name.strip() for name in self.pipes.split(",") if name.strip()]

    def served_pipes(self) -> frozenset[tuple[str, str, str]] | None:
        """The pipes of SNOWPIPE_PIPES as canonical (database, schema, pipe) names
        (worker/identifiers.py); None when it is unset (every valid pipe is served)."""
        return parse_pipe_list(self.pipes) if self.pipes.strip() else None

    @property
    def state_is_sentinel(self) -> bool:
        """True when the state Redis is reached through Sentinel (a sentinel:// URL)."""
        return is_sentinel_url(self.state_url)

    @property
    def broker_is_redis(self) -> bool:
        """True when the Celery broker is Redis (else RabbitMQ)."""
        return urlsplit(self.broker_url).scheme.startswith("redis")

    def private_key_pem(self) -> bytes:
        """The private key's PEM bytes, from the file or the environment."""
        if self.private_key is not None:
            return self.private_key.get_secret_value().encode()
        assert self.private_key_path is not None
        return self.private_key_path.read_bytes()

    def passphrase(self) -> bytes | None:
        """The private key's passphrase, if one is set."""
        if self.private_key_passphrase is None:
            return None
        return self.private_key_passphrase.get_secret_value().encode()


def split_name(text: str, sep: str = ".") -> list[str]:
    """`text` split at `sep` outside double quotes (`"a.b".C` is two parts), parts stripped.

    Snowflake identifiers in double quotes may hold any character; `""` inside is a quote.
    ValueError for an unterminated quote.
    """
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted  # `""` toggles twice: stays inside, both kept
            current.append(ch)
        elif ch == sep and not quoted:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if quoted:
        raise ValueError(f"{text!r} has an unterminated double quote")
    parts.append("".join(current).strip())
    return parts


def pipe_table_map(value: str) -> dict[tuple[str, str, str], tuple[str, str, str]]:
    """`DB.SCHEMA.PIPE=TABLE,...` (TABLE may be DB.SCHEMA.TABLE) as a map; ValueError naming
    the bad entry and the expected form."""
    out: dict[tuple[str, str, str], tuple[str, str, str]] = {}
    for entry in split_name(value, ","):
        if not entry:
            continue
        sides = split_name(entry, "=")
        pipe = split_name(sides[0]) if len(sides) == 2 else []
        table = split_name(sides[1]) if len(sides) == 2 else []
        if len(pipe) != 3 or len(table) not in (1, 3) or not all(pipe) or not all(table):
            raise ValueError(
                f"{entry!r} is not DB.SCHEMA.PIPE=TABLE: {_FIXES['pipe_tables']}"
            )
        db, schema, name = pipe
        out[(db, schema, name)] = (db, schema, table[0]) if len(table) == 1 else (
            table[0], table[1], table[2]
        )
    return out


def profile_names() -> list[str]:
    """The names of the packaged profiles (`local`)."""
    return sorted(p.name.removesuffix(".toml") for p in PROFILE_DIR.glob("*.toml"))


def profile_path(environ: Any = None) -> Path | None:
    """The TOML profile chosen by `SNOWPIPE_CONFIG`, or None.

    A bare name is one of the packaged profiles (`profile_names()`); anything else is a path.
    """
    env = os.environ if environ is None else environ
    chosen = env.get(ENV_PREFIX + "CONFIG", "").strip()
    if not chosen:
        return None
    candidate = Path(chosen).expanduser()
    if candidate.suffix != ".toml" and os.sep not in chosen:
        candidate = PROFILE_DIR / f"{chosen}.toml"
    if not candidate.is_file():
        names = ", ".join(profile_names())
        raise SettingsError(
            f"SNOWPIPE_CONFIG: profile {chosen!r} not found at {candidate}; "
            f"use one of: {names}, or a path to a .toml file"
        )
    return candidate


def _describe(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    field = loc[0] if loc else ""
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if not field:
        return message
    fix = _FIXES.get(field)
    if error.get("type") == "missing":
        message = "is required"
    line = f"{env_name(field)}: {message}"
    if fix and fix not in line:
        line += f" ({fix})"
    return line


def load_settings(*, require_identity: bool = True, **overrides: Any) -> Settings:
    """Load and validate the settings, or raise `SettingsError` naming each problem and its fix.

    `require_identity=False` is for producers (publishing, dead letters, stats): they need the
    broker and state URLs only, not the Snowflake account, user and key.
    """
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = [_describe(dict(err)) for err in exc.errors(include_input=False)]
    else:
        problems = settings.identity_problems() if require_identity else []
        if not problems:
            return settings
    if profile_path() is None:
        names = ", ".join(profile_names())
        problems.append(
            f"(no profile chosen: SNOWPIPE_CONFIG may name one of {names}, or a .toml path)"
        )
    raise SettingsError("invalid configuration:\n  - " + "\n  - ".join(problems)) from None


# Variables with the prefix that are read, but are not fields of Settings.
NOT_FIELDS = frozenset({ENV_PREFIX + "CONFIG"})


def setting_variables() -> list[str]:
    """Every `SNOWPIPE_*` variable the worker reads, sorted."""
    return sorted({env_name(name) for name in Settings.model_fields} | NOT_FIELDS)


def unknown_variables(environ: Any = None) -> list[str]:
    """One line per `SNOWPIPE_*` variable in the environment that is no setting (a misspelt one
    is silently ignored otherwise), naming the closest setting when there is one."""
    import difflib

    env = os.environ if environ is None else environ
    known = setting_variables()
    lines = []
    for name in sorted(env):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}?" if close else "see docs/configuration.md"
        lines.append(f"{name} is not a setting and is ignored ({hint})")
    return lines
