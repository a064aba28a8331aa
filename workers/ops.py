"""Ops worker: consumer lag every few seconds (kafka-lag-exporter names) and the online-quality join.

Run as ``python -m rtrec.workers.ops`` (``rtrec up`` starts one). The measurement is
the same as ``rtrec lag`` (workers/lag.py), done in a thread because the
admin and consumer clients are blocking.
"""

from __future__ import annotations

import asyncio
import logging

import faust
from kafka.errors import KafkaError

from rtrec.stream.keys import QUALITY
from rtrec.stream.settings import Settings
from rtrec.workers.faust_app import run_module, worker_app
from rtrec.workers.lag import LagError, LagMonitor
from rtrec.workers.lifecycle import serving, worker_redis
from rtrec.workers.metrics import readiness, record_lag, record_lag_unknown
from rtrec.workers.quality import QualityJoin
from rtrec.workers.runtime import BACKGROUND_IDLE_WAIT_MS, ConsumerRuntime

log = logging.getLogger(__name__)


class LagExporter:
    """Publishes `LagMonitor.measure()` (every group `rtrec_groups` names, the quality join's included)
    every `lag_interval_s`; a broker outage is a not-ready flag and one log line per try, not a crash."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.monitor: LagMonitor | None = None
        self.last_ok = False

    def measure_once(self) -> int:
        """One measurement published as metrics; returns the number of partitions measured."""
        if self.monitor is None:
            self.monitor = LagMonitor(self.settings)  # LagError within seconds if the broker is unreachable
        rows = self.monitor.measure()
        record_lag(rows)
        return len(rows)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.measure_once)
                self.last_ok = True
            except (LagError, KafkaError, OSError) as exc:  # the broker may be restarting: not ready, keep trying
                await self._failed(exc)  # (anything else is a bug: the supervisor restarts the task, visibly)
            await asyncio.sleep(self.settings.lag_interval_s)

    async def _failed(self, exc: Exception) -> None:
        """Log one line (a LagError already says what to check) and reconnect on the next try."""
        self.last_ok = False
        record_lag_unknown()  # old figures would read as the current lag
        text = str(exc) if isinstance(exc, LagError) else f"{type(exc).__name__}: {exc}"
        log.warning("lag measurement failed: %s", " ".join(text.split()))
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            await asyncio.to_thread(monitor.close)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()


class QualityCounts:
    """Adds a batch's join counts to Redis; a retried batch (Redis down) adds the counts computed once."""

    def __init__(self, join: QualityJoin, redis_client) -> None:
        self.join = join
        self.redis = redis_client
        self._batch: tuple | None = None
        self._counts: dict[str, int] = {}

    async def add(self, records) -> None:
        first = records[0]
        batch = (first.topic, first.partition, first.offset, len(records))
        if batch != self._batch:  # a new batch, not the retry of the last one: join it once
            self._batch, self._counts = batch, self.join.handle(records)
        if self._counts:
            pipe = self.redis.pipeline(transaction=False)
            for field, n in self._counts.items():
                pipe.hincrby(QUALITY, field, n)
            await pipe.execute()


async def export_lag(settings: Settings) -> None:
    """Lag of every rtrec group every RTREC_LAG_INTERVAL_S, and the online-quality join, until stopped."""
    async with worker_redis(settings) as redis:
        exporter = LagExporter(settings)
        quality = ConsumerRuntime(
            settings,
            [settings.topic_events, settings.topic_responses],
            settings.quality_group,
            max_records=5000,
            max_wait_ms=100,
            idle_wait_ms=BACKGROUND_IDLE_WAIT_MS,  # counts, not answers: no hurry when idle
            worker="quality",
        )

        async def ready() -> dict[str, bool]:
            checks = await readiness(quality, redis)
            return {**checks, "broker": checks["broker"] and exporter.last_ok}

        await quality.start()
        try:
            quality.supervise("lag-exporter", exporter.run)
            async with serving(settings, "ops", redis, ready):
                await quality.run(QualityCounts(QualityJoin(settings), redis).add)
        finally:
            await quality.stop()
            exporter.close()


def build_app(settings: Settings | None = None) -> faust.App:
    """The Faust app of the ops worker."""
    return worker_app("rtrec-ops-app", export_lag, settings)


def main() -> None:
    run_module(build_app)


if __name__ == "__main__":
    main()
