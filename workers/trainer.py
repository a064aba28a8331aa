"""Incremental trainer: windows of the events topic -> fine-tune -> gate -> promote + announce.

Run as ``python -m rtrec.workers.trainer`` or ``rtrec trainer`` (``rtrec up`` starts
it). It reads the events topic in its own consumer group. A window closes
after `trainer_every_events` events, after `trainer_every_s` seconds with at
least `trainer_min_events`, or early when the drift watch fires. The window's
offsets are committed only after its decision is on disk, and every decision
records the offsets it covered: on restart the trainer starts from the later
of the committed offsets and the last decision's, so no window is skipped and
none is trained on twice, even if it stopped between the two writes.

Freshness (how old the newest event the served model learned from is) is what
the windows are sized for (`rtrec bench freshness`): a due window first reads
what arrived while the last cycle ran, then trains on its newest
`trainer_max_window_events` events only, each user's history cut to
`finetune_history_events` — so a cycle's cost stays bounded at any rate, cycles
run back to back on the newest events, and a trainer slower than the flow
skips ahead instead of falling further behind. The older events of a window
still move its offsets and stay in the users' histories in Redis (the next
windows' context).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from rtrec.model.checkpoint import MANIFEST, Checkpoint, load_checkpoint, save_checkpoint, sha256_file
from rtrec.model.drift import DriftWatch
from rtrec.model.finetune import FineTuneData, GateResult, build_data, fine_tune, gate
from rtrec.model.generator import resolve_device
from rtrec.model.store import CheckpointStore
from rtrec.stream.connections import aiokafka_auth, kafka_bootstrap, redis_client
from rtrec.stream.events import InvalidEvent, parse_event
from rtrec.stream.keys import QUALITY, TRAINER_STATS
from rtrec.stream.settings import Settings, get_settings
from rtrec.stream.state_store import StateReads, StateStore
from rtrec.workers.faults import is_transient
from rtrec.workers.faust_app import run_module, worker_app
from rtrec.workers.lifecycle import serving, worker_redis
from rtrec.workers.metrics import TRAINER_DECISIONS, readiness
from rtrec.workers.quality import hit_rates
from rtrec.workers.runtime import BACKGROUND_IDLE_WAIT_MS, ConsumerRuntime

log = logging.getLogger(__name__)
QUALITY_CHECK_S = 10.0
REPLACED_KEPT = 20  # replaced versions whose online counts the trainer keeps for judging their successors


@dataclass
class Window:
    """Events read since the last decision, and the offsets just past them.

    `keep` bounds the events held (a backlog read after a long cycle): past twice that many, the oldest
    are dropped; they still count in `read` and their offsets are covered.
    """

    events: list[dict[str, Any]] = field(default_factory=list)
    next_offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> offset
    opened: float = field(default_factory=time.monotonic)
    opened_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    keep: int = 0  # 0: no bound
    read: int = 0  # events added, dropped ones included
    newest_record_ms: int = -1  # the newest broker timestamp (producer's send time) of a record read
    due_since: float | None = None  # when the window was first due (monotonic)

    def add(
        self, topic: str, partition: int, offset: int, event: dict[str, Any] | None, record_ms: int | None = None
    ) -> None:
        """Add one record's event; a record already in the window (a retried batch) is skipped."""
        key = f"{topic}:{partition}"
        if offset < self.next_offsets.get(key, -1):
            return
        if event is not None:
            self.events.append(event)
            self.read += 1
            if self.keep and len(self.events) >= 2 * self.keep:
                del self.events[: len(self.events) - self.keep]
        if record_ms is not None:
            self.newest_record_ms = max(self.newest_record_ms, record_ms)
        self.next_offsets[key] = offset + 1

    def newest(self) -> list[dict[str, Any]]:
        """The window's newest `keep` events (all when unbounded), oldest first: what a cycle trains on."""
        ordered = sorted(self.events, key=lambda e: e["ts"])
        return ordered[-self.keep :] if self.keep else ordered


