"""Reading a window of the events topic (for training from Kafka instead of a file)."""

from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition

from stream.connections import kafka_bootstrap, kafka_python_auth
from stream.events import InvalidEvent, parse_event
from stream.settings import Settings


def read_topic_events(settings: Settings, since_ms: int | None = None, timeout_s: float = 120) -> list[dict]:
    """Valid events from the topic's start (or the last `since_ms` of broker time) up to now.

    "Up to now" is by broker timestamp: records appended after the read began are
    left for next time. (The end is not taken from ListOffsets: the embedded Tansu
    broker under-reports it, see workers/lag.py.) Invalid records are skipped
    here: the state worker already dead-letters them. The result is sorted by
    event time, ready for training or replay into Redis.
    """
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap(settings), group_id=None,
                             enable_auto_commit=False, fetch_max_wait_ms=50, **kafka_python_auth(settings))
    started_ms = int(time.time() * 1000)
    try:
        parts = [TopicPartition(settings.topic_events, p)
                 for p in sorted(consumer.partitions_for_topic(settings.topic_events) or [])]
        consumer.assign(parts)
        if since_ms:
            found = consumer.offsets_for_times({tp: started_ms - since_ms for tp in parts})
            for tp in parts:
                if found.get(tp):
                    consumer.seek(tp, found[tp].offset)
                else:
                    consumer.seek_to_end(tp)
        else:
            consumer.seek_to_beginning(*parts)
        events: list[dict] = []
        done: set[TopicPartition] = set()
        empty_polls = 0
        deadline = time.monotonic() + timeout_s
        while len(done) < len(parts) and empty_polls < 3 and time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200, max_records=10_000)
            empty_polls = 0 if batch else empty_polls + 1
            for tp, records in batch.items():
                for rec in records:
                    if rec.timestamp > started_ms:  # appended after the read began
                        done.add(tp)
                        consumer.pause(tp)
                        break
                    if since_ms and rec.timestamp < started_ms - since_ms:
                        continue  # older than the window (a seek_to_end Tansu answered too low)
                    try:
                        events.append(parse_event(rec.value, settings, started_ms).to_dict())
                    except InvalidEvent:
                        pass
    finally:
        consumer.close()
    events.sort(key=lambda e: e["ts"])
    return events
