"""Hostile records and faults through real workers: nothing a client sends can stop a worker.

Each test sends what an outside client could send (with an independent kafka-python
producer), then a canary on *every* partition, which must be applied or answered
within 10 s: one bad record never holds back another record or partition.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

from rtrec.stream.connections import async_redis_client, redis_client
from rtrec.stream.embedded import free_port, start_redis
from rtrec.stream.producer import EventProducer
from rtrec.stream.rec_client import RecClient
from rtrec.stream.topics import ensure_topics, internal_topics
from rtrec.workers.stack import Stack
from tests.helpers import scrape, tiny_checkpoint, wait_for

pytestmark = pytest.mark.integration

TWO_MB = 2 * 1024 * 1024
CANARY_S = 10  # the bound on a canary's answer behind hostile records


# ---- helpers -----------------------------------------------------------------------------------
def raw_producer(settings) -> KafkaProducer:
    """An outside client: no validation, big requests allowed."""
    return KafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", max_request_size=4 * TWO_MB, linger_ms=0
    )


def topics_on_broker(settings) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def read_topic(settings, topic: str, done=None, timeout_s: float = CANARY_S) -> list:
    """`topic` from its start until `done(records)` (default: read up to the high watermark of every partition)."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=20,
        max_partition_fetch_bytes=4 * TWO_MB,
    )
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)

    def at_end(_records) -> bool:
        ends = [consumer.highwater(tp) for tp in parts]
        return all(end is not None and consumer.position(tp) >= end for tp, end in zip(parts, ends))

    done = done or at_end
    records: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while not done(records):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out reading {topic}: {len(records)} records")
            for recs in consumer.poll(timeout_ms=100).values():
                records += recs
        return records
    finally:
        consumer.close()


def letters_for(settings, sources: dict[str, tuple[str, int, int]]) -> dict[str, dict[str, object]]:
    """The dead letter of each named source record (topic, partition, offset): headers, key and value."""
    wanted = {v: k for k, v in sources.items()}

    def index(records):
        found = {}
        for rec in records:
            h = {k: v.decode() for k, v in rec.headers}
            src = (
                h.get("rtrec.source.topic"),
                int(h.get("rtrec.source.partition", -1)),
                int(h.get("rtrec.source.offset", -1)),
            )
            if src in wanted:
                found[wanted[src]] = {**h, "_key": rec.key, "_value": rec.value}
        return found

    records = read_topic(settings, settings.topic_dead_letters, lambda recs: len(index(recs)) == len(sources))
    return index(records)


def event_json(event_id: str, user: str, item: str = "it-1") -> bytes:
    return json.dumps(
        {"event_id": event_id, "user_id": user, "item_id": item, "type": "click", "ts": int(time.time() * 1000)}
    ).encode()


def hostile_values(tag: str) -> dict[str, tuple[bytes | None, bytes | None, str]]:
    """name -> (key, value, the reason its dead letter must carry)."""
    return {
        "2 MB value": (b"u", b'{"user_id":"' + b"a" * TWO_MB + b'"}', "oversized"),
        "1.1 MB key": (b"k" * 1_100_000, b"{}", "key_too_large"),
        "[1]": (None, b"[1]", "not_an_object"),
        "null value": (f"null-{tag}".encode(), None, "empty_payload"),
        "JSON string": (None, b'"hello"', "not_an_object"),
    }


