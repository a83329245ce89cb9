"""A private database on the shared Redis for one test: claimed in DB 0, emptied when released.

The Redis on 127.0.0.1:6379 is shared with other test runs. A test claims one of DBs 2-15 by
`SET snowpipe-test:db:<n> <pid> NX EX 1800` in DB 0, takes it only if it is empty (someone who
did not claim it may be using it), and deletes the keys in it when done (all of them were created
by the test: the database was empty and claimed). Never FLUSHALL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
FIRST_DB, LAST_DB = 2, 15
CLAIM_SECONDS = 1800
CLAIM_WAIT_SECONDS = 120.0


@dataclass(frozen=True)
class RedisDB:
    """A claimed database: its number, URL and a client."""

    number: int
    url: str
    client: redis.Redis


def _claim_key(n: int) -> str:
    return f"snowpipe-test:db:{n}"


def _empty(client: redis.Redis) -> None:
    for key in client.scan_iter(count=500):
        client.delete(key)


@contextmanager
def claimed_db(timeout: float = CLAIM_WAIT_SECONDS) -> Iterator[RedisDB]:
    """Claim an empty Redis DB for the duration of the block; empty and release it afterwards."""
    control = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    owner = f"{os.getpid()}:{time.time_ns()}"
    deadline = time.monotonic() + timeout
    number = None
    while number is None:
        for n in range(FIRST_DB, LAST_DB + 1):
            if not control.set(_claim_key(n), owner, nx=True, ex=CLAIM_SECONDS):
                continue
            probe = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=n)
            if probe.dbsize() == 0:
                number = n
                probe.close()
                break
            probe.close()
            control.delete(_claim_key(n))  # in use by someone who did not claim it: leave it
        else:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no free Redis DB among {FIRST_DB}-{LAST_DB} within {timeout:g} s "
                    "(claims are keys snowpipe-test:db:<n> in DB 0)"
                )
            time.sleep(0.5)
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
    try:
        yield RedisDB(number, f"redis://{REDIS_HOST}:{REDIS_PORT}/{number}", client)
    finally:
        try:
            _empty(client)
        finally:
            client.close()
            if control.get(_claim_key(number)) == owner.encode():
                control.delete(_claim_key(number))
            control.close()
