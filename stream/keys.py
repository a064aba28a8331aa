"""Every Redis key name rtrec uses, in one place, so a key cannot be spelled two ways.

The state store's keys (per user and shared aggregates, their layout and cluster
buckets) are built from a *prefix* by the Lua scripts in stream/state_store.py,
which documents that layout; this module holds the prefix, the rest of the
layout the Python side needs, and every key outside the state: log epochs,
latency samples, online quality, dead-letter counts, worker stats, the serving
model, the stack's ready sets and the rebuild's staging namespace.

The strings are stored data: renaming one orphans what Redis already holds.
"""

from __future__ import annotations

import re

PREFIX = "rt"
"""The root of the live state store's keys (``rt:u:{u}:h``, ``rt:pop``, ...; see stream/state_store.py)."""

STATE_SINGLE_KEYS = frozenset({"pop", "pop:L", "items:n", "stats"})
"""State keys of which a shard holds one each: ``<shard prefix>:<name>``."""

STATE_FAMILIES = ("u:", "covis:")
"""State key families of a shard: one key per user part (``u:{u}:<part>``) and per item (``covis:{i}``)."""

BUCKET_TAG = re.compile(r":\{b\d+\}")
"""What follows the store prefix in a cluster bucket's prefix (``:{b7}``): see bucket_prefix."""

LOGS = "rt:logs"
"""Hash: ``topic:partition`` -> ``epoch:offset:fingerprint``, the incarnation of each events log."""

INGEST_LATENCY = "rt:lat:ingest"
"""List: ms from an event's timestamp to its state being visible, pushed by the state worker when
``record_latency`` is on; the ingest bench reads them."""

ITEM_CATEGORY = "rt:item:category"
"""Hash: item -> category, for filters, diversity re-ranking and the demo (stream/catalog.py)."""

ITEM_UNAVAILABLE = "rt:item:unavailable"
"""Set: items the catalog marks unavailable; never recommended (stream/catalog.py)."""

ITEM_INFO = "rt:item:info"
"""Hash: item -> JSON ``{"title", "price"}`` from the catalog, when it sends them (stream/catalog.py)."""

QUALITY = "rt:quality"
"""Hash: ``<model version>|served`` / ``<model version>|hits`` -> online counts (workers/quality.py)."""

MODEL_SERVING = "rt:model:serving"
"""Hash: recommend worker pid -> the model version it serves (ops reads it)."""

RECOMMEND_STATS = "rt:stats:recommend"
"""Hash: the recommend workers' counters (batches, requests, last model swap)."""

TRAINER_STATS = "rt:stats:trainer"
"""Hash: the trainer's promotion counters and its last decision."""

BENCH_SCRATCH = "rtrec-bench-memory:scratch"
"""Scratch key of the memory bench, outside every state family; deleted again after each use."""

STAGING = "rebuild"
"""The rebuild's staging namespace under a live prefix: ``rt:rebuild``."""


def bucket_prefix(prefix: str, bucket: int) -> str:
    """The prefix of a cluster bucket's keys, ``rt:{b7}``: the hash tag puts them all in one slot."""
    return f"{prefix}:{{b{bucket}}}"


def user_key(user_prefix: str, user_id: str, part: str) -> str:
    """A user's state key, ``rt:u:{u}:h``: `user_prefix` is the store's prefix or the user's bucket prefix."""
    return f"{user_prefix}:u:{user_id}:{part}"


def trending(prefix: str) -> str:
    """Zset: item -> forward-decayed popularity under a store (or shard) prefix, ``rt:pop``."""
    return f"{prefix}:pop"


def staging_prefix(live_prefix: str) -> str:
    """The prefix a rebuild stages its state under, ``rt:rebuild`` (its buckets ``rt:rebuild:{b7}``)."""
    return f"{live_prefix}:{STAGING}"


def rebuild_lock(live_prefix: str) -> str:
    """String: the token of the one rebuild running against a live prefix, ``rt:rebuild:lock``."""
    return f"{staging_prefix(live_prefix)}:lock"


def workers_ready(kind: str) -> str:
    """Set: pids of the workers of one kind (``state``, ``recommend``, ...) that are up, ``rt:workers:state``."""
    return f"{PREFIX}:workers:{kind}"


def dead_letter_counts(prefix: str = PREFIX) -> str:
    """Hash: reason -> dead letters counted, ``rt:dlq``."""
    return f"{prefix}:dlq"


def dead_letter_marker(counts_key: str, topic: str, partition: int, offset: int) -> str:
    """String: set once a source record's dead letter was counted, ``{rt:dlq}:seen:<topic>:<partition>:<offset>``.

    ``{rt:dlq}`` hashes like ``rt:dlq``: marker and counts share a Cluster slot, as the counting script needs.
    """
    return f"{{{counts_key}}}:seen:{topic}:{partition}:{offset}"
