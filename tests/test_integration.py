"""End to end on real servers: events -> Redis state (exactly once in effect) -> requests -> responses."""

from __future__ import annotations

import json
import time

import pytest
from kafka import KafkaConsumer, TopicPartition

from rtrec.stream.connections import kafka_bootstrap
from rtrec.stream.state_store import StateStore
from tests.helpers import wait_for

pytestmark = pytest.mark.integration
NOW = int(time.time() * 1000)


def ev(uid_: str, item: str, etype: str, ts: int, eid: str) -> dict:
    return {"event_id": eid, "user_id": uid_, "item_id": item, "type": etype, "ts": ts}


def event_count(redis, user: str) -> int:
    return int(redis.hget(f"rt:u:{user}:h", "n") or 0)


def test_events_become_user_state(producer, redis, settings, uid):
    user, a, b, c = uid("u"), uid("a"), uid("b"), uid("c")
    events = [
        ev(user, a, "browse", NOW - 5000, uid("e1")),
        ev(user, b, "browse", NOW - 4000, uid("e2")),
        ev(user, b, "click", NOW - 3000, uid("e3")),
        ev(user, b, "purchase", NOW - 2000, uid("e4")),
        ev(user, c, "browse", NOW - 1000, uid("e5")),
    ]
    producer.send_many(events)
    producer.flush()
    wait_for(lambda: event_count(redis, user) == 5, what="5 events applied")

    [state] = StateStore(settings).fetch(redis, [user])
    assert [(e.item_id, e.type) for e in state.sequence] == [
        (a, "browse"),
        (b, "browse"),
        (b, "click"),
        (b, "purchase"),
        (c, "browse"),
    ]
    assert state.counts == {"browse": 3, "click": 1, "purchase": 1, "n": 5}
    assert state.last_ts == NOW - 1000 and state.first_ts == NOW - 5000
    assert state.purchased == {b}
    # b has browse+click+purchase weight, so it leads the affinities
    assert max(state.affinities, key=state.affinities.get) == b
    assert set(state.affinities) == {a, b, c}
    # co-visitation both ways, within the fan-out
    covis_c = dict(state.covis[c])
    assert covis_c[b] >= 1 and covis_c[a] >= 1
    assert dict(redis.zrange(f"rt:covis:{a}", 0, -1, withscores=True))[c] == 1


def test_redelivered_event_changes_state_once(producer, redis, uid):
    user, item = uid("u"), uid("i")
    dup = ev(user, item, "click", NOW - 1000, uid("dup"))
    producer.send(dup)
    producer.send(dup)  # a producer retry / replay
    producer.flush()
    producer.send(ev(user, item, "browse", NOW - 500, uid("later")))
    producer.send(dup)  # redelivered after later events
    producer.send(ev(user, item, "browse", NOW - 400, uid("last")))  # the user's events apply in order
    producer.flush()
    wait_for(lambda: redis.zscore("rt:items:n", item) == 3, what="the last event applied")
    assert redis.hgetall(f"rt:u:{user}:h")["click"] == "1"
    assert event_count(redis, user) == 3
    assert redis.zcard(f"rt:u:{user}:seq") == 3


def test_out_of_order_events_are_ordered_by_time(producer, redis, settings, uid):
    user = uid("u")
    items = [uid(f"i{n}") for n in range(3)]
    producer.send(ev(user, items[2], "browse", NOW - 1000, uid("e3")))
    producer.send(ev(user, items[0], "browse", NOW - 3000, uid("e1")))
    producer.send(ev(user, items[1], "click", NOW - 2000, uid("e2")))
    producer.flush()
    wait_for(lambda: event_count(redis, user) == 3, what="3 events applied")
    [state] = StateStore(settings).fetch(redis, [user])
    assert [e.item_id for e in state.sequence] == items
    assert state.last_ts == NOW - 1000 and state.first_ts == NOW - 3000
    assert state.counts["browse"] == 2 and state.counts["click"] == 1


