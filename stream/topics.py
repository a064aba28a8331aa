"""The topics rtrec uses, created idempotently with the admin API."""

from __future__ import annotations

import time

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from stream.connections import kafka_bootstrap, kafka_python_auth
from stream.settings import Settings


def topic_names(settings: Settings) -> list[str]:
    return [
        settings.topic_events,
        settings.topic_requests,
        settings.topic_responses,
        settings.topic_dead_letters,
        settings.topic_model_updates,
    ]


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
