"""Helpers shared by the test modules: waiting for a condition, running the CLI, scraping metrics,
a tiny checkpoint, and comparing live state with a reference.

Test modules import these from here, never from each other, so that running one test file
never collects (or depends on the fixtures of) another.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rtrec.stream.settings import Settings

RTREC = [sys.executable, "-m", "rtrec.workers.cli"]

# a model small enough to train in a second on a CPU
SMALL = {
    "model_hidden": 32,
    "model_heads": 1,
    "model_layers": 1,
    "model_intermediate": 64,
    "model_max_events": 30,
    "model_item_capacity": 200,
    "finetune_first_epochs": 4,
    "finetune_epochs": 1,
    "finetune_replay_users": 20,
    "promote_min_cases": 5,
    "train_batch_size": 32,
    "drift_enabled": False,
}


def wait_for(predicate: Callable[[], object], timeout_s: float = 20, what: str = "condition"):
    """Poll `predicate` until it returns something truthy (returned) or `timeout_s` passes (AssertionError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def answered_by(client, version: str) -> bool:
    """Read the responses that have arrived at a RecClient; True once one of them came from model `version`."""
    client.poll()
    return any(r.get("model_version") == version for r in client.responses.values())


@contextmanager
def steady_requests(client, users: Sequence[str], k: int = 5, pause_s: float = 0.01) -> Iterator[list[str]]:
    """Send requests for `users` in turn from a thread while the block runs (load during a hot-swap).

    Yields the ids sent so far: a list that grows until the block ends and the sender stops.
    """
    sent: list[str] = []
    stop = threading.Event()

    def load() -> None:
        n = 0
        while not stop.is_set():
            sent.append(client.send(users[n % len(users)], k=k))
            n += 1
            time.sleep(pause_s)  # pacing: a steady stream of requests, not a flood

    sender = threading.Thread(target=load, name="steady-requests")
    sender.start()
    try:
        yield sent
    finally:
        stop.set()
        sender.join()


def run_cli(
    args: list[str], env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        RTREC + args,
        env={**os.environ, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def stack_env(settings: Settings) -> dict[str, str]:
    return {"RTREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "RTREC_REDIS_URL": settings.redis_url}


def scrape(port: int) -> dict[str, float]:
    """A worker's /metrics as {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def tiny_checkpoint(root: Path, events: list[dict], seed: int = 0) -> Path:
    """A saved (not promoted) checkpoint of a SMALL model over the events' vocabulary."""
    import torch

    from rtrec.model.checkpoint import save_checkpoint
    from rtrec.model.histories import user_histories
    from rtrec.model.pipeline import model_meta
    from rtrec.model.sequence_model import build_model
    from rtrec.model.train import vocab_for

    s = Settings(**SMALL)
    vocab = vocab_for(user_histories(events).values(), s)
    torch.manual_seed(seed)
    return save_checkpoint(build_model(s, vocab), vocab, root, model_meta(s))


def assert_state_matches_reference(s: Settings, redis, events: list[dict], tag: str) -> None:
    """Live state of the events' users and items == the same events applied once under a fresh prefix."""
    from rtrec.stream.events import event_from_dict
    from rtrec.stream.state_store import StateStore

    # reference: the same events applied once, in one go, under a fresh prefix of the same server
    reference = StateStore(s, prefix=f"ref-{tag}")
    parsed = [event_from_dict(e, s) for e in events]
    for start in range(0, len(parsed), 2000):
        reference.apply(redis, parsed[start : start + 2000])
    live = StateStore(s)
    users = sorted({e["user_id"] for e in events})
    for got, want in zip(live.fetch(redis, users), reference.fetch(redis, users)):
        assert got.counts == want.counts, got.user_id
        assert [(x.item_id, x.type, x.ts) for x in got.sequence] == [(x.item_id, x.type, x.ts) for x in want.sequence]
        assert got.affinities.keys() == want.affinities.keys()
        for item, value in want.affinities.items():
            assert math.isclose(got.affinities[item], value, rel_tol=1e-6), (got.user_id, item)
    for user in users[:50]:  # independently of the store: plain counting
        mine = [e for e in events if e["user_id"] == user]
        assert int(redis.hget(f"rt:u:{user}:h", "n")) == len(mine)
    now = int(time.time() * 1000)
    items = {e["item_id"] for e in events}
    live_pop = {i: v for i, v in live.decayed_popularity(redis, now).items() if i in items}
    ref_pop = reference.decayed_popularity(redis, now)
    assert live_pop.keys() == ref_pop.keys() == items
    for item in items:
        assert math.isclose(live_pop[item], ref_pop[item], rel_tol=1e-6), item


TINY_TRAINED = {
    "model_hidden": 64,
    "model_heads": 1,
    "model_layers": 1,
    "model_intermediate": 128,
    "model_max_events": 20,
    "model_item_capacity": 120,
    "train_epochs": 2,
}
"""A model small enough to train in seconds that still ranks its training users' next items."""


def trained_checkpoint(root: Path, events: list[dict], settings: Settings | None = None, seed: int = 0) -> Path:
    """A saved checkpoint of a model trained on `events` (TINY_TRAINED unless `settings` says otherwise)."""
    import torch

    from rtrec.model.checkpoint import save_checkpoint
    from rtrec.model.histories import user_histories
    from rtrec.model.pipeline import model_meta
    from rtrec.model.sequence_model import build_model
    from rtrec.model.train import train_model, vocab_for

    s = settings or Settings(**TINY_TRAINED)
    hist = list(user_histories(events).values())
    vocab = vocab_for(hist, s)
    torch.manual_seed(seed)
    model = build_model(s, vocab)
    train_model(model, vocab, hist, s, torch.device("cpu"), progress=False)
    return save_checkpoint(model, vocab, root, model_meta(s))


def run_worker_batch(
    settings: Settings,
    recommender,
    requests: list[bytes],
    *,
    diversity: int = 0,
    expected: int | None = None,
    swap_to=None,
    candidate=None,
) -> list[dict]:
    """Hand `requests` to an in-process RecommendWorker as one batch (on the real broker and Redis);
    return the responses read back from a response topic of its own.

    `swap_to`: a recommender swapped in before the batch, as the model watcher does; `candidate`:
    the worker's A/B candidate.
    """
    import asyncio
    import json
    import uuid

    from aiokafka import AIOKafkaProducer, ConsumerRecord
    from kafka import KafkaConsumer, TopicPartition

    from rtrec.stream.connections import async_redis_client, kafka_bootstrap
    from rtrec.stream.topics import ensure_topics
    from rtrec.workers.dead_letters import DeadLetters
    from rtrec.workers.recommend import RecommendWorker

    topic = f"responses-{uuid.uuid4().hex[:8]}"
    s = settings.model_copy(update={"topic_responses": topic, "diversity_max_per_category": diversity})
    ensure_topics(s)

    async def go() -> None:
        redis = async_redis_client(s)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap(s))
        await producer.start()
        try:
            dead_letters = DeadLetters(s, producer, redis)
            worker = RecommendWorker(s, redis, producer, dead_letters, recommender, candidate=candidate)
            if swap_to is not None:
                worker.recommender = swap_to
            now = int(time.time() * 1000)
            records = [
                ConsumerRecord(s.topic_requests, 0, n, now, 0, b"k", raw, None, len(b"k"), len(raw), [])
                for n, raw in enumerate(requests)
            ]
            await (await worker.handle(records))  # the responses, then their acks
        finally:
            await producer.stop()
            await redis.aclose()

    asyncio.run(go())
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap(s), group_id=None, auto_offset_reset="earliest")
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    out: list[dict] = []
    deadline = time.monotonic() + 20
    while len(out) < (expected or len(requests)) and time.monotonic() < deadline:
        for recs in consumer.poll(timeout_ms=200).values():
            out += [json.loads(r.value) for r in recs]
    consumer.close()
    return out
