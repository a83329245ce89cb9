"""Dead letters: what can never succeed as sent, kept in the state Redis with its reason.

A batch is dead-lettered (never silently dropped) when Snowflake refuses it for good (unknown pipe,
bad request, credentials a refresh did not fix, rows that cannot be encoded). Each letter keeps
the rows, so `snowpipe-worker dead-letters requeue` can send it again after the cause is fixed.

Letters live in a hash `snowpipe:letters` (letter id -> JSON) ordered by `snowpipe:letters:order`
(a sorted set, letter id -> ms). A batch dead-lettered from a channel log is ONE letter holding
every piece of it that was still in the log (pieces already committed are named in
`detail["committed_pieces"]`, not included), and its dedup record is marked with the letter id:
a late copy of the original message is then not logged again, while the letter's requeue (the
batch under its own id, `requeue_of=<letter id>`) is, once. Kinds:

- "failed": never committed; requeued as its own batch id.
- "row_errors": committed except the rows Snowflake rejected. Found in the table's error table
  (worker/rejections.py), the letter holds exactly the rejected rows, and is requeued once the
  operator says the table was fixed (`requeue --table-fixed`), under its letter id as batch id;
  attributed coarsely (from the channel status), it holds whole batches and is never requeued
  (that would duplicate the good rows).
- "malformed": a message on the queue that was not a valid batch (worker/intake.py): `raw` keeps
  its body as received (text, or base64 when `detail["raw_encoding"]` is "base64"), `rows` is
  empty, and it is never requeued (there is no batch to send; fix the producer).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import orjson
import redis

from worker.delivery.channels import KEY_PREFIX
from worker.messages import IngestMessage

LETTERS_KEY = KEY_PREFIX + "letters"
ORDER_KEY = KEY_PREFIX + "letters:order"
# Where letters lived before (a list): moved into LETTERS_KEY on first use.
LEGACY_KEY = KEY_PREFIX + "dead"
DEAD_KEY = LETTERS_KEY

Kind = Literal["failed", "row_errors", "malformed"]


# Store one letter: its JSON by id, and its place in the order (kept when it is replaced).
_ADD = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[1])
return 1
"""


