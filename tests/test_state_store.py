"""StateStore against a real Redis: idempotence, order independence, decay, covis, fetch."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import uuid

import pytest
import redis

from rtrec.stream.events import Event
from rtrec.stream.log_positions import LogPosition
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import (
    ARGS_PER_EVENT,
    ID_BYTES,
    RESCALE_AFTER_HALF_LIVES,
    SeqEntry,
    StateReads,
    StateStore,
)
from tests.helpers import wait_for

BASE = Settings(
    kafka_bootstrap=None,
    redis_url=None,
    sequence_length=50,
    covis_fanout=5,
    covis_window_ms=3_600_000,
    affinity_half_life_ms=7 * 86_400_000,
    trend_half_life_ms=6 * 3_600_000,
    weight_browse=1.0,
    weight_click=2.0,
    weight_purchase=4.0,
    dedupe_ttl_s=7 * 86_400,
    blend_recent_items=10,
    trending_pool=200,
)
T0 = 1_767_225_600_000
FIRST_EVENT_ARG = 20  # settings, prefix, tie slots and caps come first (APPLY_LUA's FIRST = 21, 1-based)
MINUTE = 60_000
HOUR = 3_600_000


def event_ids(call) -> list[str]:
    """The event ids an APPLY_LUA call carries (its events' fields are one JSON array after the settings)."""
    assert len(call.args) == FIRST_EVENT_ARG + 1
    return json.loads(call.args[FIRST_EVENT_ARG])[::ARGS_PER_EVENT]


def new_store(**overrides) -> StateStore:
    """A store under a fresh key prefix, so tests sharing the server never see each other's keys."""
    return StateStore(BASE.model_copy(update=overrides), prefix=f"t{uuid.uuid4().hex}")


_counter = iter(range(10**9))


def ev(user: str, item: str, ts: int, etype: str = "browse", eid: str | None = None) -> Event:
    return Event(eid or f"e{next(_counter)}", user, item, etype, ts)


def dump(client, store: StateStore, skip_stats: bool = True) -> dict:
    """Every key under the store's prefix with its value, the prefix itself stripped off."""
    out = {}
    for key in client.scan_iter(match=f"{store.prefix}:*", count=1000):
        name = key[len(store.prefix) :]
        if skip_stats and name == ":stats":
            continue
        kind = client.type(key)
        if kind == "zset":
            out[name] = client.zrange(key, 0, -1, withscores=True)
        elif kind == "hash":
            out[name] = client.hgetall(key)
        elif kind == "string":
            out[name] = client.get(key)
        else:  # pragma: no cover - the layout has no other types
            raise AssertionError(f"unexpected {kind} at {key}")
    return out


def covis(client, store: StateStore, item: str) -> dict[str, float]:
    return dict(client.zrange(f"{store.prefix}:covis:{item}", 0, -1, withscores=True))


def raw_scores(client, key: str) -> list[float]:
    return [score for _, score in client.zrange(key, 0, -1, withscores=True)]


def one(client, store: StateStore, user: str):
    [state] = store.fetch(client, [user])
    return state


def async_twin(client: redis.Redis) -> redis.asyncio.Redis:
    """An asyncio client of the same server: the workers' kind of client."""
    kw = client.connection_pool.connection_kwargs
    return redis.asyncio.Redis(host=kw["host"], port=kw["port"], decode_responses=True)


# ---- one plan, two clients -------------------------------------------------------------------------


def test_a_batch_is_one_pipeline_on_one_redis_and_in_batch_order_per_bucket_on_a_cluster() -> None:
    """The calls of a batch are built without a server; the replies map back to the batch's order."""
    events = [ev(f"user{n % 40}", f"i{n % 9}", T0 + n) for n in range(600)]
    number = {e.event_id: n for n, e in enumerate(events)}
    single, cluster = new_store(), new_store(redis_cluster=True, redis_cluster_buckets=4)
    with pytest.raises(StopIteration):  # an empty batch: no round at all
        next(single.apply_plan([]).steps())
    for store in (single, cluster):
        steps = store.apply_plan(events).steps()
        round_ = next(steps)
        assert round_.pipelined == (store is single)
        ids = [event_ids(call) for call in round_.calls]
        assert sorted(n for part in ids for n in map(number.get, part)) == list(range(600))
        assert all(len(part) <= store.CHUNK for part in ids)
        for bucket in {call.keys[0] for call in round_.calls}:  # a bucket's calls in batch order (one slot)
            numbers = [min(map(number.get, ids[n])) for n, call in enumerate(round_.calls) if call.keys[0] == bucket]
            assert numbers == sorted(numbers)
        with pytest.raises(StopIteration) as done:
            steps.send([[number[eid] % 2 for eid in part] for part in ids])
        assert done.value.value == [n % 2 == 1 for n in range(600)]


def test_the_async_client_runs_the_same_plan_to_the_same_state(redis_only) -> None:
    """The workers (asyncio) and the tools (sync) share one copy of the calls: same keys, same values."""
    events = [
        ev(f"u{n % 7}", f"i{n % 11}", T0 + n * MINUTE, ("browse", "click", "purchase")[n % 3]) for n in range(600)
    ]  # more than two chunks
    positions = [LogPosition("events:0", 0, n) for n in range(600)]
    users = [f"u{n}" for n in range(7)]
    sync_store, async_store = new_store(), new_store()
    assert sync_store.apply(redis_only, events, positions) == [True] * 600

    async def apply_twice_and_read() -> tuple[list[bool], list[bool], list]:
        client = async_twin(redis_only)
        try:
            return (
                await async_store.apply_async(client, events, positions),
                await async_store.apply_async(client, events[::-1], positions[::-1]),
                await async_store.fetch_async(client, users),
            )
        finally:
            await client.aclose()

    first, again, states = asyncio.run(apply_twice_and_read())
    assert first == [True] * 600 and again == [False] * 600
    assert dump(redis_only, async_store, skip_stats=False) == {
        **dump(redis_only, sync_store),
        ":stats": {"applied": "600", "duplicates": "600"},
    }
    assert states == sync_store.fetch(redis_only, users)


# ---- apply: new / duplicate ---------------------------------------------------------------------


def test_apply_returns_new_flags_and_counts_stats(redis_only) -> None:
    store = new_store()
    a, b = ev("u", "i1", T0), ev("u", "i2", T0 + 1)
    assert store.apply(redis_only, [a, b]) == [True, True]
    assert store.apply(redis_only, [b, ev("u", "i3", T0 + 2)]) == [False, True]
    assert store.stats(redis_only) == {"applied": 3, "duplicates": 1}
    assert store.apply(redis_only, []) == []


def test_duplicate_in_the_same_batch_changes_nothing(redis_only) -> None:
    events = [ev("u", "a", T0), ev("u", "b", T0 + MINUTE, "purchase"), ev("v", "a", T0 + 2 * MINUTE)]
    once, twice = new_store(), new_store()
    assert once.apply(redis_only, events) == [True] * 3
    assert twice.apply(redis_only, events + [events[1], events[0]]) == [True] * 3 + [False] * 2
    assert dump(redis_only, twice) == dump(redis_only, once)
    assert twice.stats(redis_only) == {"applied": 3, "duplicates": 2}


def test_duplicate_in_a_later_batch_changes_nothing(redis_only) -> None:
    store = new_store()
    events = [ev("u", f"i{n % 4}", T0 + n * MINUTE, ("browse", "click", "purchase")[n % 3]) for n in range(12)]
    store.apply(redis_only, events)
    before = dump(redis_only, store)
    assert store.apply(redis_only, list(reversed(events))) == [False] * 12
    assert dump(redis_only, store) == before
    assert store.stats(redis_only) == {"applied": 12, "duplicates": 12}


def test_same_event_id_with_different_content_is_still_a_duplicate(redis_only) -> None:
    store = new_store()
    store.apply(redis_only, [ev("u", "a", T0, eid="x1")])
    before = dump(redis_only, store)
    assert store.apply(redis_only, [ev("u", "b", T0 + 1, "purchase", eid="x1")]) == [False]
    assert dump(redis_only, store) == before


def test_a_resent_event_is_a_duplicate_while_in_its_users_window(redis_only) -> None:
    store = new_store(dedupe_window=4)
    first = ev("u", "a", T0, eid="w0")
    store.apply(redis_only, [first, *(ev("u", f"i{n}", T0 + n) for n in range(1, 4))])
    assert store.apply(redis_only, [first]) == [False]  # three later events: still among the last four
    store.apply(redis_only, [ev("u", "z", T0 + 10)])
    assert store.apply(redis_only, [first]) == [True]  # four later events: out of the window, applied again
    assert len(redis_only.get(store.user_key("u", "ids"))) == 4 * ID_BYTES  # the window never grows past it


def test_event_ids_are_unique_per_user(redis_only) -> None:
    store = new_store()
    assert store.apply(redis_only, [ev("u", "a", T0, eid="same"), ev("v", "a", T0, eid="same")]) == [True, True]


def test_the_id_window_expires_with_the_user(redis_only) -> None:
    store = new_store(user_ttl_days=1.0)
    store.apply(redis_only, [ev("u", "a", T0)])
    ttl = redis_only.pttl(store.user_key("u", "ids"))
    assert 86_400_000 - 5_000 < ttl <= 86_400_000


def at(offset: int, epoch: int = 0, field: str = "events:0") -> LogPosition:
    return LogPosition(field, epoch, offset)


def test_redelivered_records_are_duplicates_however_many_by_their_offsets(redis_only) -> None:
    """A crash before a commit redelivers a whole batch: far more of one user's events than the id window."""
    events = [ev("bot", f"i{n % 7}", T0 + n * MINUTE, ("browse", "click", "purchase")[n % 3]) for n in range(40)]
    once, twice = new_store(dedupe_window=3), new_store(dedupe_window=3)
    positions = [at(100 + n) for n in range(40)]
    once.apply(redis_only, events, positions)
    twice.apply(redis_only, events[:25], positions[:25])
    assert twice.apply(redis_only, events, positions) == [False] * 25 + [True] * 15
    assert dump(redis_only, twice) == dump(redis_only, once)
    assert twice.stats(redis_only) == {"applied": 40, "duplicates": 25}


def test_a_new_log_epoch_applies_offsets_seen_in_the_old_log(redis_only) -> None:
    store = new_store()
    store.apply(redis_only, [ev("u", "a", T0)], [at(0)])
    assert store.apply(redis_only, [ev("u", "b", T0 + 1)], [at(0)]) == [False]  # same log: a redelivery
    assert store.apply(redis_only, [ev("u", "b", T0 + 1)], [at(0, epoch=1)]) == [True]  # the broker's log restarted
    assert redis_only.hget(store.user_key("u", "h"), "o:events:0") == "1:0"


def test_records_without_a_position_rely_on_the_id_window(redis_only) -> None:
    store = new_store()
    a = ev("u", "a", T0)
    store.apply(redis_only, [a], [at(5)])
    assert store.apply(redis_only, [a]) == [False]  # a producer retry: same id, another offset
    assert store.apply(redis_only, [ev("u", "b", T0 + 1)], [None]) == [True]


def test_batches_larger_than_one_chunk(redis_only) -> None:
    store = new_store()
    n = StateStore.CHUNK * 2 + 17
    events = [ev(f"u{i % 7}", f"i{i % 13}", T0 + i) for i in range(n)]
    flags = store.apply(redis_only, events + events[:3])
    assert flags == [True] * n + [False] * 3
    assert sum(raw_scores(redis_only, f"{store.prefix}:items:n")) == n
    assert store.stats(redis_only) == {"applied": n, "duplicates": 3}


def test_a_call_a_full_redis_refused_loses_no_event_of_its_users(redis_only) -> None:
    """Redis at its memory limit refuses some calls of a pipeline and runs the others; the retry of the
    batch must still apply every event once (a user's later event applied first would raise the user's
    watermark over the earlier one, which the retry would then skip as redelivered)."""
    store = new_store()
    n = StateStore.CHUNK * 2 + 17
    events = [ev(f"u{i % 7}", f"i{i % 13}", T0 + i) for i in range(n)]  # every user in every part of the batch
    positions = [at(i) for i in range(n)]
    round_ = next(store.apply_plan(events, positions).steps())
    assert len(round_.calls) > 1
    for call in round_.calls[1:]:  # the first call was refused (OOM), the others ran
        redis_only.register_script(call.source)(keys=call.keys, args=call.args)
    assert sum(store.apply(redis_only, events, positions)) == len(event_ids(round_.calls[0]))
    assert sum(int(redis_only.hget(f"{store.prefix}:u:u{k}:h", "n")) for k in range(7)) == n


# ---- sequence and counts ------------------------------------------------------------------------------


def test_sequence_is_capped_keeping_the_newest_by_ts(redis_only) -> None:
    store = new_store(sequence_length=5)
    offsets = list(range(12))
    random.Random(5).shuffle(offsets)  # arrive out of order
    events = [ev("u", f"i{k}", T0 + k * MINUTE, eid=f"e{k}") for k in offsets]
    store.apply(redis_only, events)
    state = one(redis_only, store, "u")
    assert state.sequence == [SeqEntry(f"i{k}", "browse", T0 + k * MINUTE, f"e{k}") for k in range(7, 12)]
    assert redis_only.zcard(f"{store.prefix}:u:u:seq") == 5
    assert state.counts["n"] == 12  # counts are not capped


def test_counts_first_and_last_ts(redis_only) -> None:
    store = new_store()
    store.apply(
        redis_only,
        [
            ev("u", "a", T0 + 5 * MINUTE, "click"),
            ev("u", "b", T0 + 9 * MINUTE, "browse"),
            ev("u", "a", T0 + 1 * MINUTE, "purchase"),  # late, and the oldest
            ev("u", "c", T0 + 7 * MINUTE, "click"),
        ],
    )
    state = one(redis_only, store, "u")
    assert state.known
    assert state.counts == {"browse": 1, "click": 2, "purchase": 1, "n": 4}
    assert (state.first_ts, state.last_ts) == (T0 + MINUTE, T0 + 9 * MINUTE)
    assert [e.item_id for e in state.sequence] == ["a", "a", "c", "b"]
    assert [e.type for e in state.sequence] == ["purchase", "click", "click", "browse"]


def test_bought_set(redis_only) -> None:
    store = new_store()
    store.apply(
        redis_only,
        [
            ev("u", "a", T0, "purchase"),
            ev("u", "b", T0 + 1, "browse"),
            ev("u", "c", T0 + 2, "click"),
            ev("u", "d", T0 + 3, "purchase"),
            ev("u", "a", T0 + 4, "purchase"),
            ev("other", "e", T0 + 5, "purchase"),
        ],
    )
    assert one(redis_only, store, "u").purchased == {"a", "d"}
    assert redis_only.zscore(f"{store.prefix}:u:u:bought", "a") == T0 + 4  # latest purchase
    store.apply(redis_only, [ev("u", "a", T0 - 100, "purchase")])  # an older, late purchase
    assert redis_only.zscore(f"{store.prefix}:u:u:bought", "a") == T0 + 4


# ---- forward decay: order independence ------------------------------------------------------------


def random_events(seed: int, n: int = 200) -> list[Event]:
    rng = random.Random(seed)
    types = ["browse"] * 6 + ["click"] * 3 + ["purchase"]
    return [
        Event(
            f"e{seed}-{k}",
            f"u{rng.randrange(4)}",
            f"i{rng.randrange(25)}",
            rng.choice(types),
            T0 + rng.randrange(3 * 86_400_000),  # three days: twelve trend half-lives
        )
        for k in range(n)
    ]


def test_out_of_order_arrival_gives_the_same_state(redis_only) -> None:
    events = random_events(seed=11)
    in_order = sorted(events, key=lambda e: e.ts)
    shuffled = events[:]
    random.Random(42).shuffle(shuffled)
    assert [e.ts for e in shuffled] != [e.ts for e in in_order]

    ordered_store, shuffled_store = new_store(sequence_length=20), new_store(sequence_length=20)
    ordered_store.apply(redis_only, in_order)
    for start in range(0, len(shuffled), 37):  # several batches, too
        shuffled_store.apply(redis_only, shuffled[start : start + 37])

    users = sorted({e.user_id for e in events})
    for a, b in zip(ordered_store.fetch(redis_only, users), shuffled_store.fetch(redis_only, users)):
        assert a.known and len(a.sequence) == 20
        assert b.sequence == a.sequence
        assert b.counts == a.counts
        assert (b.first_ts, b.last_ts) == (a.first_ts, a.last_ts)
        assert b.purchased == a.purchased
        assert b.affinities == pytest.approx(a.affinities, rel=1e-9)
        assert dict(b.trending) == pytest.approx(dict(a.trending), rel=1e-9)

    def counts(store):
        return dict(redis_only.zrange(f"{store.prefix}:items:n", 0, -1, withscores=True))

    assert counts(shuffled_store) == counts(ordered_store)
    now = T0 + 4 * 86_400_000
    pop_ordered = ordered_store.decayed_popularity(redis_only, now)
    assert len(pop_ordered) == len({e.item_id for e in events})
    assert shuffled_store.decayed_popularity(redis_only, now) == pytest.approx(pop_ordered, rel=1e-9)


def test_decayed_popularity_matches_the_closed_form(redis_only) -> None:
    store = new_store()
    events = random_events(seed=3, n=120)
    random.Random(1).shuffle(events)
    store.apply(redis_only, events)
    now = T0 + 5 * 86_400_000
    weights = BASE.type_weights()
    expected: dict[str, float] = {}
    for e in events:
        expected[e.item_id] = expected.get(e.item_id, 0.0) + weights[e.type] * 2 ** (
            -(now - e.ts) / BASE.trend_half_life_ms
        )
    assert store.decayed_popularity(redis_only, now) == pytest.approx(expected, rel=1e-9)


def test_decayed_popularity_of_an_empty_store(redis_only) -> None:
    assert new_store().decayed_popularity(redis_only, T0) == {}


def test_affinity_half_life(redis_only) -> None:
    store = new_store()
    hl = BASE.affinity_half_life_ms
    store.apply(redis_only, [ev("u", "late", T0 + hl), ev("u", "early", T0)])
    state = one(redis_only, store, "u")
    assert state.affinities["late"] == pytest.approx(1.0)
    assert state.affinities["early"] == pytest.approx(0.5, rel=1e-9)


def test_popularity_half_life(redis_only) -> None:
    store = new_store()
    hl = BASE.trend_half_life_ms
    store.apply(redis_only, [ev("u", "early", T0), ev("v", "late", T0 + hl)])
    assert store.decayed_popularity(redis_only, T0 + hl) == pytest.approx({"early": 0.5, "late": 1.0}, rel=1e-9)
    assert store.decayed_popularity(redis_only, T0 + 3 * hl) == pytest.approx({"early": 0.125, "late": 0.25}, rel=1e-9)


def test_event_types_are_weighted(redis_only) -> None:
    store = new_store()
    store.apply(redis_only, [ev("u", "b", T0, "browse"), ev("u", "c", T0, "click"), ev("u", "p", T0, "purchase")])
    assert one(redis_only, store, "u").affinities == pytest.approx({"p": 1.0, "c": 0.5, "b": 0.25})
    assert store.decayed_popularity(redis_only, T0) == pytest.approx({"b": 1.0, "c": 2.0, "p": 4.0})


def test_affinities_are_per_user_and_max_normalised(redis_only) -> None:
    store = new_store()
    store.apply(redis_only, [ev("u", "a", T0), ev("u", "a", T0 + 1), ev("u", "b", T0 + 2), ev("v", "b", T0)])
    [u, v] = store.fetch(redis_only, ["u", "v"])
    assert u.affinities == pytest.approx({"a": 1.0, "b": 0.5}, rel=1e-6)
    assert v.affinities == {"b": 1.0}


# ---- rescaling over many half-lives ------------------------------------------------------------------

HL = 1000  # one second: a few dozen events span hundreds of half-lives


def test_rescaling_keeps_ratios_and_scores_finite(redis_only) -> None:
    store = new_store(trend_half_life_ms=HL, affinity_half_life_ms=HL)
    # one item per step, 10 half-lives apart, over 300 half-lives; then three close to the end
    steps = [ev("u", f"s{k}", T0 + k * 10 * HL) for k in range(31)]
    end = T0 + 300 * HL
    tail = [ev("u", "p", end - HL, "purchase"), ev("u", "q", end - 2 * HL), ev("u", "r", end - 3 * HL, "click")]
    store.apply(redis_only, steps[:20])
    store.apply(redis_only, steps[20:] + tail)

    landmark = int(redis_only.get(f"{store.prefix}:pop:L"))
    assert landmark > T0 + RESCALE_AFTER_HALF_LIVES * HL  # the landmark moved forward
    for key in (f"{store.prefix}:pop", f"{store.prefix}:u:u:aff"):
        scores = raw_scores(redis_only, key)
        assert all(math.isfinite(s) and 0 <= s < 2 ** (RESCALE_AFTER_HALF_LIVES + 3) for s in scores)

    pop = store.decayed_popularity(redis_only, end)
    assert pop["s30"] == pytest.approx(1.0, rel=1e-9)
    assert pop["p"] == pytest.approx(4 * 0.5, rel=1e-9)
    assert pop["q"] == pytest.approx(0.25, rel=1e-9)
    assert pop["r"] == pytest.approx(2 * 0.125, rel=1e-9)
    assert pop["s29"] == pytest.approx(2.0**-10, rel=1e-9)
    assert pop["s25"] == pytest.approx(2.0**-50, rel=1e-9)

    aff = one(redis_only, store, "u").affinities  # relative to the top item, p (4 * 0.5 = 2)
    assert aff["p"] == 1.0
    assert aff["s30"] == pytest.approx(1.0 / 2, rel=1e-9)
    assert aff["q"] == pytest.approx(0.25 / 2, rel=1e-9)
    assert aff["r"] == pytest.approx(0.25 / 2, rel=1e-9)
    assert aff["s28"] == pytest.approx(2.0**-20 / 2, rel=1e-9)


def test_out_of_order_arrival_across_rescales(redis_only) -> None:
    events = [ev(f"u{k % 3}", f"i{k % 7}", T0 + k * 5 * HL, ("browse", "click")[k % 2]) for k in range(60)]
    shuffled = events[:]
    random.Random(9).shuffle(shuffled)
    a = new_store(trend_half_life_ms=HL, affinity_half_life_ms=HL)
    b = new_store(trend_half_life_ms=HL, affinity_half_life_ms=HL)
    a.apply(redis_only, events)
    b.apply(redis_only, shuffled)
    now = T0 + 300 * HL
    pa, pb = a.decayed_popularity(redis_only, now), b.decayed_popularity(redis_only, now)
    assert set(pa) == set(pb) == {f"i{k}" for k in range(7)}
    assert pb == pytest.approx(pa, rel=1e-9)
    assert max(pa.values()) / min(pa.values()) > 2**20  # the values really span many half-lives
    for user in ("u0", "u1", "u2"):
        assert one(redis_only, b, user).affinities == pytest.approx(one(redis_only, a, user).affinities, rel=1e-9)
    assert all(math.isfinite(s) for s in raw_scores(redis_only, f"{b.prefix}:pop"))


def test_a_single_jump_of_thousands_of_half_lives(redis_only) -> None:
    store = new_store(trend_half_life_ms=HL, affinity_half_life_ms=HL)
    store.apply(redis_only, [ev("u", "old", T0)])
    store.apply(redis_only, [ev("u", "new", T0 + 2000 * HL), ev("u", "near", T0 + 1999 * HL)])
    assert all(math.isfinite(s) for s in raw_scores(redis_only, f"{store.prefix}:pop"))
    pop = store.decayed_popularity(redis_only, T0 + 2000 * HL)
    assert pop["new"] == pytest.approx(1.0)
    assert pop["near"] == pytest.approx(0.5)
    assert one(redis_only, store, "u").affinities["new"] == pytest.approx(1.0)


def test_old_first_event_does_not_break_popularity_of_current_ones(redis_only) -> None:
    store = StateStore(Settings(kafka_bootstrap=None, redis_url=None), prefix=f"t{uuid.uuid4().hex}")
    store.apply(redis_only, [ev("u", "ancient", 1_000)])
    store.apply(redis_only, [ev("u", "current", T0)])
    assert store.decayed_popularity(redis_only, T0)["current"] == pytest.approx(1.0)


# ---- co-visitation ---------------------------------------------------------------------------------


def test_covis_is_symmetric_and_counts_pairs(redis_only) -> None:
    store = new_store()
    store.apply(redis_only, [ev("u", "a", T0), ev("u", "b", T0 + MINUTE)])
    store.apply(redis_only, [ev("v", "a", T0), ev("v", "b", T0 + MINUTE)])
    assert covis(redis_only, store, "a") == {"b": 2.0}
    assert covis(redis_only, store, "b") == {"a": 2.0}


def test_covis_never_pairs_an_item_with_itself_or_counts_it_twice(redis_only) -> None:
    store = new_store()
    store.apply(redis_only, [ev("u", "a", T0), ev("u", "a", T0 + 1), ev("u", "b", T0 + 2), ev("u", "b", T0 + 3)])
    # 2nd a: only a before it; 1st b: a (twice in the sequence, counted once); 2nd b: a (b skipped)
    assert covis(redis_only, store, "a") == {"b": 2.0}
    assert covis(redis_only, store, "b") == {"a": 2.0}


def test_covis_fanout_is_bounded(redis_only) -> None:
    store = new_store(covis_fanout=3)
    store.apply(redis_only, [ev("u", f"i{k}", T0 + k * MINUTE) for k in range(8)])
    store.apply(redis_only, [ev("u", "new", T0 + 9 * MINUTE)])
    assert set(covis(redis_only, store, "new")) == {"i7", "i6", "i5"}  # the three most recent
    assert all(len(covis(redis_only, store, f"i{k}")) <= 3 + 3 for k in range(8))
    assert len(covis(redis_only, store, "i0")) == 3  # paired with i1..i3 when they arrived


def test_covis_fanout_zero_disables_covis(redis_only) -> None:
    store = new_store(covis_fanout=0)
    store.apply(redis_only, [ev("u", f"i{k}", T0 + k) for k in range(5)])
    assert not list(redis_only.scan_iter(match=f"{store.prefix}:covis:*"))


def test_covis_window_is_respected(redis_only) -> None:
    window = 10 * MINUTE
    store = new_store(covis_window_ms=window)
    store.apply(
        redis_only,
        [
            ev("u", "far", T0),
            ev("u", "near", T0 + window + MINUTE),  # more than a window after "far"
            ev("u", "x", T0 + window + 2 * MINUTE),  # within a window of "near" only
        ],
    )
    assert covis(redis_only, store, "far") == {}
    assert covis(redis_only, store, "near") == {"x": 1.0}
    assert covis(redis_only, store, "x") == {"near": 1.0}


def test_late_event_pairs_with_its_neighbours_in_event_time(redis_only) -> None:
    window = 10 * MINUTE
    store = new_store(covis_window_ms=window)
    store.apply(redis_only, [ev("u", "a", T0), ev("u", "b", T0 + 30 * MINUTE)])
    store.apply(redis_only, [ev("u", "late", T0 + 25 * MINUTE)])  # arrives last, belongs next to b
    assert covis(redis_only, store, "late") == {"b": 1.0}


def test_fetch_returns_covis_of_recent_items(redis_only) -> None:
    store = new_store()
    store.apply(redis_only, [ev("v", "a", T0), ev("v", "x", T0 + 1), ev("v", "b", T0 + 2), ev("v", "y", T0 + 3)])
    store.apply(redis_only, [ev("u", "a", T0 + HOUR * 5), ev("u", "b", T0 + HOUR * 10)])
    state = one(redis_only, store, "u")
    assert set(state.covis) == {"a", "b"}
    assert dict(state.covis["b"]) == {"x": 1.0, "y": 1.0, "a": 1.0}
    assert dict(state.covis["a"]) == {"x": 1.0, "b": 1.0, "y": 1.0}


# ---- fetch --------------------------------------------------------------------------------------------


def test_fetch_unknown_user(redis_only) -> None:
    store = new_store()
    store.apply(redis_only, [ev("someone", "hot", T0, "purchase"), ev("someone", "warm", T0)])
    state = one(redis_only, store, "nobody")
    assert state.user_id == "nobody"
    assert not state.known
    assert state.sequence == [] and state.counts == {} and state.affinities == {}
    assert state.purchased == set() and state.covis == {}
    assert (state.first_ts, state.last_ts) == (None, None)
    assert state.exclude == frozenset()
    assert state.trending == [("hot", 1.0), ("warm", 0.25)]  # trending is there even for strangers


def test_fetch_on_an_empty_store(redis_only) -> None:
    [state] = new_store().fetch(redis_only, ["u"])
    assert not state.known and state.trending == []


def test_fetch_many_users_in_one_call(redis_only) -> None:
    store = new_store()
    users = [f"user{n}" for n in range(30)]
    store.apply(redis_only, [ev(u, f"item{n}", T0 + n, "click") for n, u in enumerate(users)])
    asked = users + ["ghost"] + users[:2]
    states = store.fetch(redis_only, asked)
    assert [s.user_id for s in states] == asked
    for n, s in enumerate(states[:30]):
        assert [e.item_id for e in s.sequence] == [f"item{n}"]
        assert s.counts == {"click": 1, "n": 1}
    assert not states[30].known
    assert states[31].sequence == states[0].sequence
    assert all(s.trending == states[0].trending for s in states)
    assert store.fetch(redis_only, []) == []


def test_trending_is_capped_by_the_pool_size(redis_only) -> None:
    store = new_store(trending_pool=5)
    store.apply(redis_only, [ev("u", f"i{n:02d}", T0 + n) for n in range(12)])
    trending = one(redis_only, store, "u").trending
    assert len(trending) == 5
    assert [item for item, _ in trending] == ["i11", "i10", "i09", "i08", "i07"]
    assert trending[0][1] == 1.0
    assert all(a[1] >= b[1] for a, b in itertools.pairwise(trending))


def test_stores_with_different_prefixes_do_not_share_state(redis_only) -> None:
    a, b = new_store(), new_store()
    a.apply(redis_only, [ev("u", "x", T0, eid="shared-id")])
    assert b.apply(redis_only, [ev("u", "y", T0, eid="shared-id")]) == [True]
    assert [e.item_id for e in one(redis_only, a, "u").sequence] == ["x"]
    assert [e.item_id for e in one(redis_only, b, "u").sequence] == ["y"]


def test_equal_timestamps_keep_arrival_order(redis_only) -> None:
    """MovieLens-style histories stamp many events in the same second: the sequence keeps file order."""
    store = new_store()
    items = ["z", "a", "m", "b"]
    store.apply(redis_only, [ev("u", item, T0, eid=f"tie-{n}") for n, item in enumerate(items)])
    state = one(redis_only, store, "u")
    assert [e.item_id for e in state.sequence] == items
    assert {e.ts for e in state.sequence} == {T0}


def test_a_smaller_read_returns_the_newest_events_and_fewer_neighbour_lists(redis_only) -> None:
    store = new_store()
    others = [ev(f"o{n}", f"item{n}", T0 + n) for n in range(8)]
    others += [ev(f"o{n}", "shared", T0 + 100 + n) for n in range(8)]
    mine = [ev("me", f"item{n}", T0 + 1000 + n) for n in range(8)]
    store.apply(redis_only, others + mine)
    [full] = store.fetch(redis_only, ["me"])
    [small] = store.fetch(redis_only, ["me"], StateReads(sequence=3, recent_items=2, neighbours=1))
    assert [e.item_id for e in full.sequence] == [f"item{n}" for n in range(8)]
    assert [e.item_id for e in small.sequence] == ["item5", "item6", "item7"]  # the newest, oldest first
    assert set(small.covis) == {"item7", "item6"}  # neighbours only for the two most recent items
    assert all(len(v) <= 1 for v in small.covis.values())
    assert len(full.covis) == 8


# ---- caps: memory bounded by configuration -------------------------------------------------------
def test_affinities_covis_and_item_sets_keep_only_their_top_members(redis_only) -> None:
    store = new_store(affinity_cap=5, covis_cap=3, items_cap=4, covis_fanout=5)
    events = [ev("cap-u", f"i{k}", T0 + k * MINUTE) for k in range(20)]  # 20 distinct items, one user
    events += [ev("cap-u", "i0", T0 + (20 + k) * MINUTE, "purchase") for k in range(5)]  # i0: the favourite
    store.apply(redis_only, events)
    p = store.prefix
    aff = redis_only.zrange(f"{p}:u:cap-u:aff", 0, -1)
    assert len(aff) == 5 and "i0" in aff  # the strongest affinity survives the trims
    assert redis_only.zcard(f"{p}:pop") == 4 and redis_only.zcard(f"{p}:items:n") == 4
    assert "i0" in redis_only.zrange(f"{p}:pop", 0, -1)
    assert max(redis_only.zcard(key) for key in redis_only.scan_iter(match=f"{p}:covis:*")) == 3
    assert one(redis_only, store, "cap-u").counts["n"] == 25  # counts and sequence are not capped by these


def test_caps_do_not_bind_below_them(redis_only) -> None:
    capped, free = new_store(affinity_cap=50, covis_cap=50, items_cap=50), new_store()
    events = [ev(f"u{k % 3}", f"i{k % 10}", T0 + k * MINUTE, eid=f"same-{k}") for k in range(60)]
    capped.apply(redis_only, events)
    free.apply(redis_only, events)
    assert dump(redis_only, capped) == dump(redis_only, free)


# ---- retention ---------------------------------------------------------------------------------
def test_user_and_item_keys_expire_after_inactivity_and_every_event_refreshes_them(redis_only) -> None:
    day_ms = 86_400_000
    store = new_store(user_ttl_days=60_000 / day_ms, item_ttl_days=60_000 / day_ms)  # one minute each
    store.apply(redis_only, [ev("ret-u", "a", T0, "purchase"), ev("ret-u", "b", T0 + MINUTE)])
    p = store.prefix
    keys = [f"{p}:u:ret-u:{part}" for part in ("h", "seq", "aff", "bought")] + [f"{p}:covis:a", f"{p}:covis:b"]
    assert all(0 < redis_only.pttl(key) <= 60_000 for key in keys)
    redis_only.pexpire(f"{p}:u:ret-u:h", 5_000)  # as if most of the minute had passed
    store.apply(redis_only, [ev("ret-u", "c", T0 + 2 * MINUTE)])
    assert redis_only.pttl(f"{p}:u:ret-u:h") > 5_000  # the new event refreshed it

    store.apply(redis_only, [ev("late-buyer", "a", T0), ev("late-buyer", "a", T0 + MINUTE, "purchase")])
    assert 0 < redis_only.pttl(f"{p}:u:late-buyer:bought") <= 60_000  # a key created later gets its TTL too

    short = new_store(user_ttl_days=200 / day_ms, item_ttl_days=0)  # 0.2 s; items kept
    short.apply(redis_only, [ev("gone-u", "x", T0), ev("gone-u", "y", T0 + MINUTE)])
    assert redis_only.pttl(f"{short.prefix}:covis:x") == -1  # no expiry
    wait_for(lambda: not redis_only.exists(f"{short.prefix}:u:gone-u:h"), timeout_s=10, what="user keys expired")
    assert not one(redis_only, short, "gone-u").known  # a returning user starts afresh


def test_retention_zero_keeps_keys(redis_only) -> None:
    store = new_store(user_ttl_days=0, item_ttl_days=0)
    store.apply(redis_only, [ev("keep-u", "a", T0), ev("keep-u", "b", T0 + MINUTE)])
    assert redis_only.pttl(f"{store.prefix}:u:keep-u:h") == -1 and redis_only.pttl(f"{store.prefix}:covis:a") == -1


# ---- fairness ------------------------------------------------------------------------------------
def test_one_user_cannot_take_over_trending_or_co_visitation(redis_only) -> None:
    store = new_store(fair_max_per_item=5, fair_window_ms=HOUR)
    events = [ev("bot", "bot-item", T0 + k, "purchase") for k in range(60)]  # 60 purchases in one minute
    events += [ev("bot", "bot-a" if k % 2 else "bot-b", T0 + 1000 + k, "click") for k in range(60)]
    events += [ev(f"shopper{k}", "real-hit", T0 + k, "purchase") for k in range(8)]  # 8 people buy it once
    store.apply(redis_only, events)
    trending = [item for item, _ in one(redis_only, store, "cold-start-user").trending]
    assert trending.index("real-hit") < trending.index("bot-item")  # the bot counts like 5 purchases, not 60
    pop = dict(redis_only.zrange(f"{store.prefix}:pop", 0, -1, withscores=True))
    assert pop["bot-item"] == pytest.approx(pop["real-hit"] * 5 / 8, rel=1e-3)
    assert covis(redis_only, store, "bot-a").get("bot-b", 0) <= 2 * 5  # pairs from at most 5 + 5 events
    assert one(redis_only, store, "bot").counts["purchase"] == 60  # its own state counts everything


def test_the_fairness_window_lets_the_same_user_count_again_later(redis_only) -> None:
    store = new_store(fair_max_per_item=2, fair_window_ms=HOUR)
    events = [ev("fan", "song", T0 + k * MINUTE) for k in range(5)]  # hour 0: 2 of 5 count
    events += [ev("fan", "song", T0 + HOUR + k * MINUTE) for k in range(5)]  # hour 1: 2 more
    store.apply(redis_only, events)
    assert redis_only.zscore(f"{store.prefix}:items:n", "song") == 10  # raw counts stay raw
    shared = new_store(fair_max_per_item=100, fair_window_ms=HOUR)
    shared.apply(
        redis_only, [ev("fan", "song", e.ts, eid=f"x{e.event_id}") for n, e in enumerate(events) if n % 5 < 2]
    )  # the four that counted, with no cap
    assert redis_only.zscore(f"{store.prefix}:pop", "song") == pytest.approx(
        redis_only.zscore(f"{shared.prefix}:pop", "song"), rel=1e-9
    )


def test_a_read_survives_a_redis_restart_between_two_reads(tmp_path) -> None:
    """Pipelines do not retry a dropped connection (they may not be idempotent); reads are, so the store
    retries them once: the first request after a Redis restart is answered, not failed."""
    import asyncio

    from rtrec.stream.connections import async_redis_client, redis_client
    from rtrec.stream.embedded import start_redis

    server, url = start_redis(BASE, tmp_path)
    try:
        s = BASE.model_copy(update={"redis_url": url})
        store, client = StateStore(s), redis_client(s)
        store.apply(client, [ev("u", "a", T0)])
        client.save()

        async def read_restart_read() -> bool:
            aclient = async_redis_client(s)
            assert (await store.fetch_async(aclient, ["u"]))[0].known  # the pool holds a connection now
            server.restart()
            server.wait_port(server.port)
            return (await store.fetch_async(aclient, ["u"]))[0].known

        assert store.fetch(client, ["u"])[0].known
        assert asyncio.run(read_restart_read())  # the worker's path
        server.restart()
        server.wait_port(server.port)
        assert store.fetch(client, ["u"])[0].known  # the CLI's path
    finally:
        server.stop()


# ---- the hot path's shortcuts change nothing ---------------------------------------------------------


def dump_with_ttls(client, store: StateStore) -> dict:
    """``dump`` with each key's TTL in whole minutes (two stores written a moment apart agree on those)."""
    return {
        name: (value, round(client.pttl(f"{store.prefix}{name}") / MINUTE))
        for name, value in dump(client, store).items()
    }


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"sequence_length": 4, "affinity_cap": 3, "covis_cap": 2, "items_cap": 5, "fair_max_per_item": 1},
        {"affinity_half_life_ms": MINUTE, "trend_half_life_ms": MINUTE, "user_ttl_days": 1.0, "item_ttl_days": 0.5},
        {"covis_fanout": 0, "user_ttl_days": 0.0, "item_ttl_days": 0.0, "dedupe_window": 3},
    ],
    ids=["defaults", "tight-caps", "decay-and-ttls", "no-covis-no-ttl"],
)
def test_one_script_call_per_chunk_equals_one_call_per_event(redis_only, overrides) -> None:
    """APPLY_LUA reads a user's hash once, writes it back once, and counts a set only when it may have
    outgrown its cap: a chunk must still leave exactly what the same events applied one call each leave
    (caps crossed again and again, fairness windows, rescaled landmarks, resent and redelivered events)."""
    rnd = random.Random(7)
    events: list[Event] = []
    positions: list[LogPosition | None] = []
    for n in range(700):
        if events and rnd.random() < 0.1:  # resent (another offset) or redelivered (the same one)
            k = rnd.randrange(len(events))
            events.append(events[k])
            positions.append(positions[k] if rnd.random() < 0.5 else at(n, field=f"ev:{n % 2}"))
            continue
        etype = rnd.choice(["browse", "browse", "click", "purchase"])
        jump = 400 * 86_400_000 if rnd.random() < 0.01 else 0  # far ahead: the landmarks move
        events.append(ev(f"u{rnd.randrange(6)}", f"i{rnd.randrange(12)}", T0 + n * MINUTE + jump, etype))
        positions.append(None if rnd.random() < 0.1 else at(n, field=f"ev:{n % 2}"))
    assert_one_call_equals_one_call_per_event(redis_only, events, positions, overrides)