def history_only(max_events: int) -> StateReads:
    """A state read for training: the event sequence, with the smallest neighbour/affinity reads."""
    return StateReads(sequence=max_events, recent_items=0, neighbours=1, affinities=1)


def _train_window(
    window: Sequence[dict[str, Any]],
    trigger: str,
    offsets: dict[str, int] | None,
    current: Checkpoint | None,
    data: FineTuneData,
    replayed: int,
    read: int | None = None,
) -> dict[str, Any]:
    """What a candidate was trained on, saved with it so a checkpoint names its window; `last_ts` (its newest
    event's time) is what the served model's freshness counts from."""
    return {
        "events": len(window),
        "read": len(window) if read is None else read,
        "users": data.window_users,
        "held_out": len(data.holdout),
        "replayed": replayed,
        "first_ts": window[0]["ts"] if window else None,
        "last_ts": window[-1]["ts"] if window else None,
        "trigger": trigger,
        "offsets": offsets or {},
        "parent": current.version if current else None,
    }


class Trainer:
    """One window -> one decision: fine-tune the current checkpoint, gate it, promote or keep."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = CheckpointStore(settings.checkpoint_dir)
        self.state = StateStore(settings)
        self.device = resolve_device(settings.device)
        self.windows = 0
        self._judged: set[str] = set()  # versions whose online quality was already compared
        self._replaced: dict[str, dict[str, float]] = {}  # version -> its online counts when a promotion replaced it

    # ---- data for one window -------------------------------------------------------------
    def context(self, client, window: Sequence[dict[str, Any]], max_events: int) -> dict[str, list]:
        """Each window user's events from Redis that came before the window (the model's context)."""
        first_ts: dict[str, int] = {}
        ids = {e["event_id"] for e in window}
        for e in window:
            first_ts.setdefault(str(e["user_id"]), int(e["ts"]))
        users = list(first_ts)
        reads = history_only(min(max_events, self.settings.finetune_history_events))
        out = {}
        for start in range(0, len(users), 500):
            chunk = users[start : start + 500]
            for st in self.state.fetch(client, chunk, reads):
                out[st.user_id] = [
                    (s.item_id, s.type) for s in st.sequence if s.event_id not in ids and s.ts <= first_ts[st.user_id]
                ]
        return out

    def replay(self, client, exclude: set[str], max_events: int) -> list[list]:
        """Histories of a sample of other users, so a fine-tune does not forget them."""
        n = self.settings.finetune_replay_users
        if n <= 0:
            return []
        candidates: list[str] = []
        for shard in self.state.shard_prefixes():  # one, or each cluster bucket
            prefix = f"{shard}:u:"
            for key in client.scan_iter(match=f"{prefix}*:h", count=1000):
                user = key[len(prefix) : -2]
                if user not in exclude:
                    candidates.append(user)
                if len(candidates) >= 5 * n:
                    break
            if len(candidates) >= 5 * n:
                break
        rng = random.Random(self.settings.train_seed + self.windows)
        chosen = rng.sample(candidates, min(n, len(candidates)))
        reads = history_only(min(max_events, self.settings.finetune_history_events))
        return [[(s.item_id, s.type) for s in st.sequence] for st in self.state.fetch(client, chosen, reads)]

    # ---- the decision ---------------------------------------------------------------------
    def run_window(
        self,
        window: Sequence[dict[str, Any]],
        trigger: str,
        offsets: dict[str, int] | None = None,
        read: int | None = None,
    ) -> dict[str, Any]:
        """Fine-tune, gate, and (if not worse) save + promote; returns the recorded decision (with the cycle's
        `seconds` and `decided_ms`, when it was decided). `read`: events the window read, when it trains on
        fewer (its newest)."""
        s = self.settings
        started = time.monotonic()
        self.windows += 1
        current_path = self.store.current_path()
        current = load_checkpoint(current_path) if current_path else None
        max_events = current.max_events if current else s.model_max_events
        client = redis_client(s)
        try:
            context = self.context(client, window, max_events)
            replay = self.replay(client, set(context), max_events)
            decision = self._decide(window, trigger, offsets, current, context, replay, read, started)
            if decision.get("version") and current is not None:
                self._note_replaced(client, current.version)
            client.hincrby(TRAINER_STATS, "promoted" if decision["promoted"] else "kept", 1)
            client.hset(
                TRAINER_STATS,
                mapping={
                    "last_decision": json.dumps(decision, default=str),
                    "last_decision_at": int(time.time() * 1000),
                },
            )
        finally:
            client.close()
        return decision

    def _record(self, decision: dict[str, Any], started: float) -> dict[str, Any]:
        """Stamp the cycle's duration and end on a decision and append it to the store's log."""
        decision["seconds"] = round(time.monotonic() - started, 2)
        decision["decided_ms"] = int(time.time() * 1000)
        self.store.record_decision(decision)
        return decision

    def _decide(
        self,
        window: Sequence[dict[str, Any]],
        trigger: str,
        offsets: dict[str, int] | None,
        current: Checkpoint | None,
        context: dict[str, list],
        replay: list[list],
        read: int | None,
        started: float,
    ) -> dict[str, Any]:
        s = self.settings
        data: FineTuneData = build_data(window, context, replay, s, max_history=s.finetune_history_events)
        if not data.train:
            return self._skip(window, trigger, offsets, current, started)
        candidate, report = fine_tune(current, data, s, self.device)  # trains a copy; `current` is scored after
        result = gate(candidate, current, data.holdout, s.promote_tolerance, self.device, s.promote_min_cases)
        train_window = _train_window(window, trigger, offsets, current, data, len(replay), read)
        decision: dict[str, Any] = {
            "promoted": result.promote,
            "reason": result.reason,
            "trigger": trigger,
            "candidate_metrics": result.candidate,
            "current_metrics": result.current,
            "current": current.version if current else None,
            "window": train_window,
            "offsets": offsets or {},
            "train_seconds": round(report.seconds, 2),
        }
        if result.promote:
            decision.update(self._promote(candidate, result, len(data.holdout), report.seconds, train_window, trigger))
        return self._record(decision, started)

    def _skip(
        self,
        window: Sequence[dict[str, Any]],
        trigger: str,
        offsets: dict[str, int] | None,
        current: Checkpoint | None,
        started: float,
    ) -> dict[str, Any]:
        """Record a window with nothing to train on, so its offsets still count as covered."""
        skipped: dict[str, Any] = {
            "promoted": False,
            "reason": "no history of two or more events to train on",
            "trigger": trigger,
            "current": current.version if current else None,
            "offsets": offsets or {},
            "window": {"events": len(window)},
        }
        return self._record(skipped, started)

    def _promote(
        self,
        candidate: Checkpoint,
        result: GateResult,
        held_out: int,
        train_seconds: float,
        train_window: dict[str, Any],
        trigger: str,
    ) -> dict[str, Any]:
        """Save the candidate, make it CURRENT and prune old checkpoints; returns the decision's extra fields."""
        metrics = {**result.candidate, "held_out": held_out, "train_seconds": round(train_seconds, 2)}
        path = save_checkpoint(
            candidate.model,
            candidate.vocab,
            self.store.root,
            candidate.manifest["meta"],
            metrics=metrics,
            training_window=train_window,
        )
        self.store.promote(path.name, reason=f"trainer: {trigger}")
        return {"version": path.name, "pruned": self.store.prune(self.settings.checkpoint_keep)}

    def _note_replaced(self, client, version: str) -> None:
        """Keep the online counts of a version this trainer just replaced, as they are now (`judge_online`)."""
        row = hit_rates(client.hgetall(QUALITY)).get(version)
        if row:
            self._replaced[version] = row
            while len(self._replaced) > REPLACED_KEPT:
                del self._replaced[next(iter(self._replaced))]

    def resume_offsets(self) -> dict[str, int]:
        """Offsets covered by the last window decision ({} when there is none)."""
        for decision in reversed(self.store.decisions()):
            if decision.get("offsets"):
                return dict(decision["offsets"])
        return {}

    def judge_online(self) -> dict[str, Any] | None:
        """Roll CURRENT back if its online hit rate fell below its predecessor's (judged once per version).

        Like is compared with like: a version is judged soon after its promotion, while its newest responses
        have had no time to be hit yet, so its predecessor counts as it was when this trainer replaced it (the
        same young tail), not with every response matured since. Measured with promotions every ~15 s (`rtrec
        bench freshness`), comparing against the matured counts rolled back 2 of 3 fine-tunes that the
        offline gate had scored better, each time to the first, stalest model. A predecessor this process
        did not replace (promoted by hand, or before a restart) counts as it is."""
        s, store = self.settings, self.store
        current = store.current_version()
        if not current or current in self._judged:
            return None
        previous = next(
            (
                r.get("previous")
                for r in reversed(store.promotions())
                if r["version"] == current and not r.get("rollback_of")
            ),
            None,
        )
        if not previous:
            return None
        client = redis_client(s)
        try:
            rates = hit_rates(client.hgetall(QUALITY))
        finally:
            client.close()
        cur, prev = rates.get(current), self._replaced.get(previous) or rates.get(previous)
        if not cur or not prev or min(cur["served"], prev["served"]) < s.quality_min_served:
            return None  # not enough traffic yet to judge
        self._judged.add(current)
        if cur["hit_rate"] >= prev["hit_rate"] - s.quality_tolerance:
            return None
        path = store.rollback()
        decision = {
            "promoted": False,
            "rolled_back": current,
            "version": path.name,
            "trigger": "online quality",
            "reason": f"online hit rate {cur['hit_rate']:.4f} ({int(cur['served'])} served) < "
            f"{previous} {prev['hit_rate']:.4f} - tolerance {s.quality_tolerance}",
            "decided_ms": int(time.time() * 1000),
        }
        store.record_decision(decision)
        return decision


