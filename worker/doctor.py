"""`snowpipe-worker doctor` and the worker's start-up checks: is this configuration usable?

Each check gives one `Check`: its name, whether it passed, what was found and, when it failed,
the fix. In order (a check that cannot run because an earlier one failed is skipped):

    settings            the configuration loads (every SNOWPIPE_* setting is valid)
    private key         the key loads (PEM or base64 DER, the passphrase if encrypted)
    key fingerprint     SHA256:... -- what DESCRIBE USER shows as RSA_PUBLIC_KEY_FP
    account host        the host of SNOWPIPE_ACCOUNT_URL resolves
    account URL         it answers HTTP(S) (any answer: it is reachable, TLS works)
    token exchange      a key-pair JWT is exchanged for a scoped token (doctor); the worker at
                        start sends the JWT to the hostname endpoint instead (Snowflake verifies
                        key, account and user there without issuing a token)
    pipe D.S.P          each pipe of --pipe / SNOWPIPE_PIPES: bulk channel status with a probe
                        channel (the pipe exists and the role may use it)
    SQL API             with SNOWPIPE_ERROR_TABLE=auto and pipes to check (not at worker start):
                        Snowflake's SQL API runs a query with the key-pair JWT (a warehouse:
                        SNOWPIPE_SQL_WAREHOUSE or the user's default)
    error table of D.S.P  each pipe's table (worker.snowpipe.errortable) has a readable error
                        table; when error logging is off it says how to turn it on and that
                        rejected rows are attributed to whole batches until then (a warning: the
                        pipe works without it)
    broker              SNOWPIPE_BROKER_URL accepts a connection
    state store         SNOWPIPE_STATE_URL answers PING
    state persistence   the state Redis writes an AOF (appendonly yes; `always` recommended);
                        does not apply to the embedded broker of the local stack (in memory)
    state replication   the primary (through Sentinel with a sentinel:// URL), its replicas and
                        their lag; fails when fewer replicas are online than
                        SNOWPIPE_STATE_MIN_REPLICAS, or when the URL reaches a replica

A check that passed with a `warning` is shown with `!` and its fix; it does not fail the run.

Nothing here prints or logs a token, key or passphrase: messages name settings and files only.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from worker.errors import token_cause
from worker.observability import get_logger
from worker.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from worker.auth.keypair import KeyPairJWT
    from worker.snowpipe.client import SnowpipeClient

PROBE_CHANNEL = "snowpipe_doctor_probe"
HTTP_TIMEOUT_SECONDS = 5.0
# Doctor's own calls: one attempt each, bounded (it reports; it does not ride out an outage).
DOCTOR_OVERRIDES: dict[str, Any] = {
    "retry_attempts": 1,
    "retry_deadline_seconds": 10.0,
    "http_timeout_seconds": 10.0,
    "http_connect_timeout_seconds": HTTP_TIMEOUT_SECONDS,
    "refresh_wait_timeout_seconds": 10.0,
    "sql_timeout_seconds": 30.0,
}

_log = get_logger("worker.doctor")


@dataclass(frozen=True)
class Check:
    """One check's outcome: `fix` says what to do when it failed."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # passed, but something is worth fixing (shown with `!` and the fix)

    @property
    def mark(self) -> str:
        """✓ passed, ! passed with a warning, ✗ failed."""
        if not self.ok:
            return "✗"
        return "!" if self.warning else "✓"

    def line(self) -> str:
        """`✓ name: detail`, or `✗ name: detail -> fix` (`!` for a warning, with its fix)."""
        text = f"{self.mark} {self.name}: {self.detail}"
        if (not self.ok or self.warning) and self.fix:
            text += f"\n    fix: {self.fix}"
        return text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _split_hint(exc: BaseException) -> tuple[str, str]:
    """(what failed, the fix) of a Snowpipe error (its hint), or of any error."""
    from worker.snowpipe.errors import SnowpipeError

    if isinstance(exc, SnowpipeError):
        head = exc.message
        if exc.status is not None:
            head = f"HTTP {exc.status}{' ' + exc.code if exc.code else ''}: {head}"
        return head, exc.hint
    return _first_line(exc), ""


def _encryption(s: Settings) -> str:
    """What the passphrase did: decrypted the key, or nothing (the key is not encrypted)."""
    from worker.auth.keypair import KeyPairError, load_private_key

    if not s.passphrase():
        return ""
    try:
        load_private_key(s.private_key_pem(), None)
    except KeyPairError:
        return " (decrypted with SNOWPIPE_PRIVATE_KEY_PASSPHRASE)"
    return " (not encrypted: SNOWPIPE_PRIVATE_KEY_PASSPHRASE is set but not needed)"