# ---- events ------------------------------------------------------------------------------------
def test_hostile_events_are_dead_lettered_and_every_partition_keeps_flowing(settings, redis):
    tag = uuid.uuid4().hex[:8]
    before = topics_on_broker(settings)
    hostile = hostile_values(tag)
    producer = raw_producer(settings)
    try:
        sent = {}
        for name, (key, value, _) in hostile.items():
            meta = producer.send(settings.topic_events, key=key, value=value).get(10)
            sent[name] = (settings.topic_events, meta.partition, meta.offset)
        canaries = {p: f"canary-{tag}-{p}" for p in range(settings.partitions)}
        for p, user in canaries.items():
            producer.send(settings.topic_events, key=user.encode(), value=event_json(f"ev-{user}", user), partition=p)
        producer.flush()
    finally:
        producer.close()

    wait_for(
        lambda: all(redis.hget(f"rt:u:{u}:h", "n") == "1" for u in canaries.values()),
        timeout_s=CANARY_S,
        what="a canary event applied on every partition",
    )
    letters = letters_for(settings, sent)
    for name, (_, _, reason) in hostile.items():
        assert letters[name]["rtrec.reason"] == reason, name
    big = letters["2 MB value"]
    value = hostile["2 MB value"][1]
    assert big["rtrec.truncated"] == "1" and int(big["rtrec.original.value_bytes"]) == len(value)
    assert big["rtrec.original.sha256"] == hashlib.sha256(value).hexdigest()
    assert len(big["_value"]) <= settings.dlq_max_bytes and value.startswith(big["_value"])
    assert len(letters["1.1 MB key"]["_key"]) < 1_100_000
    assert topics_on_broker(settings) == before  # nothing auto-created


# ---- requests ----------------------------------------------------------------------------------
def hostile_reply_topics(settings, tag: str) -> dict[str, str]:
    """reply_topic -> the reason its request is dead-lettered with."""
    topics = {"..": "bad_reply_topic", ".": "bad_reply_topic", "x" * 300: "bad_reply_topic"}
    topics.update(dict.fromkeys(internal_topics(settings), "bad_reply_topic"))
    topics.update({f"made-up-{tag}-{i}": "bad_reply_topic" for i in range(10)})  # outside the allowed prefix
    topics.update({f"{settings.reply_topic_prefix}made-up-{tag}-{i}": "reply_topic_missing" for i in range(10)})
    return topics


def request_json(request_id: str, user: str, **extra) -> bytes:
    return json.dumps({"request_id": request_id, "user_id": user, "k": 3, **extra}).encode()


def test_hostile_requests_never_reach_internal_topics_and_every_partition_is_answered(settings):
    tag = uuid.uuid4().hex[:8]
    before = topics_on_broker(settings)
    reply_topics = hostile_reply_topics(settings, tag)
    assert len(reply_topics) == 3 + 5 + 20  # 5 internal topics
    with RecClient(settings) as client:  # reads the default response topic from its end
        producer = raw_producer(settings)
        try:
            sent, ids = {}, {}
            for n, topic in enumerate(reply_topics):
                rid = f"hostile-{tag}-{n}"
                meta = producer.send(
                    settings.topic_requests, key=b"u", value=request_json(rid, f"u-{tag}", reply_topic=topic)
                ).get(10)
                sent[topic], ids[topic] = (settings.topic_requests, meta.partition, meta.offset), rid
            values = hostile_values(tag)
            for name, (key, value, _) in values.items():
                meta = producer.send(settings.topic_requests, key=key, value=value).get(10)
                sent[name] = (settings.topic_requests, meta.partition, meta.offset)
            canaries = [f"canary-{tag}-{p}" for p in range(settings.partitions)]
            for p, rid in enumerate(canaries):
                producer.send(settings.topic_requests, key=rid.encode(), value=request_json(rid, rid), partition=p)
            producer.flush()
        finally:
            producer.close()

        answered = client.collect(canaries, timeout_s=CANARY_S)
        assert sorted(answered) == sorted(canaries), "a canary request on some partition was not answered"
        assert all(not r.get("error") for r in answered.values())
        errors = client.collect(list(ids.values()), timeout_s=CANARY_S)  # each refused request: an error answer
        assert sorted(errors) == sorted(ids.values())
        assert all(r["error"].startswith("invalid request") for r in errors.values())

    letters = letters_for(settings, sent)
    for topic, reason in reply_topics.items():
        assert letters[topic]["rtrec.reason"] == reason, topic[:40]
    for name, (_, _, reason) in values.items():
        assert letters[name]["rtrec.reason"] == reason, name
    assert topics_on_broker(settings) == before  # no reply topic was created
    ours = set(ids.values())
    for topic in internal_topics(settings):  # no response (it carries model_version) in an internal topic
        for rec in read_topic(settings, topic, timeout_s=30):
            msg = _json(rec.value)
            assert not (isinstance(msg, dict) and "model_version" in msg and msg.get("request_id") in ours), topic


