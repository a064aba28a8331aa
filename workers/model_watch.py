"""Hot-swap for the recommendation worker: follow promotions, load off the event loop, swap between batches.

The served model always converges to the store's CURRENT version. A
`model-updates` message is the fast path (the swap starts within one poll);
a periodic look at CURRENT covers announcements missed while the worker
started and rollbacks made without Kafka. The new checkpoint is loaded and
verified (sha256 of the manifest against the announcement, then of every file)
and warmed up in a thread; only then does one attribute assignment swap it in.
The worker reads that attribute once per batch, so a batch in flight finishes
on the old model and every response names the version that produced it. A
checkpoint that cannot be loaded is refused with the reason logged and
counted, and the current model keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import redis.exceptions
from aiokafka import AIOKafkaConsumer

from rtrec.model.checkpoint import MANIFEST, CheckpointError, sha256_file
from rtrec.model.loader import load_generator, warm_up
from rtrec.model.recommender import GenerativeRecommender
from rtrec.model.store import CheckpointStore
from rtrec.stream.connections import aiokafka_auth, kafka_bootstrap
from rtrec.stream.keys import MODEL_SERVING
from rtrec.stream.settings import Settings
from rtrec.workers.metrics import MODEL_REFUSED, MODEL_SWAPS, set_model

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 10.0  # how long stopping waits for the watch's Kafka consumer to close


class ModelWatcher:
    """Keeps `worker.recommender` on the CURRENT checkpoint."""

    def __init__(self, settings: Settings, worker: Any, redis_client, stats_key: str) -> None:
        self.settings = settings
        self.worker = worker
        self.redis = redis_client
        self.stats_key = stats_key
        self.store = CheckpointStore(settings.checkpoint_dir)
        self.swaps = 0
        self.refused: list[str] = []
        self._lock = asyncio.Lock()
        self._stopping = False
        self.consumer = AIOKafkaConsumer(
            settings.topic_model_updates,
            bootstrap_servers=kafka_bootstrap(settings),
            group_id=None,
            auto_offset_reset="latest",
            client_id="rtrec-model-watch",
            fetch_max_wait_ms=500,  # promotions are rare; the periodic look at CURRENT covers a slow one
            **aiokafka_auth(settings),
        )

    @property
    def serving(self) -> str:
        return self.worker.recommender.version

    async def start(self) -> None:
        await self.consumer.start()
        await self.publish_serving()

    async def stop(self) -> None:
        """Leave the serving set; a consumer that does not close within STOP_TIMEOUT_S is left behind, said once
        (a worker that is stopping must not hang on it)."""
        self._stopping = True  # run() ends at its next poll even if a cancellation was swallowed on the way
        closing = asyncio.ensure_future(self.consumer.stop())
        # asyncio.wait, not wait_for: wait_for waits for the cancelled stop() to finish, and aiokafka's
        # consumer.stop() suppresses CancelledError while it awaits its fetch task
        _, pending = await asyncio.wait({closing}, timeout=STOP_TIMEOUT_S)
        if pending:
            log.warning("model watch: its consumer did not stop within %.0f s; leaving it", STOP_TIMEOUT_S)
        await self.redis.hdel(MODEL_SERVING, str(os.getpid()))

    async def publish_serving(self) -> None:
        await self.redis.hset(MODEL_SERVING, str(os.getpid()), self.serving)

    async def run(self) -> None:
        last_look = 0.0
        while not self._stopping:
            batch = await self.consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for rec in records:
                    await self.on_message(rec.value)
            if time.monotonic() - last_look >= self.settings.model_check_s:
                last_look = time.monotonic()
                await self.follow_current()

    async def on_message(self, raw: bytes) -> None:
        try:
            msg = json.loads(raw)
            version, sha = str(msg["version"]), str(msg["sha256"])
        except (ValueError, KeyError, TypeError) as exc:
            await self._refuse("?", f"unreadable model-updates message ({exc})")
            return
        if version != self.store.current_version():
            log.info("ignoring announcement of %s: CURRENT is %s", version, self.store.current_version())
            return
        await self.swap_to(version, expected_sha256=sha)

    async def follow_current(self) -> None:
        current = self.store.current_version()
        if current and current != self.serving and current not in self.refused:
            await self.swap_to(current)

    async def swap_to(self, version: str, expected_sha256: str | None = None) -> bool:
        """Load, verify and warm `version` in a thread; swap it in. False (and logged) if refused."""
        async with self._lock:
            if version == self.serving:
                return True
            started = time.monotonic()
            previous = self.serving
            try:
                recommender = await asyncio.to_thread(self._load, version, expected_sha256)
            except Exception as exc:  # noqa: BLE001 - corrupt, tampered, wrong shape, unreadable: keep serving
                await self._refuse(version, f"{type(exc).__name__}: {exc}")
                return False
            old, self.worker.recommender = self.worker.recommender, recommender  # between batches
            load_ms = (time.monotonic() - started) * 1000
            self.swaps += 1
            MODEL_SWAPS.inc()
            set_model(version)
            await self._write_stats("swaps", {"last_swap_ms": round(load_ms, 1), "last_swap_version": version})
            log.info(
                "hot-swapped %s -> %s (%s, warmed in %.0f ms)",
                previous,
                version,
                "weights updated in place" if old is recommender else "loaded",
                load_ms,
            )
            if isinstance(old, GenerativeRecommender) and old is not recommender:
                await asyncio.to_thread(old.close)  # a vLLM engine holds memory; torch models are garbage-collected
            return True

    def _load(self, version: str, expected_sha256: str | None) -> GenerativeRecommender:
        path = self.store.path_of(version)  # resolved in our store: a message never names a file to load
        if expected_sha256 is not None and sha256_file(path / MANIFEST) != expected_sha256:
            raise CheckpointError(f"{path}: manifest sha256 differs from the announcement")
        if self.settings.backend == "vllm":
            updated = self._updated_in_place(path)
            if updated is not None:
                return updated
        recommender = load_generator(self.settings, path)
        warm_up(recommender)
        return recommender

    def _updated_in_place(self, path: Path) -> GenerativeRecommender | None:
        """The serving vLLM engine with the new weights, or None when a new engine must be loaded."""
        from rtrec.model.vllm_backend import ShapeChanged, VllmGenerator  # lazy: vLLM is optional

        current = self.worker.recommender
        if not isinstance(current, VllmGenerator):
            return None
        try:  # the same engine, new weights: no second engine in memory, paused only between batches
            current.update_in_place(path)
            warm_up(current)
            return current
        except ShapeChanged as exc:  # e.g. a grown vocabulary: a new engine, then swap the reference
            log.warning("%s; starting a new engine", exc)
            return None

    async def _refuse(self, version: str, reason: str) -> None:
        self.refused.append(version)
        MODEL_REFUSED.inc()
        log.error("refused model %s: %s (still serving %s)", version, reason, self.serving)
        await self._write_stats("swaps_refused", {"last_refusal": f"{version}: {reason}"[:500]})

    async def _write_stats(self, counter: str, fields: dict[str, object]) -> None:
        """Swap stats and the serving version in Redis: best-effort, the swap itself already happened."""
        try:
            await self.redis.hincrby(self.stats_key, counter, 1)
            await self.redis.hset(self.stats_key, mapping=fields)
            await self.publish_serving()
        except redis.exceptions.RedisError as exc:
            log.warning("model stats not written (%s: %s)", type(exc).__name__, exc)
