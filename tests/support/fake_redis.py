"""fakeredis (with Lua through lupa) for fast unit tests of the delivery core's scripts, and a
handle on its clock.

The scripts read the Redis clock (`TIME`: offsets, heartbeats) and rely on key expiry (leases,
dedup records). `RedisClock` moves the clock fakeredis uses for both: `advance(s)` shifts it
`s` seconds ahead of real time, so a test can let a lease expire or a node's heartbeat go stale
without sleeping. Real time keeps running underneath, so blocking reads (`XREAD BLOCK`) still end.
"""

from __future__ import annotations

import time
from typing import Any

import fakeredis
import pytest

# The modules of fakeredis that read the wall clock: for TIME, and for expiry ("now" is set
# per command). Checked at patch time, so a fakeredis that moved them fails loudly.
_CLOCK_MODULES = ("fakeredis._socket._base", "fakeredis.commands_mixins.server_mixin")


class RedisClock:
    """fakeredis's wall clock: real time plus an offset the test moves on."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        """Move the Redis clock (TIME, expiry) on by `seconds`."""
        self.offset += seconds

    def now_us(self) -> int:
        """What TIME answers now, in microseconds."""
        return int(self.time() * 1_000_000)

    def __getattr__(self, name: str) -> Any:  # the rest of the `time` module, unchanged
        return getattr(time, name)


def patch_clock(monkeypatch: pytest.MonkeyPatch) -> RedisClock:
    """Make fakeredis read its clock from a `RedisClock` for the rest of the test."""
    import importlib

    clock = RedisClock()
    for name in _CLOCK_MODULES:
        module = importlib.import_module(name)
        assert getattr(module, "time", None) is time, f"{name} no longer uses time.time()"
        monkeypatch.setattr(module, "time", clock)
    return clock


def fake_redis() -> fakeredis.FakeRedis:
    """A fresh in-memory Redis of its own (Lua scripting needs the `lupa` package)."""
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())
