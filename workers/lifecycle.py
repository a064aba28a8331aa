"""What every long-running worker does around its own work, written once.

A worker (state, recommend, trainer, ops) connects to Redis once the broker and Redis answer
(workers/startup.py waits for them), serves ``/metrics`` and ``/readyz``, and announces itself
ready: ``rtrec up`` and the tests wait for that announcement (workers/stack.py ``wait_ready``
counts the live pids in the set). On the way out, whatever stopped the work, the same steps are
undone in reverse order. Each worker module then reads top to bottom as what it consumes, what
it does per batch and what it produces.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rtrec.stream.connections import aiokafka_auth, async_redis_client, kafka_bootstrap
from rtrec.stream.keys import workers_ready
from rtrec.stream.settings import Settings
from rtrec.workers.faults import is_transient
from rtrec.workers.metrics import Readiness, serve
from rtrec.workers.runtime import ConsumerRuntime
from rtrec.workers.startup import retry_until, wait_for_services

log = logging.getLogger(__name__)


@asynccontextmanager
async def worker_redis(settings: Settings) -> AsyncIterator[Redis]:
    """The worker's Redis client, handed out once rtrec's topics exist and Redis answers
    (waited for up to RTREC_STARTUP_TIMEOUT_S), and closed when the worker stops."""
    redis = async_redis_client(settings)
    try:
        await wait_for_services(settings, redis)
        yield redis
    finally:
        await redis.aclose()


@asynccontextmanager
async def worker_producer(settings: Settings, **options: Any) -> AsyncIterator[AIOKafkaProducer]:
    """A started producer that waits for every in-sync replica (acks=all), stopped when the worker stops."""
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap(settings), acks="all", **options, **aiokafka_auth(settings)
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


@asynccontextmanager
async def consuming(consumer: ConsumerRuntime) -> AsyncIterator[ConsumerRuntime]:
    """The consumer started (group joined) for the block, stopped after it (its side tasks too)."""
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


@asynccontextmanager
async def serving(settings: Settings, kind: str, redis: Redis, ready: Readiness) -> AsyncIterator[None]:
    """/metrics and /readyz served, and the worker announced ready, for the life of the block."""
    metrics_server = await serve(settings.metrics_port, ready)
    try:
        await announce_ready(redis, kind, settings.startup_timeout_s)
        yield
    finally:
        if metrics_server is not None:
            await metrics_server.cleanup()
        await announce_gone(redis, kind)


async def announce_ready(redis: Redis, kind: str, timeout_s: float = 120.0) -> None:
    """Add this process to the kind's ready set.

    Retried while Redis is slow or away, up to `timeout_s`: a worker must not crash at start
    because one write timed out (seen under load with a short RTREC_REDIS_TIMEOUT_S).
    """
    await retry_until(
        lambda: redis.sadd(workers_ready(kind), str(os.getpid())), time.monotonic() + timeout_s, is_transient
    )


async def announce_gone(redis: Redis, kind: str) -> None:
    """Leave the ready set. Best effort: a worker stopping while Redis is away leaves a stale pid,
    which readers ignore (they count live pids only)."""
    try:
        await redis.srem(workers_ready(kind), str(os.getpid()))
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        log.info("could not leave the %s ready set (%s: %s)", kind, type(exc).__name__, exc)