def assert_one_call_equals_one_call_per_event(client, events, positions, overrides) -> None:
    batched, single = new_store(**overrides), new_store(**overrides)
    flags = batched.apply(client, events, positions)
    first_seen = {e.user_id: n for n, e in reversed(list(enumerate(events)))}
    order = sorted(range(len(events)), key=lambda n: (first_seen[events[n].user_id], n))  # a batch's calls: by user
    one_by_one = {n: single.apply(client, [events[n]], [positions[n]])[0] for n in order}
    assert flags == [one_by_one[n] for n in range(len(events))]
    assert dump_with_ttls(client, batched) == dump_with_ttls(client, single)
    assert batched.stats(client) == single.stats(client)


def test_a_user_with_hundreds_of_items_in_one_call(redis_only) -> None:
    """The write-back of a user's hashes at the end of a call goes out in slices (Lua's unpack has a limit)."""
    events = [ev("many", f"i{n}", T0 + n) for n in range(600)]
    positions = [at(n) for n in range(600)]
    assert_one_call_equals_one_call_per_event(redis_only, events, positions, {"affinity_cap": 1000})


@pytest.mark.parametrize("encoder", ["orjson", "json"])
def test_event_fields_travel_as_one_json_argument_whatever_they_hold(redis_only, monkeypatch, encoder) -> None:
    """A chunk's events are one JSON array for the script, so no character of a field can shift another
    field (the store takes Events built without validation too); orjson or json (escapes) alike."""
    from rtrec.stream import state_store

    if encoder == "json":
        monkeypatch.setattr(state_store, "_dumps", None)
    elif state_store._dumps is None:
        pytest.skip("orjson is not installed")
    store = new_store()
    odd = ev('u "1"', 'itém,\n"x', T0, eid="e\x00\\1")
    [call] = next(store.apply_plan([odd]).steps()).calls
    assert json.loads(call.args[FIRST_EVENT_ARG])[:4] == ["e\x00\\1", 'u "1"', 'itém,\n"x', "browse"]
    assert store.apply(redis_only, [odd]) == [True]
    assert store.apply(redis_only, [odd]) == [False]
    [state] = store.fetch(redis_only, ['u "1"'])
    assert [(s.item_id, s.event_id) for s in state.sequence] == [('itém,\n"x', "e\x00\\1")]


