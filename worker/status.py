"""`snowpipe-worker status`: one look at a deployment, read from the state store, the broker and
Snowflake.

What it gathers (`collect_status`), each part from where it lives:

- **channels** (the state store): every channel that ever had a log entry
  (`snowpipe:channels`); its owner (the node holding `snowpipe:lease:{chan}`), the last offset
  the log issued (`next:{chan}`), the log's depth (entries, NDJSON bytes) and the age of its
  oldest entry (`log:{chan}`). From **Snowflake** (one bulk channel status request per pipe,
  through `SnowpipeClient`): the committed offset, rows inserted and in error, the channel's
  status code and its last error. Without a Snowflake identity in the settings (a producer's
  environment) or with `--no-snowflake`, those columns are empty and `snowflake` says why;
  a failed request is reported per pipe, never raised.
- **invalid channel keys**: members of `snowpipe:channels` that are not
  `database|schema|pipe|channel` (written before names were checked); the pumps skip them.
- **state replication** (the state store, through Sentinel for a `sentinel://` URL): the
  primary, each replica with its state, bytes behind the primary and seconds since its last
  acknowledgement (`INFO replication`), Sentinel's flags for it (`SENTINEL REPLICAS`), how many
  are online, and a `problem` line when fewer are online than `SNOWPIPE_STATE_MIN_REPLICAS` or
  the URL reaches a replica.
- **nodes**: the live worker nodes (`snowpipe:nodes`) and when their heartbeat expires.
- **token**: the shared scoped token (`worker/tokenstore.py`): its age, when it expires, when
  beat will refresh it (its advisory window) and when a worker's guard would at the latest (its
  soft window); refreshes counted by reason. The value is never read out.
- **queues**: the ingest queue and its control queue. Redis broker: the list length (every
  priority's list) plus the `unacked` hash entries routed to that queue (delivered to a worker
  and not yet acknowledged: held by a running task, or by a dead one until the visibility sweep
  restores them). RabbitMQ: a passive declare gives the ready messages and the consumers; AMQP
  0-9-1 has no count of unacknowledged messages (only the management API or `rabbitmqctl` has
  it), so `unacked` is what the worker nodes report through Celery's remote control (tasks
  active and reserved from that queue); nodes that do not answer within the timeout are missing
  from it, and it says so.
- **dead letters**: the state store's list by kind (`failed`, `row_errors`, `malformed`, counted
  in the state store by one script, without reading the rows out) and the broker's dead-letter
  queue (`<queue>.dead`, RabbitMQ only).

No part prints a token, a key or a password (URLs are shown with the password masked).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any

import redis

from worker.settings import Settings

# Status's own Snowflake calls: bounded, one attempt (it reports; it does not ride anything out).
STATUS_OVERRIDES: dict[str, Any] = {
    "retry_attempts": 1,
    "retry_deadline_seconds": 10.0,
    "http_timeout_seconds": 10.0,
    "http_connect_timeout_seconds": 5.0,
    "refresh_wait_timeout_seconds": 10.0,
}
# kombu's Redis transport: priority lists are `<queue><sep><priority>` (priority 0 is `<queue>`).
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
KOMBU_UNACKED_KEY = "unacked"

# KEYS: the unacked hash. ARGV: routing keys. Counts the entries routed to each (kombu stores
# `[message, exchange, routing_key]` under each delivery tag); done in the store so that the
# messages' bodies (rows) are not read out.
_COUNT_UNACKED = """
local wanted = {}
for i, key in ipairs(ARGV) do wanted[key] = i end
local counts = {}
for i = 1, #ARGV do counts[i] = 0 end
local cursor = '0'
repeat
  local page = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 200)
  cursor = page[1]
  local items = page[2]
  for j = 2, #items, 2 do
    local ok, entry = pcall(cjson.decode, items[j])
    if ok and type(entry) == 'table' then
      local i = wanted[tostring(entry[3])]
      if i then counts[i] = counts[i] + 1 end
    end
  end
