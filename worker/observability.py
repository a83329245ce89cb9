"""Logging and metrics for the worker: structlog set-up, secret redaction, Prometheus metrics.

`configure_logging()` is called once at start (CLI, Celery's per-process set-up). It routes
structlog *and* the standard library's loggers (Celery, httpx, ...) through one formatter whose
last step before rendering is `redact`, so no token, private key or passphrase reaches the output
whatever logger produced the line:

- values under secret-looking keys (`token`, `authorization`, `assertion`, `private_key`,
  `passphrase`, `password`, `secret`, ...) are replaced wholesale; Snowflake's `offset_token` and
  `continuation_token` are not secrets and stay readable;
- any registered secret (`register_secret`) is masked wherever it appears in a string;
- JWT-shaped strings and PEM blocks are masked anywhere in any string.

Metrics live at module level in the default Prometheus registry (worker/metrics.py serves them;
docs/operations.md#metrics lists them).
"""

from __future__ import annotations

import collections
import logging
import re
import sys
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import IO, Any

import structlog
from prometheus_client import Counter, Gauge, Histogram

REDACTED = "[REDACTED]"

# Keys whose values are secrets whatever they contain (matched after lower-casing and `-` -> `_`).
_SECRET_KEY = re.compile(
    r"^(?:.*_)?(?:token|jwt|assertion|authorization|private_key(?:_pem)?|privatekey|pem|"
    r"passphrase|password|passwd|secret|api_key|cookie|set_cookie|credentials?)$"
)
# Snowflake vocabulary that ends in "token" but is not a credential: keep it readable in logs.
_NOT_SECRET_KEYS = ("offset_token", "continuation_token")

# A JWT: base64url of a JSON header (always starts `eyJ`, i.e. `{"`), payload and signature.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# A PEM block; a truncated one (no END line) is masked to the end of the string.
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----(?:.*?-----END [A-Z0-9 ]+-----|.*)", re.DOTALL)

# Shorter registered values would mask ordinary words; values under secret keys are masked anyway.
MIN_SECRET_LENGTH = 4
# Transient secrets (fetched tokens) are kept in a bounded window: a process refreshes forever.
MAX_TRANSIENT_SECRETS = 64