def test_orjson_reads_every_payload_as_json_does(monkeypatch) -> None:
    """The state worker parses events with orjson when it is installed; whatever it accepts, refuses or reads
    differently (integers beyond 64 bits, deep nesting, lone surrogates, NaN) must end as json's path ends."""
    from rtrec.stream import events

    if events._fast_loads is None:
        pytest.skip("orjson is not installed: json is the only path")
    settings = BASE
    valid = b'{"event_id":"e1","user_id":"u1","item_id":"i1","type":"click","ts":%d' % T0
    payloads = [
        valid + b"}",
        valid + b',"session_id":"s1","price":12.5,"quantity":2,"context":{"page":"home","n":[1,2.5,{"a":null}]}}',
        valid + b',"quantity":123456789012345678901234567890}',
        valid + b',"price":1e400}',
        valid + b',"price":NaN}',
        valid + b',"price":18446744073709551616}',
        valid + b',"price":9223372036854775808.0}',
        valid.replace(b"%d" % T0, b"99999999999999999999999") + b"}",
        valid + b',"context":{"x":' + b"[" * 150 + b"]" * 150 + b"}}",
        valid + b',"context":{"x":' + b"[" * 99 + b"]" * 99 + b"}}",
        valid + b',"item_id":"\\ud800"}',
        valid + b',"user_id":"\xe9"}',
        b"\xef\xbb\xbf" + valid + b"}",
        b" \n" + valid + b"} \t",
        valid + b"}x",
        valid + b',"ts":true}',
        b"[1, 2]",
        b'"text"',
        b"",
        b"[" * 5000 + b"]" * 5000,
        valid + b',"type":"click","type":"browse"}',
    ]

    def outcome(raw: bytes):
        try:
            return events.parse_event(raw, settings, now_ms=T0)
        except events.InvalidEvent as exc:
            return exc.reason, exc.detail

    fast = [outcome(raw) for raw in payloads]
    monkeypatch.setattr(events, "_fast_loads", None)
    slow = [outcome(raw) for raw in payloads]
    assert [repr(x) for x in fast] == [repr(x) for x in slow]
    assert isinstance(fast[0], Event) and isinstance(fast[1], Event)


