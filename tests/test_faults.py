"""Faults against the real broker and Redis, checked by counts and state equality, never by timings."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from rtrec.stream.producer import EventProducer
from rtrec.stream.state_store import StateStore
from rtrec.stream.topics import ensure_topics
from rtrec.workers.lag import LagMonitor
from rtrec.workers.stack import Stack
from tests.helpers import assert_state_matches_reference, scrape, wait_for

pytestmark = pytest.mark.integration

N_EVENTS = 50_000  # long enough to kill a worker mid-replay


def own_events_topic(settings, tag: str):
    """Settings with an events topic and state group of this test's own (created)."""
    s = settings.model_copy(update={"topic_events": f"events-{tag}", "state_group": f"state-{tag}"})
    ensure_topics(s)
    return s


def replay_events(tag: str, n: int) -> list[dict]:
    now = int(time.time() * 1000) - n
    return [
        {
            "event_id": f"{tag}-{i}",
            "user_id": f"crash-{tag}-{i % 300}",
            "item_id": f"it-{tag}-{(i * 7) % 500}",
            "type": ("browse", "click", "purchase")[i % 3],
            "ts": now + i,
        }
        for i in range(n)
    ]


def test_kill_9_mid_replay_loses_nothing_and_counts_nothing_twice(settings, redis, tmp_path):
    tag = uuid.uuid4().hex[:8]
    s = own_events_topic(settings, tag)
    events = replay_events(tag, N_EVENTS)
    stack = Stack(s, run_dir=tmp_path / "run")
    only_offsets = {"RTREC_DEDUPE_WINDOW": "1"}  # an id window of one event: redeliveries are caught by offset
    first = stack.start_worker("state", **only_offsets)
    try:
        stack.wait_ready("state")
        producing = threading.Thread(target=_produce, args=(s, events))
        producing.start()
        wait_for(
            lambda: scrape(stack.metrics_ports[first.name]).get("rtrec_events_processed_total", 0) > 10_000,
            timeout_s=120,
            what="a fifth of the replay applied",
        )
        first.kill()  # SIGKILL mid-stream: uncommitted batches will be delivered again
        stack.workers.remove(first)
        producing.join()
        stack.start_worker("state", **only_offsets)
        with LagMonitor(s, {s.state_group: s.topic_events}) as monitor:
            wait_for(
                lambda: (rows := monitor.measure()) and sum(r.lag for r in rows) == 0,
                timeout_s=180,
                what="the restarted worker caught up",
            )
    finally:
        stack.stop()

    assert_state_matches_reference(s, redis, events, tag)


def _produce(s, events: list[dict], pause_s: float = 0.0) -> None:
    with EventProducer(s) as producer:
        for start in range(0, len(events), 1000):
            producer.send_many(events[start : start + 1000])
            producer.flush()
            time.sleep(pause_s)  # > 0: a stream that lasts, so workers can join and leave during it


def test_recommendation_worker_crash_answers_every_request_after_restart(settings, redis, tmp_path):
    from rtrec.stream.rec_client import RecClient

    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(
        update={
            "topic_requests": f"req-{tag}",
            "topic_responses": f"resp-{tag}",
            "recommend_group": f"rec-{tag}",
            "checkpoint_dir": tmp_path / "none",
        }
    )
    ensure_topics(s)
    stack = Stack(s, run_dir=tmp_path / "run")
    first = stack.start_worker("recommend")
    try:
        stack.wait_ready("recommend")
        with RecClient(s) as client:
            sent = [client.send(f"user-{n % 50}", k=5) for n in range(1000)]
            client.producer.flush()
            wait_for(lambda: client.poll(timeout_ms=50) or len(client.responses) >= 20, what="some answers")
            first.kill()  # mid-load: answered-but-uncommitted requests will be answered again
            stack.workers.remove(first)
            answered_before = len(client.responses)
            stack.start_worker("recommend")
            got = client.collect(sent, timeout_s=120)
        assert answered_before < len(sent)  # the crash really interrupted the load
        assert set(got) == set(sent)  # every request answered, none lost
        assert not [r for r in got.values() if r.get("error")]
    finally:
        stack.stop()


