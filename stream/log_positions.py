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

The Redis side (read the identities, compare-and-set the changes, retry) is one
plan, ``positions_plan``, run on a sync client by ``LogEpochs`` (the rebuild) and
on an asyncio one by ``AsyncLogEpochs`` (the state worker): stream/redis_calls.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Generic, Protocol, TypeVar

from rtrec.stream import redis_calls
from rtrec.stream.keys import LOGS
from rtrec.stream.redis_calls import AsyncClient, Plan, Round, ScriptCall, Steps, SyncClient

C = TypeVar("C")  # the client kind: SyncClient or AsyncClient
BUMP_TRIES = 5  # reads and compare-and-sets before a batch gives up on identities that keep changing

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
        """``epoch:offset:fingerprint``, as ``rt:logs`` holds it."""
        return f"{self.epoch}:{self.offset}:{self.fingerprint}"

    @classmethod
    def decode(cls, raw: str | bytes | None) -> LogIdentity | None:
        if raw is None:
            return None
        epoch, offset, fingerprint = redis_calls.text(raw).split(":", 2)
        return cls(int(epoch), int(offset), fingerprint)


def partition_field(record: LogRecord) -> str:
    """The user-hash field of the record's partition, ``topic:partition``."""
    return f"{record.topic}:{record.partition}"


def record_fingerprint(record: LogRecord) -> str:
    """Tells two records at the same offset apart: same key, value and timestamp means the same record."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(record.key or b"")
    digest.update(b"\x00")
    digest.update(record.value or b"")
    digest.update(str(record.timestamp).encode())
    return digest.hexdigest()


def assign_positions(
    records: Sequence[LogRecord], known: dict[str, LogIdentity | None]
) -> tuple[list[LogPosition | None], dict[str, LogIdentity]]:
    """Positions of `records` given the stored identities, and the identities to store (new or bumped).

    Pure: the callers read ``known`` from Redis, store the returned changes with a
    compare-and-set, and call again if another owner changed one meanwhile.
    """
    by_partition = _by_partition(records)
    current: dict[tuple[str, int], tuple[str, LogIdentity]] = {}
    changes: dict[str, LogIdentity] = {}
    for tp, recs in by_partition.items():
        name = partition_field(recs[0])  # one string per partition, not per record
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
        current[tp] = (name, identity)
    positions: list[LogPosition | None] = []
    add = positions.append
    for rec in records:
        name, identity = current[rec.topic, rec.partition]
        add(None if rec.offset < identity.offset else LogPosition(name, identity.epoch, rec.offset))
    return positions, changes


def _by_partition(records: Iterable[LogRecord]) -> dict[tuple[str, int], list[LogRecord]]:
    """Records by (topic, partition), in batch order: keyed by tuple, not by ``partition_field``'s string,
    which would format a string per record on the state worker's path."""
    out: dict[tuple[str, int], list[LogRecord]] = {}
    for rec in records:
        tp = (rec.topic, rec.partition)
        recs = out.get(tp)
        if recs is None:
            out[tp] = [rec]
        else:
            recs.append(rec)
    return out


def _fields(records: Iterable[LogRecord]) -> list[str]:
    return sorted(partition_field(recs[0]) for recs in _by_partition(records).values())


def positions_plan(records: Sequence[LogRecord], key: str = LOGS) -> Plan[list[LogPosition | None]]:
    """The Redis work behind the positions of `records`: read the identities, compare-and-set the changes.

    Built once for both clients (stream/redis_calls.py): ``LogEpochs`` runs it on a
    sync client, ``AsyncLogEpochs`` on an asyncio one.
    """
    return Plan(partial(_position_steps, records, key))


def _position_steps(records: Sequence[LogRecord], key: str) -> Steps[list[LogPosition | None]]:
    fields = _fields(records)
    if not fields:
        return []
    for _ in range(BUMP_TRIES):
        [stored] = yield Round([redis_calls.hmget(key, fields)], pipelined=False)
        known = dict(zip(fields, map(LogIdentity.decode, stored)))
        positions, changes = assign_positions(records, known)
        bumps = [_bump(key, name, known[name], new) for name, new in changes.items()]
        got = (yield Round(bumps, pipelined=False)) if bumps else []  # one key: in order on its node
        if all(reply is not None and redis_calls.text(reply) == bump.args[2] for reply, bump in zip(got, bumps)):
            return positions
    raise RuntimeError(f"{key}: identities kept changing under this batch")


def _bump(key: str, name: str, old: LogIdentity | None, new: LogIdentity) -> ScriptCall:
    """Store `new` as `name`'s identity if it still is `old`; the script replies with the identity it leaves."""
    return ScriptCall(BUMP_LUA, [key], [name, old.encode() if old else "", new.encode()])


class _Epochs(Generic[C]):
    """The identities' hash (``rt:logs``) on one client."""

    def __init__(self, client: C, key: str = LOGS) -> None:
        self.client = client
        self.key = key


class LogEpochs(_Epochs[SyncClient]):
    """Positions for batches of records, with the identities kept in Redis (sync client: the rebuild)."""

    def positions(self, records: Sequence[LogRecord]) -> list[LogPosition | None]:
        return redis_calls.run(self.client, positions_plan(records, self.key))


class AsyncLogEpochs(_Epochs[AsyncClient]):
    """The same with an asyncio Redis client (the state worker)."""

    async def positions(self, records: Sequence[LogRecord]) -> list[LogPosition | None]:
        return await redis_calls.run_async(self.client, positions_plan(records, self.key))
