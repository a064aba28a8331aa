"""Redis Cluster: a real 3-master cluster on loopback, the store and the workers on it.

The cluster layout (users in hash-tagged buckets, each bucket holding partial
shared aggregates) must give exactly the state one Redis gives for the same
events; the workers must run on it unchanged.
"""

from __future__ import annotations

import math
import time
import uuid

import pytest

from rtrec.stream.connections import redis_client
from rtrec.stream.embedded import start_redis_cluster
from rtrec.stream.eventfile import read_events
from rtrec.stream.events import event_from_dict
from rtrec.stream.producer import EventProducer
from rtrec.stream.rebuild import staging_store, state_keys, switch
from rtrec.stream.rec_client import RecClient
from rtrec.stream.sample import SAMPLE_PATH
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import StateReads, StateStore
from rtrec.workers.dead_letters import dlq_counts
from rtrec.workers.stack import Stack
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

ALL = StateReads(sequence=200, recent_items=10, neighbours=10_000, affinities=10_000)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes, url = start_redis_cluster(Settings(redis_url=None), tmp_path_factory.mktemp("cluster"))
    settings = Settings(kafka_bootstrap=None, redis_url=url, redis_cluster=True)
    client = redis_client(settings)
    yield settings, client, nodes
    client.close()
    for node in nodes:
        node.stop()


def sample_events(n: int, settings: Settings) -> list:
    tag = uuid.uuid4().hex[:6]
    out = []
    for e in list(read_events(SAMPLE_PATH))[:n]:
        out.append(
            event_from_dict({**e, "event_id": f"{tag}-{e['event_id']}", "user_id": f"{tag}-{e['user_id']}"}, settings)
        )
    return out


def test_cluster_state_equals_one_redis(cluster, redis_only) -> None:
    settings, client, nodes = cluster
    events = sample_events(4000, settings)
    on_cluster = StateStore(settings, prefix=f"c{uuid.uuid4().hex[:6]}")
    single = StateStore(settings.model_copy(update={"redis_cluster": False}), prefix=on_cluster.prefix)

    assert all(on_cluster.apply(client, events))
    assert all(single.apply(redis_only, events))
    assert not any(on_cluster.apply(client, events[:500]))  # redelivery: counted once

    assert on_cluster.stats(client) == {"applied": 4000, "duplicates": 500}
    assert on_cluster.item_counts(client) == single.item_counts(redis_only)
    now = max(e.ts for e in events)
    want_pop = single.decayed_popularity(redis_only, now)
    got_pop = on_cluster.decayed_popularity(client, now)
    assert got_pop.keys() == want_pop.keys()
    assert all(math.isclose(got_pop[i], v, rel_tol=1e-9) for i, v in want_pop.items())

    users = sorted({e.user_id for e in events})
    got_states, want_states = on_cluster.fetch(client, users, ALL), single.fetch(redis_only, users, ALL)
    for got, want in zip(got_states, want_states):
        assert got.counts == want.counts
        assert got.sequence == want.sequence
        assert got.purchased == want.purchased
        assert got.affinities == pytest.approx(want.affinities, rel=1e-9)
        assert got.covis.keys() == want.covis.keys()
        for item, neighbours in want.covis.items():
            assert dict(got.covis[item]) == dict(neighbours), (got.user_id, item)
    assert [i for i, _ in got_states[0].trending] == [i for i, _ in want_states[0].trending]

    # the buckets spread over every master, so the load does too
    for node in nodes:
        port = int(node.name.rsplit("-", 1)[1])
        assert (
            redis_client(
                settings.model_copy(update={"redis_cluster": False, "redis_url": f"redis://127.0.0.1:{port}/0"})
            ).dbsize()
            > 0
        )