def test_a_paused_redis_only_delays_the_state_worker(settings, redis, tmp_path):
    tag = uuid.uuid4().hex[:8]
    s = own_events_topic(settings, tag)
    events = replay_events(tag, 3000)
    stack = Stack(s, run_dir=tmp_path / "run")
    worker = stack.start_worker("state")
    try:
        stack.wait_ready("state")
        _produce(s, events[:1000])
        with LagMonitor(s, {s.state_group: s.topic_events}) as monitor:
            wait_for(lambda: (rows := monitor.measure()) and sum(r.lag for r in rows) == 0, what="first part applied")
            redis.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")  # Redis stops accepting writes until UNPAUSE
            _produce(s, events[1000:])
            assert sum(r.lag for r in monitor.measure()) > 0  # back-pressure: the backlog waits in Kafka
            redis.execute_command("CLIENT", "UNPAUSE")
            wait_for(lambda: sum(r.lag for r in monitor.measure()) == 0, timeout_s=120, what="backlog drained")
        assert worker.alive()
        users = sorted({e["user_id"] for e in events})
        for user in users:
            assert int(redis.hget(f"rt:u:{user}:h", "n")) == sum(e["user_id"] == user for e in events)
    finally:
        redis.execute_command("CLIENT", "UNPAUSE")
        stack.stop()


def test_a_second_state_worker_joining_and_leaving_mid_stream_loses_nothing(settings, redis, tmp_path):
    tag = uuid.uuid4().hex[:8]
    s = own_events_topic(settings, tag)
    events = replay_events(tag, N_EVENTS)
    stack = Stack(s, run_dir=tmp_path / "run")
    first = stack.start_worker("state")
    try:
        stack.wait_ready("state")
        producing = threading.Thread(target=_produce, args=(s, events, 0.3))  # ~15 s of stream
        producing.start()

        def applied(w) -> float:
            return scrape(stack.metrics_ports[w.name]).get("rtrec_events_processed_total", 0)

        wait_for(lambda: applied(first) > 5_000, timeout_s=120, what="a tenth of the replay applied")
        second = stack.start_worker("state")  # rebalance: partitions move to the newcomer
        stack.wait_ready("state", 2)
        wait_for(lambda: applied(second) > 0, timeout_s=120, what="the second worker applying events")
        stack.stop_worker(second)  # and back: its partitions return to the first worker
        producing.join()
        with LagMonitor(s, {s.state_group: s.topic_events}) as monitor:
            wait_for(
                lambda: (rows := monitor.measure()) and sum(r.lag for r in rows) == 0,
                timeout_s=180,
                what="caught up after two rebalances",
            )
    finally:
        stack.stop()
    assert_state_matches_reference(s, redis, events, tag)


def test_redis_restart_mid_stream_with_aof_loses_nothing(settings, tmp_path):
    """Redis (AOF on) stops and comes back mid-replay: the worker retries with backoff, state is exact."""
    from rtrec.stream.connections import redis_client
    from rtrec.stream.embedded import free_port, start_redis

    tag = uuid.uuid4().hex[:8]
    port, redis_dir = free_port(), tmp_path / "redis"
    server, url = start_redis(settings, redis_dir, port=port, appendonly=True)
    s = own_events_topic(settings.model_copy(update={"redis_url": url}), tag)
    own = redis_client(s)
    events = replay_events(tag, 10_000)
    stack = Stack(s, run_dir=tmp_path / "run")
    worker = stack.start_worker("state")
    try:
        stack.wait_ready("state")
        producing = threading.Thread(target=_produce, args=(s, events, 0.3))  # ~3 s of stream
        producing.start()
        wait_for(lambda: StateStore(s).stats(own).get("applied", 0) > 2_000, timeout_s=60, what="part applied")
        retries_before = worker.log_path.read_text().count("retrying")
        server.stop()  # SIGTERM: Redis flushes its AOF and exits; writes now fail
        wait_for(
            lambda: worker.log_path.read_text().count("retrying") > retries_before,
            timeout_s=60,
            what="a batch failing and being retried while Redis is down",
        )
        server, _ = start_redis(settings, redis_dir, port=port, appendonly=True)  # reloads the AOF
        producing.join()
        with LagMonitor(s, {s.state_group: s.topic_events}) as monitor:
            wait_for(
                lambda: (rows := monitor.measure()) and sum(r.lag for r in rows) == 0,
                timeout_s=120,
                what="caught up after the Redis restart",
            )
        assert worker.alive()  # it reconnected rather than crashed
        assert StateStore(s).stats(own)["applied"] == len(events)
        assert_state_matches_reference(s, own, events, tag)
    finally:
        stack.stop()
        server.stop()


