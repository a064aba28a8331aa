"""`rtrec rebuild-state`: the state rebuilt from the topic, equal to what was sent, whatever Redis still holds.

Each test has a Redis server of its own (a rebuild replaces the whole live state
namespace, which the session stack's other tests share) and an events topic of
its own on the session broker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest

from rtrec.stream.connections import redis_client
from rtrec.stream.embedded import python_env, start_redis
from rtrec.stream.producer import EventProducer
from rtrec.stream.rebuild import apply_tail, rebuild, stage, staging_store, switch
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import StateStore
from rtrec.stream.topics import ensure_topics
from rtrec.workers.stack import Stack
from tests.helpers import assert_state_matches_reference, run_cli, wait_for

pytestmark = pytest.mark.integration

# keys outside the state families, some named like them: a switch must leave every one alone
OTHER_KEYS = {
    "rt:stats:recommend": "hash",
    "rt:popular": "string",
    "rt:user:x": "string",
    "rt:covisit": "string",
    "rt:quality": "hash",
    "rt:lat:ingest": "list",
    "rt:item:category": "hash",
}


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    proc, url = start_redis(Settings(kafka_bootstrap=None, redis_url=None), tmp_path_factory.mktemp("rebuild-redis"))
    yield url
    proc.stop()


@pytest.fixture
def env(settings, own_redis):
    """(settings on this test's topic, state group and empty Redis; a client of that Redis; the tag)."""
    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(
        update={"topic_events": f"events-{tag}", "state_group": f"state-{tag}", "redis_url": own_redis}
    )
    ensure_topics(s)
    client = redis_client(s)
    client.flushall()
    yield s, client, tag
    client.close()


def make_events(tag: str, n: int, users: int = 40, start: int = 0) -> list[dict]:
    now = int(time.time() * 1000) - 10 * n
    return [
        {
            "event_id": f"{tag}-{i}",
            "user_id": f"u-{tag}-{i % users}",
            "item_id": f"it-{tag}-{(i * 7) % 90}",
            "type": ("browse", "click", "purchase")[i % 3],
            "ts": now + 10 * i,
        }
        for i in range(start, start + n)
    ]


def send(s, events: list[dict]) -> None:
    with EventProducer(s) as producer:
        producer.send_many(events)
        producer.flush()


def rebuild_cli(s):
    res = run_cli(["rebuild-state"], env=python_env(s))
    assert res.returncode == 0, res.stdout + res.stderr
    return " ".join(res.stdout.replace(",", "").split())


def rt_keys(client) -> set[str]:
    return set(client.scan_iter(match="rt:*", count=1000))


def assert_counts_equal_sent(client, events: list[dict]) -> None:
    """Per user `n` and the item counts are exactly what was sent: nothing lost, nothing counted twice."""
    per_user = Counter(e["user_id"] for e in events)
    got = {u: int(client.hget(f"rt:u:{u}:h", "n") or 0) for u in per_user}
    assert got == dict(per_user)
    per_item = Counter(e["item_id"] for e in events)
    assert {i: int(n) for i, n in client.zrange("rt:items:n", 0, -1, withscores=True)} == dict(per_item)
    assert not [k for k in rt_keys(client) if k.startswith("rt:rebuild")], "staging keys left behind"


def plant_other_keys(client) -> None:
    for key, kind in OTHER_KEYS.items():
        {
            "hash": lambda k: client.hset(k, "f", "v"),
            "string": lambda k: client.set(k, "v"),
            "list": lambda k: client.rpush(k, "1"),
        }[kind](key)


def test_rebuild_twice_with_the_worker_running_gives_what_was_sent_and_keeps_other_keys(env, tmp_path):
    s, client, tag = env
    events = make_events(tag, 600)
    send(s, events)
    stack = Stack(s, run_dir=tmp_path / "run")
    stack.start_worker("state")
    try:
        stack.wait_ready("state")
        wait_for(
            lambda: int(client.hget("rt:stats", "applied") or 0) == len(events),
            timeout_s=60,
            what="the worker applied the events",
        )
        assert_counts_equal_sent(client, events)
        plant_other_keys(client)
        others = {k for k in rt_keys(client) if not k.startswith(("rt:u:", "rt:covis:"))} - {
            "rt:pop",
            "rt:pop:L",
            "rt:items:n",
            "rt:stats",
        }
        assert {"rt:logs", "rt:lat:ingest", *OTHER_KEYS} <= others

        out = rebuild_cli(s)
        assert (
            out == f"rebuilt state from 600 events (0 records skipped as invalid) of {s.topic_events}: "
            "40 users 90 items; 0 more applied after the switch"
        ), out  # (thousands separators removed)
        assert_counts_equal_sent(client, events)

        more = make_events(tag, 300, start=600)  # sent while the second rebuild runs: the tail, or the worker
        sending = threading.Thread(target=send, args=(s, more))
        sending.start()
        out = rebuild_cli(s)
        sending.join()
        assert "rebuilt state from" in out, out
        wait_for(
            lambda: sum(int(n) for _, n in client.zrange("rt:items:n", 0, -1, withscores=True)) >= 900,
            timeout_s=60,
            what="the events sent during the rebuild applied",
        )
        assert_counts_equal_sent(client, events + more)
        assert others <= rt_keys(client)
        assert all(client.type(k) == kind for k, kind in OTHER_KEYS.items())
    finally:
        stack.stop()
    assert_counts_equal_sent(client, events + more)  # nothing arrived late and twice


def test_rebuild_after_dedupe_state_expired_gives_counts_equal_to_what_was_sent(env):
    s, client, tag = env
    events = make_events(tag, 600)
    send(s, events)
    rebuild(s, client=client)  # the state as a worker would have left it, watermarks and id windows included
    assert_counts_equal_sent(client, events)

    users = sorted({e["user_id"] for e in events})
    for user in users[:10]:  # Redis "loses" these users, their watermarks (in :h) and id windows (:ids) with them
        client.delete(*[f"rt:u:{user}:{part}" for part in ("h", "seq", "aff", "bought", "fair", "ids")])
    for user in users[10:20]:  # only the dedupe state of these expired: the rest of their state remains
        client.delete(f"rt:u:{user}:ids")
        client.hdel(f"rt:u:{user}:h", *[f for f in client.hkeys(f"rt:u:{user}:h") if f.startswith("o:")])
    client.delete("rt:logs")  # and the log epochs

    out = rebuild_cli(s)
    assert "rebuilt state from 600 events" in out and "40 users" in out, out
    assert_counts_equal_sent(client, events)
    assert_state_matches_reference(s, client, events, tag)  # sequences, affinities, popularity too


def test_a_stale_staging_namespace_does_not_leak_into_the_rebuilt_state(env):
    s, client, tag = env
    events = make_events(tag, 300)
    send(s, events)
    ghost, user = f"ghost-{tag}", events[0]["user_id"]
    client.hset(f"rt:rebuild:u:{user}:h", mapping={"n": 999, "click": 999})  # an interrupted rebuild's leftovers
    client.hset(f"rt:rebuild:u:{ghost}:h", "n", 5)
    client.zadd(f"rt:rebuild:u:{ghost}:seq", {"x|click|e": 1})
    client.zadd(f"rt:rebuild:covis:{ghost}", {events[0]["item_id"]: 50})
    client.zadd("rt:rebuild:items:n", {ghost: 7, events[0]["item_id"]: 1000})
    client.zadd("rt:rebuild:pop", {ghost: 7})
    client.hset("rt:rebuild:stats", "applied", 10**6)

    out = rebuild_cli(s)
    assert "rebuilt state from 300 events" in out, out
    assert_counts_equal_sent(client, events)
    assert not client.exists(f"rt:u:{ghost}:h", f"rt:u:{ghost}:seq", f"rt:covis:{ghost}")
    assert client.zscore("rt:pop", ghost) is None
    assert int(client.hget("rt:stats", "applied")) == 300


def test_records_appended_after_the_read_reach_the_live_state_through_the_tail(env):
    s, client, tag = env
    first, later = make_events(tag, 300), make_events(tag, 120, start=300)
    send(s, first)
    live = StateStore(s)
    staging = staging_store(live)
    staged = stage(s, client, staging)
    assert (staged.events, staged.invalid) == (300, 0)
    send(s, later)  # after the read: the switch does not have them, the tail must
    switch(client, live, staging)
    assert_counts_equal_sent(client, first)
    assert apply_tail(s, client, live, staged.resume_at) == 120
    assert_counts_equal_sent(client, first + later)
    assert apply_tail(s, client, live, staged.resume_at) == 0  # positions: a second tail changes nothing


def test_invalid_records_are_skipped_and_since_hours_keeps_only_recent_events(env):
    s, client, tag = env
    events = make_events(tag, 200)
    send(s, events)
    with EventProducer(s) as producer:  # what a foreign producer could write
        for raw in (b"not json", b'{"user_id": "x"}'):
            producer.send_raw(raw, key=b"x")
        producer.flush()
    report = rebuild(s, client=client)
    assert (report.events, report.invalid, report.users) == (200, 2, 40)
    assert_counts_equal_sent(client, events)

    client.hset("rt:u:old-user:h", "n", 3)  # state no event of the window explains: dropped
    report = rebuild(s, since_ms=3_600_000, client=client)
    assert (report.events, report.invalid) == (200, 2)
    assert_counts_equal_sent(client, events)
    assert not client.exists("rt:u:old-user:h")

    report = rebuild(s, since_ms=1, client=client)  # a window that starts after every record (sent long before)
    assert (report.events, report.users) == (0, 0)
    assert not [k for k in rt_keys(client) if k.startswith(("rt:u:", "rt:covis:"))]


def test_rebuild_errors_are_one_line(env, settings):
    s, client, tag = env
    client.set("rt:rebuild:lock", "someone")
    res = run_cli(["rebuild-state"], env=python_env(s))
    assert res.returncode == 2 and "another rebuild-state is running" in res.stdout, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    client.delete("rt:rebuild:lock")

    missing = s.model_copy(update={"topic_events": f"nope-{tag}"})
    res = run_cli(["rebuild-state"], env=python_env(missing))
    assert res.returncode == 2 and "does not exist" in res.stdout and "unchanged" in res.stdout, res.stdout
    assert "Traceback" not in res.stdout + res.stderr

    for broken in ({"redis_url": "redis://127.0.0.1:1/0"}, {"kafka_bootstrap": "127.0.0.1:1"}):
        res = run_cli(["rebuild-state"], env=python_env(s.model_copy(update=broken)))
        assert res.returncode == 2, res.stdout + res.stderr
        assert "Traceback" not in res.stdout + res.stderr
        assert len(res.stdout.strip().splitlines()) == 1 and "check that" in res.stdout, res.stdout
    assert not client.exists("rt:rebuild:lock")  # each failed run released its lock
