"""What comes off the queues, checked before Celery reads it: no message can stop a node.

Celery's consumer turns each message into a `Request` in the worker's main process. A message it
cannot read either raises there (a body that is not `[args, kwargs, embed]`, a bad `timelimit`
header: the node exits with "Unrecoverable error", and the message, still in the queue, stops
the next node too) or is acknowledged and dropped with a log line (a body that is not JSON, an
unknown content type, an unknown task). So the worker's consumer (`worker.celery_app.Consumer`)
puts `guard` in front of Celery's own message handler: every message delivered from the task
queues is checked by `check` first, and anything the worker cannot turn into a valid call of one
of its tasks is diverted:

- not Celery's message shape: no `task` or `id` header, a header Celery reads with the wrong
  type, a body that is not `[[], {kwargs}, {embed}]`, callbacks or chains (the worker runs none);
- not JSON: a content type other than `application/json`, a body that does not decode;
- wrong or missing keyword arguments, wrong types, bad names (`IngestMessage.from_kwargs`);
- an unknown task name;
- on a Redis broker, a list item that is not a kombu envelope at all (worker/broker.py hands it
  over as a message with the `x-snowpipe-unreadable` header and the item as its body).

A diverted message becomes a request of the internal task `snowpipe.dead_letter_message`
(worker/tasks.py), with the reason and the raw body as its arguments, and goes through Celery's
own strategy to the pool like any task (threads or prefork): the dead letter (kind `malformed`) is
written there, and the message is acknowledged after that, by the same acks-late path as a
batch. While the state store is out the task holds the message and then rejects it back to the
queue (`Reject(requeue=True)`), as ingest_batch does for an outage: nothing is acknowledged
without being logged or dead-lettered. Celery's own fallbacks (`on_decode_error`,
`on_unknown_message`, `on_unknown_task`, `on_invalid_task`) divert too, for whatever reaches them.

Why this hook: it is the one place every task message passes before Celery parses it (a task
`Strategy` runs only once the `task` header was looked up, after the parts that crash; the
fallbacks see only what Celery already recognised as bad). If Celery's handler still raises for a
message whose request was never created, the message is diverted too; an error after the request
was handed over (a broken pool) is not the message's fault and is left to Celery.
"""

from __future__ import annotations

import base64
import contextlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kombu.utils import json as kombu_json
from vine import promise

from worker.celery_config import INGEST_TASK, MALFORMED_TASK, REFRESH_TASK
from worker.errors import InvalidBatchError
from worker.messages import IngestMessage
from worker.observability import get_logger

__all__ = [
    "JSON_CONTENT_TYPE",
    "RAW_MAX_BYTES",
    "SERVED_TASKS",
    "UNREADABLE_CONTENT_TYPE",
    "UNREADABLE_HEADER",
    "Problem",
    "check",
    "divert",
    "guard",
    "malformed_kwargs",
    "raw_text",
]

_log = get_logger("worker.intake")

JSON_CONTENT_TYPE = "application/json"
# The tasks a message on the worker's queues may name (the internal dead-letter task is never
# published: it only runs what `divert` hands to the pool).
SERVED_TASKS = frozenset({INGEST_TASK, REFRESH_TASK})
# worker/broker.py: a Redis list item that is not a kombu envelope is delivered with this header
# (why: "not-json" or "not-envelope"), this content type and the item, hex-encoded, as its body.
UNREADABLE_HEADER = "x-snowpipe-unreadable"
UNREADABLE_CONTENT_TYPE = "application/x-snowpipe-unreadable"
_UNREADABLE_REASONS = {
    "not-json": "the Redis list item is not JSON, so not a kombu message envelope",
    "not-envelope": "the Redis list item is JSON but not a kombu message envelope (an object "
    "with body, content-type, headers and properties with a delivery_tag)",
}
# A dead letter keeps at most this much of a malformed body (the rest is counted, not stored).
RAW_MAX_BYTES = 16 * 1024 * 1024
# Headers Celery reads from a message, with the types it can read them as (None always allowed).
_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "shadow": (str,),
    "root_id": (str,),
    "parent_id": (str,),
    "group": (str,),
    "group_index": (int,),
    "argsrepr": (str,),
    "kwargsrepr": (str,),
    "origin": (str,),
    "lang": (str,),
    "retries": (int,),
    "ignore_result": (bool,),
    "replaced_task_nesting": (int,),
    "stamped_headers": (list, tuple),
    "stamps": (dict,),
}
_FORMAT = "docs/message-format.md"
_SHAPE = '[[], {"batch_id": ..., "database": ..., "schema": ..., "pipe": ..., "rows": [...]}, {}]'


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a message cannot be run, and what of it the dead letter keeps."""

    reason: str
    raw: bytes
    fields: dict[str, str] = field(default_factory=dict)  # batch_id, database, ... if readable


def _kind(value: object) -> str:
    if isinstance(value, Mapping):
        return "a JSON object"
    if isinstance(value, list | tuple):
        return f"an array of {len(value)}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bytes):
        return "bytes"
    return "null" if value is None else type(value).__name__


def raw_body(message: Any) -> bytes:
    """The message's body as received (the Redis item itself for an unreadable one)."""
    body = getattr(message, "body", b"")
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogateescape")
    if not isinstance(body, bytes | bytearray | memoryview):
        return repr(body).encode()
    data = bytes(body)
    headers = _headers(message)
    if isinstance(headers, Mapping) and UNREADABLE_HEADER in headers:
        try:
            return bytes.fromhex(data.decode("ascii"))
        except ValueError:
            return data
    return data


