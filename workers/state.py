"""State worker: events topic -> validated -> user state in Redis (idempotent), bad input -> DLQ.

Run as ``python -m rtrec.workers.state`` (``rtrec up`` starts it). Scale out by running
more of them: they share the consumer group, Kafka spreads the partitions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import faust
from aiokafka import ConsumerRecord

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
        events: list[Event] = []
        kept: list[LogPosition | None] = []
        stamps: list[int] = []
        bad: list[DeadLetter] = []
        for rec, at in zip(records, positions):
            try:
                events.append(parse_event(rec.value, self.settings, now_ms))
                kept.append(at)
                stamps.append(rec.timestamp)
            except InvalidEvent as exc:
                bad.append(DeadLetter(rec, exc.reason, exc.detail))
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
        for stamp, ok in zip(stamps, flags):
            if ok:
                EVENT_TO_STATE.observe(max(0.0, visible_ms - stamp) / 1000)
        if self.settings.record_latency and events:
            samples = [round(visible_ms - ts, 3) for ts, ok in zip(stamps, flags) if ok]
            if samples:
                await self.redis.rpush(INGEST_LATENCY, *samples)


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
