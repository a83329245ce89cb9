"""`snowpipe-worker`: publish NDJSON, manage dead letters, run the local stack.

    snowpipe-worker publish --database D --schema S --pipe P [--batch-rows N] [--id-prefix P]
                            [--wait [--timeout S]] FILE|-      # a re-run commits each row once
    snowpipe-worker dead-letters list|requeue|drop [--batch-id ID] [--json]
    snowpipe-worker dead-letters export [--batch-id ID] [--kind K] [--sources F] FILE|-
    snowpipe-worker dead-letters requeue --kind row_errors --table-fixed
    snowpipe-worker stats
    snowpipe-worker status [--json] [--no-snowflake]     # channels, queues, token, dead letters
    snowpipe-worker doctor [--pipe DB.SCHEMA.PIPE ...]   # every check, one line each; exit 0/1
    snowpipe-worker health [--node NAME]                 # the nodes' health, asked; exit 0/1
    snowpipe-worker health --liveness|--readiness        # a node's heartbeat file; exit 0/1
    snowpipe-worker run      # the first run: local stack + 50k sample rows, verified, then exit
    snowpipe-worker up       # the local stack, kept running until Ctrl-C

The worker itself is `celery -A worker worker` (and one `celery -A worker beat`).
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Only the error tree at import: a probe (`health --liveness`) loads no broker or Redis client.
from worker.errors import NdjsonError as NdjsonError  # noqa: PLC0414 (re-exported)
from worker.errors import SettingsError, UnreachableError

if TYPE_CHECKING:
    from worker.ndjson import PublishedBatch
    from worker.settings import Settings
    from worker.waiting import WaitResult

# Help is rich markup: a tag-like "[local]" must be written "\\[local]" or it vanishes.
app = typer.Typer(
    no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_enable=False
)
dead_app = typer.Typer(no_args_is_help=True, help="Inspect, requeue or drop dead letters.")
app.add_typer(dead_app, name="dead-letters")
console = Console(stderr=True)
out = Console()
F = TypeVar("F", bound=Callable[..., Any])
# Exit codes: 1 a failure, 2 bad usage or configuration, 3 the broker or state store unreachable.
EXIT_UNREACHABLE = 3
_debug = False


@app.callback()
def _options(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="show tracebacks of errors, and INFO log lines")
    ] = False,
) -> None:
    import logging

    from worker.observability import configure_logging
    from worker.settings import unknown_variables

    global _debug  # noqa: PLW0603 (one flag per CLI invocation)
    _debug = debug
    # Log lines (the client's, Celery's) go to standard error: standard output is the report.
    configure_logging(
        logging.INFO if debug else logging.WARNING, json=not sys.stderr.isatty(), stream=sys.stderr
    )
    if ctx.invoked_subcommand != "doctor":  # doctor lists them among its checks
        for line in unknown_variables():
            console.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True, highlight=False)


def _edge(command: F) -> F:
    """Turn a broker or state-store failure (unreachable, credentials refused, TLS) into one line
    naming the setting and the fix; a traceback only with --debug."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import ssl

        import amqp.exceptions
        import kombu.exceptions
        import redis

        from worker.connectivity import broker_error, state_error

        try:
            return command(*args, **kwargs)
        except UnreachableError as exc:
            if _debug:
                raise
            raise _fail(str(exc), EXIT_UNREACHABLE) from None
        except redis.RedisError as exc:
            # The commands check the broker first where it is Redis too: this is the state store.
            if _debug:
                raise
            raise _fail(str(state_error(_settings(), exc)), EXIT_UNREACHABLE) from None
        except (
            kombu.exceptions.KombuError,
            amqp.exceptions.AMQPError,
            ConnectionError,
            TimeoutError,
            ssl.SSLError,
        ) as exc:
            if _debug:
                raise
            raise _fail(str(broker_error(_settings(), exc)), EXIT_UNREACHABLE) from None

    return wrapper  # type: ignore[return-value]


def _settings() -> Settings:
    """The producer settings (broker and state URLs; no Snowflake identity needed)."""
    from worker import runtime

    try:
        return runtime.producer_settings()
    except SettingsError as exc:
        raise _fail(str(exc), 2) from None

DEFAULT_BATCH_ROWS = 500
SAMPLE_ROWS = 50_000
SAMPLE_PIPES = 10
RUN_TIMEOUT_SECONDS = 900.0


def _fail(message: str, code: int = 1) -> typer.Exit:
    # Messages are plain text: "[local]" or "[Errno 111]" must not be read as markup.
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def _require_extra(extra: str, what: str) -> None:
    from worker.extras import missing_extra

    problem = missing_extra(extra, what)
    if problem is not None:
        raise _fail(problem, code=2)