def _headers(message: Any) -> Any:
    return getattr(message, "headers", None)


def _readable_fields(kwargs: object) -> dict[str, str]:
    if not isinstance(kwargs, Mapping):
        return {}
    return {
        name: kwargs[name]
        for name in ("batch_id", "database", "schema", "pipe")
        if isinstance(kwargs.get(name), str)
    }


def _check_headers(headers: Mapping[str, Any]) -> str | None:
    from celery.utils.time import maybe_iso8601

    task = headers.get("task")
    for name, types in _HEADER_TYPES.items():
        value = headers.get(name)
        if value is not None and not isinstance(value, types):
            return (
                f"the {name!r} header is {_kind(value)}, which Celery cannot read: leave it out "
                f"or send it as {types[0].__name__} ({_FORMAT})"
            )
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(v is None or isinstance(v, int | float) for v in limits)
    ):
        return (
            f"the 'timelimit' header is {limits!r}: send [soft, hard] seconds (or null each), "
            f"or leave it out ({_FORMAT})"
        )
    for name in ("eta", "expires"):
        value = headers.get(name)
        try:
            maybe_iso8601(value)
        except (AttributeError, ValueError, TypeError, OverflowError):
            return f"the {name!r} header {value!r} is not an ISO 8601 time: leave it out"
    if task == INGEST_TASK and headers.get("expires") is not None:
        return (
            "the 'expires' header would let Celery drop the batch unsent: a batch never "
            "expires, leave the header out"
        )
    return None


def _check_body(task: str, payload: object) -> tuple[str | None, dict[str, str]]:
    """(why the decoded body cannot be run, the readable fields)."""
    if not isinstance(payload, list | tuple) or len(payload) != 3:
        return (
            f"the body is {_kind(payload)}, not Celery's [args, kwargs, embed] array (message "
            f"protocol 2): send {_SHAPE} ({_FORMAT})",
            _readable_fields(payload),
        )
    args, kwargs, embed = payload
    linked = [
        k for k in ("callbacks", "errbacks", "chain", "chord")
        if isinstance(embed, Mapping) and embed.get(k)
    ]  # fmt: skip
    reason: str | None = None
    if not isinstance(args, list | tuple) or args:
        reason = (
            f"positional arguments ({_kind(args)}) are not accepted: send every argument by "
            f"name in the kwargs object, args empty ({_FORMAT})"
        )
    elif embed is not None and not isinstance(embed, Mapping):
        reason = f"the embed part is {_kind(embed)}, not an object: send {{}} ({_FORMAT})"
    elif linked:
        reason = (
            f"the message links other tasks ({', '.join(linked)}): the worker runs no "
            "callbacks or chains; send {} as the embed part"
        )
    elif task == INGEST_TASK:
        try:
            IngestMessage.from_kwargs(kwargs)
        except InvalidBatchError as exc:
            reason = str(exc)
    elif not isinstance(kwargs, Mapping):
        reason = f"the kwargs part is {_kind(kwargs)}, not an object"
    elif kwargs:
        reason = f"{task} takes no arguments, got {', '.join(map(str, kwargs))}"
    return reason, _readable_fields(kwargs)


