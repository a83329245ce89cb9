"""One fake clock for every test that injects time: it moves only when the test (or a `sleep`
the code under test calls) moves it.

    clock = FakeClock()
    guard = TokenGuard(fetch, clock=clock, wall_clock=clock.wall)
    policy = RetryPolicy(clock=clock, sleep=clock.sleep)
    clock.advance(30)          # or: clock.now = 30.0

`clock()` is the monotonic reading, `clock.wall()` a wall clock that follows it (`WALL_EPOCH` +
the monotonic reading), and `clock.sleep(s)` records `s` in `clock.sleeps` and advances.
"""

from __future__ import annotations

WALL_EPOCH = 1_700_000_000.0


class FakeClock:
    """A monotonic clock moved by hand, with a wall clock that follows it and a recording sleep."""

    def __init__(self, now: float = 0.0, *, wall_epoch: float = WALL_EPOCH) -> None:
        self.now = now
        self.wall_epoch = wall_epoch
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        """The wall clock (seconds since the epoch) that moves with the monotonic one."""
        return self.wall_epoch + self.now

    def advance(self, seconds: float) -> None:
        """Move both clocks on by `seconds`."""
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        """What the code under test calls instead of time.sleep: recorded, and time moves on."""
        self.sleeps.append(seconds)
        self.now += seconds
