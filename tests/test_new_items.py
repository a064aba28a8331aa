"""New items recommendable at once (model/new_items.py): a tiny trained model, a real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from rtrec.model.checkpoint import VOCAB
from rtrec.model.generator import TorchGenerator
from rtrec.model.ranking import RankingPipeline, RankQuery
from rtrec.model.vocab import ItemVocab
from rtrec.stream.connections import async_redis_client
from rtrec.stream.events import event_from_dict
from rtrec.stream.keys import ITEM_CATEGORY
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import SeqEntry, StateStore, UserState
from rtrec.stream.synthetic import SyntheticConfig, generate_events, item_cluster_map
from tests.helpers import TINY_TRAINED, trained_checkpoint

CFG = SyntheticConfig(n_users=30, n_items=80, n_clusters=4, n_events=1500, seed=4)
SETTINGS = Settings(
    kafka_bootstrap=None,
    redis_url=None,
    **TINY_TRAINED,
    serve_blend_weight=0.0,  # the model alone: the baseline could place a new item from trending without a row
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained without the held-out item NEW, NEW, and the clusters of NEW and the model's items."""
    events = generate_events(CFG)
    clusters = item_cluster_map(CFG)
    counts: dict[str, int] = {}
    for e in events:
        counts[e["item_id"]] = counts.get(e["item_id"], 0) + 1
    new = min(counts, key=lambda item: (counts[item], item))  # a rare item: the model learns without it
    path = trained_checkpoint(tmp_path_factory.mktemp("ck"), [e for e in events if e["item_id"] != new], SETTINGS)
    vocab = ItemVocab.load(path / VOCAB)
    return path, new, {item: c for item, c in clusters.items() if item in vocab or item == new}


@pytest.fixture
def env(redis_only, trained):
    """(settings, sync client, fresh generator, new item, clusters); the catalog holds every item but NEW."""
    path, new, clusters = trained
    redis_only.delete(ITEM_CATEGORY)
    redis_only.hset(ITEM_CATEGORY, mapping={item: f"c{c}" for item, c in clusters.items() if item != new})
    yield path, redis_only, new, clusters
    redis_only.delete(ITEM_CATEGORY)


def peers_row(weight, tokens):
    """The row a new item gets from these peers: their mean, scaled to their mean norm."""
    peers = weight[tokens]
    mean = peers.mean(dim=0)
    return mean * peers.norm(dim=1).mean() / mean.norm()


def run(client, coro_fn):
    """Run `coro_fn(async_redis)` against the server behind the sync test client."""

    async def go():
        kw = client.connection_pool.connection_kwargs
        redis = async_redis_client(SETTINGS.model_copy(update={"redis_url": f"redis://{kw['host']}:{kw['port']}/0"}))
        try:
            return await coro_fn(redis)
        finally:
            await redis.aclose()

    return asyncio.run(go())


def replayed_user(client, settings, store, user: str, items: list[str]) -> None:
    """`user` clicked `items` in order (one second apart), through the real state store."""
    ts = 1_767_225_600_000
    events = [
        event_from_dict(
            {"event_id": f"{user}-{n}", "user_id": user, "item_id": item, "type": "click", "ts": ts + 1000 * n},
            settings,
            now_ms=ts + 1000 * n,
        )
        for n, item in enumerate(items)
    ]
    store.apply(client, events)


def ranked_items(client, pipeline, query) -> list[str]:
    [ranking] = run(client, lambda redis: pipeline.rank(redis, [query]))
    return [rec.item_id for rec in ranking.items]


def category_setup(env, settings):
    """A user whose history is the new item's category; NEW trends (another user clicked it)."""
    _, client, new, clusters = env
    category = clusters[new]
    same = [item for item, c in clusters.items() if c == category and item != new]
    store = StateStore(settings, prefix=f"rt-new-{uuid.uuid4().hex[:8]}")
    replayed_user(client, settings, store, "fan", same[:15])
    replayed_user(client, settings, store, "other", [new])
    client.hset(ITEM_CATEGORY, new, f"c{category}")
    # every other item of the category is seen or excluded: NEW is the only one left of it
    query = RankQuery("fan", k=10, exclude=frozenset(same))
    return store, query, same


