"""Prometheus metrics and health endpoints, served by every worker process on its own port.

Names: the consumer-lag metrics use kafka-lag-exporter's names and labels, so
existing dashboards work; rtrec's own metrics carry the ``rtrec_`` prefix. The
same small aiohttp server (on ``RTREC_METRICS_PORT``; 0 = off) answers
``/metrics``, ``/healthz`` (the process is alive) and ``/readyz`` (connected to
the broker and Redis, and for a serving worker a model loaded).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from redis.exceptions import RedisClusterException, RedisError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# event -> visible and event -> reflected in a response: the targets are p99 < 50 / 100 ms, so 10 ms steps up to 100 ms
FRESHNESS_BUCKETS = (
    *(0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4),
    *(0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300, 900, 3600),
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

# ---- every consumer (workers/runtime.py) --------------------------------------------------------
BATCH_RETRIES = Counter("rtrec_batch_retries_total", "Batches retried after a transient failure", ["worker", "reason"])
CONSUMER_STALLED = Gauge(
    "rtrec_consumer_stalled_seconds",
    "How long the group's current batch has been retried (0: making progress)",
    ["group"],
)
OFFSET_RESETS = Counter(
    "rtrec_offset_resets_total",
    "Partitions reset to their earliest offset: position beyond the log end (log reset)",
    ["worker", "topic"],
)
RECORDS_SKIPPED = Counter(
    "rtrec_records_skipped_total", "Records a reader skipped unread (not its to dead-letter)", ["worker", "reason"]
)
TASK_RESTARTS = Counter(
    "rtrec_task_restarts_total", "Supervised side tasks restarted after a crash", ["worker", "task"]
)
READINESS_FAILURES = Counter(
    "rtrec_readiness_failures_total",
    "Readiness checks that could not answer (not ready); reason: the exception type",
    ["check", "reason"],
)
DEAD_LETTERS_FAILED = Counter(
    "rtrec_dead_letters_failed_total", "Dead letters the broker refused even in their smallest form (logged, dropped)"
)

# ---- state worker ---------------------------------------------------------------------------
EVENTS_PROCESSED = Counter("rtrec_events_processed_total", "Events applied to user state (first time)")
EVENTS_DUPLICATE = Counter("rtrec_events_duplicate_total", "Redelivered events recognised by their event_id")
DEAD_LETTERS = Counter("rtrec_dead_letters_total", "Records sent to the dead-letter topic", ["reason"])
EVENT_TO_STATE = Histogram(
    "rtrec_event_to_state_seconds", "Broker timestamp -> visible in Redis", buckets=FRESHNESS_BUCKETS
)
BATCH_SIZE = Histogram("rtrec_batch_size", "Records per handled batch", ["worker"], buckets=BATCH_BUCKETS)

# ---- recommendation worker -------------------------------------------------------------------
REQUESTS = Counter("rtrec_requests_total", "Recommendation requests answered", ["model_version", "outcome"])
REQUEST_LATENCY = Histogram(
    "rtrec_request_latency_seconds", "Request produced -> response produced", buckets=LATENCY_BUCKETS
)
FRESHNESS = Histogram(
    "rtrec_freshness_seconds",
    "A user's newest event (event time) -> the first response that reflects it",
    buckets=FRESHNESS_BUCKETS,
)
MODEL_INFO = Gauge("rtrec_model_info", "1 for the model version this worker serves", ["version"])
MODEL_SWAPS = Counter("rtrec_model_swaps_total", "Hot-swaps to a new model version")
MODEL_REFUSED = Counter("rtrec_model_swaps_refused_total", "Checkpoints refused (corrupt, tampered, unloadable)")

ONLINE_SERVED = Counter("rtrec_online_served_total", "Model responses joined with later events", ["model_version"])
ONLINE_HITS = Counter(
    "rtrec_online_hits_total",
    "Responses with an item the user then browsed/clicked/bought in the window",
    ["model_version"],
)

# ---- trainer -----------------------------------------------------------------------------------
TRAINER_DECISIONS = Counter("rtrec_trainer_decisions_total", "Fine-tune windows decided", ["promoted"])

# ---- lag (kafka-lag-exporter names) -------------------------------------------------------------
GROUP_LAG = Gauge("kafka_consumergroup_group_lag", "Messages behind the log end", ["group", "topic", "partition"])
GROUP_LAG_SECONDS = Gauge(
    "kafka_consumergroup_group_lag_seconds", "Age of the oldest unconsumed message", ["group", "topic", "partition"]
)
GROUP_MAX_LAG_SECONDS = Gauge(
    "kafka_consumergroup_group_max_lag_seconds", "Largest lag in seconds of a group", ["group"]
)
GROUP_MAX_LAG = Gauge("kafka_consumergroup_group_max_lag", "Largest partition lag in messages of a group", ["group"])
PARTITION_LATEST = Gauge("kafka_partition_latest_offset", "Log-end offset", ["topic", "partition"])
LAG_MEASURE_FAILURES = Counter(
    "rtrec_lag_measure_failures_total",
    "Lag measurements the broker could not answer (the lag gauges are cleared: unknown)",
)


def set_model(version: str) -> None:
    """The info metric shows exactly one version per worker."""
    MODEL_INFO.clear()
    MODEL_INFO.labels(version=version).set(1)


def record_lag(rows) -> None:
    """Publish one `LagMonitor.measure()` result."""
    max_lag_s: dict[str, float] = {}
    max_lag: dict[str, int] = {}
    for r in rows:
        labels = {"group": r.group, "topic": r.topic, "partition": str(r.partition)}
        GROUP_LAG.labels(**labels).set(r.lag)
        GROUP_LAG_SECONDS.labels(**labels).set(r.lag_seconds)
        PARTITION_LATEST.labels(topic=r.topic, partition=str(r.partition)).set(r.end)
        max_lag_s[r.group] = max(max_lag_s.get(r.group, 0.0), r.lag_seconds)
        max_lag[r.group] = max(max_lag.get(r.group, 0), r.lag)
    for group, value in max_lag_s.items():
        GROUP_MAX_LAG_SECONDS.labels(group=group).set(value)
        GROUP_MAX_LAG.labels(group=group).set(max_lag[group])


def record_lag_unknown() -> None:
    """A measurement failed: drop every lag figure (absent = unknown, not "no lag") and count the failure."""
    for gauge in (GROUP_LAG, GROUP_LAG_SECONDS, GROUP_MAX_LAG_SECONDS, GROUP_MAX_LAG, PARTITION_LATEST):
        gauge.clear()
    LAG_MEASURE_FAILURES.inc()


Readiness = Callable[[], Awaitable[dict[str, bool]]]


async def serve(port: int, ready: Readiness) -> web.AppRunner | None:
    """Start /metrics, /healthz and /readyz on `port` (None when the port is 0)."""
    if not port:
        return None

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(_: web.Request) -> web.Response:
        try:
            checks = await ready()
        except Exception as exc:  # a bug in a check (outages are caught there): 503 + traceback, never silent
            READINESS_FAILURES.labels(check="readyz", reason=type(exc).__name__).inc()
            log.exception("readiness check raised (a bug, not an outage: the checks catch outages)")
            checks = {"error": False}
        return web.json_response(checks, status=200 if all(checks.values()) else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


# What an unreachable, slow or refusing broker or Redis raises (wait_for raises TimeoutError).
UNAVAILABLE = (KafkaError, RedisError, RedisClusterException, TimeoutError, OSError)
_failing: set[str] = set()  # checks that failed last time: log a change of state, not every probe


async def readiness(runtime, redis_client, **extra: bool) -> dict[str, bool]:
    """Broker answers a metadata request, Redis answers PING, the runtime is not stalled, plus the worker's own.

    A check that cannot answer is "not ready", counted and logged when it starts failing; any other
    exception (a bug) propagates to /readyz, which logs its traceback.
    """
    checks = {
        "broker": await _answers("broker", runtime.consumer.topics()),
        "redis": await _answers("redis", redis_client.ping()),
    }
    return {**checks, **runtime.checks(), **extra}


async def _answers(check: str, probe: Awaitable[object]) -> bool:
    try:
        ok = bool(await asyncio.wait_for(probe, 2))
    except UNAVAILABLE as exc:
        READINESS_FAILURES.labels(check=check, reason=type(exc).__name__).inc()
        if check not in _failing:
            log.warning("readiness: %s does not answer (%s: %s)", check, type(exc).__name__, exc)
        _failing.add(check)
        return False
    if check in _failing:
        log.info("readiness: %s answers again", check)
        _failing.discard(check)
    return ok