def new_letter_id(batch_id: str) -> str:
    """A fresh letter id for a batch (the task's letters; the pump derives its own)."""
    return f"{batch_id}#{secrets.token_hex(6)}"


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter: what, where to, why, and its rows."""

    batch_id: str
    database: str
    schema: str
    pipe: str
    reason: str
    rows: list[dict[str, Any]]
    kind: Kind = "failed"
    attempts: int = 0
    task_id: str | None = None
    failed_at: float = field(default_factory=time.time)
    detail: dict[str, Any] = field(default_factory=dict)
    letter_id: str = ""  # unique id of the letter
    raw: str | None = None  # "malformed": the message body as received

    @property
    def exact_rows(self) -> bool:
        """True for a row_errors letter that holds exactly the rows Snowflake rejected (found in
        the table's error table: `detail["rejected"][k]` describes `rows[k]`), not a whole batch
        whose other rows were committed."""
        rejected = self.detail.get("rejected")
        return (
            self.kind == "row_errors"
            and isinstance(rejected, list)
            and len(rejected) == len(self.rows) > 0
        )

    @classmethod
    def of(
        cls,
        message: IngestMessage,
        reason: str,
        *,
        kind: Kind = "failed",
        task_id: str | None = None,
        detail: dict[str, Any] | None = None,
        letter_id: str = "",
    ) -> DeadLetter:
        """The dead letter of `message` (the one way a batch's letter is made: task and pump)."""
        return cls(
            message.batch_id,
            message.database,
            message.schema,
            message.pipe,
            reason,
            message.rows,
            kind=kind,
            attempts=message.attempt,
            task_id=task_id,
            detail=detail if detail is not None else {},
            letter_id=letter_id or new_letter_id(message.batch_id),
        )

    def dumps(self) -> bytes:
        """The entry as stored in Redis (JSON; row values as the worker encodes them)."""
        from worker.snowpipe.encoding import to_json

        return to_json(asdict(self))

    @classmethod
    def loads(cls, raw: bytes | str) -> DeadLetter:
        """The entry stored as `raw` (letters stored before letter ids get one from their
        batch id)."""
        from worker.snowpipe.encoding import decode_exact

        text = raw.encode() if isinstance(raw, str) else raw
        data = orjson.loads(text)
        if isinstance(data, dict) and isinstance(data.get("rows"), list) and data["rows"]:
            # The rows with every digit (orjson rounds integers beyond 64 bits and long
            # fractions); the rest of the letter as orjson reads it (times stay floats).
            exact = decode_exact(text)
            data["rows"] = exact["rows"]
        if not isinstance(data, dict):
            raise ValueError("a stored dead letter is not a JSON object")
        known = set(cls.__dataclass_fields__)
        try:
            letter = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ValueError(f"a stored dead letter lacks a field: {exc}") from None
        if not letter.letter_id:
            letter = replace(letter, letter_id=f"{letter.batch_id}#legacy")
        return letter


def _readable(data: bytes, letter_id: Any) -> DeadLetter:
    """The letter stored as `data`, or one that shows it could not be read (never hidden)."""
    try:
        return DeadLetter.loads(data)
    except ValueError as exc:
        lid = letter_id.decode() if isinstance(letter_id, bytes) else str(letter_id)
        return DeadLetter(
            "?", "?", "?", "?", f"unreadable stored letter: {exc}", [], kind="malformed",
            letter_id=lid, raw=data.decode("utf-8", "replace"),
        )  # fmt: skip


@dataclass(frozen=True)
class Stored:
    """A dead letter with its position in the order and the exact stored bytes."""

    index: int
    raw: bytes
    letter: DeadLetter


class DeadLetters:
    """The dead letters on the state Redis."""

    def __init__(self, client: redis.Redis, *, key: str = LETTERS_KEY) -> None:
        self._redis = client
        self.key = key
        self.order_key = f"{key}:order"
        self._migrated = False
        self._add: Any = None  # the letter-writing script, registered when first needed

    def _migrate(self) -> None:
        """Move letters of the list kept before letter ids into the hash (once per process)."""
        if self._migrated:
            return
        while True:
            raw = self._redis.lpop(LEGACY_KEY)
            if raw is None:
                break
            data = raw if isinstance(raw, bytes) else str(raw).encode()
            self._store(_readable(data, new_letter_id("unreadable")))
        self._migrated = True

    def _store(self, letter: DeadLetter) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self.key, letter.letter_id, letter.dumps())
        pipe.zadd(self.order_key, {letter.letter_id: int(letter.failed_at * 1000)}, nx=True)
        pipe.execute()

    def add(self, letter: DeadLetter) -> DeadLetter:
        """Store a dead letter (one with the same letter id is replaced); the letter stored."""
        if not letter.letter_id:
            letter = replace(letter, letter_id=new_letter_id(letter.batch_id))
        self._store(letter)
        return letter

    def add_replicated(self, letter: DeadLetter, replicas: int, timeout_ms: int) -> int:
        """Store `letter` (it must have its id) by one script, then WAIT on the same connection
        (SNOWPIPE_STATE_MIN_REPLICAS): how many replicas acknowledged it within `timeout_ms`.
        Fewer than `replicas`: a failover could take the letter back."""
        if self._add is None:
            self._add = self._redis.register_script(_ADD)
        pipe = self._redis.pipeline(transaction=False)
        args: list[Any] = [letter.letter_id, letter.dumps(), int(letter.failed_at * 1000)]
        self._add(keys=[self.key, self.order_key], args=args, client=pipe)
        pipe.wait(replicas, timeout_ms)
        _, acked = pipe.execute()
        return int(acked)

    def count(self) -> int:
        """How many dead letters are stored."""
        self._migrate()
        return int(self._redis.hlen(self.key))

    def counts_by_kind(self) -> dict[str, int]:
        """How many dead letters of each kind are stored."""
        out: dict[str, int] = {}
        for stored in self.entries():
            out[stored.letter.kind] = out.get(stored.letter.kind, 0) + 1
        return out

    def get(self, letter_id: str) -> DeadLetter | None:
        """The letter with this id, if stored."""
        raw = self._redis.hget(self.key, letter_id)
        return DeadLetter.loads(raw) if raw is not None else None

    def entries(self, *, batch_id: str | None = None) -> Iterator[Stored]:
        """Every dead letter, oldest first (or only those of `batch_id`)."""
        self._migrate()
        chunk = 200
        start = 0
        while True:
            ids: list[Any] = list(self._redis.zrange(self.order_key, start, start + chunk - 1))
            if not ids:
                return
            raws = self._redis.hmget(self.key, ids)
            for offset, raw in enumerate(raws):
                if raw is None:
                    continue  # removed meanwhile
                data = raw if isinstance(raw, bytes) else str(raw).encode()
                letter = _readable(data, ids[offset])
                if batch_id is None or letter.batch_id == batch_id:
                    yield Stored(start + offset, data, letter)
            if len(ids) < chunk:
                return
            start += chunk

    def remove(self, stored: Stored) -> bool:
        """Remove one stored letter; False if it was already gone."""
        letter_id = stored.letter.letter_id
        pipe = self._redis.pipeline(transaction=True)
        pipe.hdel(self.key, letter_id)
        pipe.zrem(self.order_key, letter_id)
        removed, _ = pipe.execute()
        return int(removed) == 1

    def requeue(
        self,
        publish: Callable[[DeadLetter], None],
        *,
        batch_id: str | None = None,
        kinds: tuple[Kind, ...] = ("failed",),
    ) -> tuple[int, int]:
        """Publish the letters of `kinds` again and remove them; (requeued, skipped).

        `publish` sends a "failed" letter as its batch with `requeue_of=letter.letter_id`, a
        "row_errors" letter (the operator fixed the table) as a batch of its own whose id is
        the letter id. A "row_errors" letter is requeued only when it holds exactly the rejected
        rows (`exact_rows`): a whole batch would duplicate its committed rows. Publish first,
        then remove: a crash in between leaves the letter, and a second requeue is answered
        "already logged" by the channel log (never logged twice).
        """
        requeued = skipped = 0
        for stored in list(self.entries(batch_id=batch_id)):
            letter = stored.letter
            if letter.kind not in kinds or (letter.kind == "row_errors" and not letter.exact_rows):
                skipped += 1
                continue
            publish(stored.letter)
            if self.remove(stored):
                requeued += 1
        return requeued, skipped

    def drop(self, *, batch_id: str | None = None) -> int:
        """Delete dead letters (all, or those of `batch_id`); how many were deleted."""
        self._migrate()
        if batch_id is None:
            n = self.count()
            self._redis.delete(self.key, self.order_key)
            return n
        return sum(1 for stored in list(self.entries(batch_id=batch_id)) if self.remove(stored))