class _Secrets:
    """The registered secrets; `view` is replaced whole so readers never need the lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.permanent: set[str] = set()
        self.transient: collections.deque[str] = collections.deque(maxlen=MAX_TRANSIENT_SECRETS)
        # Longest first, so a secret that contains another is masked whole.
        self.view: tuple[str, ...] = ()


_secrets = _Secrets()


def register_secret(value: str | bytes | None, *, transient: bool = False) -> None:
    """Mask `value` wherever it appears in a log line from now on.

    `transient=True` is for values that are replaced over time (fetched tokens): only the most
    recent `MAX_TRANSIENT_SECRETS` are kept. Values shorter than `MIN_SECRET_LENGTH` are ignored.
    """
    if value is None:
        return
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    if len(text) < MIN_SECRET_LENGTH:
        return
    with _secrets.lock:
        if text in _secrets.permanent or text in _secrets.transient:
            return
        if transient:
            _secrets.transient.append(text)
        else:
            _secrets.permanent.add(text)
        _secrets.view = tuple(
            sorted({*_secrets.permanent, *_secrets.transient}, key=len, reverse=True)
        )


def is_secret_key(key: object) -> bool:
    """True when a field named `key` holds a credential and must be masked as a whole."""
    if not isinstance(key, str):
        return False
    norm = key.lower().replace("-", "_")
    if norm.endswith(_NOT_SECRET_KEYS):
        return False
    return _SECRET_KEY.match(norm) is not None


def redact_text(text: str) -> str:
    """`text` with PEM blocks, JWT-shaped strings and registered secrets masked."""
    if "-----BEGIN" in text:
        text = _PEM.sub(REDACTED, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    for secret in _secrets.view:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_value(value: Any) -> Any:
    """`value` with every secret masked, recursing into mappings and sequences."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes | bytearray):
        return redact_text(bytes(value).decode(errors="replace"))
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_key(k) else redact_value(v)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    # Anything else is rendered with str() later: redact that rendering now.
    return redact_text(str(value))


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask every secret in the event (see the module docstring)."""
    for key in list(event_dict):
        if key.startswith("_"):  # structlog/stdlib internals (_record, _from_structlog)
            continue
        event_dict[key] = REDACTED if is_secret_key(key) else redact_value(event_dict[key])
    return event_dict


# --- Logging set-up -------------------------------------------------------------------------------

_HANDLER_NAME = "snowpipe-worker"


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


_CHATTY_LOGGERS = ("httpx", "httpcore")


def configure_logging(
    level: str | int = "INFO", *, json: bool = True, stream: IO[str] | None = None
) -> None:
    """Route structlog and stdlib logging through one redacting formatter; call once at start.

    Calling it again replaces the previous configuration (tests use this). `json=False` renders
    human-readable lines for a terminal.
    """
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared = _shared_processors()
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: tests (and a re-configuration) must reach loggers created earlier.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            # Last before rendering: tracebacks and foreign messages are redacted too.
            redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # httpx logs every request at INFO: thousands a second from the pumps and the poller.
    # They are kept at DEBUG (where they are wanted) and quieted otherwise.
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)


def get_logger(name: str) -> Any:
    """A structlog logger named `name` (events are keyword-only: `log.info("x.y", k=v)`)."""
    return structlog.get_logger(name)


# --- Metrics ---------------------------------------------------------------------------------
# Module-level metrics in the default registry; worker/metrics.py serves them (in multiprocess
# mode under the prefork pool, where every gauge below aggregates as its `multiprocess_mode`
# says). Labelled children are created on first use, after the worker chose the mode. The hot
# paths keep the children they use (`.labels()` once per pump), so an update costs a lock and an
# add. Names, labels and meaning: docs/operations.md#metrics.

# Seconds: a commit takes Snowflake seconds; a token wait is milliseconds unless a fetch is slow.
COMMIT_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Bytes on the wire per append request (capped at 4 MiB by Snowflake).
BYTES_BUCKETS = tuple(float(1 << n) for n in range(10, 23, 2))  # 1 KiB .. 4 MiB

# --- The `pipe` label ---
# A sender must not be able to create series without bound: the `pipe` label names only pipes the
# worker serves. With SNOWPIPE_PIPES set, those pipes (any other is "other"); without it, the
# first PIPE_LABELS_MAX pipes a process labels, and "other" after that.
PIPE_LABELS_MAX = 100
OTHER_PIPE = "other"
_pipe_labels_lock = threading.Lock()
_served_labels: frozenset[str] | None = None
_seen_labels: set[str] = set()


def serve_pipe_labels(served: Iterable[tuple[str, str, str]] | None) -> None:
    """Label only these (canonical database, schema, pipe) pipes; None: the first
    PIPE_LABELS_MAX seen (set once per worker from SNOWPIPE_PIPES, before the pool forks)."""
    global _served_labels  # noqa: PLW0603 (one policy per process)
    with _pipe_labels_lock:
        _served_labels = None if served is None else frozenset(".".join(p) for p in served)
        _seen_labels.clear()


def pipe_label(label: str) -> str:
    """The `pipe` label value for the pipe `DATABASE.SCHEMA.PIPE` (canonical names): itself, or
    "other" (see serve_pipe_labels)."""
    served = _served_labels
    if served is not None:
        return label if label in served else OTHER_PIPE
    if label in _seen_labels:
        return label
    with _pipe_labels_lock:
        if len(_seen_labels) < PIPE_LABELS_MAX:
            _seen_labels.add(label)
            return label
    return OTHER_PIPE


# --- Tasks (pool processes) ---
INGEST_BATCHES = Counter(
    "snowpipe_ingest_batches",
    "Batches ingest_batch handled, by pipe and outcome (logged, already_logged, backpressure, "
    "retry_later, dead_letter, requeued).",
    ["pipe", "outcome"],
)
INGEST_ROWS = Counter(
    "snowpipe_ingest_rows", "Rows written to a channel log by ingest_batch, by pipe.", ["pipe"]
)

# --- Pumps (the node's main process) ---
APPENDS = Counter(
    "snowpipe_appends",
    "Append requests by pipe and outcome (accepted, refused, reopen_required, failed).",
    ["pipe", "outcome"],
)
APPEND_BYTES = Histogram(
    "snowpipe_append_bytes",
    "Bytes on the wire per accepted append request, by pipe.",
    ["pipe"],
    buckets=BYTES_BUCKETS,
)
COMMIT_LATENCY = Histogram(
    "snowpipe_commit_latency_seconds",
    "From an accepted append to the status poll that saw it committed, by pipe.",
    ["pipe"],
    buckets=COMMIT_BUCKETS,
)
DELIVERY_LATENCY = Histogram(
    "snowpipe_delivery_latency_seconds",
    "From the oldest batch of a request written to the channel log to its commit, by pipe.",
    ["pipe"],
    buckets=COMMIT_BUCKETS,
)
BATCHES_COMMITTED = Counter(
    "snowpipe_batches_committed",
    "Batches seen committed in Snowflake, by pipe (a batch split over two requests counts twice).",
    ["pipe"],
)
ROWS_COMMITTED = Counter(
    "snowpipe_rows_committed", "Rows seen committed in Snowflake, by pipe.", ["pipe"]
)
ROW_ERRORS = Counter(
    "snowpipe_row_errors", "Rows Snowflake reported in error (channel status), by pipe.", ["pipe"]
)
CHANNEL_OPENS = Counter(
    "snowpipe_channel_opens", "Channel opens (the first and every reopen), by pipe.", ["pipe"]
)
CHANNEL_REOPENS = Counter(
    "snowpipe_channel_reopens",
    "Times an open channel had to be reopened, by pipe and reason (the error class, "
    "status_error, commit_timeout, refused, error).",
    ["pipe", "reason"],
)
LOG_FORGOT = Counter(
    "snowpipe_channel_log_forgot",
    "Opens that found Snowflake's committed offset above what the log issued (the state Redis "
    "lost writes), by pipe.",
    ["pipe"],
)
DEAD_LETTERS = Counter(
    "snowpipe_dead_letters",
    "Batches dead-lettered, by kind (failed: never delivered, requeue after the fix; row_errors: "
    "committed with rows in error, kept for inspection; malformed: a message that was not a "
    "valid batch, kept with its raw body).",
    ["kind"],
)
LEASE_EVENTS = Counter(
    "snowpipe_lease_events",
    "Channel lease changes of this node, by event (acquired, released, lost).",
    ["event"],
)

class PumpMetrics:
    """The metric children of one channel pump, resolved once (the pump's hot path only adds)."""

    __slots__ = (
        "_pipe",
        "accepted",
        "append_bytes",
        "batches",
        "commit_latency",
        "delivery_latency",
        "opens",
        "row_errors",
        "rows",
    )

    def __init__(self, pipe: str) -> None:
        pipe = pipe_label(pipe)
        self._pipe = pipe
        self.accepted = APPENDS.labels(pipe=pipe, outcome="accepted")
        self.append_bytes = APPEND_BYTES.labels(pipe=pipe)
        self.commit_latency = COMMIT_LATENCY.labels(pipe=pipe)
        self.delivery_latency = DELIVERY_LATENCY.labels(pipe=pipe)
        self.batches = BATCHES_COMMITTED.labels(pipe=pipe)
        self.rows = ROWS_COMMITTED.labels(pipe=pipe)
        self.row_errors = ROW_ERRORS.labels(pipe=pipe)
        self.opens = CHANNEL_OPENS.labels(pipe=pipe)

    def append_failed(self, outcome: str) -> None:
        """An append that was not accepted (refused, reopen_required, failed)."""
        APPENDS.labels(pipe=self._pipe, outcome=outcome).inc()

    def reopen(self, reason: str) -> None:
        """An open channel must be reopened, and why."""
        CHANNEL_REOPENS.labels(pipe=self._pipe, reason=reason).inc()

    def log_forgot(self) -> None:
        """The open found offsets committed that the log never issued."""
        LOG_FORGOT.labels(pipe=self._pipe).inc()


def record_dead_letter(kind: str) -> None:
    """Count one dead-lettered batch of `kind` (failed, row_errors, malformed)."""
    DEAD_LETTERS.labels(kind=kind).inc()


def record_lease_event(event: str) -> None:
    """Count one lease change of this node (acquired, released, lost)."""
    LEASE_EVENTS.labels(event=event).inc()


# Children of the task path's counters by label values: `.labels()` costs ~5 us, a dict lookup
# nothing. Cleared when the worker switches to multiprocess mode (worker/metrics.py).
_ingest_children: dict[tuple[str, str], tuple[Any, Any]] = {}


def record_ingest(pipe: str, outcome: str, rows: int = 0) -> None:
    """Count one ingest_batch ending (and the rows it logged); `pipe` is the batch's
    `DATABASE.SCHEMA.PIPE`, labelled as `pipe_label` says."""
    pipe = pipe_label(pipe)
    children = _ingest_children.get((pipe, outcome))
    if children is None:
        children = (INGEST_BATCHES.labels(pipe, outcome), INGEST_ROWS.labels(pipe))
        _ingest_children[(pipe, outcome)] = children
    children[0].inc()
    if rows:
        children[1].inc(rows)


# --- Tokens ---
TOKEN_REFRESHES = Counter(
    "snowpipe_token_refreshes",
    "Token refresh attempts by guard name, reason (soft, hard, 401, beat, shared, initial) "
    "and outcome (success, failure).",
    ["name", "reason", "outcome"],
)
TOKEN_GUARD_HEALTHY = Gauge(
    "snowpipe_token_guard_healthy",
    "1 while the guard's refreshes succeed, 0 after repeated consecutive failures (the "
    "escalation flag; the lowest over the node's processes).",
    ["name"],
    multiprocess_mode="livemin",
)
TOKEN_GUARD_WAIT = Histogram(
    "snowpipe_token_guard_wait_seconds",
    "Time a request spent in the TokenGuard beyond its fast path (refreshing, or waiting for "
    "the refresh in progress), by guard name.",
    ["name"],
    buckets=WAIT_BUCKETS,
)


def record_token_refresh(name: str, reason: str, outcome: str) -> None:
    """Count one refresh attempt of the guard `name`."""
    TOKEN_REFRESHES.labels(name=name, reason=reason, outcome=outcome).inc()


def set_guard_health(name: str, healthy: bool) -> None:
    """Publish the health flag of the guard `name`."""
    TOKEN_GUARD_HEALTHY.labels(name=name).set(1 if healthy else 0)


def record_guard_wait(name: str, seconds: float) -> None:
    """Time one `get()` of the guard `name` spent off its fast path."""
    TOKEN_GUARD_WAIT.labels(name=name).observe(seconds)


# --- Metrics: retries -----------------------------------------------------------------------------
# Retry metrics (RetryPolicy) go here: define them at module level like the token metrics above and
# expose small `record_*` functions, so worker/retry.py never touches prometheus_client directly.

RETRIES = Counter(
    "snowpipe_retries_total",
    "Retries scheduled by the RetryPolicy, by operation and error type.",
    ["op", "error_type"],
)
RETRIES_EXHAUSTED = Counter(
    "snowpipe_retries_exhausted_total",
    "Calls the RetryPolicy gave up on, by operation and reason (attempts, deadline, "
    "retry_after_beyond_deadline, budget).",
    ["op", "reason"],
)
RETRY_BUDGET_TOKENS = Gauge(
    "snowpipe_retry_budget_tokens",
    "Tokens left in the process-wide retry budget (a retry costs one by default; the lowest "
    "over the node's processes).",
    multiprocess_mode="livemin",
)


def record_retry(op: str, error_type: str, budget_tokens: float | None) -> None:
    """Count one scheduled retry of `op` and publish the budget left."""
    RETRIES.labels(op=op, error_type=error_type).inc()
    if budget_tokens is not None:
        RETRY_BUDGET_TOKENS.set(budget_tokens)


def record_retry_budget(tokens: float) -> None:
    """Publish what is left in the process-wide retry budget."""
    RETRY_BUDGET_TOKENS.set(tokens)


def record_retry_exhausted(op: str, reason: str) -> None:
    """Count one call of `op` the retry policy gave up on, and why."""
    RETRIES_EXHAUSTED.labels(op=op, reason=reason).inc()