def _envelope_problem(message: Any, tasks: frozenset[str]) -> str | None:
    """Why the headers or the content type of `message` are not a call of one of `tasks`."""
    headers = _headers(message)
    if not isinstance(headers, Mapping):
        return f"the message headers are {_kind(headers)}, not a table"
    unreadable = headers.get(UNREADABLE_HEADER)
    task = headers.get("task")
    task_id = headers.get("id")
    content_type = getattr(message, "content_type", None)
    if unreadable is not None:
        why = _UNREADABLE_REASONS.get(str(unreadable), str(unreadable))
        return f"{why}: a Redis producer pushes the envelope shown in {_FORMAT}"
    if task is None:
        return (
            f"not a Celery task message: no 'task' header (send message protocol 2 with the "
            f"header task={INGEST_TASK}, {_FORMAT})"
        )
    if not isinstance(task, str) or task not in tasks:
        return (
            f"unknown task {task!r}: the worker's queues take {' and '.join(sorted(tasks))} "
            "only; route other tasks to a queue of their own"
        )
    if not isinstance(task_id, str) or not task_id:
        return (
            f"the 'id' header is {_kind(task_id)}: send a unique id per message (the batch id "
            f"will do, {_FORMAT})"
        )
    problem = _check_headers(headers)
    if problem is None and content_type != JSON_CONTENT_TYPE:
        problem = (
            f"content type {content_type!r} is not {JSON_CONTENT_TYPE}: send the body as JSON "
            f"with that content type ({_FORMAT})"
        )
    return problem


def check(message: Any, tasks: frozenset[str] = SERVED_TASKS) -> Problem | None:
    """None if `message` is a call of one of `tasks` the worker can run; else the Problem (see
    the module docstring). Decodes the body (kombu caches it: Celery does not decode it again)."""
    reason = _envelope_problem(message, tasks)
    if reason is not None:
        return Problem(reason, raw_body(message))
    payload: Any = None
    try:
        payload = message.decode()
    except Exception as exc:  # noqa: BLE001 (whatever the decoder raises, the body is not JSON)
        cause = exc.__cause__ or exc
        reason = (
            f"the body is not JSON ({type(cause).__name__}: {cause}): send {_SHAPE} as UTF-8 "
            f"JSON ({_FORMAT})"
        )
        return Problem(reason, raw_body(message))
    reason, fields = _check_body(str(message.headers["task"]), payload)
    return None if reason is None else Problem(reason, raw_body(message), fields)


def raw_text(raw: bytes) -> tuple[str, dict[str, Any]]:
    """The body as the dead letter keeps it, and what to note in its detail: text if it is
    UTF-8, else base64; at most RAW_MAX_BYTES of it."""
    note: dict[str, Any] = {"raw_bytes": len(raw)}
    if len(raw) > RAW_MAX_BYTES:
        raw = raw[:RAW_MAX_BYTES]
        note["raw_truncated"] = True
    try:
        return raw.decode("utf-8"), {**note, "raw_encoding": "text"}
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), {**note, "raw_encoding": "base64"}


