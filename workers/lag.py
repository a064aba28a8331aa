"""Consumer lag per group and partition, in messages and in seconds (`rtrec lag`).

Lag in messages is the partition's log-end offset minus the group's committed
offset. Lag in seconds is the age of the oldest unconsumed message: the broker
timestamp of the record at the committed offset. Both come from one fetch at
the committed offset by a group-less consumer (it commits nothing and joins
no group): exact rather than interpolated, at one fetch per partition, which
is fine for a monitor that runs every few seconds. A group with no committed offset
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
            starts = self.consumer.beginning_offsets(parts)
            for tp in parts:
                done = committed.get(tp)
                position = done if done is not None else starts[tp]
                end, oldest_ts = self._probe(tp, position)
                age = max(0.0, (now_ms - oldest_ts) / 1000) if oldest_ts is not None else 0.0
                rows.append(PartitionLag(group, topic, tp.partition, done, end, end - position, round(age, 3)))
        return rows

    def _committed(self, group: str) -> dict[TopicPartition, int]:
        try:
            offsets = self.admin.list_group_offsets({group: None}).get(group, {})
        except Exception:  # an unknown group has committed nothing
            return {}
        return {tp: meta.offset for tp, meta in offsets.items() if meta.offset is not None and meta.offset >= 0}

    def _probe(self, tp: TopicPartition, position: int) -> tuple[int, int | None]:
        """(log-end offset, broker timestamp of the record at `position` or None if there is none).

        The log end is the high watermark of a fetch response. ListOffsets(latest) would
        do on Apache Kafka, but the embedded Tansu broker (0.6) under-reports it (about one
        offset per record batch) while its fetch responses carry the true high watermark.
        One fetch from `position` gives both figures.
        """
        self.consumer.unsubscribe()  # fresh partition state: no high watermark left from a previous probe
        self.consumer.assign([tp])
        self.consumer.seek(tp, position)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            records = self.consumer.poll(timeout_ms=200, max_records=1).get(tp, [])
            end = self.consumer.highwater(tp)
            if end is None:
                continue  # no fetch answered yet
            if end <= position:
                return position, None
            if records:
                return end, records[0].timestamp
        raise TimeoutError(f"{tp}: no fetch answer within 5 s")

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
