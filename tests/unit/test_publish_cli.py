"""`snowpipe-worker publish` with a stand-in publisher: a broker lost mid-file, Ctrl-C, standard
input; each time the message says what was published and that the same command is the fix, and a
re-run publishes the same batch ids (tests/integration/test_publish_wait.py does it for real)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from worker import cli
from worker.errors import BrokerUnavailableError
from worker.settings import Settings, load_settings
from worker.waiting import WaitResult

ARGS = ["publish", "--database", "D", "--schema", "S", "--pipe", "P", "--batch-rows", "10"]


class FakePublisher:
    """Records what it publishes; raises `fail_with` on publish number `fail_at` (1-based)."""

    published: list[str]
    fail_at: int | None = None
    fail_with: BaseException | None = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def check_broker(self) -> None:
        pass

    def publish(
        self, rows: Sequence[Mapping[str, Any]], *, database: str, schema: str, pipe: str,
        batch_id: str | None = None,
    ) -> str:  # fmt: skip
        assert batch_id is not None
        if self.fail_at is not None and len(self.published) + 1 == self.fail_at:
            assert self.fail_with is not None
            raise self.fail_with
        self.published.append(batch_id)
        return batch_id

    def close(self) -> None:
        pass


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakePublisher]:
    settings = load_settings(require_identity=False, broker_url="redis://127.0.0.1:9/0")
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    monkeypatch.setattr("worker.publish.Publisher", FakePublisher)
    FakePublisher.published = []
    FakePublisher.fail_at = None
    FakePublisher.fail_with = None
    return FakePublisher


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "rows.ndjson"
    path.write_bytes(b"".join(orjson.dumps({"id": i}) + b"\n" for i in range(45)))
    return path


def run(*args: str, stdin: bytes | None = None) -> Any:
    return CliRunner().invoke(cli.app, list(args), input=stdin)


def test_a_broker_lost_mid_file_says_what_was_published_and_a_rerun_sends_the_same_ids(
    fake: type[FakePublisher], source: Path
) -> None:
    fake.fail_at = 3
    fake.fail_with = BrokerUnavailableError("cannot reach the broker at redis://... (X); start it")
    failed = run(*ARGS, str(source))
    assert failed.exit_code == 3
    assert failed.stderr.strip() == (
        "error: cannot reach the broker at redis://... (X); start it; 2 batch(es) (20 rows) were "
        "published before it: run the same command again when the broker is back (a batch "
        "already published is not committed twice)"
    )
    first = list(fake.published)
    fake.published, fake.fail_at = [], None
    rerun = run(*ARGS, str(source))
    assert rerun.exit_code == 0, rerun.stderr
    assert "published 45 rows in 5 batches to D.S.P" in rerun.stdout
    assert fake.published[:2] == first
    assert len(set(fake.published)) == 5


def test_ctrl_c_says_what_was_published_and_that_the_same_command_finishes_it(
    fake: type[FakePublisher], source: Path
) -> None:
    fake.fail_at = 2
    fake.fail_with = KeyboardInterrupt()
    interrupted = run(*ARGS, str(source))
    assert interrupted.exit_code == 130
    assert interrupted.stderr.strip() == (
        "error: interrupted after 1 batch(es) (10 rows): run the same command again to publish "
        "the rest (a batch already published is not committed twice)"
    )


def test_standard_input_gets_the_ids_of_the_same_file(
    fake: type[FakePublisher], source: Path
) -> None:
    assert run(*ARGS, str(source)).exit_code == 0
    from_file = list(fake.published)
    fake.published = []
    piped = run(*ARGS, "-", stdin=source.read_bytes())
    assert piped.exit_code == 0, piped.stderr
    assert fake.published == from_file


def test_an_id_prefix_starts_every_id_and_a_bad_one_is_a_usage_error(
    fake: type[FakePublisher], source: Path
) -> None:
    assert run(*ARGS, "--id-prefix", "orders-0601", str(source)).exit_code == 0
    assert all(i.startswith("orders-0601-") for i in fake.published)
    bad = run(*ARGS, "--id-prefix", "has space", str(source))
    assert bad.exit_code == 2
    assert bad.stderr.startswith("error: --id-prefix 'has space' must be 1 to 64 letters")


def test_a_bad_line_is_named_and_nothing_is_published(
    fake: type[FakePublisher], source: Path
) -> None:
    lines = source.read_bytes().splitlines()
    lines[39] = b'{"id": 39,'
    source.write_bytes(b"\n".join(lines) + b"\n")
    refused = run(*ARGS, str(source))
    assert refused.exit_code == 1
    assert refused.stderr.startswith("error: line 40: not JSON (")
    assert fake.published == []


# --- --wait's report, with a stand-in for the state store -----------------------------------------


def result_for(ids: list[str], states: list[str], **kwargs: Any) -> WaitResult:
    return WaitResult(
        dict(zip(ids, states, strict=True)),  # type: ignore[arg-type]
        kwargs.get("reasons", {}),
        kwargs.get("rows_rejected", {}),
        timed_out=kwargs.get("timed_out", False),
        elapsed_seconds=1.0,
    )


def wait_with(
    monkeypatch: pytest.MonkeyPatch, make: Any, progress: list[list[str]] | None = None
) -> None:
    monkeypatch.setattr(cli, "_state_reachable", lambda settings: None)

    def wait_for_batches(ids: list[str], **kwargs: Any) -> WaitResult:
        for states in progress or []:
            kwargs["on_progress"](result_for(ids, states))
        result: WaitResult = make(ids)
        kwargs["on_progress"](result)
        return result

    monkeypatch.setattr("worker.waiting.wait_for_batches", wait_for_batches)


def test_wait_names_dead_letters_rejected_rows_and_late_batches_one_line_each(
    fake: type[FakePublisher], source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def make(ids: list[str]) -> WaitResult:
        return result_for(
            ids, ["committed", "committed", "dead_lettered", "pending", "unknown"],
            reasons={ids[2]: "Snowflake refused the channel: no pipe"},
            rows_rejected={ids[1]: "Snowflake reported 1 row error(s)"},
            timed_out=True,
        )  # fmt: skip

    wait_with(monkeypatch, make)
    done = run(*ARGS, "--wait", "--timeout", "30", str(source))
    ids = fake.published
    assert done.exit_code == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: batch {ids[2]} (3 of 5, lines 21-30) is a dead letter: Snowflake refused the "
        f"channel: no pipe; see `snowpipe-worker dead-letters list --batch-id {ids[2]}`",
        f"error: batch {ids[1]} (2 of 5, lines 11-20) is committed without the rows Snowflake "
        f"rejected: Snowflake reported 1 row error(s); see `snowpipe-worker dead-letters list "
        f"--batch-id {ids[1]}`",
        f"error: batch {ids[3]} (4 of 5, lines 31-40) still pending after 30 s: logged, not yet "
        "committed",
        f"error: batch {ids[4]} (5 of 5, lines 41-45) still pending after 30 s: not logged: still "
        "in the queue (is a worker consuming it?), or in RabbitMQ's dead-letter queue",
        "error: 2 of 5 batches (20 rows) committed in 1.0 s; 2 still pending: run the same "
        "command again to keep waiting; 2 with dead letters",
    ]
    # Not a terminal: a plain line for the progress.
    assert "waiting: 2/5 batches committed, 1 dead-lettered, 1 logged and not yet committed, " \
        "1 not yet logged" in done.stderr  # fmt: skip


def test_wait_on_a_terminal_shows_a_bar_of_batches_committed(
    fake: type[FakePublisher], source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from rich.console import Console

    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, force_terminal=True, width=100))
    wait_with(
        monkeypatch,
        lambda ids: result_for(ids, ["committed"] * 5),
        progress=[
            ["pending"] * 5,
            ["committed", "committed", "dead_lettered", "pending", "unknown"],
        ],
    )
    done = run(*ARGS, "--wait", str(source))
    assert done.exit_code == 0, done.stderr
    assert "5 of 5 batches (45 rows) committed in 1.0 s" in done.stdout
    assert "committed (1 dead-lettered)" in screen.getvalue()
    assert "5/5" in screen.getvalue()


def test_ctrl_c_while_waiting_says_the_same_command_waits_again(
    fake: type[FakePublisher], source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(ids: list[str]) -> WaitResult:
        raise KeyboardInterrupt

    wait_with(monkeypatch, interrupted)
    result = run(*ARGS, "--wait", str(source))
    assert result.exit_code == 130
    assert result.stderr.strip() == (
        "error: interrupted while waiting; every batch was published: run the same command again "
        "to keep waiting (nothing is committed twice)"
    )


def test_timeout_without_wait_is_a_usage_error(fake: type[FakePublisher], source: Path) -> None:
    result = run(*ARGS, "--timeout", "5", str(source))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: --timeout is how long --wait waits: add --wait, or drop --timeout"
    )
    assert fake.published == []
