"""Benchmark: the cost of getting a token per request.

Measures, in one run:
- `TokenGuard.get()` on its fast path (valid token, lock-free snapshot read + monotonic compare);
- a baseline guard that takes a lock on every check (authlib-style), defined below;
- minting an RS256 JWT per request with a pre-loaded key (what Snowflake's SDKs do);
- for scale, minting with PEM text (PyJWT parses and validates the key on every call).

Each figure is per call: `repeats` timings of `number` calls each, divided by `number`; the
median and p99 are over the repeats (of per-call averages: a single ~80 ns call is below the
timer's resolution). The loop overhead (an empty call) is printed separately and
not subtracted. Final line: one JSON object with the figures and the ratios.

    .venv/bin/python bench/guard.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.auth.guard import Token, TokenGuard
from worker.auth.keypair import KeyPairJWT
from worker.observability import configure_logging

GOAL_FAST_PATH_NS = 500.0
GOAL_MINT_RATIO = 500.0


class LockingGuard:
    """Baseline: the same freshness check, but under a lock on every call."""

    def __init__(self, value: str, refresh_at: float) -> None:
        self._lock = threading.Lock()
        self._value = value
        self._refresh_at = refresh_at

    def get(self) -> str:
        with self._lock:
            if time.monotonic() < self._refresh_at:
                return self._value
            raise RuntimeError("the benchmark token should never be due")


def per_call_ns(fn: Callable[[], object], *, number: int, repeats: int) -> list[float]:
    """Per-call nanoseconds for each of `repeats` timings of `number` calls."""
    timer = timeit.Timer(fn)
    return [t / number * 1e9 for t in timer.repeat(repeat=repeats, number=number)]


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "median_ns": round(statistics.median(ordered), 1),
        "p99_ns": round(p99, 1),
        "min_ns": round(ordered[0], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    configure_logging("WARNING", json=False)  # refresh events would clutter the figures

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    minter = KeyPairJWT(key, account="xy12345.us-east-1", user="bench", lifetime_seconds=3540)

    guard = TokenGuard(minter.token, name="bench", jitter_fraction=0.0)
    value = guard.get()  # first fetch: mints once; from here on every get() is the fast path
    assert isinstance(guard.current(), Token)
    locking = LockingGuard(value, time.monotonic() + 3000.0)

    fast_repeats = max(20, int(300 * scale))
    fast_number = 20_000
    empty = summary(per_call_ns(lambda: None, number=fast_number, repeats=fast_repeats))
    fast = summary(per_call_ns(guard.get, number=fast_number, repeats=fast_repeats))
    locked = summary(per_call_ns(locking.get, number=fast_number, repeats=fast_repeats))
    mint = summary(per_call_ns(minter.mint, number=20, repeats=max(5, int(50 * scale))))
    claims = minter.claims()
    mint_pem = summary(
        per_call_ns(
            lambda: jwt.encode(claims, pem, algorithm="RS256"),
            number=2,
            repeats=max(2, int(5 * scale)),
        )
    )
    assert guard.get() == value  # never refreshed during the run

    ratio_locked = locked["median_ns"] / fast["median_ns"]
    ratio_mint = mint["median_ns"] / fast["median_ns"]
    ratio_mint_pem = mint_pem["median_ns"] / fast["median_ns"]

    print(f"python {platform.python_version()} on {platform.machine()}, {platform.system()}")
    print(f"{'what':<44} {'median':>12} {'p99':>12} {'min':>12}")
    rows = [
        ("empty call (loop overhead, not subtracted)", empty),
        ("TokenGuard.get() fast path", fast),
        ("guard with a lock on every check", locked),
        ("mint RS256 JWT per request (key object)", mint),
        ("mint RS256 JWT per request (PEM text)", mint_pem),
    ]
    for label, fig in rows:
        print(
            f"{label:<44} {fig['median_ns']:>10.1f}ns {fig['p99_ns']:>10.1f}ns "
            f"{fig['min_ns']:>10.1f}ns"
        )
    print(f"lock on every check / fast path: {ratio_locked:.1f}x")
    print(f"mint per request / fast path:    {ratio_mint:.0f}x")
    print(f"mint with PEM / fast path:       {ratio_mint_pem:.0f}x")
    fast_ok = fast["median_ns"] <= GOAL_FAST_PATH_NS
    mint_ok = ratio_mint >= GOAL_MINT_RATIO
    print(
        f"goals: fast path <= {GOAL_FAST_PATH_NS:.0f} ns median: {'met' if fast_ok else 'MISSED'}; "
        f">= {GOAL_MINT_RATIO:.0f}x cheaper than minting: {'met' if mint_ok else 'MISSED'}"
    )
    print(
        json.dumps(
            {
                "bench": "guard",
                "empty_call_median_ns": empty["median_ns"],
                "fast_path_median_ns": fast["median_ns"],
                "fast_path_p99_ns": fast["p99_ns"],
                "locked_median_ns": locked["median_ns"],
                "locked_p99_ns": locked["p99_ns"],
                "mint_median_ns": mint["median_ns"],
                "mint_p99_ns": mint["p99_ns"],
                "mint_pem_median_ns": mint_pem["median_ns"],
                "ratio_locked_over_fast": round(ratio_locked, 2),
                "ratio_mint_over_fast": round(ratio_mint, 1),
                "ratio_mint_pem_over_fast": round(ratio_mint_pem, 1),
                "goal_fast_path_met": fast_ok,
                "goal_mint_ratio_met": mint_ok,
            }
        )
    )


if __name__ == "__main__":
    main()
