"""Fault injection rules: the next N (or a fraction of) requests to an endpoint misbehave.

A rule can answer with a status and body instead of the real handler, add latency before the real
handler, or let the real handler run and then drop the connection before the body is sent (the
ambiguous "did my append land?" case).
"""

from __future__ import annotations

import itertools
import random
import threading
from dataclasses import dataclass
from typing import Any

# Endpoint names a rule may target; `any` matches them all. Routes declare their own name.
ENDPOINTS = frozenset(
    {"hostname", "token", "open", "append", "status", "drop", "pipe-info", "telemetry",
     "statements", "statement-status", "any"}
)
MODES = frozenset({"respond", "drop"})


@dataclass
class FaultRule:
    """One injected misbehaviour."""

    id: str
    endpoint: str
    status: int | None = None
    body: Any = None
    has_body: bool = False
    count: int | None = None  # None: until cleared
    probability: float = 1.0
    delay_ms: float = 0.0
    retry_after: float | None = None
    mode: str = "respond"

    def as_json(self) -> dict[str, Any]:
        """The rule as the admin API shows it."""
        return {
            "id": self.id,
            "endpoint": self.endpoint,
            "status": self.status,
            "body": self.body,
            "count": self.count,
            "probability": self.probability,
            "delay_ms": self.delay_ms,
            "retry_after": self.retry_after,
            "mode": self.mode,
        }


def parse_rule(data: object, rule_id: str) -> FaultRule:
    """A FaultRule from the admin JSON; ValueError naming the bad field otherwise."""
    if not isinstance(data, dict):
        raise ValueError("fault must be a JSON object")
    unknown = set(data) - {
        "endpoint", "status", "body", "count", "probability", "delay_ms", "retry_after", "mode",
    }
    if unknown:
        raise ValueError(f"unknown fault fields: {sorted(unknown)}")
    endpoint = data.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {endpoint!r}")
    status = data.get("status")
    if status is not None and (not isinstance(status, int) or not 100 <= status <= 599):
        raise ValueError("status must be an HTTP status code (100-599)")
    count = data.get("count")
    if count is not None and (not isinstance(count, int) or count < 1):
        raise ValueError("count must be a positive integer (omit it for 'until cleared')")
    probability = data.get("probability", 1.0)
    if not isinstance(probability, int | float) or not 0.0 <= probability <= 1.0:
        raise ValueError("probability must be a number between 0 and 1")
    delay_ms = data.get("delay_ms", 0)
    if not isinstance(delay_ms, int | float) or delay_ms < 0:
        raise ValueError("delay_ms must be a non-negative number")
    retry_after = data.get("retry_after")
    if retry_after is not None and (not isinstance(retry_after, int | float) or retry_after < 0):
        raise ValueError("retry_after must be a non-negative number of seconds")
    mode = data.get("mode", "respond")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}")
    if mode == "respond" and status is None and not delay_ms:
        raise ValueError("a fault needs a status, a delay_ms, or mode 'drop'")
    return FaultRule(
        id=rule_id,
        endpoint=endpoint,
        status=status,
        body=data.get("body"),
        has_body="body" in data,
        count=count,
        probability=float(probability),
        delay_ms=float(delay_ms),
        retry_after=None if retry_after is None else float(retry_after),
        mode=mode,
    )


class FaultTable:
    """The active rules, first match wins; thread-safe."""

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.fired = 0

    def add(self, data: object) -> FaultRule:
        """Parse and add a rule; ValueError on bad input."""
        rule = parse_rule(data, f"fault-{next(self._ids)}")
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> int:
        """Remove every rule; returns how many there were."""
        with self._lock:
            n = len(self._rules)
            self._rules.clear()
        return n

    def rules(self) -> list[FaultRule]:
        """A snapshot of the active rules."""
        with self._lock:
            return list(self._rules)

    def take(self, endpoint: str) -> FaultRule | None:
        """The rule that fires for this request, consuming one of its count; None if none."""
        if not self._rules:  # the hot path: no lock when there are no faults
            return None
        with self._lock:
            for rule in self._rules:
                if rule.endpoint not in (endpoint, "any"):
                    continue
                if rule.probability < 1.0 and random.random() >= rule.probability:
                    continue
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count <= 0:
                        self._rules.remove(rule)
                self.fired += 1
                return rule
        return None
