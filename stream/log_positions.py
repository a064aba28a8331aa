"""Where a record sits in the events log, for the per-user applied-offset watermarks of the state store.

A redelivered record (crash before a commit, rebalance, a group's offsets expired,
a consumer reset to the beginning) comes back at the offset it had: the state
store keeps, in each user's hash, the highest offset applied per partition and
skips anything at or below it. That covers redelivery of any size with one hash
field per user, instead of one key per event.

Offsets identify a record only within one *incarnation* of a partition's log.
The embedded broker keeps its log in memory: restarted, it starts again at
offset 0 with different records, and watermarks of the old log would silently
drop the new ones. So each partition carries an *epoch*, kept in Redis
(``rt:logs``, field ``topic:partition`` -> ``epoch:offset:fingerprint``): the
identity is the first record applied from that log (its offset and a hash of its
key, value and timestamp). A later batch holding a record at that offset with a
different fingerprint reads a new log: the epoch goes up and watermarks of the
old epoch no longer match. Records below the identity's offset were never
applied from this log (it is the first one applied), so they carry no position
and rely on the event-id window alone. On Apache Kafka offsets are never reused:
the identity either reads the same again or has been deleted by retention, and
the epoch stays.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from rtrec.stream.keys import LOGS

# compare-and-set of one partition's identity: two owners during a rebalance must not bump the epoch twice
BUMP_LUA = r"""
local current = redis.call('HGET', KEYS[1], ARGV[1])
if (current or '') == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return ARGV[3]
end
return current
"""


class LogRecord(Protocol):
    """What both aiokafka's and kafka-python's ConsumerRecord provide."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class LogPosition:
    """A record's place: the user-hash field of its partition, the log's epoch, the offset."""

    field: str
    epoch: int
    offset: int


@dataclass(frozen=True, slots=True)
class LogIdentity:
    """The first record applied from one incarnation of a partition's log."""

    epoch: int
    offset: int
    fingerprint: str

    def encode(self) -> str:
        return f"{self.epoch}:{self.offset}:{self.fingerprint}"

    @classmethod
    def decode(cls, raw: str | bytes | None) -> "LogIdentity | None":
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        epoch, offset, fingerprint = text.split(":", 2)
        return cls(int(epoch), int(offset), fingerprint)


def partition_field(record: LogRecord) -> str:
    return f"{record.topic}:{record.partition}"


def record_fingerprint(record: LogRecord) -> str:
    """Tells two records at the same offset apart: same key, value and timestamp means the same record."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(record.key or b"")
    digest.update(b"\x00")
    digest.update(record.value or b"")
    digest.update(str(record.timestamp).encode())
    return digest.hexdigest()


def assign_positions(records: Sequence[LogRecord], known: dict[str, LogIdentity | None]
                     ) -> tuple[list[LogPosition | None], dict[str, LogIdentity]]:
    """Positions of `records` given the stored identities, and the identities to store (new or bumped).

    Pure: the callers read ``known`` from Redis, store the returned changes with a
    compare-and-set, and call again if another owner changed one meanwhile.
    """
    by_field: dict[str, list[LogRecord]] = {}
    for rec in records:
        by_field.setdefault(partition_field(rec), []).append(rec)
    current: dict[str, LogIdentity] = {}
    changes: dict[str, LogIdentity] = {}
    for name, recs in by_field.items():
        first = min(recs, key=lambda r: r.offset)
        identity = known.get(name)
        if identity is None:
            identity = LogIdentity(0, first.offset, record_fingerprint(first))
            changes[name] = identity
        else:
            at = next((r for r in recs if r.offset == identity.offset), None)
            if at is not None and record_fingerprint(at) != identity.fingerprint:  # a new log
                identity = LogIdentity(identity.epoch + 1, first.offset, record_fingerprint(first))
                changes[name] = identity
        current[name] = identity
    positions: list[LogPosition | None] = []
    for rec in records:
        name = partition_field(rec)
        identity = current[name]
        positions.append(None if rec.offset < identity.offset else LogPosition(name, identity.epoch, rec.offset))
    return positions, changes


def _fields(records: Iterable[LogRecord]) -> list[str]:
    return sorted({partition_field(r) for r in records})


class LogEpochs:
    """Positions for batches of records, with the identities kept in Redis (sync client)."""

    def __init__(self, client, key: str = LOGS) -> None:
        self.client = client
        self.key = key
        self._bump = client.register_script(BUMP_LUA)

    def positions(self, records: Sequence[LogRecord]) -> list[LogPosition | None]:
        fields = _fields(records)
        if not fields:
            return []
        for _ in range(5):
            known = dict(zip(fields, map(LogIdentity.decode, self.client.hmget(self.key, fields))))
            positions, changes = assign_positions(records, known)
            if all(self._stored(name, known[name], new) for name, new in changes.items()):
                return positions
        raise RuntimeError(f"{self.key}: identities kept changing under this batch")

    def _stored(self, name: str, old: LogIdentity | None, new: LogIdentity) -> bool:
        expected = old.encode() if old else ""
        got = self._bump(keys=[self.key], args=[name, expected, new.encode()])
        return (got.decode() if isinstance(got, bytes) else got) == new.encode()


class AsyncLogEpochs(LogEpochs):
    """The same with an asyncio Redis client (the state worker)."""

    async def positions(self, records: Sequence[LogRecord]) -> list[LogPosition | None]:  # type: ignore[override]
        fields = _fields(records)
        if not fields:
            return []
        for _ in range(5):
            known = dict(zip(fields, map(LogIdentity.decode, await self.client.hmget(self.key, fields))))
            positions, changes = assign_positions(records, known)
            stored = [await self._stored_async(name, known[name], new) for name, new in changes.items()]
            if all(stored):
                return positions
        raise RuntimeError(f"{self.key}: identities kept changing under this batch")

    async def _stored_async(self, name: str, old: LogIdentity | None, new: LogIdentity) -> bool:
        expected = old.encode() if old else ""
        got = await self._bump(keys=[self.key], args=[name, expected, new.encode()])
        return (got.decode() if isinstance(got, bytes) else got) == new.encode()
