"""A worker's first contact with the broker and Redis, retried until RTREC_STARTUP_TIMEOUT_S.

`docker compose up` (or any orchestrator) may start a worker before Kafka or Redis accept
connections; the worker waits for them instead of crashing, and gives up with one log line
naming what it waited for once the deadline has passed (the container's restart policy takes
over from there).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kafka.errors import KafkaError
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rtrec.stream.embedded import mask_url
from rtrec.stream.settings import Settings
from rtrec.stream.topics import ensure_topics

log = logging.getLogger(__name__)
T = TypeVar("T")


class StartupTimeout(RuntimeError):
    """The broker or Redis did not answer within RTREC_STARTUP_TIMEOUT_S."""


async def wait_for_services(settings: Settings, redis_client=None, topics: bool = True) -> None:
    """Create rtrec's topics (waiting for the broker) and PING Redis (waiting for it), both within one deadline."""
    budget = settings.startup_timeout_s
    deadline = time.monotonic() + budget
    if topics:
        try:
            await asyncio.to_thread(ensure_topics, settings, None, budget)
        except KafkaError as exc:  # ensure_topics retried what waiting can fix, until the deadline
            raise StartupTimeout(
                f"could not create rtrec's topics on the broker at {settings.kafka_bootstrap} "
                f"(retried up to RTREC_STARTUP_TIMEOUT_S={budget:g} s): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if redis_client is None:
        return

    def worth_waiting(exc: BaseException) -> bool:  # a wrong password does not get better by waiting
        return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)) and not isinstance(
            exc, AuthenticationError
        )

    def waiting(exc: BaseException) -> None:
        log.info("waiting for Redis (%s: %s)", type(exc).__name__, exc)

    try:
        await retry_until(redis_client.ping, deadline, worth_waiting, waiting)
    except AuthenticationError:
        raise
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StartupTimeout(
            f"Redis at {mask_url(settings.redis_url)} did not answer within "
            f"RTREC_STARTUP_TIMEOUT_S={budget:g} s: {type(exc).__name__}: {exc}"
        ) from exc


async def retry_until(
    call: Callable[[], Awaitable[T]],
    deadline: float,
    worth_waiting: Callable[[BaseException], bool],
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """`await call()` until it succeeds; a failure `worth_waiting` rejects, or one past `deadline` (monotonic
    time), is raised. Backoff 0.2 s, doubling to 2 s: start-up waits for servers that are still coming up."""
    delay = 0.2
    while True:
        try:
            return await call()
        except Exception as exc:
            if not worth_waiting(exc) or time.monotonic() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)