def _plain(value: Any, depth: int = 0) -> Any:
    """`value` as plain JSON (headers may hold anything a broker can carry)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value[:1000]
    if depth < 4 and isinstance(value, Mapping):
        return {str(k)[:200]: _plain(v, depth + 1) for k, v in list(value.items())[:100]}
    if depth < 4 and isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value[:100]]
    return repr(value)[:1000]


def malformed_kwargs(message: Any, problem: Problem) -> dict[str, Any]:
    """The keyword arguments of `snowpipe.dead_letter_message` for `message`."""
    headers = _headers(message)
    headers = headers if isinstance(headers, Mapping) else {}
    info = getattr(message, "delivery_info", None) or {}
    raw, note = raw_text(problem.raw)
    detail: dict[str, Any] = {
        "task": _plain(headers.get("task")),
        "message_id": _plain(headers.get("id")),
        "content_type": _plain(getattr(message, "content_type", None)),
        "content_encoding": _plain(getattr(message, "content_encoding", None)),
        "exchange": _plain(info.get("exchange")),
        "routing_key": _plain(info.get("routing_key")),
        "headers": _plain({k: v for k, v in headers.items() if k != UNREADABLE_HEADER}),
        **note,
    }
    task_id = headers.get("id")
    return {
        "letter_id": uuid.uuid4().hex,
        "reason": problem.reason,
        "raw": raw,
        "batch_id": problem.fields.get("batch_id", ""),
        "database": problem.fields.get("database", ""),
        "schema": problem.fields.get("schema", ""),
        "pipe": problem.fields.get("pipe", ""),
        "task_id": task_id if isinstance(task_id, str) else None,
        "detail": detail,
    }


class _Diverted:
    """A malformed message as Celery's strategy reads it: a protocol-2 call of
    MALFORMED_TASK. Acknowledging or rejecting the request acts on the original message."""

    content_type = JSON_CONTENT_TYPE
    content_encoding = "utf-8"

    def __init__(self, original: Any, kwargs: dict[str, Any]) -> None:
        request_id = f"malformed-{kwargs['letter_id']}"
        self.headers = {
            "lang": "py",
            "task": MALFORMED_TASK,
            "id": request_id,
            "root_id": request_id,
            "parent_id": None,
            "group": None,
            "shadow": None,
            "eta": None,
            "expires": None,
            "retries": 0,
            "timelimit": [None, None],
            "argsrepr": "()",
            "kwargsrepr": repr({"reason": kwargs["reason"]}),
            "ignore_result": True,
        }
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        self.payload: tuple[list[Any], dict[str, Any], dict[str, Any]] = ([], kwargs, embed)
        self.body = kombu_json.dumps(list(self.payload)).encode()  # type: ignore[no-untyped-call]
        self.delivery_info = getattr(original, "delivery_info", None) or {}
        self.properties = getattr(original, "properties", None) or {}
        self.delivery_tag = getattr(original, "delivery_tag", None)

    def decode(self) -> Any:
        return self.payload


def divert(consumer: Any, message: Any, problem: Problem) -> None:
    """Hand `message` to the pool as a `snowpipe.dead_letter_message` request (see the module
    docstring): it is dead-lettered there, then acknowledged."""
    kwargs = malformed_kwargs(message, problem)
    detail = kwargs["detail"]
    _log.warning(
        "ingest.malformed",
        reason=problem.reason,
        task=detail["task"],
        routing_key=detail["routing_key"],
        raw_bytes=detail["raw_bytes"],
        letter_id=kwargs["letter_id"],
        note="the message becomes a dead letter of kind malformed (dead-letters list)",
    )
    ack = promise(consumer.call_soon_ack, (message.ack_log_error,))
    reject = promise(consumer.call_soon_ack, (message.reject_log_error,))
    strategy = consumer.strategies[MALFORMED_TASK]
    strategy(_Diverted(message, kwargs), None, ack, reject, consumer.on_task_message)


def _handed_over(message: Any) -> bool:
    """Whether Celery already made a request of `message` (registered under its id)."""
    from celery.worker import state

    headers = _headers(message)
    task_id = headers.get("id") if isinstance(headers, Mapping) else None
    if not isinstance(task_id, str):
        return False
    request = state.requests.get(task_id)
    return request is not None and getattr(request, "message", None) is message


def guard(consumer: Any, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Celery's task message handler `handler`, with every message checked first."""
    connection_errors = tuple(consumer.connection_errors)

    def on_task_received(message: Any) -> Any:
        try:
            problem = check(message)
        except Exception as exc:  # noqa: BLE001 (a message the check cannot read is malformed)
            problem = Problem(
                f"the worker could not read the message ({type(exc).__name__}: {exc})",
                raw_body(message),
            )
        if problem is None:
            try:
                return handler(message)
            except connection_errors:
                raise
            except Exception as exc:
                if _handed_over(message):
                    raise  # not the message's fault: Celery's own handling of an error
                problem = Problem(
                    f"Celery could not read the message ({type(exc).__name__}: {exc})",
                    raw_body(message),
                )
        divert(consumer, message, problem)
        return None

    return on_task_received


def on_decode_error(consumer: Any, message: Any, exc: BaseException) -> bool:
    """Divert a task message kombu could not decode; False for a message that is not one (a
    remote-control message: Celery's own handling applies)."""
    info = getattr(message, "delivery_info", None)
    if not isinstance(info, Mapping) or not hasattr(message, "ack_log_error"):
        return False
    if str(info.get("exchange") or "").endswith("pidbox"):
        return False
    cause = exc.__cause__ or exc
    divert(
        consumer,
        message,
        Problem(
            f"the body cannot be decoded ({type(cause).__name__}: {cause}): send UTF-8 JSON "
            f"with content type {JSON_CONTENT_TYPE} ({_FORMAT})",
            raw_body(message),
        ),
    )
    return True


def on_rejected_by_celery(consumer: Any, message: Any, why: str) -> None:
    """Celery's own fallbacks (unknown message, unknown task, invalid task): divert with the
    check's reason when it finds one, else with Celery's."""
    problem = None
    with contextlib.suppress(Exception):  # the check failing too: Celery's reason stands
        problem = check(message)
    if problem is None:
        problem = Problem(f"Celery refused the message: {why}", raw_body(message))
    divert(consumer, message, problem)
