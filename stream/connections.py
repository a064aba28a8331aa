"""Client configuration for Kafka (kafka-python, aiokafka) and Redis, from one Settings.

Auth (SASL/TLS, Redis password) is applied here once, so no worker builds its
own connection arguments and no secret is ever formatted into a log line.
"""

from __future__ import annotations

import ssl
from typing import Any, cast

import redis

from rtrec.stream.settings import Settings


class NotConfigured(RuntimeError):
    """Raised when a server address is needed but neither set nor started by `rtrec up`."""


def kafka_bootstrap(settings: Settings) -> str:
    if not settings.kafka_bootstrap:
        raise NotConfigured("no Kafka broker: run `rtrec up` (embedded Tansu) or set RTREC_KAFKA_BOOTSTRAP")
    return settings.kafka_bootstrap


def redis_url(settings: Settings) -> str:
    if not settings.redis_url:
        raise NotConfigured("no Redis: run `rtrec up` (embedded server) or set RTREC_REDIS_URL")
    return settings.redis_url


def _protocol_and_sasl(settings: Settings) -> dict[str, Any]:
    """The security arguments kafka-python and aiokafka spell alike."""
    kw: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_sasl_mechanism:
        kw["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kw["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            kw["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return kw


def kafka_python_auth(settings: Settings) -> dict[str, Any]:
    """Security arguments in kafka-python's spelling."""
    kw = _protocol_and_sasl(settings)
    if settings.kafka_ssl_cafile:
        kw["ssl_cafile"] = settings.kafka_ssl_cafile
    return kw


def kafka_connect_kwargs(settings: Settings, timeout_s: float | None = None) -> dict[str, Any]:
    """kafka-python arguments that make an unreachable broker fail after RTREC_CONNECT_TIMEOUT_S (default 5 s;
    or `timeout_s` if shorter) instead of after kafka-python's 30 s bootstrap and 60 s send waits."""
    ms = int(min(settings.connect_timeout_s, timeout_s or settings.connect_timeout_s) * 1000)
    return {"bootstrap_timeout_ms": ms, "reconnect_backoff_max_ms": 1000}


def aiokafka_auth(settings: Settings) -> dict[str, Any]:
    """Security arguments in aiokafka's spelling (it wants an SSLContext, not a file)."""
    kw = _protocol_and_sasl(settings)
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        kw["ssl_context"] = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    return kw


def redis_client(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A synchronous Redis client (decode_responses on: ids and fields are text); a RedisCluster in cluster mode."""
    if settings.redis_cluster:
        from redis.cluster import RedisCluster

        cluster = RedisCluster.from_url(redis_url(settings), **_redis_kwargs(settings, cluster=True), **kwargs)
        return cast(redis.Redis, cluster)  # not a Redis subclass, but it answers the commands the callers use
    return redis.Redis.from_url(redis_url(settings), **_redis_kwargs(settings), **kwargs)


def async_redis_client(settings: Settings, **kwargs: Any) -> redis.asyncio.Redis:
    if settings.redis_cluster:
        from redis.asyncio.cluster import RedisCluster

        cluster = RedisCluster.from_url(redis_url(settings), **_redis_kwargs(settings, cluster=True), **kwargs)
        return cast("redis.asyncio.Redis", cluster)  # not a Redis subclass, but it answers the commands the callers use
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(redis_url(settings), **_redis_kwargs(settings), **kwargs)


def is_cluster(client: Any) -> bool:
    """Cluster clients route each script call by its first key and refuse scripts in pipelines."""
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

    return isinstance(client, (RedisCluster, AsyncRedisCluster))


def _redis_kwargs(settings: Settings, cluster: bool = False) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": min(settings.redis_timeout_s, settings.connect_timeout_s),
    }
    if not cluster:
        kw["health_check_interval"] = 30
    if settings.redis_username:
        kw["username"] = settings.redis_username
    if settings.redis_password is not None:
        kw["password"] = settings.redis_password.get_secret_value()
    if settings.redis_ssl_cafile:
        if not redis_url(settings).startswith("rediss://"):
            raise NotConfigured("RTREC_REDIS_SSL_CAFILE is set but RTREC_REDIS_URL is not a rediss:// (TLS) URL")
        kw["ssl_ca_certs"] = settings.redis_ssl_cafile
    return kw