def read_ndjson(stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """The rows of an NDJSON stream (blank lines skipped); NdjsonError names the bad line."""
    from worker.ndjson import parse_line

    for number, line in enumerate(stream, start=1):
        if line.strip():
            yield parse_line(line.strip(), number)


# Exit code of `publish --wait` when batches were still pending at --timeout (none dead-lettered).
EXIT_PENDING = 4
# `publish --wait` names at most this many pending batches (dead-lettered ones: every one).
MAX_PENDING_LISTED = 20
WAIT_TIMEOUT_SECONDS = 600.0


@contextlib.contextmanager
def _input(source: str) -> Iterator[IO[bytes]]:
    """The input as a seekable file: standard input is read whole into a temporary file first."""
    if source == "-":
        with tempfile.TemporaryFile(prefix="snowpipe-publish-") as spool:
            shutil.copyfileobj(sys.stdin.buffer, spool)
            spool.seek(0)
            yield spool
        return
    path = Path(source)
    if not path.is_file():
        raise _fail(f"no such file: {source}")
    with path.open("rb") as stream:
        yield stream


PUBLISH_HELP = (
    "Publish NDJSON rows as batches of --batch-rows to the ingest queue. Only the broker "
    "settings are needed."
    "\n\n"
    "Every line is checked before anything is published: a bad line is named and nothing is "
    "sent. Batch ids are derived from the input (target, position in the file, rows, "
    "--id-prefix): after any failure (a broker gone, Ctrl-C, a killed process), run the same "
    "command again and each row is committed once. Standard input is read whole first."
    "\n\n"
    "--wait then waits until every batch is committed in Snowflake (reading the state store, "
    "SNOWPIPE_STATE_URL): exit 0 if all are, 1 if a batch is a dead letter or had rows "
    "rejected, 4 if batches are still pending after --timeout (run the same command again to "
    "wait longer: it commits nothing twice)."
)


@app.command(help=PUBLISH_HELP)
@_edge
def publish(
    source: Annotated[
        str, typer.Argument(help="NDJSON file, or - for standard input (read whole first)")
    ] = "-",
    *,
    database: Annotated[str, typer.Option(help="target database")] = ...,  # type: ignore[assignment]
    schema: Annotated[str, typer.Option(help="target schema")] = ...,  # type: ignore[assignment]
    pipe: Annotated[str, typer.Option(help="target pipe (a table T has pipe T-STREAMING)")] = ...,  # type: ignore[assignment]
    batch_rows: Annotated[int, typer.Option(min=1, help="rows per batch")] = DEFAULT_BATCH_ROWS,
    id_prefix: Annotated[
        str | None,
        typer.Option(
            help="start every batch id with PREFIX- (a new prefix publishes the same rows again)"
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="then wait until every batch is committed in Snowflake; exit 0 only if all are",
        ),
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(min=0, help=f"seconds --wait waits (default {WAIT_TIMEOUT_SECONDS:g})"),
    ] = None,
) -> None:
    """Publish NDJSON rows as batches of --batch-rows (see PUBLISH_HELP)."""
    from worker.ndjson import check_id_prefix
    from worker.publish import InvalidBatchError, Publisher, check_names

    if timeout is not None and not wait:
        raise _fail("--timeout is how long --wait waits: add --wait, or drop --timeout", 2)
    settings = _settings()
    try:
        prefix = check_id_prefix(id_prefix) if id_prefix is not None else None
        check_names(database=database, schema=schema, pipe=pipe)
    except (NdjsonError, InvalidBatchError) as exc:
        raise _fail(str(exc), 2) from None
    if wait:
        _state_reachable(settings)  # unreachable: say so before publishing anything
    publisher = Publisher(settings)  # BrokerUnavailableError (one line) if it refuses us
    try:
        publisher.check_broker()
    except UnreachableError:
        publisher.close()
        raise
    started = time.monotonic()
    try:
        published = _publish_file(
            publisher, source, settings=settings, target=(database, schema, pipe),
            batch_rows=batch_rows, prefix=prefix,
        )  # fmt: skip
    finally:
        publisher.close()
    rows_sent = sum(b.rows for b in published)
    elapsed = time.monotonic() - started
    rate = rows_sent / elapsed if elapsed > 0 else 0.0
    out.print(
        f"published {rows_sent} rows in {len(published)} batches to {database}.{schema}.{pipe} "
        f"in {elapsed:.1f} s ({rate:,.0f} rows/s)",
        highlight=False,
    )
    if wait:
        try:
            limit = timeout if timeout is not None else WAIT_TIMEOUT_SECONDS
            code = _wait_for(settings, published, limit)
        except KeyboardInterrupt:
            raise _fail(
                "interrupted while waiting; every batch was published: run the same command "
                "again to keep waiting (nothing is committed twice)",
                130,
            ) from None
        raise typer.Exit(code)


def _state_reachable(settings: Settings) -> None:
    """StateStoreUnavailableError unless the state store answers."""
    from worker.connectivity import state_client

    state_client(settings).close()


def _publish_file(
    publisher: Any,
    source: str,
    *,
    settings: Settings,
    target: tuple[str, str, str],
    batch_rows: int,
    prefix: str | None,
) -> list[PublishedBatch]:
    """Check the whole input, then publish it batch by batch; what was published."""
    from worker.ndjson import check_ndjson, file_batches
    from worker.publish import InvalidBatchError

    database, schema, pipe = target
    published: list[PublishedBatch] = []
    rows_sent = 0
    try:
        with _input(source) as stream:
            try:
                total = check_ndjson(stream, settings=settings)
            except NdjsonError as exc:
                raise _fail(str(exc)) from None
            stream.seek(0)
            with _progress() as progress:
                task = progress.add_task("publishing", total=total)
                batches = file_batches(stream, database=database, schema=schema, pipe=pipe,
                                       batch_rows=batch_rows, id_prefix=prefix)  # fmt: skip
                for batch in batches:
                    publisher.publish(batch.rows, database=database, schema=schema, pipe=pipe,
                                      batch_id=batch.batch_id)  # fmt: skip
                    published.append(batch.summary())
                    rows_sent += len(batch.rows)
                    progress.update(task, advance=len(batch.rows))
    except InvalidBatchError as exc:
        raise _fail(
            f"{exc} (batch {len(published) + 1}; {len(published)} batch(es) were published "
            "before it: run the same command again once fixed)"
        ) from None
    except UnreachableError as exc:
        raise _fail(
            f"{exc}; {len(published)} batch(es) ({rows_sent} rows) were published before it: run "
            "the same command again when the broker is back (a batch already published is not "
            "committed twice)",
            EXIT_UNREACHABLE,
        ) from None
    except KeyboardInterrupt:
        raise _fail(
            f"interrupted after {len(published)} batch(es) ({rows_sent} rows): run the same "
            "command again to publish the rest (a batch already published is not committed "
            "twice)",
            130,
        ) from None
    return published


def _wait_for(settings: Settings, batches: list[PublishedBatch], timeout: float) -> int:
    """`publish --wait`: progress while waiting, one line per problem; the exit code."""
    from worker.waiting import wait_for_batches

    total = len(batches)
    if console.is_terminal:
        with _progress() as progress:
            task = progress.add_task("committed", total=total)

            def show(result: WaitResult) -> None:
                counts = result.counts
                dead = counts["dead_lettered"]
                progress.update(
                    task,
                    completed=counts["committed"],
                    description=f"committed ({dead} dead-lettered)" if dead else "committed",
                )
                progress.refresh()

            result = wait_for_batches(
                [b.batch_id for b in batches], timeout=timeout, settings=settings,
                on_progress=show,
            )  # fmt: skip
    else:
        last: list[tuple[int, ...]] = []

        def show_line(result: WaitResult) -> None:
            counts = result.counts
            now = (counts["committed"], counts["dead_lettered"], counts["pending"],
                   counts["unknown"])  # fmt: skip
            if last and last[-1] == now:
                return
            last.append(now)
            console.print(
                f"waiting: {now[0]}/{total} batches committed, {now[1]} dead-lettered, "
                f"{now[2]} logged and not yet committed, {now[3]} not yet logged",
                highlight=False,
                soft_wrap=True,
            )

        result = wait_for_batches(
            [b.batch_id for b in batches], timeout=timeout, settings=settings,
            on_progress=show_line,
        )  # fmt: skip
    return _wait_report(result, batches, timeout)


def _wait_report(result: WaitResult, batches: list[PublishedBatch], timeout: float) -> int:
    """Print the outcome of `publish --wait`: one line per problem; the exit code."""
    total = len(batches)
    by_id = {b.batch_id: b for b in batches}
    counts = result.counts

    def where(batch_id: str) -> str:
        b = by_id[batch_id]
        return f"batch {batch_id} ({b.index + 1} of {total}, lines {b.first_line}-{b.last_line})"

    def problem(text: str) -> None:
        console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True, highlight=False)

    for batch_id in result.ids("dead_lettered"):
        problem(
            f"{where(batch_id)} is a dead letter: {result.reasons.get(batch_id, '?')}; see "
            f"`snowpipe-worker dead-letters list --batch-id {batch_id}`"
        )
    for batch_id, reason in result.rows_rejected.items():
        problem(
            f"{where(batch_id)} is committed without the rows Snowflake rejected: {reason}; see "
            f"`snowpipe-worker dead-letters list --batch-id {batch_id}`"
        )
    late = [(b, "logged, not yet committed") for b in result.ids("pending")]
    late += [
        (b, "not logged: still in the queue (is a worker consuming it?), or in RabbitMQ's "
            "dead-letter queue")
        for b in result.ids("unknown")
    ]  # fmt: skip
    for batch_id, state in late[:MAX_PENDING_LISTED]:
        problem(f"{where(batch_id)} still pending after {timeout:g} s: {state}")
    if len(late) > MAX_PENDING_LISTED:
        problem(f"... and {len(late) - MAX_PENDING_LISTED} more batches still pending")
    rows = sum(b.rows for b in batches if result.states[b.batch_id] == "committed")
    summary = (
        f"{counts['committed']} of {total} batches ({rows} rows) committed in "
        f"{result.elapsed_seconds:.1f} s"
    )
    if result.ok:
        out.print(summary, highlight=False)
        return 0
    failed = counts["dead_lettered"] + len(result.rows_rejected)
    if late:
        summary += f"; {len(late)} still pending: run the same command again to keep waiting"
    if failed:
        summary += f"; {failed} with dead letters"
    problem(summary)
    return 1 if failed else EXIT_PENDING