until cursor == '0'
return counts
"""

# KEYS: the dead-letter list. Returns {kind, count, kind, count, ...}.
_COUNT_DEAD = """
local counts = {}
local function count(raw)
  local ok, letter = pcall(cjson.decode, raw)
  local kind = 'unreadable'
  if ok and type(letter) == 'table' and type(letter['kind']) == 'string' then
    kind = letter['kind']
  end
  counts[kind] = (counts[kind] or 0) + 1
end
for _, raw in ipairs(redis.call('HVALS', KEYS[1])) do count(raw) end
for _, raw in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do count(raw) end
local out = {}
for kind, n in pairs(counts) do
  out[#out + 1] = kind
  out[#out + 1] = n
end
return out
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _age(ms: int | None, now_ms: int) -> float | None:
    return None if ms is None else round(max(0.0, (now_ms - ms) / 1000), 1)


def _redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def channels(client: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    """Every channel with its owner, log depth and age (no Snowflake part yet)."""
    from worker.delivery.channels import channel_key
    from worker.delivery.lease import holder
    from worker.delivery.log import ChannelLog

    log = ChannelLog(client, dedup_ttl_seconds=settings.dedup_ttl_seconds)
    refs = log.channels()
    if not refs:
        return []
    depths = log.depths(refs)
    pipe = client.pipeline(transaction=False)
    for ref in refs:
        pipe.get(channel_key("lease", ref))
        pipe.get(channel_key("next", ref))
    raw = pipe.execute()
    now_ms = _redis_now_ms(client)
    rows: list[dict[str, Any]] = []
    for n, (ref, depth) in enumerate(zip(refs, depths, strict=True)):
        lease, issued = raw[2 * n], raw[2 * n + 1]
        rows.append(
            {
                "pipe": ".".join(ref.target),
                "target": list(ref.target),
                "channel": ref.channel,
                "owner": holder(_text(lease)) if lease is not None else None,
                "last_issued_offset": int(_text(issued)) if issued is not None else None,
                "log_entries": depth.entries,
                "log_bytes": depth.bytes,
                "oldest_age_seconds": _age(depth.oldest_ms, now_ms) if depth.entries else None,
                "committed_offset": None,
                "rows_inserted": None,
                "rows_errors": None,
                "status_code": None,
                "last_error": None,
            }
        )
    return rows


def add_snowflake(
    rows: list[dict[str, Any]], settings: Settings, client: redis.Redis
) -> dict[str, Any]:
    """Fill in each channel's Snowflake status (one bulk status per pipe); what happened."""
    if not rows:
        return {"queried": False, "detail": "no channels yet"}
    problems = settings.identity_problems()
    if problems:
        return {
            "queried": False,
            "detail": "no Snowflake identity in these settings (" + problems[0] + ")",
        }
    from worker.snowpipe.client import SnowpipeClient
    from worker.snowpipe.errors import SnowpipeError
    from worker.tokenstore import token_hooks

    # Adopt the workers' shared token if there is one; never publish one (not a worker's refresh).
    hooks = token_hooks(client, settings)
    quick = settings.model_copy(update=STATUS_OVERRIDES)
    try:
        sf = SnowpipeClient.from_settings(quick, adopt=hooks.adopt)
    except Exception as exc:  # noqa: BLE001 (reported, never raised)
        return {"queried": False, "detail": f"cannot build the Snowflake client: {exc}"}
    by_pipe: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_pipe[row["pipe"]].append(row)
    errors: dict[str, str] = {}
    try:
        for name, members in by_pipe.items():
            database, schema, pipe = members[0]["target"]
            try:
                found = sf.bulk_channel_status(
                    database, schema, pipe, [m["channel"] for m in members]
                )
            except Exception as exc:  # noqa: BLE001 (per pipe, reported)
                message = exc.message if isinstance(exc, SnowpipeError) else str(exc)
                errors[name] = f"{type(exc).__name__}: {message}".splitlines()[0]
                continue
            for member in members:
                status = found.get(member["channel"])
                if status is None:
                    member["status_code"] = "(no such channel)"
                    continue
                token = status.last_committed_offset_token
                member["committed_offset"] = int(token) if token and token.isdigit() else token
                member["rows_inserted"] = status.rows_inserted
                member["rows_errors"] = status.rows_error_count
                member["status_code"] = status.channel_status_code
                member["last_error"] = status.last_error_message
    finally:
        sf.close()
    return {"queried": True, "errors": errors}


def invalid_channel_keys(client: redis.Redis) -> list[str]:
    """Members of the channel set that are not channel keys (the pumps skip them): written
    before names were checked, e.g. a pipe name with `|`."""
    from worker.delivery.channels import CHANNELS_KEY, ChannelRef

    invalid: list[str] = []
    for member in client.smembers(CHANNELS_KEY):
        try:
            ChannelRef.from_key(_text(member))
        except ValueError:
            invalid.append(_text(member))
    return sorted(invalid)


def nodes(client: redis.Redis) -> list[dict[str, Any]]:
    """Live worker nodes and the seconds until their heartbeat expires."""
    from worker.delivery.channels import NODES_KEY

    now_ms = _redis_now_ms(client)
    live: Any = client.zrangebyscore(NODES_KEY, now_ms, "+inf", withscores=True)
    return [
        {"node": _text(name), "expires_in_seconds": round((float(score) - now_ms) / 1000, 1)}
        for name, score in live
    ]


def token(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """The shared token's age and refresh times (never its value)."""
    if not (settings.account and settings.user):
        detail = "no SNOWPIPE_ACCOUNT/SNOWPIPE_USER in these settings"
        return {"configured": False, "detail": detail}
    from worker.tokenstore import TokenStore, advisory_window, guard_margin, identity

    store = TokenStore(client, identity(settings))
    out: dict[str, Any] = {
        "configured": True,
        "identity": identity(settings),
        "refreshes": store.refresh_counts(),
    }
    shared = store.load()
    if shared is None:
        out.update(shared=False, detail="no shared token (none fetched yet, or it expired)")
        return out
    now = time.time()
    remaining = shared.remaining(now)
    margin = guard_margin(settings, shared.lifetime)
    advisory = advisory_window(settings, shared.lifetime)
    out.update(
        shared=True,
        lifetime_seconds=round(shared.lifetime, 1),
        age_seconds=round(max(0.0, shared.lifetime - remaining), 1),
        expires_in_seconds=round(remaining, 1),
        # Beat refreshes once the token is inside its advisory window (refresh_tokens).
        beat_refresh_in_seconds=round(max(0.0, remaining - advisory), 1),
        # A worker's guard refreshes on its own at the latest when its soft window opens.
        guard_refresh_in_seconds=round(max(0.0, remaining - margin), 1),
    )
    return out


def redis_queues(settings: Settings, names: list[str]) -> list[dict[str, Any]]:
    """Redis broker: messages waiting (every priority list) and unacknowledged, per queue."""
    from worker.statestore import redis_client

    client = redis_client(settings.broker_url, ca_file=settings.ca_file)
    try:
        pipe = client.pipeline(transaction=False)
        for name in names:
            for step in KOMBU_PRIORITY_STEPS:
                pipe.llen(name if step == 0 else f"{name}{KOMBU_PRIORITY_SEP}{step}")
        lengths = pipe.execute()
        unacked = client.eval(_COUNT_UNACKED, 1, KOMBU_UNACKED_KEY, *names)
    finally:
        client.close()
    steps = len(KOMBU_PRIORITY_STEPS)
    return [
        {
            "queue": name,
            "ready": sum(int(v) for v in lengths[n * steps : (n + 1) * steps]),
            "unacked": int(unacked[n]),
            "unacked_source": "broker",
            "consumers": None,
        }
        for n, name in enumerate(names)
    ]


def rabbit_queues(settings: Settings, names: list[str], *, timeout: float) -> list[dict[str, Any]]:
    """RabbitMQ: ready messages and consumers (passive declare); unacked as the nodes report."""
    from worker.connectivity import broker_connection

    out: list[dict[str, Any]] = []
    with broker_connection(settings, timeout=5) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
        for name in names:
            channel: Any = conn.channel()
            try:
                declared: Any = channel.queue_declare(queue=name, passive=True)
                out.append({"queue": name, "ready": int(declared.message_count),
                            "consumers": int(declared.consumer_count)})  # fmt: skip
            except conn.channel_errors:  # 404: the queue does not exist
                out.append({"queue": name, "ready": None, "consumers": None,
                            "detail": "not declared yet (no worker started on it)"})  # fmt: skip
            finally:
                with contextlib.suppress(Exception):  # a channel the broker closed (404)
                    channel.close()
    unacked, answered = _unacked_by_nodes(settings, names, timeout=timeout)
    for entry in out:
        entry["unacked"] = unacked.get(entry["queue"], 0) if answered is not None else None
        entry["unacked_source"] = (
            f"{answered} worker node(s) (Celery remote control)" if answered is not None
            else "no worker node answered"
        )  # fmt: skip
    return out


def _unacked_by_nodes(
    settings: Settings, names: list[str], *, timeout: float
) -> tuple[dict[str, int], int | None]:
    """Tasks active or reserved by the worker nodes, per queue (acks_late: unacknowledged)."""
    from celery import Celery

    from worker.celery_config import build_config

    app = Celery("snowpipe-status", set_as_current=False)
    app.conf.update(build_config(settings))
    counts: dict[str, int] = dict.fromkeys(names, 0)
    nodes_seen: set[str] = set()
    try:
        inspect = app.control.inspect(timeout=timeout)
        for reply in (inspect.active() or {}, inspect.reserved() or {}):
            for node, tasks in reply.items():
                nodes_seen.add(node)
                for task in tasks or []:
                    info = task.get("delivery_info") or {}
                    key = str(info.get("routing_key") or "")
                    if key in counts:
                        counts[key] += 1
    finally:
        app.close()
    return counts, (len(nodes_seen) if nodes_seen else None)


def dead_letters(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """The state store's dead letters by kind, and the broker's dead-letter queue."""
    from worker.brokerletters import BrokerDeadLetters
    from worker.deadletter import LEGACY_KEY, LETTERS_KEY

    raw = client.eval(_COUNT_DEAD, 2, LETTERS_KEY, LEGACY_KEY)
    by_kind = {_text(raw[i]): int(raw[i + 1]) for i in range(0, len(raw), 2)}
    broker = BrokerDeadLetters(settings)
    out: dict[str, Any] = {"state_store": dict(sorted(by_kind.items()))}
    if broker.enabled:
        out["broker_queue"] = {"queue": broker.name, "messages": broker.count()}
    else:
        out["broker_queue"] = None
    return out


def state_replication(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """The state store's primary, replicas and their lag (`worker.statestore.replication`); on
    a refused INFO or SENTINEL command, the error instead."""
    from worker.statestore import replication

    try:
        return replication(client, settings)
    except redis.RedisError as exc:
        lines = str(exc).strip().splitlines()
        return {"error": f"{type(exc).__name__}: {lines[0] if lines else ''}"}


def collect_status(
    settings: Settings, *, snowflake: bool = True, timeout: float = 1.0
) -> dict[str, Any]:
    """Everything `snowpipe-worker status` shows, as one JSON-able document."""
    from worker.celery_config import control_queue_name
    from worker.connectivity import check_broker, redact_url, state_client

    client = state_client(settings)  # StateStoreUnavailableError: the CLI's one line
    check_broker(settings)  # BrokerUnavailableError, likewise
    try:
        rows = channels(client, settings)
        sf = (
            add_snowflake(rows, settings, client)
            if snowflake
            else {"queried": False, "detail": "--no-snowflake"}
        )
        names = [settings.queue_name, control_queue_name(settings)]
        queues = (
            redis_queues(settings, names)
            if settings.broker_is_redis
            else rabbit_queues(settings, names, timeout=timeout)
        )
        return {
            "broker": redact_url(settings.broker_url),
            "state_store": redact_url(settings.state_url),
            "state_replication": state_replication(client, settings),
            "channels": rows,
            "invalid_channel_keys": invalid_channel_keys(client),
            "snowflake": sf,
            "nodes": nodes(client),
            "token": token(client, settings),
            "queues": queues,
            "dead_letters": dead_letters(client, settings),
        }
    finally:
        client.close()
