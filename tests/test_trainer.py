"""Incremental trainer, checkpoint store and hot-swap, against the session's real Kafka and Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from rtrec.model.checkpoint import CheckpointError, load_checkpoint
from rtrec.model.drift import DriftWatch
from rtrec.model.store import CheckpointStore
from rtrec.stream.producer import EventProducer
from rtrec.stream.rec_client import RecClient
from rtrec.stream.settings import Settings
from rtrec.stream.synthetic import SyntheticConfig, generate_events
from rtrec.stream.topics import ensure_topics
from rtrec.workers.stack import Stack
from rtrec.workers.trainer import Trainer, TrainerLoop, announce_sync
from tests.helpers import SMALL, answered_by, steady_requests, tiny_checkpoint, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def events() -> list[dict]:
    return generate_events(SyntheticConfig(n_users=40, n_items=60, n_clusters=4, n_events=1200, seed=11))


def trainer_settings(settings: Settings, tmp_path: Path, **kw) -> Settings:
    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(
        update={
            **SMALL,
            "checkpoint_dir": tmp_path / "checkpoints",
            "topic_events": f"events-{tag}",
            "trainer_group": f"trainer-{tag}",
            **kw,
        }
    )
    ensure_topics(s)
    return s


# ---- the store -----------------------------------------------------------------------------
def test_promote_rollback_and_retention(tmp_path, events) -> None:
    store = CheckpointStore(tmp_path)
    versions = [tiny_checkpoint(tmp_path, events, seed=n).name for n in range(4)]
    for v in versions[:3]:
        store.promote(v)
    assert store.current_version() == versions[2]
    assert store.rollback().name == versions[1]
    assert store.current_version() == versions[1]
    assert store.rollback().name == versions[0]  # a second rollback goes further back, not forward
    with pytest.raises(CheckpointError):
        store.rollback()  # nothing before the first promotion
    store.promote(versions[3])
    pruned = store.prune(keep=2)
    left = {v.version for v in store.versions()}
    assert store.current_version() in left and versions[0] in left  # CURRENT and its rollback target stay
    assert set(pruned) == set(versions) - left and pruned


def test_a_tampered_version_is_not_promoted(tmp_path, events) -> None:
    store = CheckpointStore(tmp_path)
    good, bad = tiny_checkpoint(tmp_path, events).name, tiny_checkpoint(tmp_path, events, seed=1).name
    store.promote(good)
    (tmp_path / bad / "vocab.json").write_text('{"capacity": 1, "hash_buckets": 1, "items": []}')
    with pytest.raises(CheckpointError, match="sha256"):
        store.promote(bad)
    assert store.current_version() == good


# ---- gate and drift ----------------------------------------------------------------------------
def test_a_worse_candidate_is_not_promoted(settings, producer, redis, tmp_path, events) -> None:
    s = trainer_settings(settings, tmp_path, finetune_first_epochs=8)
    trainer = Trainer(s)
    half = len(events) // 2
    first = trainer.run_window(events[:half], "test: first")
    assert first["promoted"] and first["reason"] == "first model"
    good = trainer.store.current_version()
    # a learning rate this large wrecks the weights: the gate must notice and keep the current model
    trainer.settings = s.model_copy(update={"finetune_lr": 5.0, "finetune_epochs": 3})
    second = trainer.run_window(events[half:], "test: ruinous fine-tune")
    assert not second["promoted"], second
    assert second["candidate_metrics"]["NDCG@10"] < second["current_metrics"]["NDCG@10"]
    assert "candidate NDCG@10" in second["reason"]
    assert trainer.store.current_version() == good
    assert [d["promoted"] for d in trainer.store.decisions()] == [True, False]
    assert redis.hget("rt:stats:trainer", "kept")


def test_a_sound_fine_tune_is_promoted_and_grows_the_vocabulary(settings, tmp_path, events) -> None:
    s = trainer_settings(settings, tmp_path, promote_tolerance=1.0)
    trainer = Trainer(s)
    trainer.run_window(events[:600], "test: first")
    new_items = [dict(e, item_id=f"new-{e['item_id']}", event_id=f"{e['event_id']}-n") for e in events[600:]]
    decision = trainer.run_window(new_items, "test: new items")
    assert decision["promoted"], decision
    ck = load_checkpoint(trainer.store.current_path())
    assert any(i.startswith("new-") for i in ck.vocab.items)
    assert ck.manifest["training_window"]["trigger"] == "test: new items"
    assert ck.manifest["training_window"]["parent"] == decision["current"]


def test_a_young_version_is_judged_against_its_predecessor_as_it_was_when_replaced(
    settings, redis, tmp_path, events
) -> None:
    """The online judge compares like with like: the version a promotion replaced counts as it was then (its
    newest responses not yet hit), not with every response matured since; a worse one is still rolled back."""
    from rtrec.stream.keys import QUALITY

    trainer = Trainer(trainer_settings(settings, tmp_path, promote_tolerance=1.0, quality_min_served=100))
    v1 = trainer.run_window(events[:400], "test: first")["version"]
    redis.hset(QUALITY, mapping={f"{v1}|served": 300, f"{v1}|hits": 60})  # 0.20 when v2 replaces it
    v2 = trainer.run_window(events[400:800], "test: second")["version"]
    redis.hset(QUALITY, mapping={f"{v1}|hits": 120, f"{v2}|served": 300, f"{v2}|hits": 57})  # v1 matured: 0.40
    assert trainer.judge_online() is None  # v2's 0.19 is judged against v1's 0.20, not its matured 0.40
    assert trainer.store.current_version() == v2
    v3 = trainer.run_window(events[800:], "test: third")["version"]
    redis.hset(QUALITY, mapping={f"{v3}|served": 300, f"{v3}|hits": 15})  # 0.05 against v2's 0.19: worse
    decision = trainer.judge_online()
    assert decision and decision["rolled_back"] == v3 and trainer.store.current_version() == v2


def test_drift_watch_fires_when_the_popular_items_change() -> None:
    watch = DriftWatch(head_items=5, delta=0.002)
    watch.reset([{"item_id": f"i{n % 5}"} for n in range(100)])
    for n in range(1000):
        assert not watch.update(f"i{n % 8}")  # steady mix: 5 of 8 items are head items
    fired_at = next((n for n in range(2000) if watch.update(f"j{n}")), None)  # all new items
    assert fired_at is not None and watch.fired and "ADWIN" in watch.describe()


# ---- offsets across restarts -------------------------------------------------------------------
class RecordingTrainer(Trainer):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.windows_seen: list[list[str]] = []

    def run_window(self, window, trigger, offsets=None, read=None):
        self.windows_seen.append([e["event_id"] for e in window])
        return super().run_window(window, trigger, offsets, read)


def run_loop_until(s: Settings, trainer: Trainer, decisions: int, commit: bool = True) -> TrainerLoop:
    async def go() -> TrainerLoop:
        loop = TrainerLoop(s, trainer)
        if not commit:

            async def no_commit(offsets):  # the process "dies" between decision and commit
                return None

            loop._commit = no_commit
        await loop.start()
        try:
            deadline = time.monotonic() + 90
            while len(loop.decisions) < decisions and time.monotonic() < deadline:
                trigger = await loop.poll_once(timeout_ms=200)
                if trigger:
                    await loop.close_window(trigger)
        finally:
            await loop.stop()
        return loop

    return asyncio.run(go())


def test_trainer_resumes_from_committed_offsets_after_a_restart(settings, tmp_path, events) -> None:
    s = trainer_settings(settings, tmp_path, trainer_every_events=200, promote_tolerance=1.0)
    sent = events[:400]
    with EventProducer(s) as p:
        p.send_many(sent[:200])
        p.flush()
    first = RecordingTrainer(s)
    run_loop_until(s, first, decisions=1)
    with EventProducer(s) as p:
        p.send_many(sent[200:])
        p.flush()
    second = RecordingTrainer(s)  # a new process: only the group's committed offsets carry over
    run_loop_until(s, second, decisions=1)
    [a], [b] = first.windows_seen, second.windows_seen
    assert not set(a) & set(b)  # nothing read twice
    assert sorted(a + b) == sorted(e["event_id"] for e in sent)  # nothing skipped


def test_a_lost_commit_does_not_train_the_same_window_twice(settings, tmp_path, events) -> None:
    s = trainer_settings(settings, tmp_path, trainer_every_events=150, promote_tolerance=1.0)
    with EventProducer(s) as p:
        p.send_many(events[:150])
        p.flush()
    first = RecordingTrainer(s)
    run_loop_until(s, first, decisions=1, commit=False)  # decided, then "died" before committing
    with EventProducer(s) as p:
        p.send_many(events[150:300])
        p.flush()
    second = RecordingTrainer(s)
    run_loop_until(s, second, decisions=1)
    [a], [b] = first.windows_seen, second.windows_seen
    assert sorted(a) == sorted(e["event_id"] for e in events[:150])
    assert sorted(b) == sorted(e["event_id"] for e in events[150:300])  # resumed after the decided window


# ---- hot-swap under load ------------------------------------------------------------------------
def test_hot_swap_under_load_answers_every_request(settings, producer, redis, tmp_path, events) -> None:
    tag = uuid.uuid4().hex[:8]
    root = tmp_path / "checkpoints"
    store = CheckpointStore(root)
    versions = [tiny_checkpoint(root, events, seed=n).name for n in range(3)]
    store.promote(versions[0])
    s = settings.model_copy(
        update={
            "checkpoint_dir": root,
            "topic_requests": f"req-{tag}",
            "topic_responses": f"resp-{tag}",
            "recommend_group": f"rec-{tag}",
            "model_check_s": 60.0,
        }
    )
    ensure_topics(s)
    users = sorted({e["user_id"] for e in events})[:10]
    producer.send_many([dict(e, event_id=f"{e['event_id']}-{tag}") for e in events if e["user_id"] in users])
    producer.flush()
    stack = Stack(s, run_dir=tmp_path / "run")
    stack.start_worker("recommend")
    try:
        stack.wait_ready("recommend")
        with RecClient(s) as client:
            with steady_requests(client, users) as sent:
                wait_for(lambda: answered_by(client, versions[0]), timeout_s=30, what=f"an answer from {versions[0]}")
                for v in versions[1:]:
                    store.promote(v)
                    announce_sync(s, v, "test")
                    wait_for(
                        lambda v=v: redis.hget("rt:model:serving", str(stack.workers[0].proc.pid)) == v,
                        timeout_s=30,
                        what=f"worker serving {v}",
                    )
                    wait_for(lambda v=v: answered_by(client, v), timeout_s=30, what=f"an answer from {v}")
                # a corrupt checkpoint made CURRENT behind the store's back is refused; serving goes on
                bad = tiny_checkpoint(root, events, seed=9)
                (bad / "vocab.json").write_text("{}")
                (root / "CURRENT").write_text(bad.name)
                announce_sync(s, bad.name, "test")
                wait_for(lambda: _refusals(redis) >= 1, timeout_s=90, what="refusal of the corrupt checkpoint")
                after_refusal = len(sent)  # serving goes on: a request sent after the refusal is answered

                def answered_after_refusal() -> bool:
                    client.poll()
                    return any(rid in client.responses for rid in sent[after_refusal:])

                wait_for(answered_after_refusal, timeout_s=30, what="an answer to a request sent after the refusal")
            got = client.collect(list(sent), timeout_s=60)
        assert sent and len(got) == len(sent)  # every request answered, across every swap (each version below)
        assert not [r for r in got.values() if r.get("error")]
        seen = {r["model_version"] for r in got.values()}
        assert set(versions) <= seen  # every promoted version answered some requests
        assert bad.name not in seen
    finally:
        stack.stop()


def _refusals(redis) -> int:
    return int(redis.hget("rt:stats:recommend", "swaps_refused") or 0)