def test_histogram_observed_per_batch_counts_as_observed_per_event() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from rtrec.workers.state import observe_many

    registry = CollectorRegistry()
    one = Histogram("one_by_one", "", buckets=(0.001, 0.01, 0.1, 1), registry=registry)
    many = Histogram("per_batch", "", buckets=(0.001, 0.01, 0.1, 1), registry=registry)
    values = [0.0, 0.001, 0.0010001, 0.005, 0.01, 0.5, 1.0, 2.0, 30.0, 0.0002] * 3
    for v in values:
        one.observe(v)
    observe_many(many, values[:7])
    observe_many(many, values[7:])
    observe_many(many, [])

    def samples(name: str) -> dict[str, float]:
        """The histogram's bucket counts (by bound), count and sum."""
        [metric] = [m for m in registry.collect() if m.name == name]
        return {
            f"{s.name}{s.labels.get('le', '')}".removeprefix(name): s.value
            for s in metric.samples
            if not s.name.endswith("_created")  # a timestamp, not an observation
        }

    got, want = samples("per_batch"), samples("one_by_one")
    assert got.keys() == want.keys()
    assert all(math.isclose(got[k], want[k]) for k in want)


def test_latency_samples_are_one_entry_per_batch() -> None:
    from rtrec.workers.state import decode_samples, encode_samples

    lags = [0.0, 1.23456, 40.0, 1234.5]
    entries = [encode_samples(lags), encode_samples([7.0]).encode()]
    assert decode_samples(entries) == [0.0, 1.235, 40.0, 1234.5, 7.0]