def _progress() -> Progress:
    # On a terminal only: piped, a bar would be printed once, at the end, as a line of noise.
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def _dead_letters() -> Any:
    from worker.connectivity import state_client
    from worker.deadletter import DeadLetters

    return DeadLetters(state_client(_settings()))


def _broker_dead_letters() -> Any:
    from worker.brokerletters import BrokerDeadLetters
    from worker.connectivity import check_broker

    letters = BrokerDeadLetters(_settings())
    if letters.enabled:
        check_broker(letters.settings)  # credentials and TLS: one line, before any read
    return letters


def _letter_json(stored: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {**asdict(stored.letter), "source": "state", "index": stored.index}


def _print_rows(state: list[Any], from_broker: list[Any]) -> None:
    """The rows of each dead letter (a malformed message's raw body) after the list."""
    from worker.snowpipe.encoding import to_json

    for stored in state:
        for row in stored.letter.rows:
            out.print_json(to_json(row).decode())
        if stored.letter.raw is not None:  # a malformed message: its body as received
            sys.stdout.write(stored.letter.raw + "\n")
    for b in from_broker:
        for row in b.rows:
            out.print_json(to_json(row).decode())


@dead_app.command("list")
@_edge
def dead_list(
    batch_id: Annotated[str | None, typer.Option(help="only this batch")] = None,
    rows: Annotated[
        bool, typer.Option(help="print the rows too (a malformed message's raw body)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document (rows included)")] = (
        False
    ),
) -> None:
    """List dead letters: the state store's, then the broker's dead-letter queue (RabbitMQ)."""
    state = list(_dead_letters().entries(batch_id=batch_id))
    broker = _broker_dead_letters()
    from_broker = broker.entries(batch_id=batch_id)
    if as_json:
        entries = [_letter_json(stored) for stored in state]
        entries += [letter.as_json() for letter in from_broker]
        from worker.snowpipe.encoding import to_json

        # Rows keep their numbers exactly (integers beyond 64 bits, long fractions).
        sys.stdout.write(to_json(entries, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    listed: list[tuple[str, str, str, str, str, str]] = []
    for stored in state:
        letter = stored.letter
        names = (letter.database, letter.schema, letter.pipe)
        target = ".".join(names) if any(names) else "-"
        listed.append((str(stored.index), letter.batch_id, target, letter.kind,
                       str(len(letter.rows)), letter.reason))  # fmt: skip
    for n, b in enumerate(from_broker):
        listed.append((f"{broker.name}#{n}", b.batch_id, f"{b.database}.{b.schema}.{b.pipe}",
                       "broker", str(len(b.rows)), b.reason))  # fmt: skip
    if out.is_terminal:
        table = Table("#", "batch id", "target", "kind", "rows", "reason")
        table.columns[1].overflow = "fold"  # whole ids, never an ellipsis
        table.columns[1].no_wrap = False
        for line in listed:
            table.add_row(*line)
        out.print(table)
    else:
        # Not a terminal: tab-separated, whole values (ids can be pasted into --batch-id).
        sys.stdout.write("#\tbatch id\ttarget\tkind\trows\treason\n")
        for line in listed:
            sys.stdout.write("\t".join(field.replace("\t", " ") for field in line) + "\n")
        sys.stdout.flush()
    if rows:
        _print_rows(state, from_broker)
    where = f" ({len(from_broker)} in the broker's queue {broker.name})" if from_broker else ""
    out.print(f"{len(listed)} dead letter(s){where}")


KINDS = ("failed", "row_errors", "malformed")


def _export_rows(letters: list[Any], stream: IO[bytes], side: IO[bytes] | None) -> tuple[int, int]:
    """Write the letters' rows to `stream` (and where each came from to `side`); (rows written,
    letters without rows)."""
    from worker.snowpipe.encoding import to_json

    exported = without_rows = 0
    for letter in letters:
        if not letter.rows:
            without_rows += 1
            continue
        rejected = letter.detail.get("rejected") if letter.exact_rows else None
        for k, row in enumerate(letter.rows):
            exported += 1
            stream.write(to_json(row) + b"\n")
            if side is None:
                continue
            why = rejected[k] if rejected else {"row": k, "message": letter.reason}
            source = {
                "line": exported,
                "letter_id": letter.letter_id,
                "batch_id": letter.batch_id,
                "kind": letter.kind,
                "database": letter.database,
                "schema": letter.schema,
                "pipe": letter.pipe,
                "row": why.get("row", k),
                "message": why.get("message"),
                "code": why.get("code"),
                "column": why.get("column"),
            }
            side.write(to_json(source) + b"\n")
    return exported, without_rows


def _kind(kind: str | None) -> Any:
    if kind is not None and kind not in KINDS:
        raise _fail(f"--kind {kind!r} is not a dead-letter kind: use one of {', '.join(KINDS)}", 2)
    return kind


@dead_app.command("requeue")
@_edge
def dead_requeue(
    batch_id: Annotated[str | None, typer.Option(help="only this batch (default: all)")] = None,
    kind: Annotated[
        str | None, typer.Option(help="only this kind: failed or row_errors (default: both)")
    ] = None,
    table_fixed: Annotated[
        bool,
        typer.Option(
            "--table-fixed",
            help="the table now accepts the rows Snowflake rejected: send row_errors letters' "
            "rows (exactly the rejected ones) once",
        ),
    ] = False,
) -> None:
    """Publish dead letters again, the broker's dead-letter queue's too (same batch id: nothing
    committed is sent twice). A row_errors letter is sent only with --table-fixed, under its
    letter id as batch id, and only when it holds exactly the rejected rows."""
    from worker.brokerletters import BrokerDeadLetter
    from worker.connectivity import check_broker
    from worker.deadletter import DeadLetter, Kind
    from worker.publish import Publisher

    kind = _kind(kind)
    dead = _dead_letters()
    broker = _broker_dead_letters()
    letters = [s.letter for s in dead.entries(batch_id=batch_id)]
    row_errors = [x for x in letters if x.kind == "row_errors" and kind in (None, "row_errors")]
    coarse = [x for x in row_errors if not x.exact_rows]
    malformed = sum(1 for x in letters if x.kind == "malformed" and kind in (None, "malformed"))
    check_broker(_settings())  # requeueing publishes: a broker that refuses us is said first
    publisher = Publisher(_settings())

    def republish(letter: DeadLetter | BrokerDeadLetter) -> None:
        # A letter of the state store is requeued as itself: the channel log logs it once
        # (requeue_of names the letter), and never a late copy of the original message. The
        # rejected rows of a row_errors letter are a batch of their own, whose id is the
        # letter id: a second requeue of the same letter is a duplicate the channel log drops.
        batch = letter.batch_id
        if isinstance(letter, DeadLetter) and letter.kind == "row_errors":
            batch = letter.letter_id
        publisher.publish(
            letter.rows,
            database=letter.database,
            schema=letter.schema,
            pipe=letter.pipe,
            batch_id=batch,
            requeue_of=letter.letter_id if isinstance(letter, DeadLetter) else None,
        )

    kinds: tuple[Kind, ...] = ("failed", "row_errors") if table_fixed else ("failed",)
    if kind is not None:
        kinds = tuple(k for k in kinds if k == kind)
    try:
        requeued, _ = dead.requeue(republish, batch_id=batch_id, kinds=kinds)
        moved = kept = 0
        if kind is None:
            moved, kept = broker.requeue(republish, batch_id=batch_id)
    finally:
        publisher.close()
    out.print(f"requeued {requeued + moved} batch(es)")
    if moved:
        out.print(f"({moved} of them from the broker's dead-letter queue {broker.name})")
    if row_errors and not table_fixed:
        out.print(
            f"kept {len(row_errors)} row_errors letter(s): Snowflake rejected those rows and "
            "committed the rest of their batches. Once the table accepts them, "
            "`dead-letters requeue --kind row_errors --table-fixed` sends them once; or "
            "`dead-letters export`, fix the rows and publish them (docs/operations.md)",
            soft_wrap=True,
        )
    elif coarse:
        out.print(
            f"kept {len(coarse)} row_errors letter(s) that hold whole batches (no error table "
            "told which rows were rejected; their other rows are committed): export them, keep "
            "the rejected rows and publish those",
            soft_wrap=True,
        )
    if malformed:
        out.print(
            f"kept {malformed} malformed letter(s): those messages are not batches (inspect "
            "them with `dead-letters list --json`, then drop them)",
            soft_wrap=True,
        )
    if kept:
        out.print(
            f"kept {kept} message(s) in {broker.name}: not ingest batches, or rows that cannot "
            "be published (see `dead-letters list --rows`)"
        )


@dead_app.command("export")
@_edge
def dead_export(
    target: Annotated[str, typer.Argument(help="NDJSON file to write, or - for stdout")] = "-",
    batch_id: Annotated[str | None, typer.Option(help="only this batch")] = None,
    kind: Annotated[
        str | None, typer.Option(help="only this kind: failed, row_errors or malformed")
    ] = None,
    pipe: Annotated[str | None, typer.Option(help="only letters for DATABASE.SCHEMA.PIPE")] = None,
    sources: Annotated[
        Path | None,
        typer.Option(
            help="also write this NDJSON file: line N says which letter, batch and row line N "
            "of the export came from, and why it was dead-lettered"
        ),
    ] = None,
) -> None:
    """Write the rows of dead letters as NDJSON, one row per line, to fix and publish again."""
    kind = _kind(kind)
    if pipe is not None and len([p for p in pipe.split(".") if p]) != 3:
        raise _fail(f"--pipe {pipe!r} is not DATABASE.SCHEMA.PIPE", 2)
    letters = [
        s.letter
        for s in _dead_letters().entries(batch_id=batch_id)
        if (kind is None or s.letter.kind == kind)
        and (pipe is None or f"{s.letter.database}.{s.letter.schema}.{s.letter.pipe}" == pipe)
    ]
    with contextlib.ExitStack() as files:
        stream = (
            sys.stdout.buffer if target == "-" else files.enter_context(Path(target).open("wb"))
        )
        side = files.enter_context(sources.open("wb")) if sources is not None else None
        exported, without_rows = _export_rows(letters, stream, side)
        stream.flush()
    where = "standard output" if target == "-" else target
    console.print(
        f"exported {exported} row(s) of {len(letters) - without_rows} dead letter(s) to {where}"
        + (f" (sources in {sources})" if sources is not None else ""),
        highlight=False,
        soft_wrap=True,
    )
    if without_rows:
        console.print(
            f"{without_rows} letter(s) have no rows (malformed messages: see "
            "`dead-letters list --json` for their raw bodies)",
            highlight=False,
            soft_wrap=True,
        )


@dead_app.command("drop")
@_edge
def dead_drop(
    batch_id: Annotated[str | None, typer.Option(help="only this batch")] = None,
    all_: Annotated[bool, typer.Option("--all", help="drop every dead letter")] = False,
) -> None:
    """Delete dead letters of the state store (one batch with --batch-id, or --all)."""
    if batch_id is None and not all_:
        raise _fail("say which: --batch-id ID, or --all", 2)
    dropped = _dead_letters().drop(batch_id=batch_id)
    out.print(f"dropped {dropped} dead letter(s)")


@app.command()
@_edge
def stats(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
) -> None:
    """Counters: batches committed, retries, dead letters (both kinds), token refreshes. A table
    on a terminal; tab-separated lines when piped; --json for one document."""
    from worker.connectivity import state_client
    from worker.deadletter import DeadLetters
    from worker.delivery.stats import counters
    from worker.tokenstore import TokenStore, identity

    s = _settings()
    client = state_client(s)
    counted = counters(client)
    refreshes: dict[str, int] = {}
    if s.account and s.user:
        refreshes = TokenStore(client, identity(s)).refresh_counts()
    dead = DeadLetters(client).count()
    broker = _broker_dead_letters()
    in_broker = broker.count() if broker.enabled else None
    if as_json:
        doc = {
            "counters": dict(sorted(counted.items())),
            "token_refreshes": dict(sorted(refreshes.items())),
            "dead_letters": dead,
            "broker_dead_letters": (
                {"queue": broker.name, "messages": in_broker} if in_broker is not None else None
            ),
        }
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    rows = [[name, str(value)] for name, value in sorted(counted.items())]
    rows += [[f"token refreshes ({reason})", str(n)] for reason, n in sorted(refreshes.items())]
    rows.append(["dead letters", str(dead)])
    if in_broker is not None:
        rows.append([f"broker dead-letter queue ({broker.name})", str(in_broker)])
    if out.is_terminal:
        table = Table("counter", "value")
        for row in rows:
            table.add_row(*row)
        out.print(table)
        return
    sys.stdout.write("".join(f"{name}\t{value}\n" for name, value in rows))
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return str(value).replace("\t", " ").replace("\n", " ")


def _status_sections(doc: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each part of `status`, as text cells."""
    chan_header = ["pipe", "channel", "owner", "committed", "last issued", "log entries",
                   "log bytes", "oldest s", "rows inserted", "rows in error", "status",
                   "last error"]  # fmt: skip
    chan_rows = [
        [_cell(c[k]) for k in ("pipe", "channel", "owner", "committed_offset",
                               "last_issued_offset", "log_entries", "log_bytes",
                               "oldest_age_seconds", "rows_inserted", "rows_errors",
                               "status_code", "last_error")]
        for c in doc["channels"]
    ]
    queue_rows = [
        [q["queue"], _cell(q.get("ready")), _cell(q.get("unacked")), _cell(q.get("consumers")),
         _cell(q.get("detail") or q.get("unacked_source"))]
        for q in doc["queues"]
    ]
    tok = doc["token"]
    if not tok["configured"] or not tok.get("shared"):
        token_rows = [["token", tok.get("detail", "")]]
    else:
        token_rows = [
            ["identity", tok["identity"]],
            ["age s", _cell(tok["age_seconds"])],
            ["lifetime s", _cell(tok["lifetime_seconds"])],
            ["expires in s", _cell(tok["expires_in_seconds"])],
            ["beat refresh in s", _cell(tok["beat_refresh_in_seconds"])],
            ["guard refresh in s (latest)", _cell(tok["guard_refresh_in_seconds"])],
        ]
    for reason, count in sorted(tok.get("refreshes", {}).items()):
        token_rows.append([f"refreshes ({reason})", str(count)])
    dead = doc["dead_letters"]
    dead_rows = [["state store", kind, str(n)] for kind, n in dead["state_store"].items()]
    if not dead["state_store"]:
        dead_rows.append(["state store", "-", "0"])
    if dead["broker_queue"] is not None:
        dead_rows.append([dead["broker_queue"]["queue"], "broker",
                          str(dead["broker_queue"]["messages"])])  # fmt: skip
    node_rows = [[n["node"], _cell(n["expires_in_seconds"])] for n in doc["nodes"]]
    invalid_rows = [
        [_cell(key), "not database|schema|pipe|channel: skipped by the pumps"]
        for key in doc.get("invalid_channel_keys", [])
    ]
    repl = doc["state_replication"]
    if "error" in repl:
        repl_rows = [["error", repl["error"], "", "", ""]]
    else:
        where = repl["primary"] or "-"
        if repl["via"] == "sentinel":
            where += f" (Sentinel master {repl['master_name']})"
        repl_rows = [["primary", where, repl["role"] or "-", "", ""]]
        repl_rows += [
            ["replica", r["address"], _cell(r["state"]), _cell(r["behind_bytes"]),
             _cell(r["lag_seconds"])]
            for r in repl["replicas"]
        ]  # fmt: skip
        repl_rows.append(["online", f"{repl['replicas_online']} (SNOWPIPE_STATE_MIN_REPLICAS "
                          f"{repl['min_replicas']})", "", "", ""])  # fmt: skip
        if repl["problem"]:
            repl_rows.append(["problem", repl["problem"], "", "", ""])
    sf = doc["snowflake"]
    sf_rows = [[pipe, error] for pipe, error in sorted(sf.get("errors", {}).items())]
    if not sf["queried"]:
        sf_rows.append(["-", sf["detail"]])
    return [
        ("channels", chan_header, chan_rows),
        ("invalid channel keys", ["key", "problem"], invalid_rows),
        ("snowflake", ["pipe", "problem"], sf_rows),
        ("state store", ["what", "address", "state", "bytes behind", "last ack s"], repl_rows),
        ("nodes", ["node", "heartbeat expires in s"], node_rows),
        ("token", ["what", "value"], token_rows),
        ("queues", ["queue", "ready", "unacked", "consumers", "note"], queue_rows),
        ("dead letters", ["where", "kind", "count"], dead_rows),
    ]


def _numeric(cell: str) -> bool:
    return cell.replace(".", "", 1).lstrip("-").isdigit() or cell == "-"


# A text column of a terminal table folds down to this many characters (ids, pipe names).
MIN_TEXT_WIDTH = 12


def _table(title: str, header: list[str], rows: list[list[str]], width: int) -> Table | None:
    """A terminal table whose numbers (16-digit offsets) stay whole on one line and whose text
    folds; None when even that is wider than `width` (the caller prints plain rows instead)."""
    numeric = [
        all(_numeric(row[n]) for row in rows) and any(row[n] != "-" for row in rows)
        for n in range(len(header))
    ]
    # Numbers never wrap, so their headers go one word per line to keep the columns narrow.
    titles = [name.replace(" ", "\n") if numeric[n] else name for n, name in enumerate(header)]
    needed = 1
    for n, name in enumerate(titles):
        longest = max([len(word) for word in name.split()] + [len(row[n]) for row in rows])
        needed += 3 + (longest if numeric[n] else min(MIN_TEXT_WIDTH, longest))
    if needed > width:
        return None
    table = Table(*titles, title=title, title_justify="left")
    for n, column in enumerate(table.columns):
        if numeric[n]:
            column.no_wrap = True
            column.justify = "right"
        else:
            column.overflow = "fold"  # whole ids, never an ellipsis
    for row in rows:
        table.add_row(*row)
    return table


def _plain(title: str, header: list[str], rows: list[list[str]]) -> None:
    """One `[section]` line, a header line, then tab-separated whole values."""
    sys.stdout.write(f"[{title}]\n" + "\t".join(header) + "\n")
    for row in rows:
        sys.stdout.write("\t".join(row) + "\n")
    sys.stdout.flush()


@app.command()
@_edge
def status(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
    snowflake: Annotated[
        bool, typer.Option("--snowflake/--no-snowflake", help="ask Snowflake for each channel")
    ] = True,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="RabbitMQ: seconds to wait for nodes' unacked counts")
    ] = 1.0,
) -> None:
    """Per channel: owner, committed offset, log depth and age, rows inserted and in error, last
    error; live nodes; the shared token's age and next refresh; queue depths with
    unacknowledged messages; dead letters by kind and the broker's dead-letter queue."""
    import logging

    from worker.observability import configure_logging
    from worker.status import collect_status

    # The client's own log lines go to standard error, warnings and worse only: stdout is the
    # report (a JSON document with --json).
    configure_logging(logging.WARNING, json=not sys.stderr.isatty(), stream=sys.stderr)
    doc = collect_status(_settings(), snowflake=snowflake, timeout=timeout)
    if as_json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    optional = ("snowflake", "invalid channel keys")  # shown only when they have rows
    sections = [s for s in _status_sections(doc) if s[0] not in optional or s[2]]
    for title, header, rows in sections:
        # A terminal gets tables; a pipe, or a terminal too narrow for whole numbers, plain rows.
        table = _table(title, header, rows, out.width) if out.is_terminal else None
        if table is not None:
            out.print(table)
        else:
            _plain(title, header, rows)


@app.command()
def keygen(
    directory: Annotated[Path, typer.Argument(help="where to write the key pair")],
) -> None:
    """Write a throwaway key pair (snowpipe_key.pem, mode 0600 / .pub) for the emulator, if
    absent; a symbolic link at either path is refused."""
    from worker.errors import KeyPairError
    from worker.keyfiles import ensure_key

    try:
        private, public = ensure_key(directory)
    except KeyPairError as exc:
        raise _fail(str(exc)) from None
    out.print(f"private key {private}\npublic key  {public}")


def _port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server listens on the port. Bound the way the emulator and the
    embedded broker bind theirs, with SO_REUSEADDR: the connections of a stack just stopped,
    left in TIME_WAIT for a minute, do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


class _Stop(Exception):
    """SIGTERM/SIGHUP received: stop the stack like Ctrl-C does."""


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


@app.command()
def up(
    pool: Annotated[str, typer.Option(help="worker pool: threads or prefork")] = "threads",
    concurrency: Annotated[int, typer.Option(min=1)] = 16,
    redis_port: Annotated[int, typer.Option(help="port of the embedded broker")] = 6399,
    emulator_port: Annotated[int, typer.Option(help="port of the emulator")] = 8087,
) -> None:
    """Start the local stack (embedded broker, emulator, worker, beat) and keep it running;
    Ctrl-C, SIGTERM or SIGHUP stop every part. Needs the \\[local] extra."""
    _require_extra("local", "snowpipe-worker up")
    from worker.devstack import LocalStack, StackError

    for port, what, option in ((redis_port, "the embedded broker", "--redis-port"),
                               (emulator_port, "the emulator", "--emulator-port")):  # fmt: skip
        if port and _port_in_use(port):
            raise _fail(
                f"port {port} ({what}) is already in use on 127.0.0.1: another `snowpipe-worker "
                f"up` may be running (stop it), or pick another port with {option}"
            )
    stack = LocalStack(
        redis_port=redis_port, emulator_port=emulator_port, pool=pool, concurrency=concurrency
    )
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            stack.start()
        except (StackError, OSError) as exc:
            raise _fail(str(exc)) from None
        assert stack.redis is not None
        out.print(
            f"[bold green]up[/]: broker {stack.redis.url}, emulator {stack.emulator_url}, "
            f"worker + beat (logs in {stack.log_dir})\n"
            "publish from another shell with:\n"
            f"  SNOWPIPE_CONFIG=local SNOWPIPE_BROKER_URL={stack.redis.url} "
            ".venv/bin/snowpipe-worker publish --database DEMO "
            "--schema PUBLIC --pipe EVENTS FILE.ndjson\n"
            "Ctrl-C (or SIGTERM) stops everything."
        )
        while all(stack.alive().values()):
            time.sleep(1)
        dead = [name for name, alive in stack.alive().items() if not alive]
        raise _fail(f"{', '.join(dead)} exited; see {stack.log_dir}")
    except (KeyboardInterrupt, _Stop):
        out.print("stopping")
    finally:
        # A second signal while stopping must not interrupt the stop itself.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@app.command()
def run(
    rows: Annotated[int, typer.Option(min=1, help="sample rows to publish")] = SAMPLE_ROWS,
    pipes: Annotated[int, typer.Option(min=1, help="pipes to spread them over")] = SAMPLE_PIPES,
    batch_rows: Annotated[int, typer.Option(min=1)] = DEFAULT_BATCH_ROWS,
) -> None:
    """The first run: start the local stack, publish sample rows, verify each committed once.
    Needs the \\[local] extra."""
    _require_extra("local", "snowpipe-worker run")
    from worker.demo import run_demo

    raise typer.Exit(run_demo(rows=rows, pipes=pipes, batch_rows=batch_rows, console=out))


@app.command()
def doctor(
    pipe: Annotated[
        list[str] | None,
        typer.Option("--pipe", help="DB.SCHEMA.PIPE to probe (repeatable; default SNOWPIPE_PIPES)"),
    ] = None,
) -> None:
    """Check the configuration end to end: settings, key, account, token, pipes, broker, state
    store. One line per check; exit 0 only if every check passes."""
    import logging

    from worker.doctor import run_doctor

    if not _debug:
        # Every failure is a check line below; the client's own warnings would repeat them.
        logging.getLogger().setLevel(logging.ERROR)
    result = run_doctor(pipe or ())
    styles = {"✓": "green", "!": "yellow", "✗": "red"}
    for check in result.results:
        mark = check.mark
        out.print(f"[{styles[mark]}]{escape(mark)}[/] {escape(check.name)}: "
                  f"{escape(check.detail)}", highlight=False, soft_wrap=True)  # fmt: skip
        if (not check.ok or check.warning) and check.fix:
            out.print(f"    fix: {escape(check.fix)}", highlight=False, soft_wrap=True)
    failed = sum(1 for check in result.results if not check.ok)
    warned = sum(1 for check in result.results if check.ok and check.warning)
    summary = f"{len(result.results) - failed} passed, {failed} failed"
    if warned:
        summary += f" ({warned} with a warning)"
    out.print(summary, highlight=False)
    raise typer.Exit(0 if result.ok else 1)


def _heartbeat_path(given: Path | None) -> Path:
    if given is not None:
        return given
    from os import environ

    if environ.get("SNOWPIPE_HEARTBEAT_FILE"):
        return Path(environ["SNOWPIPE_HEARTBEAT_FILE"])
    configured = _settings().heartbeat_file
    if configured is None:
        raise _fail(
            "no heartbeat file: pass --heartbeat-file, or set SNOWPIPE_HEARTBEAT_FILE (the worker "
            "writes it only when that is set)",
            2,
        )
    return configured


def _probe(liveness: bool, path: Path, max_age: float | None, as_json: bool) -> None:
    from worker import heartbeat_file

    checks: dict[str, Any] = {}
    if liveness:
        verdict = heartbeat_file.liveness(path, max_age)
    else:
        verdict, checks = heartbeat_file.readiness(path, max_age)
    if as_json:
        doc = {"ok": verdict.ok, "detail": verdict.line, "checks": checks}
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    else:
        mark = "[green]✓[/]" if verdict.ok else "[red]✗[/]"
        out.print(f"{mark} {escape(verdict.line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(0 if verdict.ok else 1)


@app.command()
@_edge
def health(
    *,
    node: Annotated[
        str | None, typer.Option(help="only this node, e.g. celery@HOST (default: every node)")
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="seconds to wait for a node that has not answered")
    ] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="the answers as JSON")] = False,
    liveness: Annotated[
        bool,
        typer.Option("--liveness", help="exec probe: the heartbeat file is fresh (no broker call)"),
    ] = False,
    readiness: Annotated[
        bool,
        typer.Option("--readiness", help="exec probe: the heartbeat file is fresh and ready"),
    ] = False,
    heartbeat_file: Annotated[
        Path | None,
        typer.Option(help="the node's heartbeat file (default: SNOWPIPE_HEARTBEAT_FILE)"),
    ] = None,
    max_age: Annotated[
        float | None,
        typer.Option(min=1, help="--liveness/--readiness: seconds (default: 6 heartbeat periods)"),
    ] = None,
) -> None:
    """Probe worker nodes; exit 0 when healthy, 1 when not.

    With --liveness or --readiness: read the node's heartbeat file (a Kubernetes exec probe; no
    broker or state-store call). Without: ask this deployment's nodes (or --node) through the
    broker whether their token guard, state store and leases are healthy."""
    if liveness and readiness:
        raise _fail("choose one: --liveness or --readiness", 2)
    if liveness or readiness:
        _probe(liveness, _heartbeat_path(heartbeat_file), max_age, as_json)
    from worker.health import check_deployment

    result = check_deployment(_settings(), node=node, timeout=timeout)
    problems, answers = result["problems"], result["nodes"]
    ok = bool(result["ok"])
    if as_json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        for problem in problems:
            out.print(f"[red]✗[/] {escape(problem)}", highlight=False, soft_wrap=True)
        for name, answer in sorted(answers.items()):
            mark = "[green]✓[/]" if answer["ok"] else "[red]✗[/]"
            out.print(f"{mark} {escape(name)}", highlight=False)
            for check_name, check in answer["checks"].items():
                sub = "✓" if check["ok"] else "✗"
                out.print(f"    {sub} {escape(check_name)}: {escape(str(check['detail']))}",
                          highlight=False, soft_wrap=True)  # fmt: skip
    raise typer.Exit(0 if ok else 1)


def main() -> None:
    """Console entry point of `snowpipe-worker`."""
    app()
