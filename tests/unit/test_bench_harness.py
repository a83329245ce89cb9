"""bench/_harness.py helpers of the drain phases: the steady rate and a process tree's CPU."""

from __future__ import annotations

import os
import subprocess
import sys

from bench._harness import CountSampler, group_cpu, wait_for


def test_steady_rate_is_the_rate_between_10_and_90_percent_of_the_total() -> None:
    s = CountSampler(lambda: 0)
    # 0 for 2 s (start-up), then 100/s for 10 s, then flat.
    s.samples = [(t / 10, 0 if t <= 20 else min(1000, (t - 20) * 10)) for t in range(0, 140)]
    rate = s.steady_rate(1000)
    assert rate is not None and abs(rate - 100) < 1e-6
    assert s.reached(1000) == 12.0
    assert s.steady_rate(2000) is None  # 90 % of 2000 never reached


def test_group_cpu_counts_children() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    parent = subprocess.Popen(
        [sys.executable, "-c",
         f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {burn!r}]);"
         " p.wait(); time.sleep(20)"],
    )  # fmt: skip
    try:
        # The child's burn, counted while it runs and after its parent reaped it.
        assert wait_for(lambda: group_cpu(parent.pid) >= 0.25, 15.0)
    finally:
        parent.kill()
        parent.wait(10)
    assert group_cpu(os.getpid()) > 0
