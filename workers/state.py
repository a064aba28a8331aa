"""State worker: events topic -> validated -> user state in Redis (idempotent), bad input -> DLQ;
and the catalog topic -> item categories, availability and info in Redis (stream/catalog.py).

The two topics are read by two consumer loops in one process, each in its own group
(``RTREC_STATE_GROUP`` and ``<that>-catalog``): a failed catalog batch is retried (or split)
without handling events again, and each topic keeps its own offsets and lag.

Run as ``python -m rtrec.workers.state`` (``rtrec up`` starts it). Scale out by running
more of them: they share the consumer groups, Kafka spreads the partitions.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Coroutine, Sequence
from typing import Any

import faust
from aiokafka import ConsumerRecord
from prometheus_client import Histogram

from rtrec.stream import redis_calls
from rtrec.stream.catalog import (
    CatalogEntry,
    catalog_full_detail,
    catalog_group,
    parse_catalog_record,
    store_catalog_async,
)
from rtrec.stream.events import Event, InvalidEvent, parse_event
from rtrec.stream.keys import INGEST_LATENCY
from rtrec.stream.log_positions import AsyncLogEpochs, LogPosition
from rtrec.stream.redis_calls import AsyncClient
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import StateStore
from rtrec.workers.dead_letters import DeadLetter, DeadLetters
from rtrec.workers.faust_app import run_module, worker_app
from rtrec.workers.lifecycle import consuming, serving, worker_producer, worker_redis
from rtrec.workers.metrics import BATCH_SIZE, EVENT_TO_STATE, EVENTS_DUPLICATE, EVENTS_PROCESSED, readiness
from rtrec.workers.runtime import ConsumerRuntime

log = logging.getLogger(__name__)


class CatalogWorker:
    """Catalog upserts -> item metadata in Redis; a bad record, or a new item the full catalog refuses, is
    dead-lettered with its reason and the rest of the batch applies. Upserts are idempotent, so a batch
    handled again (at-least-once) changes nothing more."""

    def __init__(self, settings: Settings, redis_client: AsyncClient, dead_letters: DeadLetters) -> None:
        self.settings = settings
        self.redis = redis_client
        self.dead_letters = dead_letters
        self.applied = 0
        self.refused = 0

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        entries: list[CatalogEntry] = []
        kept: list[ConsumerRecord] = []
        bad: list[DeadLetter] = []
        for rec in records:
            try:
                entries.append(parse_catalog_record(rec.value, self.settings))
            except InvalidEvent as exc:
                bad.append(DeadLetter(rec, exc.reason, exc.detail))
                continue
            kept.append(rec)
        refusals = await store_catalog_async(self.redis, entries, self.settings)
        refused = [
            DeadLetter(rec, reason, catalog_full_detail(self.settings)) for rec, reason in zip(kept, refusals) if reason
        ]
        await self.dead_letters.publish(bad + refused)
        self.applied += len(entries) - len(refused)
        self.refused += len(refused)
        BATCH_SIZE.labels(worker="state-catalog").observe(len(records))


class StateWorker:
    """Turns a batch of raw records into state updates and dead letters."""

    def __init__(self, settings: Settings, redis_client: AsyncClient, dead_letters: DeadLetters) -> None:
        self.settings = settings
        self.redis = redis_client
        self.store = StateStore(settings)
        self.epochs = AsyncLogEpochs(redis_client)
        self.dead_letters = dead_letters
        self.applied = 0
        self.duplicates = 0

    def split(
        self, records: Sequence[ConsumerRecord], positions: Sequence[LogPosition | None]
    ) -> tuple[list[Event], list[LogPosition | None], list[int], list[DeadLetter]]:
        """Valid events (with their log positions and broker timestamps) and dead letters."""
        now_ms = int(time.time() * 1000)
        settings = self.settings
        events: list[Event] = []
        kept: list[LogPosition | None] = []
        stamps: list[int] = []
        bad: list[DeadLetter] = []
        for rec, at in zip(records, positions):
            try:
                events.append(parse_event(rec.value, settings, now_ms))
            except InvalidEvent as exc:
                bad.append(DeadLetter(rec, exc.reason, exc.detail))
                continue
            kept.append(at)
            stamps.append(rec.timestamp)
        return events, kept, stamps, bad

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        events, positions, stamps, bad = self.split(records, await self.epochs.positions(records))
        await self.dead_letters.publish(bad)
        flags = await self.store.apply_async(self.redis, events, positions)
        visible_ms = time.time() * 1000
        new = sum(flags)
        self.applied += new
        self.duplicates += len(flags) - new
        EVENTS_PROCESSED.inc(new)
        EVENTS_DUPLICATE.inc(len(flags) - new)
        BATCH_SIZE.labels(worker="state").observe(len(records))
        if not new:
            return
        lags_ms = [visible_ms - stamp for stamp, ok in zip(stamps, flags) if ok]
        observe_many(EVENT_TO_STATE, [max(0.0, lag) / 1000 for lag in lags_ms])
        if self.settings.record_latency:
            await self.redis.rpush(INGEST_LATENCY, encode_samples(lags_ms))


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for each value, with one update per bucket instead of a loop per value
    (the state worker observes every event). Uses prometheus_client's internals (pinned in pyproject);
    a histogram without them (labels not chosen, another version) is observed value by value."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts = Counter(bisect_left(bounds, value) for value in values)  # the first bucket with value <= bound
    for i, n in counts.items():
        if i < len(buckets):  # observe() counts nothing above the last bound (+Inf: never)
            buckets[i].inc(n)
    total.inc(math.fsum(values))


def encode_samples(lags_ms: Sequence[float]) -> str:
    """One batch's event->visible latencies (ms, 3 decimals) as one comma-separated list entry: one
    argument per batch rather than one per event (``rtrec bench ingest`` splits them again)."""
    return ",".join([str(round(lag, 3)) for lag in lags_ms])


def decode_samples(entries: Sequence[str | bytes]) -> list[float]:
    """The latencies (ms) of INGEST_LATENCY's entries, as ``encode_samples`` wrote them."""
    return [float(x) for entry in entries for x in redis_calls.text(entry).split(",") if x]