def parse_pipe(name: str) -> tuple[str, str, str]:
    """`DB.SCHEMA.PIPE` as its three parts (ValueError naming the expected form)."""
    parts = [part.strip() for part in name.split(".")]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{name!r} is not DATABASE.SCHEMA.PIPE")
    return parts[0], parts[1], parts[2]


class Doctor:
    """Runs the checks of the module docstring against one configuration."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        pipes: Sequence[str] = (),
        startup: bool = False,
        client_factory: Callable[[Settings, KeyPairJWT], SnowpipeClient] | None = None,
    ) -> None:
        self.settings = settings
        self.pipes = list(pipes)
        self.startup = startup
        self._client_factory = client_factory
        self.results: list[Check] = []

    def _add(self, check: Check) -> Check:
        self.results.append(check)
        return check

    def run(self) -> list[Check]:
        """Every check, in order; also kept in `results`."""
        self.results = []
        s = self._settings()
        if s is None:
            return self.results
        pipes = self.pipes or s.pipe_names()
        minter = self._key(s)
        if self._account(s) and minter is not None:
            client = self._snowflake(s, minter)
            if client is not None:
                try:
                    found = [pipe for pipe in pipes if self._pipe(client, pipe)]
                    if not self.startup:
                        self._error_tables(client, found)
                finally:
                    client.close()
        self._broker(s)
        # At start the node itself logs the state store's persistence (state.persistence.*).
        if self._state(s):
            if not self.startup:
                self._persistence(s)
            self._replication(s)
        return self.results

    @property
    def ok(self) -> bool:
        """True when every check that ran passed (warnings pass)."""
        return all(check.ok for check in self.results)

    # --- The checks -------------------------------------------------------------------------------

    def _settings(self) -> Settings | None:
        if self.settings is not None:
            self._add(Check("settings", True, "loaded"))
            return self.settings
        from worker.settings import profile_path, unknown_variables

        for line in unknown_variables():
            name, _, hint = line.partition(" is not a setting and is ignored ")
            self._add(Check("environment", True, f"{name} is not a setting: it is ignored",
                            f"rename or remove it {hint}", warning=True))  # fmt: skip
        try:
            s = load_settings()
            profile = profile_path()
        except SettingsError as exc:
            problems = str(exc).removeprefix("invalid configuration:").strip()
            self._add(Check("settings", False, "invalid configuration", problems))
            return None
        self.settings = s
        source = f"profile {profile} and the environment" if profile else "the environment"
        self._add(Check("settings", True, f"loaded from {source}"))
        return s

    def _key(self, s: Settings) -> KeyPairJWT | None:
        from worker.auth.keypair import KeyPairError, KeyPairJWT

        source = str(s.private_key_path) if s.private_key_path else "SNOWPIPE_PRIVATE_KEY"
        try:
            minter = KeyPairJWT.from_settings(s)
        except KeyPairError as exc:
            text = str(exc)
            what, _, fix = text.partition(": ")
            self._add(Check("private key", False, what, fix or text))
            return None
        except OSError as exc:
            self._add(Check("private key", False, f"cannot read {source}: {exc.strerror}",
                            "point SNOWPIPE_PRIVATE_KEY_PATH at a readable PEM file"))  # fmt: skip
            return None
        self._add(Check("private key", True, f"RSA key loaded from {source}{_encryption(s)}"))
        self._add(
            Check(
                "key fingerprint",
                True,
                f"{minter.fingerprint}: DESCRIBE USER {minter.subject.split('.', 1)[1]} must show "
                "it as RSA_PUBLIC_KEY_FP (or RSA_PUBLIC_KEY_2_FP)",
            )
        )
        return minter

    def _account(self, s: Settings) -> bool:
        import httpx

        parts = urlsplit(s.account_url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if "account_url" in s.model_fields_set:  # set, not derived from SNOWPIPE_ACCOUNT
            fix_url = (
                f"check SNOWPIPE_ACCOUNT_URL ({s.account_url}): the host and port of the "
                "Snowflake account (or of the emulator, running), reachable from here"
            )
        else:
            fix_url = (
                "check SNOWPIPE_ACCOUNT (the account identifier, e.g. myorg-myaccount) or set "
                "SNOWPIPE_ACCOUNT_URL to https://<account>.snowflakecomputing.com"
            )
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self._add(Check("account host", False, f"{host} does not resolve ({exc})", fix_url))
            return False
        self._add(Check("account host", True, f"{host} resolves"))
        from worker.tls import client_context

        verify = client_context(s.ca_file)
        try:
            with httpx.Client(timeout=HTTP_TIMEOUT_SECONDS, verify=verify) as http:
                response = http.get(s.account_url + "/")
        except httpx.ConnectError as exc:
            fix = fix_url
            if "CERTIFICATE" in str(exc).upper():
                fix = "point SNOWPIPE_CA_FILE at the CA bundle that signed the server certificate"
            self._add(Check("account URL", False, f"{s.account_url} refused: {exc}", fix))
            return False
        except httpx.HTTPError as exc:
            fix = "check the network path (proxy, firewall) to the account host"
            self._add(Check("account URL", False, f"{s.account_url}: {type(exc).__name__}", fix))
            return False
        status = response.status_code
        self._add(Check("account URL", True, f"{s.account_url} answers (HTTP {status})"))
        return True

    def _snowflake(self, s: Settings, minter: KeyPairJWT) -> SnowpipeClient | None:
        quick = s.model_copy(update=DOCTOR_OVERRIDES)
        if self._client_factory is not None:
            client = self._client_factory(quick, minter)
        else:
            from worker.snowpipe.client import SnowpipeClient

            client = SnowpipeClient(quick, minter=minter)
        name = "key-pair JWT" if self.startup else "token exchange"
        try:
            if self.startup and not self.pipes and not s.pipe_names():
                host = client.tokens.ingest_host()  # the JWT, checked by Snowflake; no token
                detail = f"accepted for {minter.subject} (ingest host {host})"
            else:
                token = client.tokens.refresh("doctor")
                detail = (
                    f"scoped token issued for {minter.subject} (valid {token.lifetime:.0f} s)"
                )
        except Exception as exc:  # noqa: BLE001 (every failure is reported, none raised)
            what, fix = _split_hint(token_cause(exc))
            self._add(Check(name, False, what, fix or "see the message"))
            client.close()
            return None
        self._add(Check(name, True, detail))
        return client

    def _pipe(self, client: SnowpipeClient, name: str) -> bool:
        from worker.snowpipe.errors import PipeNotFoundError

        label = f"pipe {name}"
        try:
            database, schema, pipe = parse_pipe(name)
        except ValueError as exc:
            self._add(Check(label, False, str(exc), "name it as DATABASE.SCHEMA.PIPE"))
            return False
        s = client.settings
        names = [f"{s.channel_prefix}_{i}" for i in range(s.channels_per_pipe)]
        try:
            found = client.bulk_channel_status(database, schema, pipe, [PROBE_CHANNEL, *names])
        except PipeNotFoundError as exc:
            self._add(
                Check(label, False, f"not found: {exc.message}",
                      f"check the name (a table T has the pipe T-STREAMING), create the pipe, "
                      f"or grant the role{' ' + s.role if s.role else ''} USAGE/OPERATE on it")
            )  # fmt: skip
            return False
        except Exception as exc:  # noqa: BLE001
            what, fix = _split_hint(token_cause(exc))
            self._add(Check(label, False, what, fix or "see the message"))
            return False
        ours = sorted(n for n in found if n != PROBE_CHANNEL)
        self._add(Check(label, True, f"answers bulk channel status ({len(ours)} of our "
                                     f"{len(names)} channels exist)"))  # fmt: skip
        return True

    def _error_tables(self, client: SnowpipeClient, pipes: Sequence[str]) -> None:
        """The SQL API, then each pipe's error table (module docstring)."""
        from worker.errors import PipeTableUnknownError, SnowpipeError
        from worker.snowpipe.errortable import TableLocator, error_rows_statement

        s = client.settings
        if s.error_table == "off" or not pipes:
            return
        sql = client.sql()
        locator = TableLocator(sql, s.pipe_tables_map())
        api = _SqlApiCheck(self, s)
        for name in pipes:
            label = f"error table of {name}"
            database, schema, pipe = parse_pipe(name)
            try:
                table = locator.table_of(database, schema, pipe)
            except PipeTableUnknownError as exc:
                api.answered()
                self._add(Check(label, True, exc.what, exc.fix, warning=True))
                continue
            except SnowpipeError as exc:
                if api.failed(exc):
                    return
                continue
            try:
                sql.execute(error_rows_statement(table), [PROBE_CHANNEL])
            except SnowpipeError as exc:
                if api.failed(exc):
                    return
                self._add(_error_table_warning(label, table.sql(), exc, s.role))
                continue
            api.answered()
            self._add(Check(label, True, f"{table} has error logging on: rows Snowflake rejects "
                                         "are found and dead-lettered one by one"))  # fmt: skip

    def _broker(self, s: Settings) -> None:
        from worker.connectivity import UnreachableError, check_broker, redact_url

        try:
            check_broker(s)
        except UnreachableError as exc:
            what, _, fix = str(exc).rpartition("; ")
            self._add(Check("broker", False, what, fix))
            return
        self._add(Check("broker", True, f"{redact_url(s.broker_url)} accepts connections"))

    def _state(self, s: Settings) -> bool:
        from worker.connectivity import UnreachableError, redact_url, state_client

        try:
            state_client(s).close()
        except UnreachableError as exc:
            what, _, fix = str(exc).rpartition("; ")
            self._add(Check("state store", False, what, fix))
            return False
        self._add(Check("state store", True, f"{redact_url(s.state_url)} answers PING"))
        return True

    def _persistence(self, s: Settings) -> None:
        import redis

        from worker.connectivity import state_client

        client = state_client(s, check=False)
        name = "state persistence"
        try:
            config = client.config_get("appendonly") | client.config_get("appendfsync")
            config |= client.config_get("save")
        except redis.RedisError as exc:
            from worker.embedded import is_embedded

            if is_embedded(client):
                self._add(Check(name, True, "does not apply: the local stack's embedded broker "
                                "keeps everything in memory, by design (a deployment's state "
                                "Redis needs appendonly yes, appendfsync always)"))  # fmt: skip
                return
            self._add(Check(name, False, f"CONFIG GET refused ({_first_line(exc)})",
                            "allow CONFIG GET for this user, and make sure the state Redis runs "
                            "with appendonly yes and appendfsync always"))  # fmt: skip
            return
        finally:
            client.close()
        appendonly = str(config.get("appendonly", "")).lower()
        fsync = str(config.get("appendfsync", "")).lower()
        save = str(config.get("save", "")).strip()
        fix = (
            "run the state Redis with appendonly yes and appendfsync always "
            "(CONFIG SET appendonly yes; CONFIG SET appendfsync always; and in redis.conf)"
        )
        if appendonly != "yes":
            what = (
                "RDB snapshots only: a restart loses what was logged since the last snapshot"
                if save
                else "nothing is kept on disk: a restart loses every acknowledged batch not yet "
                "committed"
            )
            self._add(Check(name, False, what, fix))
        elif fsync != "always":
            detail = (
                f"appendonly yes, appendfsync {fsync} (a crash may lose about the last second; "
                "`always` closes that window)"
            )
            self._add(Check(name, True, detail))
        else:
            self._add(Check(name, True, "appendonly yes, appendfsync always"))

    def _replication(self, s: Settings) -> None:
        import redis

        from worker.connectivity import state_client
        from worker.statestore import describe_replicas, replication

        client = state_client(s, check=False)
        name = "state replication"
        try:
            view = replication(client, s)
        except redis.RedisError as exc:
            if "unknown command" in str(exc).lower():
                self._add(Check(name, True, "does not apply: the local stack's embedded broker "
                                "has no replicas"))  # fmt: skip
                return
            fix = "allow INFO for this user (and SENTINEL REPLICAS on the Sentinels)"
            self._add(Check(name, False, f"INFO replication failed ({_first_line(exc)})", fix))
            return
        finally:
            client.close()
        where = f"primary {view['primary']}"
        if view["via"] == "sentinel":
            where += f" (Sentinel master {view['master_name']!r})"
        online = f"{view['replicas_online']} replica(s) online"
        detail = f"{where}, {online}: {describe_replicas(view)}"
        if view["problem"]:
            what, _, fix = view["problem"].rpartition("; ")
            self._add(Check(name, False, f"{where}: {what}", fix))
            return
        wanted = view["min_replicas"]
        if wanted:
            detail += f" (SNOWPIPE_STATE_MIN_REPLICAS={wanted})"
        self._add(Check(name, True, detail))


