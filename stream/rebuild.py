"""`rtrec rebuild-state`: the state rebuilt from the events topic, the same whatever Redis still holds.

Idempotent by construction, not by dedupe state: the applied-offset watermarks
and event-id windows that keep the state worker exactly-once can have expired,
been lost or be stale, so the rebuild never applies over them. It

1. reads the topic up to "now" (broker time) and applies it to a fresh *staging*
   namespace, ``rt:rebuild`` (deleted first: an interrupted rebuild may have left one);
2. switches per shard (one Redis: one; a Redis Cluster: one per bucket) with one
   Lua script that deletes the live state keys and renames each staging key to its
   live name, so readers see the old state or the new one, never a mix;
3. applies the *tail*, the records appended since the read began, to the live
   namespace: the state worker kept applying them to the namespace the switch
   replaced. The records carry their log positions, so these applies and the
   worker's own skip what the other already applied.

Only the state families move: ``P:u:*``, ``P:covis:*``, ``P:pop``, ``P:pop:L``,
``P:items:n``, ``P:stats`` (``P`` the store's prefix or a cluster bucket's).
Every other key (``rt:logs``, ``rt:lat:*``, ``rt:quality``, dead-letter
markers, model keys, worker registrations) is left as it is. In a cluster the
staging bucket ``rt:rebuild:{b7}`` shares the hash tag, hence the slot, of the
live ``rt:{b7}``, so one script can switch a bucket.

Staging and tail positions come from ``rt:logs``, the log epochs the worker uses
(stream/log_positions.py), so the rebuilt watermarks are the worker's.

Left open: a state key the worker creates between the listing of the live keys
and the switch (a new co-visited item, say) is not deleted by the switch; if
the tail then applies the event again, that key counts it twice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
from kafka.errors import KafkaError
from redis.exceptions import RedisClusterException

from rtrec.stream import keys
from rtrec.stream.connections import redis_client
from rtrec.stream.events import Event, InvalidEvent, parse_event
from rtrec.stream.log_positions import LogEpochs, LogPosition, LogRecord
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import StateStore
from rtrec.stream.topic_window import TopicReadError, iter_topic_records

LOCK_TTL_MS = 60_000  # a rebuild refreshes its lock while it runs; a killed one frees it this long after
SCAN_COUNT = 1000

# Switch one shard: the live state keys go, each staging key takes its live name. One script: atomic.
# ARGV: live prefix, staging prefix, number of live suffixes, the live suffixes, then the staging suffixes.
SWITCH_LUA = r"""
local live, staging, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local gone, moved = 0, 0
for i = 4, 3 + n do gone = gone + redis.call('UNLINK', live .. ':' .. ARGV[i]) end
for i = 4 + n, #ARGV do
  local from = staging .. ':' .. ARGV[i]
  if redis.call('EXISTS', from) == 1 then  -- expired since listed: nothing to move (and no error midway)
    redis.call('RENAME', from, live .. ':' .. ARGV[i])
    moved = moved + 1
  end
end
return {gone, moved}
"""

UNLOCK_LUA = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RebuildError(RuntimeError):
    """The rebuild could not finish; the message is one line: what failed, what state Redis is in, what to do."""


@dataclass(frozen=True, slots=True)
class Staged:
    """What the read into the staging namespace found, and where the tail starts."""

    events: int  # valid events applied to staging (duplicates among them included)
    invalid: int  # records that are not valid events (the state worker dead-letters them)
    resume_at: dict[int, int]  # partition -> first offset not read


@dataclass(frozen=True, slots=True)
class RebuildReport:
    topic: str
    since_ms: int | None
    events: int
    invalid: int
    users: int
    items: int
    tail: int  # events applied to the live namespace after the switch

    def summary(self) -> str:
        window = f" (last {self.since_ms / 3_600_000:g} h)" if self.since_ms else ""
        return (
            f"rebuilt state from {self.events:,} events ({self.invalid:,} records skipped as invalid) of "
            f"{self.topic}{window}: {self.users:,} users, {self.items:,} items; "
            f"{self.tail:,} more applied after the switch"
        )


def staging_store(live: StateStore) -> StateStore:
    """The store writing under the staging prefix; in a cluster its buckets share the live buckets' hash tags."""
    return StateStore(live.settings, prefix=keys.staging_prefix(live.prefix))


