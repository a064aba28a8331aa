"""The topics rtrec uses, created idempotently with the admin API."""

from __future__ import annotations

import re
import time

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from stream.connections import kafka_bootstrap, kafka_connect_kwargs, kafka_python_auth
from stream.settings import Settings


def topic_names(settings: Settings) -> list[str]:
    return [
        settings.topic_events,
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
    """Create rtrec's topics (settings.partitions each) unless they exist; retries while the broker starts."""
    names = topic_names(settings) + list(extra or [])
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=kafka_bootstrap(settings),
                client_id="rtrec-admin",
                **kafka_python_auth(settings),
                **kafka_connect_kwargs(settings, timeout_s),
            )
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, settings.partitions, settings.replication_factor)
            for name in names
            if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
