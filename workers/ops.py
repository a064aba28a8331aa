"""Ops worker: consumer lag every few seconds (kafka-lag-exporter names) and the online-quality join.

Run as ``python -m workers.ops`` (``rtrec up`` starts one). The measurement is
the same as ``rtrec lag`` (workers/lag.py), done in a thread because the
admin and consumer clients are blocking.
"""

from __future__ import annotations

import asyncio
import logging

from stream.connections import async_redis_client
from stream.settings import Settings, get_settings
from workers.batch_consumer import BatchConsumer
from workers.faust_app import make_app, run_module
from workers.lag import LagMonitor
from workers.metrics import record_lag, serve
from workers.quality import QUALITY_KEY, QualityJoin
from workers.stack import announce_gone, announce_ready

log = logging.getLogger(__name__)


class LagExporter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.monitor: LagMonitor | None = None
        self.last_ok = False

    def measure_once(self) -> int:
        """One measurement published as metrics; returns the number of partitions measured."""
        if self.monitor is None:
            self.monitor = LagMonitor(self.settings)
        rows = self.monitor.measure()
        record_lag(rows)
        return len(rows)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.measure_once)
                self.last_ok = True
            except Exception as exc:  # the broker may be restarting: report not-ready, keep trying
                self.last_ok = False
                log.warning("lag measurement failed: %s", exc)
                if self.monitor is not None:
                    await asyncio.to_thread(self.monitor.close)
                    self.monitor = None
            await asyncio.sleep(self.settings.lag_interval_s)


def build_app(settings: Settings | None = None):
    settings = settings or get_settings()
    app = make_app("rtrec-ops-app", settings)

    @app.task
    async def export_lag() -> None:
        redis = async_redis_client(settings)
        exporter = LagExporter(settings)

        async def ready() -> dict[str, bool]:
            return {"broker": exporter.last_ok, "redis": bool(await redis.ping())}

        metrics_server = await serve(settings.metrics_port, ready)
        join = QualityJoin(settings)
        quality = BatchConsumer(settings, [settings.topic_events, settings.topic_responses], settings.quality_group,
                                max_records=5000, max_wait_ms=100, client_id="rtrec-quality")

        async def add_counts(records) -> None:
            counts = join.handle(records)
            if counts:
                pipe = redis.pipeline(transaction=False)
                for field, n in counts.items():
                    pipe.hincrby(QUALITY_KEY, field, n)
                await pipe.execute()

        await quality.start()
        await announce_ready(redis, "ops")
        try:
            await asyncio.gather(exporter.run(), quality.run(add_counts))
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
