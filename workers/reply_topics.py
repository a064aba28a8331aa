"""Which reply topics exist: a request may only be answered on a topic that is already there.

Sending to a topic the broker does not know either auto-creates it (the
embedded broker, or Kafka with ``auto.create.topics.enable``) or waits for its
metadata until a timeout: one made-up name per request would create topics
without bound, or hold the batch. So the worker sends only to topics listed in
the broker's metadata (a metadata request for *all* topics never creates one),
refreshed at most once per ``REFRESH_S`` when a request names one it has not
seen. Operators create ``rec-responses.<app>`` topics ahead, like any topic.
"""

from __future__ import annotations

import time

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

REFRESH_S = 1.0


class ReplyTopics:
    """A cache of the broker's topic names, refreshed on a miss (rate-limited)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self.known: frozenset[str] = frozenset()
        self._refreshed = float("-inf")

    async def exists(self, topic: str) -> bool:
        if topic not in self.known and time.monotonic() - self._refreshed >= REFRESH_S:
            self._refreshed = time.monotonic()
            try:
                metadata = await self.producer.client.fetch_all_metadata()
            except KafkaError as exc:  # the broker's fault, not the request's: retry the batch
                raise KafkaConnectionError(f"topic metadata unavailable: {exc}") from exc
            self.known = frozenset(metadata.topics())
        return topic in self.known