class _SqlApiCheck:
    """The one "SQL API" line of a doctor run, added before the first error-table line."""

    def __init__(self, doctor: Doctor, settings: Settings) -> None:
        self._doctor = doctor
        self._settings = settings
        self._done = False

    def answered(self) -> None:
        """The SQL API ran a statement (or answered that the statement failed)."""
        if self._done:
            return
        self._done = True
        warehouse = self._settings.sql_warehouse
        where = f"warehouse {warehouse}" if warehouse else "the user's default warehouse"
        self._doctor._add(Check("SQL API", True, f"runs queries with the key-pair JWT ({where})"))

    def failed(self, exc: BaseException) -> bool:
        """Report `exc` if the SQL API itself failed (True: stop checking error tables); False
        when only the statement failed (the caller reports it)."""
        from worker.errors import SqlNoWarehouseError, SqlStatementError

        if isinstance(exc, SqlStatementError) and not isinstance(exc, SqlNoWarehouseError):
            self.answered()
            return False
        if not self._done:
            what, fix = _split_hint(token_cause(exc))
            self._doctor._add(
                Check("SQL API", False, what,
                      f"{fix or 'see the message'}; or set SNOWPIPE_ERROR_TABLE=off (rejected "
                      "rows are then attributed to whole batches)")
            )  # fmt: skip
            self._done = True
        return True