def test_category_peers_give_the_row_and_the_item_is_recommended(env):
    path, client, new, _ = env
    gen = TorchGenerator.from_path(path, device="cpu")
    store, query, same = category_setup(env, SETTINGS)
    today = SETTINGS.model_copy(update={"serve_new_item_rows": False})
    before = ranked_items(client, RankingPipeline(today, TorchGenerator.from_path(path, "cpu"), store=store), query)
    assert new not in before  # today: no row, never recommended by the model

    pipeline = RankingPipeline(SETTINGS, gen, store=store)
    free = gen.vocab.free_rows
    items = ranked_items(client, pipeline, query)
    assert new in gen.vocab and gen.vocab.free_rows == free - 1
    peers = [gen.vocab.token(item) for item in same if item in gen.vocab]
    weight = gen.checkpoint.model.get_input_embeddings().weight
    assert torch.allclose(weight[gen.vocab.token(new)], peers_row(weight, peers), atol=1e-5)
    assert new in items  # the mean of its category ranks it in the top 10 of a user of that category
    assert pipeline.new_items.served is not None and pipeline.new_items.served.registered == [new]


def test_without_category_the_co_visited_items_give_the_row(env):
    path, client, new, _ = env
    gen = TorchGenerator.from_path(path, device="cpu")
    a, b = gen.vocab.items[:2]
    states = [
        UserState("u1", [SeqEntry(a, "click", 1, "e1")], covis={a: [(new, 1.0)]}),
        UserState("u2", [SeqEntry(b, "click", 1, "e2")], covis={b: [(new, 2.0), (a, 1.0)]}),
    ]
    pipeline = RankingPipeline(SETTINGS, gen)

    async def prepare(redis):
        await pipeline.new_items.prepare(redis, gen, states)

    run(client, prepare)  # NEW has no category in the catalog
    assert pipeline.new_items.register(gen, states) == [new]
    weight = gen.checkpoint.model.get_input_embeddings().weight
    expected = peers_row(weight, [gen.vocab.token(a), gen.vocab.token(b)])
    assert torch.allclose(weight[gen.vocab.token(new)], expected, atol=1e-5)
    # an item with neither a category nor a co-visited item gets no row (yet): tried again later
    lonely = UserState("u3", trending=[("never-seen", 1.0)])
    run(client, lambda redis: pipeline.new_items.prepare(redis, gen, [lonely]))
    assert pipeline.new_items.register(gen, [lonely]) == []
    assert "never-seen" not in gen.vocab
    assert pipeline.new_items.served is not None and pipeline.new_items.served.attempts["never-seen"] == 1


def test_no_free_rows_nothing_registered(env):
    path, client, new, _ = env
    gen = TorchGenerator.from_path(path, device="cpu")
    gen.vocab.capacity = len(gen.vocab)  # every reserved row taken
    store, query, _ = category_setup(env, SETTINGS)
    items = ranked_items(client, RankingPipeline(SETTINGS, gen, store=store), query)
    assert new not in gen.vocab and new not in items
    assert len(items) == 10


def test_setting_off_registers_nothing(env):
    path, client, new, _ = env
    gen = TorchGenerator.from_path(path, device="cpu")
    settings = SETTINGS.model_copy(update={"serve_new_item_rows": False})
    store, query, _ = category_setup(env, settings)
    free = gen.vocab.free_rows
    items = ranked_items(client, RankingPipeline(settings, gen, store=store), query)
    assert new not in gen.vocab and gen.vocab.free_rows == free and new not in items


def test_hot_swap_starts_without_the_old_registrations(env):
    path, client, new, _ = env
    old, fresh = TorchGenerator.from_path(path, device="cpu"), TorchGenerator.from_path(path, device="cpu")
    store, query, _ = category_setup(env, SETTINGS)
    pipeline = RankingPipeline(SETTINGS, old, store=store)
    ranked_items(client, pipeline, query)
    assert new in old.vocab

    pipeline.recommender = fresh  # the model watcher's hot swap
    batch = run(client, lambda redis: pipeline.start(redis, [query]))
    served = pipeline.new_items.served
    assert served is not None and served.model is fresh and served.registered == []
    assert new not in fresh.vocab
    # a batch still ranked by the old model after the swap registers nothing anywhere
    other = UserState("late", trending=[("item-after-swap", 1.0)])
    assert pipeline.new_items.register(old, [other]) == []
    pipeline.score(batch.recommender, batch.states, 10)
    assert new in fresh.vocab and served.registered == [new]