def test_broker_restart_producer_and_state_worker_reconnect(settings, redis, tmp_path):
    """The broker comes back with an empty log while the producer goes on: nothing is lost, nothing needs a restart.

    The embedded broker forgets its logs, topics and offsets, so the worker's positions
    point past the new, empty logs (before the fix, a 3,000-event run lost 164 events here).
    The same producer object sends the second half at once, while the worker is still
    at its old positions; every event of it must be applied, none twice, and the
    worker must say it reset (`rtrec_offset_resets_total`).
    """
    from rtrec.stream.embedded import free_port, start_tansu

    tag = uuid.uuid4().hex[:8]
    port = free_port()
    broker, bootstrap = start_tansu(tmp_path / "broker", port)
    # the worker must fetch while the new log is still shorter than its position (what the reset guard
    # checks): idle fetch waits stay at the batch wait here, as they were before waits adapted
    update = {"kafka_bootstrap": bootstrap, "idle_fetch_wait_ms": 5}
    s = own_events_topic(settings.model_copy(update=update), tag)
    events = replay_events(tag, 3000)
    stack = Stack(s, run_dir=tmp_path / "run")
    worker = stack.start_worker("state")

    def count(batch: list[dict]) -> int:
        return sum(int(redis.hget(f"rt:u:{u}:h", "n") or 0) for u in {e["user_id"] for e in batch})

    try:
        stack.wait_ready("state")
        with EventProducer(s) as producer:
            producer.send_many(events[:1500])
            producer.flush()
            wait_for(lambda: count(events[:1500]) == 1500, timeout_s=60, what="first half applied")
            broker.stop()
            broker, _ = start_tansu(tmp_path / "broker", port)  # memory-only: empty, no topics, no offsets
            ensure_topics(s)
            for start in range(1500, 3000, 50):  # the same producer object: it reconnects and goes on
                producer.send_many(events[start : start + 50])
                producer.flush()  # raises DeliveryError if any send was lost
            assert producer.failed == 0
        wait_for(lambda: count(events) == len(events), timeout_s=120, what="every event sent after the restart applied")
        assert worker.alive()
        resets = scrape(stack.metrics_ports[worker.name])
        assert sum(v for k, v in resets.items() if k.startswith("rtrec_offset_resets_total")) >= 1
        for user in sorted({e["user_id"] for e in events})[:50]:  # nothing counted twice
            assert int(redis.hget(f"rt:u:{user}:h", "n")) == sum(e["user_id"] == user for e in events)
    finally:
        stack.stop()
        broker.stop()


def test_redis_at_its_memory_limit_stalls_visibly_and_loses_nothing(settings, tmp_path):
    """maxmemory with noeviction: writes fail, the batch is retried (readyz fails), then drains once raised."""
    import json
    import urllib.error
    import urllib.request

    from rtrec.stream.connections import redis_client
    from rtrec.stream.embedded import start_redis

    tag = uuid.uuid4().hex[:8]
    redis_proc, url = start_redis(settings, tmp_path / "redis")
    s = own_events_topic(
        settings.model_copy(update={"redis_url": url, "stall_alert_s": 1.0, "retry_max_backoff_s": 0.5}), tag
    )
    own = redis_client(s)
    stack = Stack(s, run_dir=tmp_path / "run")
    worker = stack.start_worker("state")
    port = stack.metrics_ports[worker.name]

    def readyz() -> dict:
        try:
            return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    events = replay_events(tag, 3000)

    def count() -> int:
        return sum(int(own.hget(f"rt:u:{u}:h", "n") or 0) for u in {e["user_id"] for e in events})

    try:
        stack.wait_ready("state")
        used = int(own.info("memory")["used_memory"])
        own.config_set("maxmemory-policy", "noeviction")
        own.config_set("maxmemory", used + 256 * 1024)  # room for a few hundred events, not 3,000
        _produce(s, events)
        wait_for(lambda: readyz().get("consuming") is False, timeout_s=60, what="the worker stalled on OOM")
        assert count() < len(events)  # the rest waits in Kafka
        retries = scrape(port)
        assert (
            sum(v for k, v in retries.items() if k.startswith("rtrec_batch_retries_total") and "OutOfMemoryError" in k)
            >= 1
        )
        own.config_set("maxmemory", 0)  # the operator raises the limit
        try:
            wait_for(lambda: count() >= len(events), timeout_s=90, what="every event applied after the limit rose")
        except AssertionError as exc:
            tail = "".join(worker.log_path.read_text().splitlines(keepends=True)[-40:])
            raise AssertionError(f"{exc}: {count()} of {len(events)}; worker log:\n{tail}") from None
        assert count() == len(events), "events counted twice"
        wait_for(lambda: readyz().get("consuming") is True, timeout_s=20, what="ready again")
        for user in sorted({e["user_id"] for e in events})[:50]:  # nothing counted twice
            assert int(own.hget(f"rt:u:{user}:h", "n")) == sum(e["user_id"] == user for e in events)
        assert worker.alive()
    finally:
        own.config_set("maxmemory", 0)
        own.close()
        stack.stop()
        redis_proc.stop()