def _dead_letters(settings, keys: set[bytes], expected: int) -> list:
    consumer = KafkaConsumer(
        bootstrap_servers=kafka_bootstrap(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    parts = [
        TopicPartition(settings.topic_dead_letters, p)
        for p in consumer.partitions_for_topic(settings.topic_dead_letters)
    ]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    found = []
    deadline = time.monotonic() + 20
    while len(found) < expected and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            found += [r for r in records if r.key in keys]
    consumer.close()
    return found


def test_bad_input_goes_to_dead_letters_and_worker_keeps_going(producer, redis, settings, uid):
    user = uid("bad")
    key = user.encode()
    good = ev(user, uid("i"), "click", NOW, uid("ok"))
    bad_payloads = {
        b"{not json": "malformed_json",
        json.dumps({**good, "type": "like"}).encode(): "unknown_type",
        json.dumps({k: v for k, v in good.items() if k != "item_id"}).encode(): "missing_field",
        json.dumps({**good, "ts": str(NOW)}).encode(): "wrong_type",
        json.dumps({**good, "ts": -5}).encode(): "ts_out_of_range",
        json.dumps({**good, "ts": NOW + 86_400_000}).encode(): "ts_in_future",
        json.dumps({**good, "context": {"x": "y" * 20_000}}).encode(): "oversized",
        b"\xff\xfe\x00": "bad_encoding",
        json.dumps({**good, "user_id": "../../etc"}).encode(): "bad_id",
    }
    before = {k: int(v) for k, v in redis.hgetall("rt:dlq").items()}
    for payload in bad_payloads:
        producer.send_raw(payload, key=key)
    producer.send(good)
    producer.flush()

    wait_for(lambda: event_count(redis, user) == 1, what="the valid event after the bad ones")
    letters = _dead_letters(settings, {key}, len(bad_payloads))
    by_value = {r.value: dict(r.headers) for r in letters}
    assert set(by_value) == set(bad_payloads)  # original bytes kept
    for payload, reason in bad_payloads.items():
        headers = by_value[payload]
        assert headers["rtrec.reason"].decode() == reason
        assert headers["rtrec.source.topic"].decode() == settings.topic_events
        assert int(headers["rtrec.source.offset"]) >= 0
    after = {k: int(v) for k, v in redis.hgetall("rt:dlq").items()}
    for reason in set(bad_payloads.values()):
        expected = list(bad_payloads.values()).count(reason)
        assert after[reason] - before.get(reason, 0) == expected


def test_recommendations_reflect_the_latest_events(producer, rec_client, redis, uid):
    shopper, other = uid("shopper"), uid("other")
    a, b = uid("a"), uid("b")
    # someone else looked at a then b: a and b are co-visited
    producer.send(ev(other, a, "browse", NOW - 60_000, uid("o1")))
    producer.send(ev(other, b, "click", NOW - 59_000, uid("o2")))
    producer.flush()
    wait_for(lambda: event_count(redis, other) == 2, what="co-visitation")

    before = rec_client.recommend(shopper, k=5)
    assert before["fallback"] is True and before["model_version"] == "trending"
    assert all(it["reason"] in ("trending now", "popular pick") for it in before["items"])

    producer.send(ev(shopper, a, "browse", NOW - 1000, uid("s1")))
    producer.flush()
    wait_for(lambda: event_count(redis, shopper) == 1, what="shopper's event")

    after = rec_client.recommend(shopper, k=5)
    assert after["fallback"] is False
    assert after["items"][0]["item_id"] == b
    assert after["items"][0]["reason"] == f"because you browsed {a}"
    assert a not in [it["item_id"] for it in after["items"]]  # exclude_seen by default
    assert after["latency_ms"] >= 0 and after["generated_at"] > NOW - 1000
    seen = rec_client.recommend(shopper, k=5, exclude_seen=False)
    assert a in [it["item_id"] for it in seen["items"]]


def test_invalid_request_gets_an_error_response(settings, rec_client, producer, uid):
    request_id = uid("req")
    producer.send_raw(
        json.dumps({"request_id": request_id, "user_id": "u1", "k": 10_000}).encode(),
        key=b"u1",
        topic=settings.topic_requests,
    )
    producer.flush()
    got = rec_client.collect([request_id], timeout_s=20)
    assert "k must be between" in got[request_id]["error"]
    assert got[request_id]["items"] == []


def test_a_burst_of_requests_is_answered_in_batches(rec_client, redis, uid):
    stats = "rt:stats:recommend"
    batches_before, requests_before = (int(v or 0) for v in redis.hmget(stats, ["batches", "requests"]))
    ids = [rec_client.send(uid(f"burst{n}"), k=3) for n in range(60)]
    got = rec_client.collect(ids, timeout_s=30)
    assert set(got) == set(ids)
    # the counts are written while the responses are acked: wait until all 60 are counted
    wait_for(lambda: int(redis.hget(stats, "requests")) - requests_before >= len(ids), what="60 requests counted")
    batches = int(redis.hget(stats, "batches")) - batches_before
    assert 1 <= batches < len(ids)
