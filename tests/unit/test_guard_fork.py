"""TokenGuard across os.fork(): the child never inherits a lock held by a parent thread."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from worker.auth.guard import Token, TokenGuard

CHILD_OK = 0
CHILD_WRONG_TOKEN = 3
CHILD_ERROR = 4


def _wait_child(pid: int, timeout: float) -> int:
    """The child's exit status; kills it and fails the test if it does not exit in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"child {pid} hung for {timeout} s (deadlocked on the guard's lock?)")


@pytest.mark.timeout(60)
def test_child_refreshes_while_a_parent_thread_holds_the_lock_at_fork() -> None:
    parent = os.getpid()
    release = threading.Event()
    in_fetch = threading.Event()
    counter = {"n": 0}

    def fetch() -> Token:
        counter["n"] += 1
        n = counter["n"]
        if os.getpid() == parent and n > 1:
            in_fetch.set()
            release.wait(30)  # the parent's refresh holds the lock until the test is done
        return Token(f"tok-{os.getpid()}-{n}", 3600.0, time.time() + 3600.0 + n)

    # wait_timeout well under the child's deadline: without the fork reset, the child's
    # refresh() would time out on the inherited, held lock and exit with CHILD_ERROR.
    guard = TokenGuard(fetch, name="fork", wait_timeout=5.0, jitter_fraction=0.0)
    inherited = guard.get()

    holder = threading.Thread(target=guard.refresh, args=("beat",))
    holder.start()
    assert in_fetch.wait(10)
    assert guard._lock.locked()  # the parent's lock is held at the moment of fork

    pid = os.fork()
    if pid == 0:  # child: exit with a status the parent checks, never return into pytest
        status = CHILD_ERROR
        try:
            if guard.get() != inherited:  # the token is kept across fork
                os._exit(CHILD_WRONG_TOKEN)
            token = guard.refresh("beat")  # needs the lock the parent's thread holds
            status = (
                CHILD_OK
                if guard.get() == token.value and token.value.startswith(f"tok-{os.getpid()}-")
                else CHILD_WRONG_TOKEN
            )
        except BaseException:
            status = CHILD_ERROR
        finally:
            os._exit(status)

    try:
        assert _wait_child(pid, timeout=20.0) == CHILD_OK
    finally:
        release.set()
        holder.join(10)
    assert guard.get().startswith(f"tok-{parent}-2")


@pytest.mark.timeout(60)
def test_child_get_refreshes_an_invalidated_token_after_fork_with_lock_held() -> None:
    parent = os.getpid()
    release = threading.Event()
    in_fetch = threading.Event()
    counter = {"n": 0}

    def fetch() -> Token:
        counter["n"] += 1
        n = counter["n"]
        if os.getpid() == parent and n > 1:
            in_fetch.set()
            release.wait(30)
        return Token(f"tok-{os.getpid()}-{n}", 3600.0, time.time() + 3600.0 + n)

    guard = TokenGuard(fetch, name="fork-get", wait_timeout=5.0, jitter_fraction=0.0)
    rejected = guard.get()
    holder = threading.Thread(target=guard.refresh, args=("beat",))
    holder.start()
    assert in_fetch.wait(10)

    pid = os.fork()
    if pid == 0:
        status = CHILD_ERROR
        try:
            guard.invalidate(rejected)  # a 401 in the child: get() must take the lock and fetch
            value = guard.get()
            status = CHILD_OK if value.startswith(f"tok-{os.getpid()}-") else CHILD_WRONG_TOKEN
        except BaseException:
            status = CHILD_ERROR
        finally:
            os._exit(status)

    try:
        assert _wait_child(pid, timeout=20.0) == CHILD_OK
    finally:
        release.set()
        holder.join(10)