def split_state_key(key: str, store: StateStore) -> tuple[str, str] | None:
    """(shard prefix, rest) when `key` is one of `store`'s state keys, else None.

    Exact, because ``rt:*`` also holds keys that are not state (``rt:stats:recommend``,
    ``rt:logs``, ...) and, under ``rt:rebuild:``, the staging namespace. In a cluster any
    bucket counts, also one past ``redis_cluster_buckets``: after the bucket count shrank,
    a rebuild removes the state of the buckets no longer read.
    """
    if store.buckets:
        end = key.find("}")
        shard = key[: end + 1]
        if end < 0 or not shard.startswith(store.prefix) or not keys.BUCKET_TAG.fullmatch(shard[len(store.prefix) :]):
            return None
    else:
        shard = store.prefix
    if not key.startswith(shard + ":"):
        return None
    rest = key[len(shard) + 1 :]
    return (shard, rest) if rest in keys.STATE_SINGLE_KEYS or rest.startswith(keys.STATE_FAMILIES) else None


def state_keys(client: redis.Redis, stores: Sequence[StateStore]) -> list[dict[str, list[str]]]:
    """Per store, shard prefix -> the rests of its state keys; one SCAN for all (they share the first prefix)."""
    root = stores[0].prefix
    assert all(store.prefix == root or store.prefix.startswith(root + ":") for store in stores)
    found: list[dict[str, list[str]]] = [{shard: [] for shard in store.shard_prefixes()} for store in stores]
    for key in client.scan_iter(match=f"{_glob_escape(root)}:*", count=SCAN_COUNT):
        for store, out in zip(stores, found):
            hit = split_state_key(key, store)
            if hit is not None:
                out.setdefault(hit[0], []).append(hit[1])
                break
    return found


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def clear(client: redis.Redis, store: StateStore) -> int:
    """Delete `store`'s state keys (a previous rebuild's staging namespace); returns how many."""
    [found] = state_keys(client, [store])
    n = 0
    for shard, rests in found.items():  # one shard's keys share a slot: one UNLINK per chunk works on a cluster
        for start in range(0, len(rests), 500):
            n += client.unlink(*(f"{shard}:{rest}" for rest in rests[start : start + 500]))
    return n


def parse_batch(
    records: Sequence[LogRecord], positions: Sequence[LogPosition | None], settings: Settings, now_ms: int
) -> tuple[list[Event], list[LogPosition | None], int]:
    """Valid events with their positions, and the number of invalid records (left to the dead letters)."""
    events: list[Event] = []
    kept: list[LogPosition | None] = []
    for rec, at in zip(records, positions):
        if rec.value is None:  # a tombstone: no event (the state worker dead-letters it)
            continue
        try:
            events.append(parse_event(rec.value, settings, now_ms))
            kept.append(at)
        except InvalidEvent:
            continue
    return events, kept, len(records) - len(events)


def stage(
    settings: Settings,
    client: redis.Redis,
    staging: StateStore,
    since_ms: int | None = None,
    progress: Callable[[int], object] | None = None,
    refresh: Callable[[], None] | None = None,
) -> Staged:
    """Empty the staging namespace, then apply the topic up to now to it (batches streamed, positions kept)."""
    clear(client, staging)
    started_ms = int(time.time() * 1000)
    resume_at: dict[int, int] = {}
    batches = iter_topic_records(settings, started_ms, since_ms=since_ms, resume_at=resume_at)
    n_events, n_invalid, _ = apply_records(settings, client, staging, batches, started_ms, progress, refresh)
    return Staged(n_events, n_invalid, resume_at)


def apply_records(
    settings: Settings,
    client: redis.Redis,
    store: StateStore,
    batches: Iterable[Sequence[LogRecord]],
    now_ms: int,
    progress: Callable[[int], object] | None = None,
    refresh: Callable[[], None] | None = None,
) -> tuple[int, int, int]:
    """Apply batches of records to `store` at their log positions (the worker's epochs, ``rt:logs``);
    returns (valid events, invalid records, events new to the store)."""
    epochs = LogEpochs(client)
    n_events = n_invalid = n_new = 0
    for records in batches:
        events, positions, invalid = parse_batch(records, epochs.positions(records), settings, now_ms)
        n_new += sum(store.apply(client, events, positions))
        n_events, n_invalid = n_events + len(events), n_invalid + invalid
        if progress is not None:
            progress(len(records))
        if refresh is not None:
            refresh()
    return n_events, n_invalid, n_new


