"""Unit-test fixtures: an in-memory Redis (fakeredis, Lua through lupa) and its clock."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest

from tests.support.fake_redis import RedisClock, fake_redis, patch_clock


@pytest.fixture
def redis_clock(monkeypatch: pytest.MonkeyPatch) -> RedisClock:
    """The clock fakeredis answers TIME with and expires keys by; `advance(s)` moves it on."""
    return patch_clock(monkeypatch)


@pytest.fixture
def fredis(redis_clock: RedisClock) -> Iterator[fakeredis.FakeRedis]:
    """A fresh in-memory Redis for one test, on `redis_clock`."""
    client = fake_redis()
    yield client
    client.close()
