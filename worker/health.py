"""Health of a worker node: `celery -A worker inspect snowpipe_health` and `snowpipe-worker health`.

A node is healthy when:

- its TokenGuards have not escalated (`TokenGuard.healthy`: fewer than
  SNOWPIPE_REFRESH_ESCALATE_AFTER refreshes in a row failed);
- the broker answers (the reply itself travels through it) and the state Redis answers PING;
- every channel lease it holds is still its own in the state Redis (renewed in time), and its
  node heartbeat has not expired;
- the start-up checks (worker/doctor.py) found nothing that stops every delivery (the key,
  the key-pair JWT, the token exchange).

The inspect command runs in the node's main process, where the pumps and their guard live, and
answers `{"ok": bool, "checks": {name: {"ok": bool, "detail": str}}}`. `snowpipe-worker health`
broadcasts it (to one node with --node) and exits 0 only if every answering node is healthy.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from celery.worker.control import inspect_command

HEALTH_COMMAND = "snowpipe_health"


def _check(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": ok, "detail": detail}


def _pump_node(controller: Any) -> Any:
    from worker.bootsteps import PumpStep

    blueprint = getattr(controller, "blueprint", None)
    for step in getattr(blueprint, "order", None) or []:
        if isinstance(step, PumpStep):
            return step.node
    return None


def node_health(controller: Any) -> dict[str, Any]:
    """The health answer of this node (see the module docstring)."""
    from worker import doctor, runtime
    from worker.delivery.channels import NODES_KEY
    from worker.statestore import state_redis

    checks: dict[str, dict[str, Any]] = {}
    node = _pump_node(controller)
    checks["broker"] = _check(True, "answered this request")
    if node is None:
        settings = runtime.settings()
        client = state_redis(settings)
        checks["pumps"] = _check(True, "not running on this node (SNOWPIPE_PUMP_ENABLED=false)")
    else:
        client = node.redis
        guards = [node.client.tokens.jwt, node.client.tokens.scoped]
        escalated = [g.name for g in guards if not g.healthy]
        checks["token guard"] = _check(
            not escalated,
            f"escalated: {', '.join(escalated)} refresh failed "
            f"{max(g.consecutive_failures for g in guards)} times in a row"
            if escalated
            else "not escalated",
        )
    try:
        client.ping()
        checks["state store"] = _check(True, "answers PING")
    except redis.RedisError as exc:
        checks["state store"] = _check(False, f"{type(exc).__name__}: {exc}")
    finally:
        if node is None:
            client.close()  # our own client (a Sentinel client holds connections to each)
    if node is not None and checks["state store"]["ok"]:
        try:
            held = node.held()
            lost = [str(lease.ref) for lease in held if not node.leases.holds(lease)]
            score = client.zscore(NODES_KEY, node.name)
            now_ms = time.time() * 1000
            beat_ok = score is not None and float(score) > now_ms
            ok = not lost and (beat_ok or not held)
            detail = f"{len(held)} held, renewed in time"
            if lost:
                detail = f"not renewed in time: {', '.join(lost)}"
            elif not ok:
                detail = "the node's heartbeat expired"
            checks["leases"] = _check(ok, detail)
        except redis.RedisError as exc:
            checks["leases"] = _check(False, f"cannot read leases: {exc}")
    failed = list(doctor.startup_failures)
    fatal = [c for c in failed if c.name in doctor.FATAL_CHECKS]
    checks["startup checks"] = _check(
        not fatal,
        "; ".join(f"{c.name}: {c.detail}" for c in failed) if failed else "passed (or not run)",
    )
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks}


@inspect_command(name=HEALTH_COMMAND)  # type: ignore[untyped-decorator]
def snowpipe_health(state: Any, **_: Any) -> dict[str, Any]:
    """Snowpipe node health: token guard, state store, leases, start-up checks."""
    return node_health(state.consumer.controller)


def ask_nodes(
    app: Any, *, node: str | None = None, timeout: float = 5.0
) -> dict[str, dict[str, Any]]:
    """The health answers of the running nodes (or of `node`), by node name."""
    replies = app.control.broadcast(
        HEALTH_COMMAND,
        reply=True,
        timeout=timeout,
        destination=[node] if node else None,
        limit=1 if node else None,
    )
    answers: dict[str, dict[str, Any]] = {}
    for reply in replies or []:
        for name, answer in reply.items():
            if isinstance(answer, dict) and "ok" in answer:
                answers[name] = answer
            else:
                answers[name] = {"ok": False, "checks": {"reply": _check(False, repr(answer))}}
    return answers