def announcement(store: CheckpointStore, version: str, extra: dict[str, Any] | None = None) -> bytes:
    """The `model-updates` message: version, path, sha256 of the manifest (which hashes every file), metrics."""
    path = store.path_of(version)
    manifest = json.loads((path / MANIFEST).read_text())
    return json.dumps(
        {
            "version": version,
            "path": str(path.resolve()),
            "sha256": sha256_file(path / MANIFEST),
            "metrics": manifest.get("metrics", {}),
            "created_at": manifest.get("created_at"),
            **(extra or {}),
        }
    ).encode()


def announce_sync(settings: Settings, version: str, reason: str) -> None:
    """Publish a promotion or rollback from a CLI (kafka-python, waits for the ack)."""
    from rtrec.stream.producer import make_kafka_producer

    producer = make_kafka_producer(settings, linger_ms=0, client_id="rtrec-model-cli")
    try:
        producer.send(
            settings.topic_model_updates,
            value=announcement(CheckpointStore(settings.checkpoint_dir), version, {"reason": reason}),
        )
        producer.flush(timeout=10)
    finally:
        producer.close()


class _SeekPastDecisions(ConsumerRebalanceListener):
    """On assignment, skip what the last decision already covered (if the commit was lost)."""

    def __init__(self) -> None:
        self.consumer: AIOKafkaConsumer | None = None  # set once the runtime made it
        self.covered: dict[str, int] = {}  # set at start: the last decision's offsets

    async def on_partitions_revoked(self, revoked) -> None:
        pass

    async def on_partitions_assigned(self, assigned) -> None:
        for tp in assigned:
            done = self.covered.get(f"{tp.topic}:{tp.partition}")
            if done is None or self.consumer is None:
                continue
            committed = await self.consumer.committed(tp)
            if committed is None or committed < done:
                log.warning("trainer: %s resumes at %d (last decision), not %s (committed)", tp, done, committed)
                self.consumer.seek(tp, done)


