"""Consumer lag per group and partition, in messages and in seconds (`rtrec lag`).

Lag in messages is the partition's log-end offset minus the group's committed
offset. Lag in seconds is the age of the oldest unconsumed message: the broker
timestamp of the record at the committed offset. Both come from one fetch at
the committed offset by a group-less consumer (it commits nothing and joins
no group): exact rather than interpolated, at one fetch per partition, which
is fine for a monitor that runs every few seconds. A group with no committed offset
on some partition is measured there from the partition's start; a group that
never committed anything is left out (it is not running).

Every group the stack runs is measured (`rtrec_groups`), plus any a user names:
the topics of such a group are the ones it committed offsets on. A broker that
cannot be asked (unreachable, credentials refused, gone mid-measurement) raises
`LagError` within seconds, never "no lag": a monitor that hides an outage as
"nothing committed" is worse than none.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import AuthorizationError, GroupIdNotFoundError, KafkaError, SaslAuthenticationFailedError

from rtrec.stream.catalog import catalog_group
from rtrec.stream.connections import kafka_bootstrap, kafka_python_auth
from rtrec.stream.settings import Settings

# kafka-python waits 30 s by default for a first connection and for each request; a monitor should
# say "broker unreachable" sooner. Measured against 127.0.0.1:1 and an unused port: the constructor
# fails after CONNECT_TIMEOUT_MS (the admin client is built first and nothing more is tried).
CONNECT_TIMEOUT_MS = 5000
REQUEST_TIMEOUT_MS = 5000
PROBE_TIMEOUT_S = 5.0
_CLIENT_TIMEOUTS = {
    "bootstrap_timeout_ms": CONNECT_TIMEOUT_MS,
    "request_timeout_ms": REQUEST_TIMEOUT_MS,
    "reconnect_backoff_max_ms": 1000,
}

GroupTopics = Mapping[str, "str | Sequence[str]"]


class LagError(RuntimeError):
    """The broker could not be asked; the message is one line: what failed and what to check."""


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


def rtrec_groups(settings: Settings) -> dict[str, list[str]]:
    """Every consumer group the stack runs and the topics it consumes (the quality join reads two)."""
    groups: dict[str, list[str]] = {}
    for group, topics in (
        (settings.state_group, [settings.topic_events]),
        (catalog_group(settings), [settings.topic_catalog]),
        (settings.recommend_group, [settings.topic_requests]),
        (settings.trainer_group, [settings.topic_events]),
        (settings.quality_group, [settings.topic_events, settings.topic_responses]),
    ):
        known = groups.setdefault(group, [])  # two roles sharing a group name: the union of their topics
        known.extend(t for t in topics if t not in known)
    return groups


def normalise_groups(groups: GroupTopics) -> dict[str, list[str]]:
    """{group: [topic, ...]}; a bare topic name (the older one-topic shape) becomes a one-item list."""
    return {group: [topics] if isinstance(topics, str) else list(topics) for group, topics in groups.items()}


def _hint(exc: BaseException) -> str:
    """What a user can do about `exc`."""
    if isinstance(exc, SaslAuthenticationFailedError):
        return "check RTREC_KAFKA_SASL_USERNAME / RTREC_KAFKA_SASL_PASSWORD"
    if isinstance(exc, AuthorizationError):
        return "grant this principal Describe on the consumer groups and topics"
    return "check that the broker is running and RTREC_KAFKA_BOOTSTRAP points at it"


def lag_error(bootstrap: str, doing: str, exc: BaseException) -> LagError:
    """One line (kafka-python messages may span several): what failed, why, what to check."""
    name = type(exc).__name__
    text = str(exc) if name in str(exc) else f"{name}: {exc}"  # most KafkaErrors name their class
    detail = " ".join(text.split())[:300]
    return LagError(f"cannot {doing} at {bootstrap} ({detail}); {_hint(exc)}")


class LagMonitor:
    """Reads committed and end offsets; keeps its clients open between `measure` calls.

    `groups` maps a group to its topics (default: `rtrec_groups`); `extra_groups` are measured on
    the topics they committed offsets on. Raises LagError when the broker cannot be reached.
    """

    def __init__(self, settings: Settings, groups: GroupTopics | None = None, extra_groups: Sequence[str] = ()) -> None:
        self.settings = settings
        self.groups = normalise_groups(groups or rtrec_groups(settings))
        for group in extra_groups:
            self.groups.setdefault(group, [])  # []: the topics it committed on
        self.bootstrap = kafka_bootstrap(settings)
        try:
            self.admin, self.consumer = self._connect()
        except (KafkaError, OSError) as exc:
            raise lag_error(self.bootstrap, "reach the Kafka broker", exc) from exc

    def _connect(self) -> tuple[KafkaAdminClient, KafkaConsumer]:
        """Both clients, or neither: the admin client is closed again if the consumer cannot connect."""
        auth = {
            **kafka_python_auth(self.settings),
            **_CLIENT_TIMEOUTS,
            "bootstrap_timeout_ms": int(self.settings.connect_timeout_s * 1000),
        }  # RTREC_CONNECT_TIMEOUT_S
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="rtrec-lag", **auth)
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=None,
                enable_auto_commit=False,
                client_id="rtrec-lag",
                fetch_max_wait_ms=10,
                **auth,
            )
        except BaseException:
            admin.close()
            raise
        return admin, consumer

    def close(self) -> None:
        self.consumer.close()
        self.admin.close()

    def __enter__(self) -> LagMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def partitions(self, topic: str) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic) or [])]

    def measure(self) -> list[PartitionLag]:
        """One row per partition of every group that committed something; LagError if the broker cannot answer."""
        try:
            return [row for group, topics in self.groups.items() for row in self._measure_group(group, topics)]
        except (KafkaError, OSError) as exc:  # OSError includes TimeoutError from _probe
            raise lag_error(self.bootstrap, "measure consumer lag", exc) from exc

    def _measure_group(self, group: str, topics: list[str]) -> list[PartitionLag]:
        committed = self._committed(group)
        if not committed:
            return []  # a group that never committed (e.g. a trainer that is not running): nothing to say
        rows: list[PartitionLag] = []
        for topic in topics or sorted({tp.topic for tp in committed}):
            rows += self._measure_topic(group, topic, committed)
        return rows

    def _measure_topic(self, group: str, topic: str, committed: dict[TopicPartition, int]) -> list[PartitionLag]:
        parts = self.partitions(topic)
        if not parts:
            return []  # the topic does not exist (yet)
        starts = self.consumer.beginning_offsets(parts)
        rows = []
        for tp in parts:
            done = committed.get(tp)
            position = done if done is not None else starts[tp]
            end, oldest_ts = self._probe(tp, position)
            now_ms = time.time() * 1000  # at the probe, not the start of `measure`: that spans many fetches
            age = max(0.0, (now_ms - oldest_ts) / 1000) if oldest_ts is not None else 0.0
            rows.append(PartitionLag(group, topic, tp.partition, done, end, end - position, round(age, 3)))
        return rows

    def _committed(self, group: str) -> dict[TopicPartition, int]:
        """The group's committed offsets. Only a group the broker does not know counts as "nothing
        committed" (Kafka and Tansu answer {} or GROUP_ID_NOT_FOUND); any other failure is a LagError."""
        try:
            offsets = self.admin.list_group_offsets({group: None}).get(group, {})
        except GroupIdNotFoundError:
            return {}
        except (KafkaError, OSError) as exc:
            raise lag_error(self.bootstrap, f"read the committed offsets of group {group!r}", exc) from exc
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
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while time.monotonic() < deadline:
            records = self.consumer.poll(timeout_ms=200, max_records=1).get(tp, [])
            end = self.consumer.highwater(tp)
            if end is None:
                continue  # no fetch answered yet
            if end <= position:
                return position, None
            if records:
                return end, records[0].timestamp
        raise TimeoutError(f"{tp.topic}[{tp.partition}]: no fetch answer within {PROBE_TIMEOUT_S:g} s")


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
