"""Publishing events and requests with kafka-python: validated before they leave the process."""

from __future__ import annotations

import json
from typing import Any, Iterable

from kafka import KafkaProducer

from stream.connections import kafka_bootstrap, kafka_python_auth
from stream.events import Event, event_from_dict
from stream.rec_messages import RecRequest
from stream.settings import Settings


def make_kafka_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A batching producer (linger + large batches); acks=all so an ack means stored."""
    kw: dict[str, Any] = dict(
        bootstrap_servers=kafka_bootstrap(settings),
        linger_ms=settings.producer_linger_ms,
        batch_size=256 * 1024,
        acks="all",
        retries=5,
        client_id="rtrec-producer",
        **kafka_python_auth(settings),
    )
    kw.update(overrides)
    return KafkaProducer(**kw)


class EventProducer:
    """Validates events and sends them keyed by user_id (so a user's events stay in order).

    Invalid events raise ``InvalidEvent`` here, before reaching the broker:
    the dead-letter path on the worker side is for producers that do not use this client.
    """

    def __init__(self, settings: Settings, producer: KafkaProducer | None = None) -> None:
        self.settings = settings
        self._producer = producer or make_kafka_producer(settings)
        self.sent = 0

    def send(self, event: Event | dict[str, Any], now_ms: int | None = None) -> Event:
        if not isinstance(event, Event):
            event = event_from_dict(event, self.settings, now_ms)
        self._producer.send(
            self.settings.topic_events, key=event.user_id.encode(), value=event.to_json()
        )
        self.sent += 1
        return event

    def send_many(self, events: Iterable[Event | dict[str, Any]], now_ms: int | None = None) -> int:
        n = 0
        for event in events:
            self.send(event, now_ms)
            n += 1
        return n

    def send_raw(self, value: bytes, key: bytes | None = None, topic: str | None = None) -> None:
        """Send bytes unvalidated (tests and tools that exercise the dead-letter path)."""
        self._producer.send(topic or self.settings.topic_events, key=key, value=value)

    def send_request(self, request: RecRequest) -> None:
        self._producer.send(
            self.settings.topic_requests, key=request.user_id.encode(), value=request.to_json()
        )

    def flush(self, timeout: float | None = 30) -> None:
        self._producer.flush(timeout)

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()

    def __enter__(self) -> "EventProducer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