def _error_table_warning(label: str, table: str, exc: BaseException, role: str | None) -> Check:
    """The warning for an error table the SQL API could not read."""
    from worker.errors import SnowpipeError

    message = exc.message if isinstance(exc, SnowpipeError) else _first_line(exc)
    code = f"{exc.code}: " if isinstance(exc, SnowpipeError) and exc.code else ""
    grant = f"GRANT SELECT ERROR TABLE ON TABLE {table} TO ROLE {role or '<role>'}"
    return Check(
        label,
        True,
        f"cannot read the error table of {table} ({code}{message}); until it can, rows "
        "Snowflake rejects are attributed to whole batches",
        f"turn error logging on: ALTER TABLE {table} SET ERROR_LOGGING = TRUE (and, if the "
        f"role does not own the table, {grant})",
        warning=True,
    )


def run_doctor(pipes: Iterable[str] = (), settings: Settings | None = None) -> Doctor:
    """Run every check (for `snowpipe-worker doctor`); see `Doctor.results` and `.ok`."""
    doctor = Doctor(settings, pipes=list(pipes))
    doctor.run()
    return doctor


# --- At worker start --------------------------------------------------------------------------

_startup_lock = threading.Lock()
startup_failures: list[Check] = []  # what the last start-up run found (health reports it)
# Failures that stop every delivery of this node (health reports them as unhealthy); the others
# (broker, state store, one pipe) may be transient or partial and are logged only.
FATAL_CHECKS = frozenset({"settings", "private key", "key-pair JWT", "token exchange"})
_startup_done = threading.Event()