class TrainerLoop:
    """Consume the events topic, close windows on count/time/drift, decide, then commit."""

    def __init__(self, settings: Settings, trainer: Trainer | None = None) -> None:
        self.settings = settings
        self.trainer = trainer or Trainer(settings)
        self.drift = DriftWatch(settings.drift_head_items, settings.drift_delta) if settings.drift_enabled else None
        self.window = self.new_window()
        self.decisions: list[dict[str, Any]] = []
        # a window's offsets are committed after its decision, not per batch; a fine-tune may take long
        self.resume = _SeekPastDecisions()
        self.runtime = ConsumerRuntime(
            settings,
            [settings.topic_events],
            settings.trainer_group,
            max_records=5000,
            max_wait_ms=200,
            idle_wait_ms=BACKGROUND_IDLE_WAIT_MS,  # a window waits for events anyway: no hurry when idle
            worker="trainer",
            commit_batches=False,
            max_poll_interval_ms=3_600_000,
            listener=self.resume,
        )
        self.consumer = self.resume.consumer = self.runtime.consumer
        self.producer = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap(settings), acks="all", **aiokafka_auth(settings)
        )

    async def start(self) -> None:
        await self.producer.start()
        self.resume.covered = self.trainer.resume_offsets()
        await self.runtime.start()

    async def stop(self) -> None:
        await self.runtime.stop()
        await self.producer.stop()

    def new_window(self) -> Window:
        return Window(keep=self.settings.trainer_max_window_events)

    def due(self) -> str | None:
        """Why the open window should close now, or None."""
        s, n = self.settings, self.window.read  # a bounded window holds fewer than it read
        if n >= s.trainer_every_events:
            return f"every {s.trainer_every_events} events"
        if n >= s.trainer_min_events and time.monotonic() - self.window.opened >= s.trainer_every_s:
            return f"every {s.trainer_every_s:g} s"
        if n >= s.trainer_min_events and self.drift is not None and self.drift.fired:
            return self.drift.describe()
        return None

    def caught_up(self, now: float | None = None) -> bool:
        """Whether the window read up to what the broker held when it opened (the end of the last cycle): it holds
        a record sent after that. A cycle leaves a backlog of what arrived meanwhile; closing on its first batch
        would train on the oldest of it, and a trainer slower than the flow would fall further behind each time.
        A due window waits at most `trainer_every_s` for it (a producer whose clock lags never gets there)."""
        w = self.window
        if w.newest_record_ms >= w.opened_ms:
            return True
        now = time.monotonic() if now is None else now
        return w.due_since is not None and now - w.due_since >= self.settings.trainer_every_s

    async def poll_once(self, timeout_ms: int = 500) -> str | None:
        """One fetch added to the window; returns why the window should close now, or None."""
        batch = await self.runtime.poll(timeout_ms)
        self.add([rec for records in batch.values() for rec in records])
        return self.due()

    def add(self, records) -> None:
        now_ms = int(time.time() * 1000)
        for rec in records:
            try:
                event = parse_event(rec.value, self.settings, now_ms).to_dict()
            except InvalidEvent:
                event = None  # the state worker dead-letters it; here it only moves the offset
            self.window.add(rec.topic, rec.partition, rec.offset, event, rec.timestamp)
            if event is not None and self.drift is not None:
                self.drift.update(event["item_id"])

    async def handle(self, records) -> None:
        """The runtime's handler: add a batch; close the window when it is due."""
        self.add(records)
        await self.close_if_due()

    async def close_if_due(self, drained: bool = False) -> None:
        """Close the window when it is due and caught up (`drained`: an empty poll said nothing is left to read)."""
        trigger = self.due()
        if not trigger:
            return
        if self.window.due_since is None:
            self.window.due_since = time.monotonic()
        if drained or self.caught_up():
            await self.close_window(trigger)

    async def close_window(self, trigger: str) -> dict[str, Any]:
        """Decide on the open window (its newest events); a transient fault keeps it open (retried), any other
        failure closes it."""
        window = self.window
        events = window.newest()
        try:
            decision = await asyncio.to_thread(
                self.trainer.run_window, events, trigger, window.next_offsets, read=window.read
            )
        except Exception as exc:
            if is_transient(exc):
                raise  # the runtime retries with backoff; the window stays as it is
            log.exception("trainer: window of %d events failed; skipping it", len(events))
            decision = {
                "promoted": False,
                "failed": True,
                "trigger": trigger,
                "offsets": window.next_offsets,
                "reason": f"failed: {type(exc).__name__}: {exc}",
                "window": {"events": len(events)},
            }
            self.trainer.store.record_decision(decision)
        self.window = self.new_window()
        await self._commit(window.next_offsets)
        if decision.get("version"):
            await self.producer.send_and_wait(
                self.settings.topic_model_updates,
                announcement(self.trainer.store, decision["version"], {"trigger": trigger}),
            )
        if self.drift is not None:
            self.drift.reset(window.events)
        self.decisions.append(decision)
        outcome = "failed" if decision.get("failed") else str(bool(decision["promoted"])).lower()
        TRAINER_DECISIONS.labels(promoted=outcome).inc()
        log.info("trainer: %s -> %s (%s)", trigger, decision.get("version") or "kept current", decision["reason"])
        return decision

    async def _commit(self, offsets: dict[str, int]) -> None:
        commit = {}
        for key, offset in offsets.items():
            topic, part = key.rsplit(":", 1)
            commit[TopicPartition(topic, int(part))] = offset
        await self.runtime.offsets.commit(commit)

    async def run(self) -> None:
        """Windows close on new batches, or on an empty poll when their timer ran out."""
        self.runtime.supervise("online-quality", self._judge_periodically)
        await self.runtime.run(self.handle, idle=functools.partial(self.close_if_due, drained=True))

    async def _judge_periodically(self) -> None:
        while True:
            await asyncio.sleep(QUALITY_CHECK_S)
            await self.judge_online()

    async def judge_online(self) -> dict[str, Any] | None:
        """The online-quality rollback check; a rollback is announced like a promotion."""
        decision = await asyncio.to_thread(self.trainer.judge_online)
        if decision is not None:
            log.warning(
                "trainer: rolled back %s -> %s (%s)", decision["rolled_back"], decision["version"], decision["reason"]
            )
            await self.producer.send_and_wait(
                self.settings.topic_model_updates,
                announcement(self.trainer.store, decision["version"], {"trigger": "rollback: online quality"}),
            )
        return decision


