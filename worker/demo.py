"""The first run (`make run`): the local stack, sample rows, a check that each committed once.

Publishes `rows` sample rows over `pipes` pipes in batches, waits until the emulator has
committed them all (progress bars for both), reads every committed row back, and prints a
summary: rows published and committed, duplicates and missing rows, token refreshes by reason,
retries, elapsed time and rows per second. Returns 0 only if every row was committed exactly once.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

DATABASE = "DEMO"
SCHEMA = "PUBLIC"
WAIT_TIMEOUT_SECONDS = 900.0


def sample_rows(first: int, count: int, pipe: str) -> list[dict[str, Any]]:
    """Sample event rows with unique ids first .. first + count - 1."""
    return [
        {
            "id": i,
            "pipe": pipe,
            "event": random.choice(("view", "click", "purchase")),
            "amount": round(random.uniform(1, 500), 2),
            "at": time.time(),
        }
        for i in range(first, first + count)
    ]


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


@dataclass
class Outcome:
    """What a demo run measured."""

    rows: int
    batches: int
    pipes: int
    ids: Counter[int]
    emulator: dict[str, Any]
    counters: dict[str, int]
    refreshes: dict[str, int]
    dead: int
    elapsed: float
    publish_seconds: float

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.ids.values() if n > 1)

    @property
    def missing(self) -> int:
        return self.rows - sum(1 for i in self.ids if 0 <= i < self.rows)

    @property
    def ok(self) -> bool:
        return self.duplicates == 0 and self.missing == 0 and self.dead == 0


def run_demo(*, rows: int, pipes: int, batch_rows: int, console: Console) -> int:
    """Run the demo; the process exit code (0: every row committed exactly once)."""
    from worker.devstack import LocalStack, StackError

    stack = LocalStack()
    console.print("starting the local stack: embedded broker, emulator, worker, beat ...")
    try:
        stack.start()
        assert stack.redis is not None
        console.print(
            f"broker {stack.redis.url}  emulator {stack.emulator_url}  logs {stack.log_dir}"
        )
        outcome = _drive(stack, rows=rows, pipes=pipes, batch_rows=batch_rows, console=console)
    except (StackError, OSError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 1
    finally:
        stack.stop()
    _report(outcome, console)
    return 0 if outcome.ok else 1


def _drive(stack: Any, *, rows: int, pipes: int, batch_rows: int, console: Console) -> Outcome:
    from worker import runtime
    from worker.deadletter import DeadLetters
    from worker.delivery.stats import counters
    from worker.publish import Publisher
    from worker.statestore import state_redis
    from worker.tokenstore import TokenStore, identity

    names = [f"EVENTS_{i}" for i in range(pipes)]
    stack.apply_env()
    settings = runtime.settings()
    publisher = Publisher(settings)
    admin = httpx.Client(base_url=stack.emulator_url, timeout=30)

    def committed_rows() -> int:
        return int(admin.get("/_emulator/stats").json()["rows_committed"])

    started = time.monotonic()
    with _progress(console) as progress:
        published = progress.add_task("published", total=rows)
        committed = progress.add_task("committed", total=rows)
        sent = batch = 0
        while sent < rows:
            count = min(batch_rows, rows - sent)
            pipe = names[batch % pipes]
            publisher.publish(
                sample_rows(sent, count, pipe), database=DATABASE, schema=SCHEMA, pipe=pipe
            )
            sent, batch = sent + count, batch + 1
            progress.update(published, completed=sent)
            progress.update(committed, completed=committed_rows())
        publish_seconds = time.monotonic() - started
        deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            done = committed_rows()
            progress.update(committed, completed=done)
            if done >= rows:
                break
            time.sleep(0.5)
    elapsed = time.monotonic() - started
    publisher.close()
    time.sleep(1.0)  # a duplicate would still be in flight: give it time to show
    ids: Counter[int] = Counter()
    for pipe in names:
        body = admin.get(
            "/_emulator/rows", params={"database": DATABASE, "schema": SCHEMA, "pipe": pipe}
        ).content
        ids.update(int(orjson.loads(line)["row"]["id"]) for line in body.splitlines() if line)
    emulator_stats = admin.get("/_emulator/stats").json()
    admin.close()
    client = state_redis(settings)
    return Outcome(
        rows=rows,
        batches=batch,
        pipes=pipes,
        ids=ids,
        emulator=emulator_stats,
        counters=counters(client),
        refreshes=TokenStore(client, identity(settings)).refresh_counts(),
        dead=DeadLetters(client).count(),
        elapsed=elapsed,
        publish_seconds=publish_seconds,
    )


def _report(o: Outcome, console: Console) -> None:
    failed_responses = sum(
        count
        for by_status in o.emulator["requests"].values()
        for status, count in by_status.items()
        if int(status) >= 400
    )
    table = Table(title="make run", show_header=False)
    table.add_row("rows published", f"{o.rows:,} in {o.batches} batches over {o.pipes} pipes")
    table.add_row("rows committed", f"{sum(o.ids.values()):,}")
    table.add_row("duplicates", str(o.duplicates))
    table.add_row("missing", str(o.missing))
    table.add_row(
        "token refreshes",
        f"{sum(o.refreshes.values())} (beat {o.refreshes.get('beat', 0)}, request path "
        f"{o.refreshes.get('request_path', 0)}); scoped tokens issued "
        f"{o.emulator['tokens_issued']}",
    )
    table.add_row(
        "retries",
        f"{o.counters.get('retry_later', 0)} task-level; {failed_responses} error responses "
        "retried inside calls",
    )
    table.add_row("dead letters", str(o.dead))
    table.add_row("elapsed", f"{o.elapsed:.1f} s (publishing {o.publish_seconds:.1f} s)")
    table.add_row(
        "throughput", f"{o.rows / o.elapsed:,.0f} rows/s, {o.batches / o.elapsed:.1f} batches/s"
    )
    console.print(table)
    console.print(
        "[bold green]every row committed exactly once[/]"
        if o.ok
        else "[bold red]NOT exactly once: see the logs in .local/logs[/]"
    )
