"""State worker: events topic -> validated -> user state in Redis (idempotent), bad input -> DLQ.

Run as ``python -m rtrec.workers.state`` (``rtrec up`` starts it). Scale out by running
more of them: they share the consumer group, Kafka spreads the partitions.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence

import faust
from aiokafka import ConsumerRecord
from prometheus_client import Histogram

from rtrec.stream import redis_calls
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
    """Events topic -> state updates in Redis and dead letters, batch after batch, until stopped."""
    async with worker_redis(settings) as redis, worker_producer(settings) as producer:
        dead_letters = DeadLetters(settings, producer, redis)
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
        async with consuming(consumer), serving(settings, "state", redis, lambda: readiness(consumer, redis)):
            log.info("state worker consuming %s as %s", settings.topic_events, settings.state_group)
            await consumer.run(worker.handle)


def build_app(settings: Settings | None = None) -> faust.App:
    """The Faust app of the state worker."""
    return worker_app("rtrec-state-app", consume_events, settings)


def main() -> None:
    run_module(build_app)


if __name__ == "__main__":
    main()
