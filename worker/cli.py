"""`snowpipe-worker`: publish NDJSON, manage dead letters, run the local stack.

    snowpipe-worker publish --database D --schema S --pipe P [--batch-rows N] FILE|-
    snowpipe-worker dead-letters list|requeue|drop [--batch-id ID]
    snowpipe-worker stats
    snowpipe-worker run      # the first run: local stack + 50k sample rows, verified, then exit
    snowpipe-worker up       # the local stack, kept running until Ctrl-C

The worker itself is `celery -A worker worker` (and one `celery -A worker beat`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.settings import SettingsError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
dead_app = typer.Typer(no_args_is_help=True, help="Inspect, requeue or drop dead letters.")
app.add_typer(dead_app, name="dead-letters")
console = Console(stderr=True)
out = Console()

DEFAULT_BATCH_ROWS = 500
SAMPLE_ROWS = 50_000
SAMPLE_PIPES = 10
RUN_TIMEOUT_SECONDS = 900.0


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


class NdjsonError(ValueError):
    """A line of the input is not a JSON object."""


def read_ndjson(stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """The rows of an NDJSON stream (blank lines skipped); NdjsonError names the bad line."""
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise NdjsonError(f"line {number}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise NdjsonError(f"line {number}: a {type(row).__name__}, not a JSON object")
        yield row


@app.command()
def publish(
    source: Annotated[str, typer.Argument(help="NDJSON file, or - for standard input")] = "-",
    database: Annotated[str, typer.Option(help="target database")] = ...,  # type: ignore[assignment]
    schema: Annotated[str, typer.Option(help="target schema")] = ...,  # type: ignore[assignment]
    pipe: Annotated[str, typer.Option(help="target pipe (a table T has pipe T-STREAMING)")] = ...,  # type: ignore[assignment]
    batch_rows: Annotated[int, typer.Option(min=1, help="rows per batch")] = DEFAULT_BATCH_ROWS,
) -> None:
    """Publish NDJSON rows as batches of --batch-rows to the ingest queue."""
    from worker import runtime
    from worker.publish import InvalidBatchError, Publisher

    try:
        publisher = Publisher(runtime.settings())
    except SettingsError as exc:
        raise _fail(str(exc), 2) from None
    stream: IO[bytes]
    if source == "-":
        stream, total = sys.stdin.buffer, None
    else:
        path = Path(source)
        if not path.is_file():
            raise _fail(f"no such file: {source}")
        total = sum(1 for line in path.open("rb") if line.strip())
        stream = path.open("rb")
    rows_sent = batches = 0
    started = time.monotonic()
    try:
        with _progress() as progress:
            task = progress.add_task("publishing", total=total)
            batch: list[dict[str, Any]] = []
            for row in read_ndjson(stream):
                batch.append(row)
                if len(batch) >= batch_rows:
                    publisher.publish(batch, database=database, schema=schema, pipe=pipe)
                    rows_sent, batches = rows_sent + len(batch), batches + 1
                    progress.update(task, advance=len(batch))
                    batch = []
            if batch:
                publisher.publish(batch, database=database, schema=schema, pipe=pipe)
                rows_sent, batches = rows_sent + len(batch), batches + 1
                progress.update(task, advance=len(batch))
    except (NdjsonError, InvalidBatchError) as exc:
        raise _fail(
            f"{exc} (batch {batches + 1}; {rows_sent} rows were published before it)"
        ) from None
    finally:
        publisher.close()
        if stream is not sys.stdin.buffer:
            stream.close()
    elapsed = time.monotonic() - started
    rate = rows_sent / elapsed if elapsed > 0 else 0.0
    out.print(
        f"published {rows_sent} rows in {batches} batches to {database}.{schema}.{pipe} "
        f"in {elapsed:.1f} s ({rate:,.0f} rows/s)"
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _dead_letters() -> Any:
    from worker import runtime
    from worker.deadletter import DeadLetters

    try:
        s = runtime.settings()
    except SettingsError as exc:
        raise _fail(str(exc), 2) from None
    return DeadLetters(runtime.redis_client(s.state_url))


@dead_app.command("list")
def dead_list(
    batch_id: Annotated[str | None, typer.Option(help="only this batch")] = None,
    rows: Annotated[bool, typer.Option(help="print the rows too")] = False,
) -> None:
    """List dead letters: batch id, target, kind, reason."""
    dead = _dead_letters()
    table = Table("#", "batch id", "target", "kind", "rows", "reason")
    count = 0
    for stored in dead.entries(batch_id=batch_id):
        letter = stored.letter
        table.add_row(
            str(stored.index),
            letter.batch_id,
            f"{letter.database}.{letter.schema}.{letter.pipe}",
            letter.kind,
            str(len(letter.rows)),
            letter.reason,
        )
        count += 1
        if rows:
            for row in letter.rows:
                out.print_json(orjson.dumps(row).decode())
    out.print(table)
    out.print(f"{count} dead letter(s)")


@dead_app.command("requeue")
def dead_requeue(
    batch_id: Annotated[str | None, typer.Option(help="only this batch (default: all)")] = None,
) -> None:
    """Publish failed dead letters again (same batch id: nothing committed is sent twice)."""
    from worker import runtime
    from worker.publish import Publisher

    dead = _dead_letters()
    publisher = Publisher(runtime.settings())
    try:
        requeued, skipped = dead.requeue(
            lambda letter: publisher.publish(
                letter.rows,
                database=letter.database,
                schema=letter.schema,
                pipe=letter.pipe,
                batch_id=letter.batch_id,
            ),
            batch_id=batch_id,
        )
    finally:
        publisher.close()
    out.print(f"requeued {requeued} batch(es)")
    if skipped:
        out.print(
            f"kept {skipped} row_errors entr(ies): those batches were committed; requeueing "
            "would duplicate their good rows (drop them when inspected)"
        )


@dead_app.command("drop")
def dead_drop(
    batch_id: Annotated[str | None, typer.Option(help="only this batch")] = None,
    all_: Annotated[bool, typer.Option("--all", help="drop every dead letter")] = False,
) -> None:
    """Delete dead letters (one batch with --batch-id, or --all)."""
    if batch_id is None and not all_:
        raise _fail("say which: --batch-id ID, or --all", 2)
    dropped = _dead_letters().drop(batch_id=batch_id)
    out.print(f"dropped {dropped} dead letter(s)")


@app.command()
def stats() -> None:
    """Counters: batches committed, retries, dead letters, token refreshes by reason."""
    from worker import runtime
    from worker.tokenstore import TokenStore

    try:
        s = runtime.settings()
    except SettingsError as exc:
        raise _fail(str(exc), 2) from None
    client = runtime.redis_client(s.state_url)
    counters = runtime.counters(client)
    refreshes = TokenStore(client, runtime.identity(s)).refresh_counts()
    table = Table("counter", "value")
    for name, value in sorted(counters.items()):
        table.add_row(name, str(value))
    for reason, value in sorted(refreshes.items()):
        table.add_row(f"token refreshes ({reason})", str(value))
    table.add_row("dead letters", str(client.llen("snowpipe:dead")))
    out.print(table)


@app.command()
def keygen(
    directory: Annotated[Path, typer.Argument(help="where to write the key pair")],
) -> None:
    """Write a throwaway key pair (snowpipe_key.pem / .pub) for the emulator, if absent."""
    from worker.devstack import ensure_key

    private, public = ensure_key(directory)
    out.print(f"private key {private}\npublic key  {public}")


@app.command()
def up(
    pool: Annotated[str, typer.Option(help="worker pool: threads or prefork")] = "threads",
    concurrency: Annotated[int, typer.Option(min=1)] = 16,
) -> None:
    """Start the local stack (embedded broker, emulator, worker, beat) and keep it running."""
    from worker.devstack import LocalStack, StackError

    stack = LocalStack(redis_port=6399, emulator_port=8087, pool=pool, concurrency=concurrency)
    try:
        stack.start()
    except (StackError, OSError) as exc:
        stack.stop()
        raise _fail(str(exc)) from None
    assert stack.redis is not None
    out.print(
        f"[bold green]up[/]: broker {stack.redis.url}, emulator {stack.emulator_url}, "
        f"worker + beat (logs in {stack.log_dir})\n"
        "publish from another shell with:\n"
        "  SNOWPIPE_CONFIG=local .venv/bin/snowpipe-worker publish --database DEMO "
        "--schema PUBLIC --pipe EVENTS FILE.ndjson\n"
        "Ctrl-C stops everything."
    )
    try:
        while all(stack.alive().values()):
            time.sleep(1)
        dead = [name for name, alive in stack.alive().items() if not alive]
        raise _fail(f"{', '.join(dead)} exited; see {stack.log_dir}")
    except KeyboardInterrupt:
        out.print("stopping")
    finally:
        stack.stop()


@app.command()
def run(
    rows: Annotated[int, typer.Option(min=1, help="sample rows to publish")] = SAMPLE_ROWS,
    pipes: Annotated[int, typer.Option(min=1, help="pipes to spread them over")] = SAMPLE_PIPES,
    batch_rows: Annotated[int, typer.Option(min=1)] = DEFAULT_BATCH_ROWS,
) -> None:
    """The first run: start the local stack, publish sample rows, verify each committed once."""
    from worker.demo import run_demo

    raise typer.Exit(run_demo(rows=rows, pipes=pipes, batch_rows=batch_rows, console=out))


def main() -> None:
    """Console entry point of `snowpipe-worker`."""
    app()