async def consume_events(settings: Settings) -> None:
    """Events topic -> state updates, catalog topic -> item metadata, in Redis, and dead letters, batch
    after batch, until stopped."""
    async with worker_redis(settings) as redis, worker_producer(settings) as producer:
        dead_letters = DeadLetters(settings, producer, redis)
        catalog = ConsumerRuntime(
            settings,
            [settings.topic_catalog],
            catalog_group(settings),
            settings.state_batch_max,
            settings.state_batch_wait_ms,
            worker="state-catalog",
            dead_letters=dead_letters,
        )
        consumer = ConsumerRuntime(
            settings,
            [settings.topic_events],
            settings.state_group,
            settings.state_batch_max,
            settings.state_batch_wait_ms,
            worker="state",
            dead_letters=dead_letters,
        )
        worker = StateWorker(settings, redis, dead_letters)
        items = CatalogWorker(settings, redis, dead_letters)

        async def ready() -> dict[str, bool]:
            return await readiness(consumer, redis, **{f"catalog_{k}": v for k, v in catalog.checks().items()})

        async with consuming(consumer), consuming(catalog), serving(settings, "state", redis, ready):
            log.info(
                "state worker consuming %s as %s and %s as %s",
                settings.topic_events,
                settings.state_group,
                settings.topic_catalog,
                catalog_group(settings),
            )
            await run_together(consumer.run(worker.handle), catalog.run(items.handle))


async def run_together(*loops: Coroutine[Any, Any, None]) -> None:
    """Run the loops until one ends or fails (its exception raised here); the others are then cancelled."""
    tasks = [asyncio.ensure_future(loop) for loop in loops]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def build_app(settings: Settings | None = None) -> faust.App:
    """The Faust app of the state worker."""
    return worker_app("rtrec-state-app", consume_events, settings)


def main() -> None:
    run_module(build_app)


if __name__ == "__main__":
    main()
