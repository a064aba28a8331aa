"""Consumer lag per group and partition, in messages and in seconds (`rtrec lag`).

Lag in messages is the partition's log-end offset minus the group's committed
offset. Lag in seconds is the age of the oldest unconsumed message: the broker
timestamp of the record at the committed offset, read with a group-less
consumer (it commits nothing and joins no group). That is exact rather than
interpolated, at the cost of one fetch per lagging partition, which is fine
for a monitor that runs every few seconds. A group with no committed offset
on some partition is measured there from the partition's start; a group that
never committed anything is left out (it is not running).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient

from stream.connections import kafka_bootstrap, kafka_python_auth
from stream.settings import Settings


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group never committed here
    end: int
    lag: int
    lag_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def rtrec_groups(settings: Settings) -> dict[str, str]:
    """The consumer groups rtrec runs, and the topic each consumes."""
    return {settings.state_group: settings.topic_events, settings.recommend_group: settings.topic_requests,
            settings.trainer_group: settings.topic_events}


class LagMonitor:
    """Reads committed and end offsets; keeps its clients open between `measure` calls."""

    def __init__(self, settings: Settings, groups: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.groups = groups or rtrec_groups(settings)
        auth = kafka_python_auth(settings)
        self.admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap(settings), client_id="rtrec-lag", **auth)
        self.consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap(settings), group_id=None,
                                      enable_auto_commit=False, client_id="rtrec-lag", fetch_max_wait_ms=10, **auth)
        self._known_end: dict[TopicPartition, int] = {}

    def close(self) -> None:
        self.consumer.close()
        self.admin.close()

    def __enter__(self) -> "LagMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def partitions(self, topic: str) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic) or [])]

    def measure(self) -> list[PartitionLag]:
        now_ms = time.time() * 1000
        rows: list[PartitionLag] = []
        for group, topic in self.groups.items():
            parts = self.partitions(topic)
            if not parts:
                continue
            committed = self._committed(group)
            if not committed:
                continue  # a group that never committed (e.g. a trainer that is not running): nothing to say
            reported = self.consumer.end_offsets(parts)
            starts = self.consumer.beginning_offsets(parts)
            ends = {tp: self._true_end(tp, max(reported[tp], committed.get(tp) or 0)) for tp in parts}
            for tp in parts:
                done = committed.get(tp)
                position = done if done is not None else starts[tp]
                lag = max(0, ends[tp] - position)
                age = 0.0
                if lag:
                    ts = self._timestamp_at(tp, position)
                    age = max(0.0, (now_ms - ts) / 1000) if ts is not None else 0.0
                rows.append(PartitionLag(group, topic, tp.partition, done, ends[tp], lag, round(age, 3)))
        return rows

    def _true_end(self, tp: TopicPartition, reported: int) -> int:
        """The log-end offset, checked by reading past what the broker reported.

        Apache Kafka's ListOffsets(latest) is the log end. The embedded Tansu
        broker (0.6) answers with a smaller number (about one per record batch)
        while records have per-record offsets, so here the monitor reads forward
        from the larger of the answer and the end it found last time: on Kafka
        that read comes back empty, on Tansu it finds the real end. Each call
        reads only records produced since the previous one.
        """
        start = max(reported, self._known_end.get(tp, 0))
        self.consumer.assign([tp])
        self.consumer.seek(tp, start)
        end = start
        while True:
            batch = self.consumer.poll(timeout_ms=100, max_records=10_000)
            records = [r for recs in batch.values() for r in recs]
            if not records:
                break
            end = records[-1].offset + 1
        self._known_end[tp] = end
        return end

    def _committed(self, group: str) -> dict[TopicPartition, int]:
        try:
            offsets = self.admin.list_group_offsets({group: None}).get(group, {})
        except Exception:  # an unknown group has committed nothing
            return {}
        return {tp: meta.offset for tp, meta in offsets.items() if meta.offset is not None and meta.offset >= 0}

    def _timestamp_at(self, tp: TopicPartition, offset: int) -> int | None:
        """Broker timestamp (ms) of the record at `offset`, the oldest one not yet consumed."""
        self.consumer.assign([tp])
        self.consumer.seek(tp, offset)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for records in self.consumer.poll(timeout_ms=200, max_records=1).values():
                if records:
                    return records[0].timestamp
        return None


def summarize(rows: Sequence[PartitionLag]) -> dict[str, dict[str, float]]:
    """Per group: total lag in messages and the largest lag in seconds (the alerting figures)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        g = out.setdefault(r.group, {"lag": 0, "max_lag_seconds": 0.0})
        g["lag"] += r.lag
        g["max_lag_seconds"] = max(g["max_lag_seconds"], r.lag_seconds)
    return out


def breaches(rows: Sequence[PartitionLag], max_lag: int | None, max_lag_seconds: float | None) -> list[str]:
    """Groups over a threshold, as readable lines (empty: all within bounds)."""
    out = []
    for group, g in summarize(rows).items():
        if max_lag is not None and g["lag"] > max_lag:
            out.append(f"{group}: {int(g['lag'])} messages behind (> {max_lag})")
        if max_lag_seconds is not None and g["max_lag_seconds"] > max_lag_seconds:
            out.append(f"{group}: {g['max_lag_seconds']:.1f} s behind (> {max_lag_seconds:g} s)")
    return out
