"""Ask for recommendations over Kafka and wait for the answers (correlated by request_id).

The client reads the response topic by direct partition assignment (no
consumer group), positioned at the end before it sends, so it starts in
milliseconds and sees only answers to its own requests.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from rtrec.stream.connections import kafka_bootstrap, kafka_connect_kwargs, kafka_python_auth
from rtrec.stream.producer import make_kafka_producer
from rtrec.stream.rec_messages import NO_FILTER, ItemFilter, RecRequest, parse_filter
from rtrec.stream.settings import Settings


class RecClient:
    def __init__(self, settings: Settings, reply_topic: str | None = None) -> None:
        self.settings = settings
        self.reply_topic = reply_topic or settings.topic_responses
        self.producer = make_kafka_producer(settings, linger_ms=0, client_id="rtrec-client")
        self.consumer = KafkaConsumer(
            bootstrap_servers=kafka_bootstrap(settings),
            enable_auto_commit=False,
            group_id=None,
            client_id="rtrec-client",
            fetch_max_wait_ms=settings.client_fetch_wait_ms,
            **kafka_python_auth(settings),
            **kafka_connect_kwargs(settings),
        )
        self.responses: dict[str, dict[str, Any]] = {}
        self.arrivals: dict[str, float] = {}
        self.duplicates = 0  # answers to a request already answered (a crash between produce and commit)
        partitions = self._partitions()
        self.consumer.assign(partitions)
        self.consumer.seek_to_end(*partitions)
        for tp in partitions:
            self.consumer.position(tp)  # resolve "end" now, before any request is sent

    def _partitions(self, timeout_s: float = 10) -> list[TopicPartition]:
        deadline = time.monotonic() + timeout_s
        while True:
            parts = self.consumer.partitions_for_topic(self.reply_topic)
            if parts:
                return [TopicPartition(self.reply_topic, p) for p in sorted(parts)]
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {self.reply_topic!r} does not exist (is `rtrec up` running?)")
            time.sleep(0.1)

    def send(
        self,
        user_id: str = "",
        k: int = 10,
        exclude_seen: bool = True,
        *,
        item_id: str | None = None,
        candidates: Iterable[str] | None = None,
        filter: ItemFilter | Mapping[str, Any] | None = None,
    ) -> str:
        """Send one request; returns its request_id. The form follows the arguments: a user's top k; with
        `item_id`, items similar to it (`user_id` may be ""); with `candidates`, those items ranked for the
        user. `filter` is an ItemFilter or its wire form ({"categories": [...], ...}), checked here like the
        worker checks it (InvalidEvent); item_id and candidates are sent as given, for the worker to judge."""
        if isinstance(candidates, str):
            raise TypeError("candidates must be a sequence of item ids, not one string")
        request = RecRequest(
            request_id=uuid.uuid4().hex,
            user_id=user_id,
            k=k,
            exclude_seen=exclude_seen,
            reply_topic=None if self.reply_topic == self.settings.topic_responses else self.reply_topic,
            item_id=item_id,
            candidates=None if candidates is None else tuple(candidates),
            filter=as_item_filter(filter, self.settings),
        )
        key = user_id or item_id or request.request_id  # a similar-items request without a user: by its anchor
        self.producer.send(self.settings.topic_requests, key=key.encode(), value=request.to_json())
        return request.request_id

    def poll(self, timeout_ms: int = 50) -> None:
        """Read whatever responses arrived; remember them and when they arrived (perf_counter)."""
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            now = time.perf_counter()
            for rec in records:
                resp = json.loads(rec.value)
                rid = resp.get("request_id")
                if rid and rid in self.responses:
                    self.duplicates += 1
                elif rid:
                    self.responses[rid] = resp
                    self.arrivals[rid] = now

    def collect(self, request_ids: Sequence[str], timeout_s: float = 30) -> dict[str, dict[str, Any]]:
        """Wait for the responses to `request_ids`; returns those that arrived in time."""
        self.producer.flush()
        wanted = set(request_ids)
        deadline = time.monotonic() + timeout_s
        while wanted - self.responses.keys() and time.monotonic() < deadline:
            self.poll()
        return {rid: self.responses[rid] for rid in wanted if rid in self.responses}

    def recommend(
        self,
        user_id: str = "",
        k: int = 10,
        exclude_seen: bool = True,
        timeout_s: float = 30,
        *,
        item_id: str | None = None,
        candidates: Iterable[str] | None = None,
        filter: ItemFilter | Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send one request (any form, see send) and wait for its answer; TimeoutError when none comes."""
        request_id = self.send(user_id, k, exclude_seen, item_id=item_id, candidates=candidates, filter=filter)
        got = self.collect([request_id], timeout_s)
        if request_id not in got:
            raise TimeoutError(f"no response to request {request_id} within {timeout_s}s")
        return got[request_id]

    def close(self) -> None:
        self.producer.close()
        self.consumer.close()

    def __enter__(self) -> RecClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_item_filter(value: ItemFilter | Mapping[str, Any] | None, settings: Settings) -> ItemFilter:
    """An ItemFilter from one, from its wire form (validated as the worker does: InvalidEvent), or from None."""
    if value is None:
        return NO_FILTER
    if isinstance(value, ItemFilter):
        return value
    return parse_filter(dict(value), settings)