def _json(raw: bytes | None):
    try:
        return json.loads(raw) if raw is not None else None
    except ValueError:
        return None


# ---- a handler bug -----------------------------------------------------------------------------
def test_a_handler_bug_dead_letters_its_record_and_applies_the_rest_once(settings, redis):
    from aiokafka import AIOKafkaProducer

    from rtrec.workers.dead_letters import DeadLetters
    from rtrec.workers.runtime import ConsumerRuntime
    from rtrec.workers.state import StateWorker

    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(
        update={"topic_events": f"events-{tag}", "state_group": f"state-{tag}", "topic_dead_letters": f"dlq-{tag}"}
    )
    ensure_topics(s)
    now = int(time.time() * 1000)
    events = [
        {
            "event_id": f"{tag}-{i}",
            "user_id": f"bug-{tag}-{i % 20}",
            "item_id": f"it-{i % 30}",
            "type": "click",
            "ts": now + i,
        }
        for i in range(300)
    ]
    poisoned = events[137]["event_id"]
    with EventProducer(s) as p:
        p.send_many(events)

    async def run_worker() -> StateWorker:
        client = async_redis_client(s)
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
        await producer.start()
        dead_letters = DeadLetters(s, producer, client)
        worker = StateWorker(s, client, dead_letters)
        apply = worker.store.apply_async

        async def buggy(redis_async, batch, positions):  # a bug that only one event triggers
            if any(e.event_id == poisoned for e in batch):
                raise ValueError("injected bug")
            return await apply(redis_async, batch, positions)

        worker.store.apply_async = buggy
        runtime = ConsumerRuntime(
            s, [s.topic_events], s.state_group, 2000, 5, worker="state", dead_letters=dead_letters
        )
        await runtime.start()
        task = asyncio.create_task(runtime.run(worker.handle))
        deadline = time.monotonic() + 30
        while worker.applied + dead_letters.published < len(events) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await runtime.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await producer.stop()
        await client.aclose()
        return worker

    worker = asyncio.run(run_worker())
    assert worker.applied == len(events) - 1
    for user in {e["user_id"] for e in events}:  # every other event applied exactly once
        want = sum(e["user_id"] == user and e["event_id"] != poisoned for e in events)
        assert int(redis.hget(f"rt:u:{user}:h", "n")) == want, user
    [letter] = list(read_topic(s, s.topic_dead_letters, lambda recs: len(recs) >= 1))
    headers = {k: v.decode() for k, v in letter.headers}
    assert headers["rtrec.reason"] == "handler_error"
    assert headers["rtrec.detail"] == "ValueError: injected bug"
    assert json.loads(letter.value)["event_id"] == poisoned


# ---- Redis down under request load ---------------------------------------------------------------
def test_redis_down_under_request_load_answers_each_request_exactly_once(settings, tmp_path):
    tag = uuid.uuid4().hex[:8]
    port = free_port()
    redis_proc, url = start_redis(settings, tmp_path / "redis", port)
    s = settings.model_copy(
        update={
            "redis_url": url,
            "topic_requests": f"req-{tag}",
            "topic_responses": f"resp-{tag}",
            "recommend_group": f"rec-{tag}",
            "topic_dead_letters": f"dlq-{tag}",
        }
    )
    ensure_topics(s)
    stack = Stack(s, run_dir=tmp_path / "run")
    stack.start_worker("recommend")
    try:
        stack.wait_ready("recommend")
        with RecClient(s) as client:
            ids = [client.send(f"user-{tag}-{i % 10}") for i in range(30)]
            client.collect(ids[:5], timeout_s=20)
            redis_proc.stop()  # Redis goes away under load
            for i in range(40):
                ids.append(client.send(f"user-{tag}-{i % 10}"))
                client.poll(timeout_ms=10)
            redis_proc, _ = start_redis(s, tmp_path / "redis", port)
            ids += [client.send(f"user-{tag}-{i % 10}") for i in range(30)]
            got = client.collect(ids, timeout_s=60)
            assert sorted(got) == sorted(ids)
            markers = _marker_requests(s, tag)  # answered after anything a retry could re-publish
            assert sorted(client.collect(markers, timeout_s=30)) == sorted(markers)
            client.poll(timeout_ms=200)
            assert client.duplicates == 0
            assert all(("error" in r) != bool(r["items"]) or r.get("fallback") for r in got.values())
    finally:
        stack.stop()
        redis_proc.stop()


