"""Publishing events and requests with kafka-python: validated before they leave the process."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from kafka import KafkaProducer

from rtrec.stream.connections import kafka_bootstrap, kafka_connect_kwargs, kafka_python_auth
from rtrec.stream.events import Event, event_from_dict
from rtrec.stream.rec_messages import RecRequest
from rtrec.stream.settings import Settings


def make_kafka_producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    """A batching producer (linger + large batches); acks=all so an ack means stored."""
    kw: dict[str, Any] = dict(
        bootstrap_servers=kafka_bootstrap(settings),
        linger_ms=settings.producer_linger_ms,
        batch_size=256 * 1024,
        acks="all",
        retries=5,
        enable_idempotence=settings.producer_idempotence,
        client_id="rtrec-producer",
        allow_auto_create_topics=False,  # a typo'd topic fails here instead of appearing on the broker
        max_block_ms=int(settings.connect_timeout_s * 1000) + 5000,  # a send waits this long for metadata
        **kafka_python_auth(settings),
        **kafka_connect_kwargs(settings),
    )
    kw.update(overrides)
    return KafkaProducer(**kw)


class DeliveryError(RuntimeError):
    """Messages the broker did not acknowledge after the producer's retries (raised by flush)."""


class EventProducer:
    """Validates events and sends them keyed by user_id (so a user's events stay in order).

    Invalid events raise ``InvalidEvent`` here, before reaching the broker:
    the dead-letter path on the worker side is for producers that do not use this client.
    """

    def __init__(self, settings: Settings, producer: KafkaProducer | None = None) -> None:
        self.settings = settings
        self._producer = producer or make_kafka_producer(settings)
        self.sent = 0
        self.failed = 0  # sends the broker never acknowledged, over this producer's life
        self._unreported: list[BaseException] = []

    def _send(self, topic: str, key: bytes | None, value: bytes) -> None:
        self._producer.send(topic, key=key, value=value).add_errback(self._on_error)

    def _on_error(self, exc: BaseException) -> None:
        self.failed += 1
        self._unreported.append(exc)

    def send(self, event: Event | dict[str, Any], now_ms: int | None = None) -> Event:
        if not isinstance(event, Event):
            event = event_from_dict(event, self.settings, now_ms)
        self._send(self.settings.topic_events, event.user_id.encode(), event.to_json())
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
        self._send(topic or self.settings.topic_events, key, value)

    def send_request(self, request: RecRequest) -> None:
        self._send(self.settings.topic_requests, request.user_id.encode(), request.to_json())

    def flush(self, timeout: float | None = 30) -> None:
        """Wait for every send; raise DeliveryError if any was lost since the last flush (never silently)."""
        self._producer.flush(timeout)
        if self._unreported:
            errors, self._unreported = self._unreported, []
            raise DeliveryError(
                f"{len(errors)} message(s) not delivered to {kafka_bootstrap(self.settings)}: {errors[-1]!r}"
            )

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
