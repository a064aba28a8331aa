"""Reading a window of the events topic (for training from Kafka instead of a file)."""

from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition

from stream.connections import kafka_bootstrap, kafka_python_auth
from stream.events import InvalidEvent, parse_event
from stream.settings import Settings


def read_topic_events(settings: Settings, since_ms: int | None = None, timeout_s: float = 120) -> list[dict]:
    """Valid events from the topic's start (or the last `since_ms` of broker time) to its current end.

    Invalid records are skipped here: the state worker already dead-letters them.
    The result is sorted by event time, ready for training.
    """
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap(settings), group_id=None,
                             enable_auto_commit=False, **kafka_python_auth(settings))
    try:
        parts = [TopicPartition(settings.topic_events, p)
                 for p in sorted(consumer.partitions_for_topic(settings.topic_events) or [])]
        consumer.assign(parts)
        end = consumer.end_offsets(parts)
        if since_ms:
            start_at = int(time.time() * 1000) - since_ms
            found = consumer.offsets_for_times({tp: start_at for tp in parts})
            for tp in parts:
                consumer.seek(tp, found[tp].offset if found.get(tp) else end[tp])
        else:
            consumer.seek_to_beginning(*parts)
        events: list[dict] = []
        now_ms = int(time.time() * 1000)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in parts) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200, max_records=10_000).values():
                for rec in records:
                    if rec.offset >= end[TopicPartition(rec.topic, rec.partition)]:
                        continue
                    try:
                        events.append(parse_event(rec.value, settings, now_ms).to_dict())
                    except InvalidEvent:
                        pass
    finally:
        consumer.close()
    events.sort(key=lambda e: e["ts"])
    return events
