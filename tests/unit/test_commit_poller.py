"""CommitPoller: a pipe is not polled before its channels expect a commit (stub pumps)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.delivery.channels import ChannelRef
from worker.delivery.pump import CommitPoller, recent_latency


@dataclass
class StubPump:
    ref: ChannelRef
    expected_in: float = 0.0
    epoch: int = 1
    committed: int = 0
    statuses: list[Any] = field(default_factory=list)

    def wants_status(self) -> bool:
        return True

    def commit_expected_in(self) -> float:
        return self.expected_in

    def on_status(self, status: Any, epoch: int) -> None:
        self.statuses.append(status)


@dataclass
class StubClient:
    calls: list[tuple[str, list[str]]] = field(default_factory=list)

    def bulk_channel_status(self, db: str, schema: str, pipe: str, names: list[str]) -> Any:
        self.calls.append((pipe, list(names)))
        return {}


def ref(pipe: str, n: int) -> ChannelRef:
    return ChannelRef("DB", "S", pipe, f"ch{n}")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_pipe_whose_channels_expect_no_commit_yet_is_not_polled() -> None:
    client, clock = StubClient(), Clock()
    early = [StubPump(ref("A", 0), expected_in=2.0), StubPump(ref("A", 1), expected_in=3.0)]
    due = [StubPump(ref("B", 0), expected_in=0.0)]
    poller = CommitPoller(client, lambda: [*early, *due], poll_seconds=0.25, clock=clock)  # type: ignore[arg-type]
    poller.poll_once(scheduled=True)
    assert client.calls == [("B", ["ch0"])]


def test_one_channel_due_makes_the_pipe_polled_for_all_its_waiting_channels() -> None:
    client, clock = StubClient(), Clock()
    pumps = [StubPump(ref("A", 0), expected_in=2.0), StubPump(ref("A", 1), expected_in=0.0)]
    poller = CommitPoller(client, lambda: pumps, poll_seconds=0.25, clock=clock)  # type: ignore[arg-type]
    poller.poll_once(scheduled=True)
    assert client.calls == [("A", ["ch0", "ch1"])]


def test_an_unscheduled_poll_ignores_the_expectation() -> None:
    client, clock = StubClient(), Clock()
    pumps = [StubPump(ref("A", 0), expected_in=4.0)]
    poller = CommitPoller(client, lambda: pumps, poll_seconds=0.25, clock=clock)  # type: ignore[arg-type]
    poller.poll_once()
    assert client.calls == [("A", ["ch0"])]


def test_the_recent_latency_falls_at_once_and_rises_slowly() -> None:
    assert recent_latency(0.0, 6.0) == 0.6
    assert recent_latency(6.0, 5.0) == 5.0
    assert abs(recent_latency(5.0, 15.0) - 6.0) < 1e-9