def startup_checks(settings: Settings) -> list[Check]:
    """Run the checks once at worker start and log each failure once; the failures."""
    started = time.monotonic()
    doctor = Doctor(settings, startup=True)
    try:
        results = doctor.run()
    except Exception as exc:  # noqa: BLE001 (a check bug must not stop the worker)
        _log.warning("startup.checks_crashed", error=type(exc).__name__, detail=str(exc))
        return []
    failed = [check for check in results if not check.ok]
    with _startup_lock:
        startup_failures[:] = failed
    for check in failed:
        if check.name in FATAL_CHECKS:
            _log.error(
                "startup.check_failed",
                check=check.name,
                problem=check.detail,
                fix=check.fix,
                consequence="no batch can be delivered until this is fixed: batches wait in "
                "the channel logs (nothing is lost)",
            )
        else:
            _log.error(
                "startup.check_failed", check=check.name, problem=check.detail, fix=check.fix
            )
    if failed:
        _log.error("startup.checks_failed", failed=[c.name for c in failed],
                   hint="`snowpipe-worker doctor` runs the same checks")  # fmt: skip
    else:
        _log.info("startup.checks_passed", checks=len(results),
                  seconds=round(time.monotonic() - started, 2))  # fmt: skip
    _startup_done.set()
    return failed


def start_startup_checks(settings: Settings) -> threading.Thread:
    """Run `startup_checks` in a daemon thread (the worker does not wait for Snowflake)."""
    thread = threading.Thread(
        target=startup_checks, args=(settings,), name="startup checks", daemon=True
    )
    thread.start()
    return thread
