"""The Faust application every rtrec worker process runs in.

Faust owns the process: signal handling, logging, service start/stop. JSON is
the only serializer configured (never pickle); web is off until the ops issue
adds metrics.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

import faust

from stream.connections import kafka_bootstrap
from stream.settings import Settings, get_settings


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
    conf.update(overrides)
    return faust.App(name, **conf)


def _credentials(settings: Settings) -> Any:
    if settings.kafka_sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value()
            if settings.kafka_sasl_password
            else None,
            mechanism=settings.kafka_sasl_mechanism,
        )
    if settings.kafka_security_protocol == "SSL":
        import ssl

        return faust.SSLCredentials(ssl.create_default_context(cafile=settings.kafka_ssl_cafile))
    return None


def run_module(build_app: Callable[[Settings], faust.App]) -> None:
    """`python -m workers.<kind>`: settings from the environment, logging, then the app's worker."""
    settings = get_settings()
    logging.basicConfig(level=settings.log_level)
    run_worker(build_app(settings), settings)


def run_worker(app: faust.App, settings: Settings) -> None:
    """Run the app's worker in this process until SIGTERM/SIGINT."""
    level = {"WARNING": "warn", "CRITICAL": "crit"}.get(settings.log_level.upper(), settings.log_level.lower())
    sys.argv = [sys.argv[0], "worker", "--loglevel", level, "--without-web"]
    app.main()
