"""The Faust application every rtrec worker process runs in.

Faust owns the process: signal handling, logging, service start/stop. JSON is
the only serializer configured (never pickle); Faust's own web server is off, since
metrics and health endpoints are served by ``workers.metrics`` on ``RTREC_METRICS_PORT``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from rtrec.stream.connections import kafka_bootstrap
from rtrec.stream.settings import Settings, get_settings


def make_app(name: str, settings: Settings, **overrides: Any) -> faust.App:
    datadir = settings.run_dir / "faust" / name
    datadir.parent.mkdir(parents=True, exist_ok=True)
    conf: dict[str, Any] = dict(
        broker=f"kafka://{kafka_bootstrap(settings)}",
        store="memory://",
        value_serializer="json",
        key_serializer="raw",
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.heartbeat_interval_ms / 1000,
        consumer_auto_offset_reset="earliest",
        datadir=str(datadir),
        broker_credentials=_credentials(settings),
    )
    conf.setdefault("Worker", QuietWorker)
    conf.setdefault("logging_config", _logging_config(settings.log_level))
    conf.update(overrides)
    return faust.App(name, **conf)


class QuietWorker(faust.Worker):
    """Faust's worker without its terminal spinner.

    The spinner writes cursor escape codes (``ESC[?25l`` ...) and "OK ^" to
    stdout, which `rtrec up` sends to `.rtrec/run/*.log`; the banner is turned
    off by `--quiet` in `run_worker`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spinner = None


#: Chatty libraries: at INFO they log every service start/stop and rebalance step.
_THIRD_PARTY = ("faust", "mode", "aiokafka", "kafka")


def _logging_config(level: str) -> dict[str, Any]:
    """Merged into Faust's own logging setup: rtrec's loggers at `level`, libraries at WARNING
    unless DEBUG was asked for."""
    third = "DEBUG" if level.upper() == "DEBUG" else "WARNING"
    return {"merge": True, "version": 1, "loggers": {name: {"level": third} for name in _THIRD_PARTY}}


def _credentials(settings: Settings) -> Any:
    if settings.kafka_sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None,
            mechanism=settings.kafka_sasl_mechanism,
        )
    if settings.kafka_security_protocol == "SSL":
        import ssl

        return faust.SSLCredentials(ssl.create_default_context(cafile=settings.kafka_ssl_cafile))
    return None


def worker_app(name: str, work: Callable[[Settings], Awaitable[None]], settings: Settings | None = None) -> faust.App:
    """A worker's Faust app: one task, `work(settings)`, run from the worker's start until it is told to stop."""
    settings = settings or get_settings()
    app = make_app(name, settings)

    @app.task
    async def run() -> None:
        await work(settings)

    return app


def run_module(build_app: Callable[[Settings], faust.App]) -> None:
    """`python -m rtrec.workers.<kind>`: settings from the environment, logging, then the app's worker."""
    settings = get_settings()
    logging.basicConfig(level=settings.log_level)
    run_worker(build_app(settings), settings)


def run_worker(app: faust.App, settings: Settings) -> None:
    """Run the app's worker in this process until SIGTERM/SIGINT."""
    level = {"WARNING": "warn", "CRITICAL": "crit"}.get(settings.log_level.upper(), settings.log_level.lower())
    # --quiet: no banner (the worker's log is a file, not a terminal)
    sys.argv = [sys.argv[0], "--quiet", "worker", "--loglevel", level, "--without-web"]
    app.main()
