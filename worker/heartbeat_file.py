"""The heartbeat file of a worker node, and what a probe concludes from it.

A node started with `SNOWPIPE_HEARTBEAT_FILE` rewrites that file every
`SNOWPIPE_HEARTBEAT_SECONDS` (worker/heartbeat.py) for as long as its consumer and its pump
balancer make progress. Each write replaces the file (write, then rename), so its modification
time is the last moment the node was seen alive, and its content is one JSON object:

    {"node": "ingest1@host", "pid": 7, "written_at": 1700000000.0, "period_seconds": 5.0,
     "alive": true, "ready": true,
     "checks": {"consumer": {"ok": true, "detail": "..."}, "state store": {...}, ...}}

- **Liveness**: the file was written within `max_age` seconds. Nothing but the file's age counts,
  so `find FILE -mmin -1` or `test` in a shell probe decides the same way; a state-store or
  broker outage never stops the writes (the node is riding it out, not stuck).
- **Readiness**: the file is fresh and says `"ready": true`: the node is consuming from the
  broker, its state store answers, its leases were renewed in time, its token guard has not
  escalated and its start-up checks found nothing fatal.

Standard library only: a probe process imports nothing else of the worker.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A probe's default tolerance, in heartbeat periods: a node is dead after this many missed writes.
MISSED_PERIODS = 6
MIN_MAX_AGE_SECONDS = 30.0


def write(path: Path, doc: dict[str, Any]) -> None:
    """Replace `path` with `doc` as JSON (a temporary file in the same directory, renamed)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(doc, handle, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Verdict:
    """What a probe concluded: `ok`, and the line that says why."""

    ok: bool
    line: str


def default_max_age(period_seconds: float) -> float:
    """The age past which a heartbeat file means a dead or stuck node."""
    return max(MIN_MAX_AGE_SECONDS, MISSED_PERIODS * period_seconds)


def _read(path: Path) -> tuple[float, dict[str, Any] | None]:
    """(age in seconds, the JSON document or None if unreadable); FileNotFoundError if absent."""
    age = time.time() - path.stat().st_mtime
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return age, None
    return age, doc if isinstance(doc, dict) else None


def liveness(path: Path, max_age: float | None = None) -> Verdict:
    """Alive when the file was written within `max_age` s (default: six of the node's periods)."""
    try:
        age, doc = _read(path)
    except FileNotFoundError:
        return Verdict(False, f"no heartbeat file at {path}: the node has not started, or it "
                              "writes SNOWPIPE_HEARTBEAT_FILE elsewhere")  # fmt: skip
    except OSError as exc:
        return Verdict(False, f"cannot read the heartbeat file {path}: {exc.strerror}")
    period = float((doc or {}).get("period_seconds") or 0) or 5.0
    limit = max_age if max_age is not None else default_max_age(period)
    node = (doc or {}).get("node") or "the node"
    if age > limit:
        stalled = [
            f"{name}: {check.get('detail')}"
            for name, check in ((doc or {}).get("checks") or {}).items()
            if isinstance(check, dict) and not check.get("ok")
        ]
        why = f" (last seen: {'; '.join(stalled)})" if stalled else ""
        return Verdict(False, f"{node} last wrote {path} {age:.0f} s ago, more than {limit:g} s: "
                              f"it is dead or stuck{why}")  # fmt: skip
    return Verdict(True, f"{node} wrote {path} {age:.0f} s ago (alive)")


def readiness(path: Path, max_age: float | None = None) -> tuple[Verdict, dict[str, Any]]:
    """Ready when the file is fresh (see `liveness`) and says so; the verdict and the checks."""
    alive = liveness(path, max_age)
    if not alive.ok:
        return alive, {}
    try:
        _, doc = _read(path)
    except OSError as exc:
        return Verdict(False, f"cannot read the heartbeat file {path}: {exc}"), {}
    if doc is None:
        return Verdict(False, f"the heartbeat file {path} is not a node's JSON"), {}
    found = doc.get("checks")
    checks: dict[str, Any] = found if isinstance(found, dict) else {}
    node = doc.get("node") or "the node"
    if doc.get("ready") is True:
        return Verdict(True, f"{node} is ready"), checks
    failed = [
        f"{name}: {check.get('detail')}"
        for name, check in checks.items()
        if isinstance(check, dict) and not check.get("ok")
    ]
    return Verdict(False, f"{node} is not ready: {'; '.join(failed) or 'starting'}"), checks