def switch(client: redis.Redis, live: StateStore, staging: StateStore) -> tuple[int, int]:
    """Replace the live state by the staging state, one atomic script per shard; returns (users, items) switched in.

    Keys travel as ARGV (their names are computed, not declared); in a cluster
    the shard's ``stats`` key, which shares the shard's hash tag, routes the call.
    """
    live_keys, staged_keys = state_keys(client, [live, staging])
    users = sum(rest.endswith(":h") and rest.startswith("u:") for rests in staged_keys.values() for rest in rests)
    items = len(staging.item_counts(client))
    script = client.register_script(SWITCH_LUA)
    for live_shard, gone in live_keys.items():  # every configured shard, and any other bucket holding state
        staging_shard = staging.prefix + live_shard[len(live.prefix) :]  # rt:{b7} -> rt:rebuild:{b7}: one slot
        moved = staged_keys.get(staging_shard, [])
        if gone or moved:
            script(keys=[f"{live_shard}:stats"], args=[live_shard, staging_shard, len(gone), *gone, *moved])
    return users, items


def apply_tail(
    settings: Settings,
    client: redis.Redis,
    live: StateStore,
    resume_at: dict[int, int],
    progress: Callable[[int], object] | None = None,
) -> int:
    """Apply the records appended since the read began to the live namespace; returns the events new to it."""
    started_ms = int(time.time() * 1000)
    batches = iter_topic_records(settings, started_ms, from_offsets=resume_at)
    return apply_records(settings, client, live, batches, started_ms, progress)[2]


@contextmanager
def rebuild_lock(client: redis.Redis, live: StateStore) -> Iterator[Callable[[], None]]:
    """One rebuild at a time (a second one would empty the first one's staging); yields a refresh function.

    The lock expires LOCK_TTL_MS after its last refresh, so a killed rebuild does not block the next for long.
    """
    key, token = keys.rebuild_lock(live.prefix), uuid.uuid4().hex
    if not client.set(key, token, nx=True, px=LOCK_TTL_MS):
        raise RebuildError(
            f"another rebuild-state is running ({key} is held); wait for it to finish "
            f"(a killed one frees the lock within {LOCK_TTL_MS // 1000} s)"
        )

    def refresh() -> None:
        client.pexpire(key, LOCK_TTL_MS)

    try:
        yield refresh
    finally:
        client.register_script(UNLOCK_LUA)(keys=[key], args=[token])


def rebuild(
    settings: Settings,
    since_ms: int | None = None,
    progress: Callable[[int], object] | None = None,
    client: redis.Redis | None = None,
) -> RebuildReport:
    """Stage, switch, apply the tail (module docstring); broker and Redis failures become one-line RebuildErrors."""
    phase = "the live state is unchanged"
    try:
        client = client if client is not None else redis_client(settings)
        live = StateStore(settings)
        staging = staging_store(live)
        with rebuild_lock(client, live) as refresh:
            staged = stage(settings, client, staging, since_ms, progress, refresh)
            refresh()
            phase = "the switch may have been partial: rerun rtrec rebuild-state"
            users, items = switch(client, live, staging)
            phase = "the state was switched but may lack the latest events: rerun rtrec rebuild-state"
            tail = apply_tail(settings, client, live, staged.resume_at, progress)
    except (KafkaError, TopicReadError) as exc:
        raise RebuildError(
            f"cannot read topic {settings.topic_events!r} from the Kafka broker at "
            f"{settings.kafka_bootstrap} ({_one_line(exc)}); {phase}; check that the broker is "
            "running and RTREC_KAFKA_BOOTSTRAP points at it"
        ) from exc
    except (redis.RedisError, RedisClusterException) as exc:
        raise RebuildError(
            f"Redis at {_where(settings.redis_url)} failed ({_one_line(exc)}); {phase}; check "
            "that it is running and RTREC_REDIS_URL points at it"
        ) from exc
    return RebuildReport(settings.topic_events, since_ms, staged.events, staged.invalid, users, items, tail)


def _one_line(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc) if name in str(exc) else f"{name}: {exc}"
    return " ".join(text.split())[:300]


def _where(url: str | None) -> str:
    """host:port of a Redis URL, never its credentials."""
    if not url:
        return "(none)"
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.hostname else "(unparsed URL)"
