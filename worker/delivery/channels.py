"""Channels: how they are named, how a batch picks one, and their Redis key names."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

# Every key the worker writes on the state Redis starts with this.
KEY_PREFIX = "snowpipe:"


@dataclass(frozen=True, slots=True, order=True)
class ChannelRef:
    """One Snowpipe Streaming channel: where it lives and its name."""

    database: str
    schema: str
    pipe: str
    channel: str

    @property
    def key(self) -> str:
        """The channel's part of a Redis key: `database|schema|pipe|channel`."""
        return f"{self.database}|{self.schema}|{self.pipe}|{self.channel}"

    @property
    def target(self) -> tuple[str, str, str]:
        """(database, schema, pipe)."""
        return (self.database, self.schema, self.pipe)

    @classmethod
    def from_key(cls, key: str) -> ChannelRef:
        """The channel whose `key` this is."""
        parts = key.split("|")
        if len(parts) != 4 or not all(parts):
            raise ValueError(f"not a channel key: {key!r}")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.database}.{self.schema}.{self.pipe}/{self.channel}"


def channel_name(prefix: str, index: int) -> str:
    """The name of a pipe's channel number `index`: `<prefix>_<index>`."""
    return f"{prefix}_{index}"


def channel_for(
    batch_id: str, database: str, schema: str, pipe: str, *, prefix: str, channels: int
) -> ChannelRef:
    """The channel of `pipe` that batch `batch_id` is logged on (a stable hash of its id)."""
    index = zlib.crc32(batch_id.encode()) % channels
    return ChannelRef(database, schema, pipe, channel_name(prefix, index))


def channel_key(kind: str, ref: ChannelRef) -> str:
    """The Redis key of one of a channel's structures (`log`, `next`, `bytes`, `lease`, ...)."""
    return f"{KEY_PREFIX}{kind}:{ref.key}"


# The set of every channel that ever had a log entry (what the pumps share out).
CHANNELS_KEY = KEY_PREFIX + "channels"
# The worker's counters (a hash): what tasks and pumps did.
STATS_KEY = KEY_PREFIX + "stats"
# Live worker nodes: sorted set of node name -> expiry (ms, Redis clock).
NODES_KEY = KEY_PREFIX + "nodes"


def batch_key(batch_id: str) -> str:
    """The dedup record of a batch id."""
    return f"{KEY_PREFIX}batch:{batch_id}"
