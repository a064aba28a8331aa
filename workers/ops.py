"""Ops worker: consumer lag every few seconds (kafka-lag-exporter names) and the online-quality join.

Run as ``python -m rtrec.workers.ops`` (``rtrec up`` starts one). The measurement is
the same as ``rtrec lag`` (workers/lag.py), done in a thread because the
admin and consumer clients are blocking.
"""

from __future__ import annotations

import asyncio
import logging

from rtrec.stream.connections import async_redis_client
from rtrec.stream.keys import QUALITY
from rtrec.stream.settings import Settings, get_settings
from rtrec.workers.faust_app import make_app, run_module
from rtrec.workers.lag import LagError, LagMonitor
from rtrec.workers.metrics import readiness, record_lag, serve
from rtrec.workers.quality import QualityJoin
from rtrec.workers.runtime import ConsumerRuntime
from rtrec.workers.stack import announce_gone, announce_ready
from rtrec.workers.startup import wait_for_services

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
            except Exception as exc:  # the broker may be restarting: report not-ready, keep trying
                await self._failed(exc)
            await asyncio.sleep(self.settings.lag_interval_s)

    async def _failed(self, exc: Exception) -> None:
        """Log one line (a LagError already says what to check) and reconnect on the next try."""
        self.last_ok = False
        text = str(exc) if isinstance(exc, LagError) else f"{type(exc).__name__}: {exc}"
        log.warning("lag measurement failed: %s", " ".join(text.split()))
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            await asyncio.to_thread(monitor.close)


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


def build_app(settings: Settings | None = None):
    settings = settings or get_settings()
    app = make_app("rtrec-ops-app", settings)

    @app.task
    async def export_lag() -> None:
        redis = async_redis_client(settings)
        await wait_for_services(settings, redis)  # until RTREC_STARTUP_TIMEOUT_S
        exporter = LagExporter(settings)
        join = QualityJoin(settings)
        quality = ConsumerRuntime(settings, [settings.topic_events, settings.topic_responses],
                                  settings.quality_group, max_records=5000, max_wait_ms=100, worker="quality")

        async def ready() -> dict[str, bool]:
            checks = await readiness(quality, redis)
            return {**checks, "broker": checks["broker"] and exporter.last_ok}

        metrics_server = await serve(settings.metrics_port, ready)
        await quality.start()
        quality.supervise("lag-exporter", exporter.run)
        await announce_ready(redis, "ops", settings.startup_timeout_s)
        try:
            await quality.run(QualityCounts(join, redis).add)
        finally:
            await quality.stop()
            if metrics_server is not None:
                await metrics_server.cleanup()
            await announce_gone(redis, "ops")
            if exporter.monitor is not None:
                exporter.monitor.close()
            await redis.aclose()

    return app


def main() -> None:
    run_module(build_app)


if __name__ == "__main__":
    main()