def _marker_requests(s, tag: str) -> list[str]:
    producer = raw_producer(s)
    ids = [f"marker-{tag}-{p}" for p in range(s.partitions)]
    for p, rid in enumerate(ids):
        producer.send(s.topic_requests, key=rid.encode(), value=request_json(rid, rid), partition=p)
    producer.flush()
    producer.close()
    return ids


# ---- the model watcher crashes ---------------------------------------------------------------------
def test_a_crashed_model_watcher_is_restarted_and_hot_swaps_after_it(settings, tmp_path):
    from rtrec.model.store import CheckpointStore
    from rtrec.stream.synthetic import SyntheticConfig, generate_events
    from rtrec.workers.model_watch import ModelWatcher
    from rtrec.workers.supervisor import Supervisor

    events = generate_events(SyntheticConfig(n_users=20, n_items=40, n_clusters=4, n_events=300, seed=3))
    root = tmp_path / "store"
    first, second = tiny_checkpoint(root, events, seed=0).name, tiny_checkpoint(root, events, seed=1).name
    store = CheckpointStore(root)
    store.promote(first, reason="test")
    s = settings.model_copy(update={"checkpoint_dir": root, "model_check_s": 0.2})

    class Worker:
        class recommender:
            version = "blend-v1"

    worker = Worker()

    async def go() -> tuple[list[str], dict[str, bool], dict[str, bool]]:
        client = async_redis_client(s)
        watcher = ModelWatcher(s, worker, client, f"rt:stats:watch-{uuid.uuid4().hex[:6]}")
        follow, crashed = watcher.follow_current, []

        async def crash_once():
            if not crashed:
                crashed.append(True)
                raise RuntimeError("injected watcher crash")
            await follow()

        watcher.follow_current = crash_once
        supervisor = Supervisor("recommend", recovered_s=1.0)
        await watcher.start()
        supervisor.supervise("model-watch", watcher.run)
        seen = []
        try:
            await _until(lambda: crashed and not supervisor.ok["model-watch"], 10)
            during = supervisor.checks()
            await _until(lambda: worker.recommender.version == first, 30)
            seen.append(worker.recommender.version)
            store.promote(second, reason="test")
            await _until(lambda: worker.recommender.version == second, 30)
            seen.append(worker.recommender.version)
            await _until(lambda: supervisor.ok["model-watch"], 10)
            return seen, during, supervisor.checks()
        finally:
            await supervisor.stop()
            await watcher.stop()
            await client.aclose()

    seen, during, after = asyncio.run(go())
    assert during == {"task:model-watch": False}  # shown in /readyz while it was down
    assert seen == [first, second]  # it came back and still follows promotions
    assert after == {"task:model-watch": True}


