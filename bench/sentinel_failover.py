"""How the state store's client lives through a Sentinel failover.

A primary, a replica and one Sentinel (tests/support/sentinel.py: `down-after-milliseconds`
2000), and a client from `worker.statestore.state_redis` that writes every 10 ms in a thread of
its own (a registered script: `INCR`, and the port of the node that ran it). Per round:

- **kill -9** of the primary: seconds until Sentinel names the promoted replica; seconds from
  the kill until the client's first write on it; the failed writes in between;
- **the old primary restarted**: seconds until Sentinel has made it a replica; writes that
  landed on it meanwhile (should be 0: the client connects only where Sentinel points);
- **SENTINEL FAILOVER**: seconds until Sentinel names the new primary; writes that landed on the
  old primary after that (it takes writes until Sentinel demotes it) and how long after the
  switch the last one was; seconds until the old primary is a replica.

Prints one line per round and one JSON line of medians.

    PYTHONPATH=. .venv/bin/python bench/sentinel_failover.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import redis

from tests.support.sentinel import SentinelSet, sentinel_set
from worker.settings import load_settings
from worker.statestore import state_redis

WRITE_EVERY = 0.01
SCRIPT = """
redis.call('INCR', KEYS[1])
return string.match(redis.call('INFO', 'server'), 'tcp_port:(%d+)')
"""


class Writer(threading.Thread):
    """Writes until stopped; keeps (time, port of the node that ran it, or 0 for an error)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(daemon=True)
        self.script = client.register_script(SCRIPT)
        self.stop = threading.Event()
        self.writes: list[tuple[float, int]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                port = int(self.script(keys=["bench:failover"]))
            except redis.RedisError:
                port = 0
            self.writes.append((time.monotonic(), port))
            time.sleep(WRITE_EVERY)

    def since(self, t: float) -> list[tuple[float, int]]:
        return [w for w in list(self.writes) if w[0] >= t]


def one_round(ha: SentinelSet, writer: Writer) -> dict[str, float]:
    out: dict[str, float] = {}
    t0 = time.monotonic()
    old = ha.kill_master()
    new = ha.wait_for_master(other_than=old)
    out["kill_switch_s"] = time.monotonic() - t0
    while not any(port == new.port for _, port in writer.since(t0)):
        time.sleep(0.01)
    after_kill = writer.since(t0)
    first_on_new = next(t for t, port in after_kill if port == new.port)
    out["kill_first_write_on_new_s"] = first_on_new - t0
    out["kill_failed_writes"] = sum(1 for _, port in after_kill if port == 0)

    t1 = time.monotonic()
    old.start()
    ha.wait_role(old, "slave")
    out["restart_demoted_s"] = time.monotonic() - t1
    out["restart_writes_on_old"] = sum(1 for _, port in writer.since(t1) if port == old.port)

    old, t2 = ha.master(), time.monotonic()
    new = ha.failover(demote=False)
    switched = time.monotonic()
    out["forced_switch_s"] = switched - t2
    ha.wait_role(old, "slave")
    out["forced_demoted_s"] = time.monotonic() - t2
    late = [t for t, port in writer.since(switched) if port == old.port]
    out["forced_writes_on_old_after_switch"] = len(late)
    out["forced_last_write_on_old_after_switch_s"] = (max(late) - switched) if late else 0.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    for n in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-sentinel-") as tmp, sentinel_set(
            Path(tmp)
        ) as ha:
            settings = load_settings(
                require_identity=False, state_url=ha.url(0), state_sentinel_master=ha.master_name
            )
            client = state_redis(settings)
            writer = Writer(client)
            writer.start()
            try:
                result = one_round(ha, writer)
            finally:
                writer.stop.set()
                writer.join(10)
                client.close()
        rounds.append(result)
        print(f"round {n + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
    medians = {k: round(statistics.median(r[k] for r in rounds), 2) for k in rounds[0]}
    print(json.dumps({"bench": "sentinel_failover", "rounds": args.rounds, "median": medians}))


if __name__ == "__main__":
    main()
