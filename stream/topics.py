"""The topics rtrec uses, created idempotently with the admin API."""

from __future__ import annotations

import re
import time

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import BrokerNotAvailableError, InvalidReplicationFactorError, KafkaError, TopicAlreadyExistsError

from rtrec.stream.connections import kafka_bootstrap, kafka_connect_kwargs, kafka_python_auth
from rtrec.stream.settings import Settings


def topic_names(settings: Settings) -> list[str]:
    """Every topic rtrec creates and uses (internal_topics: all but the default response topic)."""
    return [
        settings.topic_events,
        settings.topic_catalog,
        settings.topic_requests,
        settings.topic_responses,
        settings.topic_dead_letters,
        settings.topic_model_updates,
    ]


LEGAL_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
"""Kafka's own rule (org.apache.kafka.common.internals.Topic): 1..249 chars of this alphabet, not "." or ".."."""


def is_legal_topic_name(name: str) -> bool:
    """Whether Kafka would accept ``name`` as a topic name (checked with fullmatch: no trailing newline)."""
    return isinstance(name, str) and name not in (".", "..") and LEGAL_TOPIC_NAME.fullmatch(name) is not None


def internal_topics(settings: Settings) -> frozenset[str]:
    """Every topic rtrec uses internally: never a legal reply topic.

    That is topic_names() without the default response topic, which requests may name as their reply_topic.
    """
    return frozenset(topic_names(settings)) - {settings.topic_responses}


def ensure_topics(settings: Settings, extra: list[str] | None = None, timeout_s: float = 30) -> None:
    """Create rtrec's topics (settings.partitions each) unless they exist.

    Retries, until `timeout_s` has passed, while the broker is unreachable or still starting (a connection
    refused, a metadata or create request that fails): a compose stack starts the broker and the workers
    together. The last error is raised after the deadline.
    """
    names = topic_names(settings) + list(extra or [])
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _create_missing(settings, names, timeout_s)
            return
        except KafkaError as exc:
            if not _starting(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _starting(exc: KafkaError) -> bool:
    """Errors of a broker that is down or still starting (a single node that has not registered itself yet
    answers a create with InvalidReplicationFactor); any other error is final and raised at once."""
    return bool(getattr(exc, "retriable", False)) or isinstance(
        exc, (BrokerNotAvailableError, InvalidReplicationFactorError)
    )


def _create_missing(settings: Settings, names: list[str], timeout_s: float) -> None:
    admin = KafkaAdminClient(
        bootstrap_servers=kafka_bootstrap(settings),
        client_id="rtrec-admin",
        **kafka_python_auth(settings),
        **kafka_connect_kwargs(settings, timeout_s),
    )
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, settings.partitions, settings.replication_factor) for name in names if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