async def _until(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


# ---- the online-quality join reads topics it does not own ----------------------------------------
def test_the_quality_join_skips_unreadable_records_and_keeps_joining(settings, redis, tmp_path):
    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(
        update={"topic_events": f"events-{tag}", "topic_responses": f"resp-{tag}", "quality_group": f"quality-{tag}"}
    )
    ensure_topics(s)
    stack = Stack(s, run_dir=tmp_path / "run")
    ops = stack.start_worker("ops")
    version, user, now = f"v-{tag}", f"q-{tag}", int(time.time() * 1000)
    producer = raw_producer(s)
    try:
        stack.wait_ready("ops")
        for topic in (s.topic_events, s.topic_responses):
            for value in (b"[1]", None, b'"a string"', b"not json", b"k" * 10):
                producer.send(topic, key=b"x", value=value)
        producer.send(
            s.topic_responses,
            value=json.dumps({"user_id": user, "model_version": version, "items": 5, "generated_at": "soon"}).encode(),
        )
        served = {
            "request_id": "r",
            "user_id": user,
            "model_version": version,
            "generated_at": now,
            "items": [{"item_id": "it-7", "score": 1.0}],
        }
        producer.send(s.topic_responses, key=user.encode(), value=json.dumps(served).encode())
        producer.flush()
        wait_for(
            lambda: redis.hget("rt:quality", f"{version}|served") == "1",
            timeout_s=CANARY_S,
            what="the valid response joined",
        )
        producer.send(s.topic_events, key=user.encode(), value=event_json(f"hit-{tag}", user, "it-7"))
        producer.flush()
        wait_for(
            lambda: redis.hget("rt:quality", f"{version}|hits") == "1",
            timeout_s=CANARY_S,
            what="the later event counted as a hit",
        )
        metrics = scrape(stack.metrics_ports[ops.name])
        skipped = {k: v for k, v in metrics.items() if k.startswith("rtrec_records_skipped_total")}
        assert sum(skipped.values()) >= 2 * 4  # [1], null, "a string", not json on both topics
        assert ops.alive()
        wait_for(
            lambda: urllib_status(stack.metrics_ports[ops.name], "/readyz") == 200,
            timeout_s=30,
            what="the ops worker ready (its first lag measurement done)",
        )
    finally:
        producer.close()
        stack.stop()


def readyz(port: int) -> dict[str, bool]:
    import urllib.error
    import urllib.request

    try:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def urllib_status(port: int, path: str) -> int:
    import urllib.error
    import urllib.request

    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status
    except urllib.error.HTTPError as exc:
        return exc.code


# ---- a stall is visible ------------------------------------------------------------------------------
def test_a_batch_retried_past_the_stall_alert_fails_readyz_until_redis_answers(settings, redis, tmp_path):
    import signal

    tag = uuid.uuid4().hex[:8]
    redis_proc, url = start_redis(settings, tmp_path / "redis")
    s = settings.model_copy(
        update={
            "redis_url": url,
            "topic_events": f"events-{tag}",
            "state_group": f"state-{tag}",
            "stall_alert_s": 1.0,
            "redis_timeout_s": 0.5,
            "retry_max_backoff_s": 0.5,
        }
    )
    ensure_topics(s)
    stack = Stack(s, run_dir=tmp_path / "run")
    worker = stack.start_worker("state")
    port = stack.metrics_ports[worker.name]
    own = redis_client(s)
    events = [
        {
            "event_id": f"{tag}-{i}",
            "user_id": f"stall-{tag}-{i % 5}",
            "item_id": "it-1",
            "type": "click",
            "ts": int(time.time() * 1000) + i,
        }
        for i in range(50)
    ]
    try:
        stack.wait_ready("state")
        redis_proc.proc.send_signal(signal.SIGSTOP)  # Redis stops answering (connections still accepted)
        with EventProducer(s) as producer:
            producer.send_many(events)
        wait_for(lambda: readyz(port).get("consuming") is False, timeout_s=20, what="/readyz: consuming false")
        assert urllib_status(port, "/readyz") == 503
        metrics = scrape(port)
        assert metrics[f'rtrec_consumer_stalled_seconds{{group="{s.state_group}"}}'] >= 1.0
        assert sum(v for k, v in metrics.items() if k.startswith("rtrec_batch_retries_total")) >= 1
        redis_proc.proc.send_signal(signal.SIGCONT)
        wait_for(
            lambda: sum(int(own.hget(f"rt:u:stall-{tag}-{u}:h", "n") or 0) for u in range(5)) == 50,
            timeout_s=30,
            what="the stalled batch applied once Redis answers",
        )
        wait_for(lambda: urllib_status(port, "/readyz") == 200, timeout_s=20, what="/readyz ready again")
        assert scrape(port)[f'rtrec_consumer_stalled_seconds{{group="{s.state_group}"}}'] == 0
        assert worker.alive()
    finally:
        redis_proc.proc.send_signal(signal.SIGCONT)
        own.close()
        stack.stop()
        redis_proc.stop()
