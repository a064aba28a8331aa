"""A batch loop over a Kafka consumer group that commits only what was handled.

Why not a plain Faust agent: measured here, a Faust agent stream tops out near
14k messages/s on this machine before doing any work, while aiokafka's
``getmany`` hands over batches at >600k/s. Both rtrec workers run this loop as
a task inside their Faust app, so Faust still owns the process (signals,
logging, lifecycle) and the loop owns delivery semantics:

* at-least-once: offsets are committed after the handler returned, never before;
* a failing handler (Redis down, broker hiccup) is retried with backoff on the
  *same* batch, so nothing is skipped and the lag simply grows (back-pressure);
* the handler itself must be idempotent (the state store dedupes by event_id);
* a handler may return an awaitable (e.g. the broker's acks of what it produced): the
  loop fetches and handles the next batch meanwhile, and commits this batch only once
  the awaitable completed; if it fails, the batch is handled again before its commit.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from stream.connections import aiokafka_auth, kafka_bootstrap
from stream.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[Sequence[ConsumerRecord]], Awaitable[Awaitable[object] | None]]


class BatchConsumer:
    """Consume `topics` as `group`, hand batches of up to `max_records` to a handler."""

    def __init__(
        self,
        settings: Settings,
        topics: Sequence[str],
        group: str,
        max_records: int,
        max_wait_ms: int,
        client_id: str = "rtrec",
    ) -> None:
        self.settings = settings
        self.topics = list(topics)
        self.max_records = max_records
        self.max_wait_ms = max_wait_ms
        self.consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=kafka_bootstrap(settings),
            group_id=group,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_records=max_records,
            fetch_max_wait_ms=max(1, max_wait_ms),
            max_partition_fetch_bytes=4 * 1024 * 1024,
            **aiokafka_auth(settings),
        )
        self.batches = 0
        self.records = 0
        self._stopping = asyncio.Event()
        self._commit_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.consumer.start()

    async def stop(self) -> None:
        self._stopping.set()
        if self._commit_task is not None:
            await asyncio.gather(self._commit_task, return_exceptions=True)
        await self.consumer.stop()

    async def run(self, handler: Handler) -> None:
        """Poll, handle, commit — until stop() is called."""
        while not self._stopping.is_set():
            batch = await self.consumer.getmany(
                timeout_ms=self.max_wait_ms, max_records=self.max_records
            )
            if not batch:
                continue
            records = [r for tp in sorted(batch, key=_tp_key) for r in batch[tp]]
            pending = await self._handle_until_done(handler, records)
            # commit in the background while the next batch is fetched and handled; commits stay in
            # order (each waits for the previous), and each follows its own batch's handling
            if self._commit_task is not None:
                await self._commit_task
            self._commit_task = asyncio.create_task(self._commit(batch, handler, records, pending))
            self.batches += 1
            self.records += len(records)

    async def _handle_until_done(self, handler: Handler, records: list[ConsumerRecord]) -> Awaitable[object] | None:
        delay = 0.1
        while True:
            try:
                return await handler(records)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # retried: the batch must not be skipped
                log.warning("batch of %d failed (%s: %s); retrying in %.1fs",
                            len(records), type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _commit(self, batch: dict[TopicPartition, list[ConsumerRecord]], handler: Handler,
                      records: list[ConsumerRecord], pending: Awaitable[object] | None) -> None:
        while pending is not None:
            try:
                await pending
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. responses not acked: handle again, then commit
                log.warning("batch of %d not acknowledged (%s: %s); handling it again", len(records),
                            type(exc).__name__, exc)
                pending = await self._handle_until_done(handler, records)
        offsets = {tp: recs[-1].offset + 1 for tp, recs in batch.items() if recs}
        assigned = self.consumer.assignment()
        offsets = {tp: off for tp, off in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except Exception as exc:  # rebalanced away: the new owner re-reads, dedupe absorbs it
            log.warning("commit failed (%s); records will be redelivered", exc)


def _tp_key(tp: TopicPartition) -> tuple[str, int]:
    return tp.topic, tp.partition