def test_rebuild_switches_each_bucket_to_its_staging_bucket_and_leaves_other_keys(cluster) -> None:
    settings, client, _ = cluster
    live = StateStore(settings, prefix=f"c{uuid.uuid4().hex[:6]}")
    staging = staging_store(live)
    for live_shard, staging_shard in zip(live.shard_prefixes(), staging.shard_prefixes()):
        assert staging_shard == live_shard.replace(live.prefix, f"{live.prefix}:rebuild", 1)
        assert client.keyslot(f"{live_shard}:stats") == client.keyslot(f"{staging_shard}:u:x:h")  # one script
    old, new = sample_events(600, settings), sample_events(800, settings)  # different users
    live.apply(client, old)
    staging.apply(client, new)
    others = [f"{live.prefix}:logs", f"{live.shard_prefixes()[0]}:stats:other", f"{live.prefix}:popular"]
    for key in others:
        client.set(key, "kept")
    stale = f"{live.prefix}:{{b{settings.redis_cluster_buckets + 3}}}:u:gone:h"  # a bucket of a larger count
    client.hset(stale, "n", 1)

    users, items = switch(client, live, staging)

    reference = StateStore(settings, prefix=f"{live.prefix}ref")
    reference.apply(client, new)
    assert (users, items) == (len({e.user_id for e in new}), len(reference.item_counts(client)))
    assert live.item_counts(client) == reference.item_counts(client)
    assert live.stats(client) == {"applied": 800}
    new_users = sorted({e.user_id for e in new})
    for got, want in zip(live.fetch(client, new_users, ALL), reference.fetch(client, new_users, ALL)):
        assert (got.counts, got.sequence, got.covis) == (want.counts, want.sequence, want.covis)
    assert not any(st.known for st in live.fetch(client, sorted({e.user_id for e in old})))
    assert state_keys(client, [staging]) == [{shard: [] for shard in staging.shard_prefixes()}]
    assert all(client.get(key) == "kept" for key in others)
    assert not client.exists(stale)


def test_state_and_generation_workers_run_on_the_cluster(cluster, tmp_path) -> None:
    settings, client, _ = cluster
    stack = Stack(settings.model_copy(update={"checkpoint_dir": tmp_path / "no-checkpoints"}), run_dir=tmp_path / "run")
    try:
        s = stack.start(state_workers=1, recommend_workers=1)
        events = [
            {
                "event_id": e.event_id,
                "user_id": e.user_id,
                "item_id": e.item_id,
                "type": e.type,
                "ts": int(time.time() * 1000) - 60_000 + n,
            }
            for n, e in enumerate(sample_events(3000, s))
        ]
        with EventProducer(s) as producer:
            for e in events:
                producer.send(e)
            producer.send_raw(b"{not json", key=b"x")  # dead letters are counted on the cluster too
        store = StateStore(s)
        wait_for(lambda: store.stats(client).get("applied", 0) >= 3000, timeout_s=60, what="events applied")
        wait_for(lambda: dlq_counts(client).get("malformed_json") == 1, what="the dead letter counted")
        users = sorted({e["user_id"] for e in events})[:20]
        for user, state in zip(users, store.fetch(client, users)):
            assert state.counts["n"] == sum(e["user_id"] == user for e in events)
        with RecClient(s) as rc:
            answers = rc.collect([rc.send(u, 5) for u in users], timeout_s=60)
        by_user = {r["user_id"]: r for r in answers.values()}
        assert set(by_user) == set(users)
        for r in by_user.values():
            assert not r.get("error") and not r["fallback"] and len(r["items"]) == 5
    finally:
        stack.stop()


def test_the_async_client_applies_and_reads_in_one_pipeline_per_node_and_survives_a_script_flush(cluster) -> None:
    """The workers' path on a cluster: scripts as EVALSHA in per-node pipelines; a node that lost its
    scripts (restarted, flushed) is given them again and the round runs again, deduped."""
    import asyncio
    from hashlib import sha1

    from rtrec.stream.connections import async_redis_client
    from rtrec.stream.state_store import READ_LUA

    read_sha = sha1(READ_LUA.encode()).hexdigest()
    settings, client, _ = cluster
    store = StateStore(settings, prefix=f"a{uuid.uuid4().hex[:6]}")
    events = sample_events(600, settings)
    users = sorted({e.user_id for e in events})[:20]
    want = store.fetch(client, users, ALL) if store.apply(client, events[:300]) else None

    async def go() -> tuple[list[bool], list, list[bool]]:
        aclient = async_redis_client(settings)
        try:
            first = await store.apply_async(aclient, events[300:])
            for node in client.get_primaries():  # every node forgets rtrec's scripts
                client.execute_command("SCRIPT", "FLUSH", target_nodes=node)
                assert client.execute_command("SCRIPT", "EXISTS", read_sha, target_nodes=node) == [0]
            states = await store.fetch_async(aclient, users, ALL)
            again = await store.apply_async(aclient, events)  # redelivered: every event a duplicate
            return first, states, again
        finally:
            await aclient.aclose()

    first, states, again = asyncio.run(go())
    assert all(first) and not any(again)
    assert store.stats(client) == {"applied": 600, "duplicates": 600}
    assert want is not None and [s.user_id for s in states] == users
    assert states == store.fetch(client, users, ALL)  # the async read equals the sync one