async def train_continuously(settings: Settings) -> None:
    """Fine-tune on each window of new events, gate, promote and announce, until stopped."""
    async with worker_redis(settings) as redis:
        loop = TrainerLoop(settings)
        await loop.start()
        try:
            async with serving(settings, "trainer", redis, lambda: readiness(loop.runtime, redis)):
                log.info("trainer consuming %s as %s", settings.topic_events, settings.trainer_group)
                await loop.run()
        finally:
            await loop.stop()


def lower_priority(nice: int) -> None:
    """Training is background work: at a lower priority it yields the cores to serving (on 2 cores a
    fine-tune on both threads otherwise competes with the recommendation worker). Linux applies a nice
    value per thread, inherited by threads started later: so this runs in `main()`, before Faust starts
    and torch trains, and never inside a test's process (two threads the imports start keep nice 0)."""
    if nice and hasattr(os, "nice"):
        os.nice(nice)  # raises only on invalid values, which the settings bound


def build_app(settings: Settings | None = None) -> faust.App:
    """The Faust app of the trainer worker."""
    return worker_app("rtrec-trainer-app", train_continuously, settings)


def limit_threads(threads: int) -> None:
    """Torch's CPU threads for training (0: torch's default, one per core). On a small machine whose cores
    serving and others share, one thread trains at a steady pace; a pool of one per core stalls whenever one
    of its threads waits for a core. Process-wide, so it runs in `main()`, never inside a test's process."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def main() -> None:
    settings = get_settings()
    lower_priority(settings.trainer_nice)
    limit_threads(settings.trainer_torch_threads)
    run_module(build_app)


if __name__ == "__main__":
    main()
