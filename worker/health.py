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


def pump_node(controller: Any) -> Any:
    """The node's pump side (worker/delivery/node.py) from the worker's bootsteps; None when
    its pumps are off or not started yet."""
    from worker.bootsteps import PumpStep

    blueprint = getattr(controller, "blueprint", None)
    for step in getattr(blueprint, "order", None) or []:
        if isinstance(step, PumpStep):
            return step.node
    return None


def node_checks(node: Any, client: redis.Redis) -> dict[str, dict[str, Any]]:
    """The checks of a node that need no broker: token guard, state store, leases, start-up.

    `node` is the node's pump side (worker/delivery/node.py), None when its pumps are off;
    `client` a client of the state store.
    """
    from worker import doctor
    from worker.delivery.channels import NODES_KEY

    checks: dict[str, dict[str, Any]] = {}
    if node is None:
        checks["pumps"] = _check(True, "not running on this node (SNOWPIPE_PUMP_ENABLED=false)")
    else:
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
    return checks


def node_health(controller: Any) -> dict[str, Any]:
    """The health answer of this node (see the module docstring)."""
    from worker import runtime
    from worker.statestore import state_redis

    node = pump_node(controller)
    if node is not None:
        checks = node_checks(node, node.redis)
    else:
        settings = runtime.settings()
        client = state_redis(settings)
        try:
            checks = node_checks(None, client)
        finally:
            client.close()
    checks = {"broker": _check(True, "answered this request"), **checks}
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks}


@inspect_command(name=HEALTH_COMMAND)  # type: ignore[untyped-decorator]
def snowpipe_health(state: Any, **_: Any) -> dict[str, Any]:
    """Snowpipe node health: token guard, state store, leases, start-up checks."""
    return node_health(state.consumer.controller)


def ask_nodes(
    app: Any, *, nodes: list[str] | None = None, timeout: float = 5.0
) -> dict[str, dict[str, Any]]:
    """The health answers of `nodes` (default: every node on this deployment's control
    exchange), by node name. With `nodes` it returns as soon as each has answered; without, once
    no answer came for `timeout` seconds."""
    replies = app.control.broadcast(
        HEALTH_COMMAND,
        reply=True,
        timeout=timeout,
        destination=list(nodes) if nodes else None,
        limit=len(nodes) if nodes else None,
    )
    answers: dict[str, dict[str, Any]] = {}
    for reply in replies or []:
        for name, answer in reply.items():
            if isinstance(answer, dict) and "ok" in answer:
                answers[name] = answer
            else:
                answers[name] = {"ok": False, "checks": {"reply": _check(False, repr(answer))}}
    return answers


def check_deployment(settings: Any, *, node: str | None, timeout: float) -> dict[str, Any]:
    """`snowpipe-worker health` without a heartbeat file: the broker, the state store, then the
    health of this deployment's nodes (the ones registered in its state store, or `node`).

    `{"ok": bool, "problems": [line, ...], "nodes": {name: answer}, "missing": [name, ...]}`.
    """
    from celery import Celery

    from worker.celery_config import build_config
    from worker.connectivity import UnreachableError, check_broker, state_client
    from worker.registry import WorkerRegistry

    problems: list[str] = []
    registered: list[str] = []
    try:
        check_broker(settings)
    except UnreachableError as exc:
        problems.append(str(exc))
    try:
        client = state_client(settings)
    except UnreachableError as exc:
        problems.append(str(exc))
    else:
        try:
            registered = WorkerRegistry(client, period_seconds=settings.heartbeat_seconds).live()
        finally:
            client.close()
    answers: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    if not problems:
        wanted = [node] if node else registered
        app = Celery("snowpipe-health", set_as_current=False)
        app.conf.update(build_config(settings))
        try:
            answers = ask_nodes(app, nodes=wanted, timeout=timeout)
        finally:
            app.close()
        missing = [name for name in wanted if name not in answers]
        for name in missing:
            unknown = ""
            if name not in registered:
                unknown = " (no live node of that name is registered in the state store"
                unknown += f"; registered: {', '.join(registered)})" if registered else ")"
            problems.append(
                f"node {name} did not answer within {timeout:g} s{unknown}: is it running with "
                "this SNOWPIPE_BROKER_URL and SNOWPIPE_QUEUE_NAME, and remote control on?"
            )
        if not wanted and not answers:
            problems.append(
                f"no worker node of this deployment (queue {settings.queue_name}) answered "
                f"within {timeout:g} s, and none is registered in the state store: start "
                "`celery -A worker worker` with the same SNOWPIPE_BROKER_URL and "
                "SNOWPIPE_QUEUE_NAME"
            )
    ok = not problems and all(a["ok"] for a in answers.values())
    return {"ok": ok, "problems": problems, "nodes": answers, "missing": missing}
