"""Reading a window of the events topic: for training from Kafka instead of a file, and for `rtrec rebuild-state`.

"Up to now" is by broker timestamp: records appended after the read began are
left for next time. The log end is not taken from ListOffsets (the embedded
Tansu broker under-reports it, see workers/lag.py) but from the high watermark
that every fetch response carries: a partition is read to its end once the
consumer's position reaches the high watermark of a fetch made after the read
began, or once it meets a record stamped after the read began.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from rtrec.stream.connections import kafka_bootstrap, kafka_python_auth
from rtrec.stream.events import InvalidEvent, parse_event
from rtrec.stream.settings import Settings

STALL_S = 60.0  # no record and no fetch answer for this long: the broker is gone, the read fails
POLL_MS = 200


class TopicReadError(RuntimeError):
    """The topic could not be read to its end (missing topic, a broker that stopped answering)."""


def iter_topic_records(
    settings: Settings,
    started_ms: int,
    since_ms: int | None = None,
    from_offsets: Mapping[int, int] | None = None,
    resume_at: dict[int, int] | None = None,
    timeout_s: float | None = None,
    max_records: int = 10_000,
) -> Iterator[list[ConsumerRecord]]:
    """Batches of the events topic's records stamped at or before `started_ms`, in offset order per partition.

    Starts at `from_offsets` (partition -> offset; partitions not named from their
    start), else at the last `since_ms` before `started_ms` (records older than that
    are skipped), else at the topic's start. Batches are streamed, never the whole
    topic. When the read completes, `resume_at` (if given) is filled with each
    partition's next offset to read: a later read from there misses nothing.
    `timeout_s` bounds the whole read (it then ends early, quietly); a broker that
    stops answering raises TopicReadError after STALL_S either way.
    """
    consumer = _consumer(settings)
    try:
        parts = _assign(consumer, settings.topic_events, started_ms, since_ms, from_offsets)
        next_offset: dict[TopicPartition, int] = {}
        done: set[TopicPartition] = set()
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        last_progress = time.monotonic()
        while len(done) < len(parts):
            if deadline is not None and time.monotonic() > deadline:
                return
            if time.monotonic() - last_progress > STALL_S:
                raise TopicReadError(
                    f"{settings.topic_events}: the broker sent nothing for {STALL_S:g} s "
                    f"(partitions {sorted(tp.partition for tp in set(parts) - done)} unfinished)"
                )
            batch = consumer.poll(timeout_ms=POLL_MS, max_records=max_records)
            out = _records_in_window(consumer, batch, started_ms, since_ms, next_offset, done)
            caught_up = _caught_up(consumer, [tp for tp in parts if tp not in done])
            if caught_up:
                consumer.pause(*caught_up)
                done |= caught_up
            if batch or caught_up:
                last_progress = time.monotonic()
            if out:
                yield out
        if resume_at is not None:
            resume_at.update(
                {tp.partition: next_offset[tp] if tp in next_offset else consumer.position(tp) for tp in parts}
            )
    finally:
        consumer.close()


def _consumer(settings: Settings) -> KafkaConsumer:
    """A consumer outside any group: the read commits nothing and assigns partitions itself."""
    return KafkaConsumer(
        bootstrap_servers=kafka_bootstrap(settings),
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
        bootstrap_timeout_ms=int(settings.connect_timeout_s * 1000),
        **kafka_python_auth(settings),
    )


def _records_in_window(
    consumer: KafkaConsumer,
    batch: Mapping[TopicPartition, list[ConsumerRecord]],
    started_ms: int,
    since_ms: int | None,
    next_offset: dict[TopicPartition, int],
    done: set[TopicPartition],
) -> list[ConsumerRecord]:
    """The polled records of the window; a partition that meets a later record is done and paused.

    Updates `next_offset` and `done` in place.
    """
    out: list[ConsumerRecord] = []
    for tp, records in batch.items():
        if tp in done:
            continue  # read to its end already: later records are left for the next read
        for rec in records:
            if rec.timestamp > started_ms:  # appended after the read began
                next_offset[tp] = rec.offset
                done.add(tp)
                consumer.pause(tp)
                break
            next_offset[tp] = rec.offset + 1
            if since_ms and rec.timestamp < started_ms - since_ms:
                continue  # older than the window (a seek_to_end Tansu answered too low)
            out.append(rec)
    return out


def _assign(
    consumer: KafkaConsumer, topic: str, started_ms: int, since_ms: int | None, from_offsets: Mapping[int, int] | None
) -> list[TopicPartition]:
    """Assign every partition of `topic` and seek to where the read starts."""
    numbers = consumer.partitions_for_topic(topic)
    if not numbers:
        raise TopicReadError(f"topic {topic!r} does not exist on the broker")
    parts = [TopicPartition(topic, p) for p in sorted(numbers)]
    consumer.assign(parts)
    if from_offsets is not None:
        for tp in parts:
            if tp.partition in from_offsets:
                consumer.seek(tp, from_offsets[tp.partition])
            else:
                consumer.seek_to_beginning(tp)
    elif since_ms:
        found = consumer.offsets_for_times(dict.fromkeys(parts, started_ms - since_ms))
        for tp in parts:
            if found.get(tp):
                consumer.seek(tp, found[tp].offset)
            else:
                consumer.seek_to_end(tp)
    else:
        consumer.seek_to_beginning(*parts)
    return parts


def _caught_up(consumer: KafkaConsumer, parts: list[TopicPartition]) -> set[TopicPartition]:
    """Partitions whose position reached the high watermark of the latest fetch (all fetches began after
    the read did: this consumer was made for it)."""
    out = set()
    for tp in parts:
        end = consumer.highwater(tp)
        if end is not None and consumer.position(tp) >= end:
            out.add(tp)
    return out


def read_topic_events(settings: Settings, since_ms: int | None = None, timeout_s: float = 120) -> list[dict[str, Any]]:
    """Valid events from the topic's start (or the last `since_ms` of broker time) up to now.

    Invalid records are skipped here: the state worker already dead-letters them.
    The result is sorted by event time, ready for training.
    """
    started_ms = int(time.time() * 1000)
    events: list[dict[str, Any]] = []
    for records in iter_topic_records(settings, started_ms, since_ms=since_ms, timeout_s=timeout_s):
        for rec in records:
            try:
                events.append(parse_event(rec.value, settings, started_ms).to_dict())
            except InvalidEvent:
                pass
    events.sort(key=lambda e: e["ts"])
    return events
