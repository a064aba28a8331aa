"""The recommendation worker with the generative model, run in-process on the real broker and Redis."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from rtrec.model.blending import BlendingRecommender
from rtrec.model.fusion import FUSION_DEPTH, fuse
from rtrec.model.generator import TorchGenerator
from rtrec.model.ranking import REASON_PLACED, RankingPipeline, RankQuery
from rtrec.stream.connections import async_redis_client
from rtrec.stream.keys import ITEM_CATEGORY
from rtrec.stream.rec_messages import RecRequest
from rtrec.stream.state_store import SeqEntry, StateReads, StateStore, UserState
from rtrec.stream.synthetic import SyntheticConfig, generate_events
from tests.helpers import run_worker_batch, trained_checkpoint, wait_for

pytestmark = pytest.mark.integration


class Broken:
    version = "broken-1"

    def recommend_batch(self, states, k):
        raise RuntimeError("model exploded")


@pytest.fixture(scope="module")
def synthetic():
    return generate_events(SyntheticConfig(n_users=30, n_items=80, n_clusters=4, n_events=1500, seed=4))


@pytest.fixture(scope="module")
def generator(synthetic, tmp_path_factory):
    return TorchGenerator.from_path(trained_checkpoint(tmp_path_factory.mktemp("ck"), synthetic), device="cpu")


def request(user: str, k: int = 5, **kw) -> bytes:
    return RecRequest(uuid.uuid4().hex, user, k, **kw).to_json()


def test_a_failing_model_answers_every_request_with_an_error(settings, producer, redis, uid):
    user = uid("known")
    producer.send(
        {"event_id": uid("e"), "user_id": user, "item_id": "i1", "type": "click", "ts": int(time.time() * 1000)}
    )
    producer.flush()
    wait_for(lambda: redis.hget(f"rt:u:{user}:h", "n"), what="user state")
    responses = run_worker_batch(settings, Broken(), [request(user), request(user), request(user)])
    assert len(responses) == 3
    assert all("model exploded" in r["error"] and r["items"] == [] for r in responses)


def test_generative_model_answers_known_users_with_its_version(settings, producer, redis, synthetic, generator):
    user = synthetic[-1]["user_id"]
    mine = [e for e in synthetic if e["user_id"] == user][-5:]
    tag = uuid.uuid4().hex[:6]
    for e in mine:  # this user's recent history, under fresh event ids
        producer.send({**e, "event_id": f"{e['event_id']}-{tag}", "user_id": f"{user}-{tag}"})
    producer.flush()
    wait_for(lambda: redis.hget(f"rt:u:{user}-{tag}:h", "n") == "5", what="history applied")
    responses = run_worker_batch(settings, generator, [request(f"{user}-{tag}", k=5), request(f"nobody-{tag}", k=5)])
    # responses are keyed by user, so two users' answers may sit on different partitions
    by_user = {r["user_id"]: r for r in responses}
    known, unknown = by_user[f"{user}-{tag}"], by_user[f"nobody-{tag}"]
    assert known["model_version"] == generator.version and known["fallback"] is False
    assert len(known["items"]) == 5 and all(it["reason"] for it in known["items"])
    seen = {e["item_id"] for e in mine}
    assert not seen & {it["item_id"] for it in known["items"]}  # exclude_seen
    assert unknown["fallback"] is True and unknown["model_version"] == "trending"


def test_fused_serving_ranks_by_the_model_and_the_baseline(settings, producer, redis, synthetic, generator):
    user = synthetic[0]["user_id"]
    tag = uuid.uuid4().hex[:6]
    mine = [e for e in synthetic if e["user_id"] == user][-8:]
    for e in mine:
        producer.send({**e, "event_id": f"{e['event_id']}-{tag}", "user_id": f"{user}-{tag}"})
    producer.flush()
    wait_for(lambda: redis.hget(f"rt:u:{user}-{tag}:h", "n") == "8", what="history applied")
    fused_settings = settings.model_copy(update={"serve_blend_weight": 0.5})
    alone_settings = settings.model_copy(update={"serve_blend_weight": 0.0})
    # the worker's read for a model: its window and the reason anchors' neighbours, for both rankings
    reads = StateReads(sequence=generator.max_events, recent_items=settings.reason_recent_items, neighbours=20)
    [state] = StateStore(settings).fetch(redis, [f"{user}-{tag}"], reads)
    state.exclude = frozenset(e.item_id for e in state.sequence) | state.purchased  # exclude_seen
    expected = fuse(
        [
            (generator.recommend_batch([state], FUSION_DEPTH)[0], 1.0),
            (BlendingRecommender(settings).recommend_batch([state], FUSION_DEPTH)[0], 0.5),
        ],
        10,
    )
    [fused] = run_worker_batch(fused_settings, generator, [request(f"{user}-{tag}", k=10)])
    [alone] = run_worker_batch(alone_settings, generator, [request(f"{user}-{tag}", k=10)])
    assert [it["item_id"] for it in fused["items"]] == [item for item, _ in expected]
    assert [it["score"] for it in fused["items"]] == pytest.approx([score for _, score in expected], rel=1e-4)
    assert [it["item_id"] for it in alone["items"]] == [item for item, _ in generator.recommend_batch([state], 10)[0]]
    assert fused["model_version"] == alone["model_version"] == generator.version


def test_responses_keep_request_order(settings, generator):
    ids = [uuid.uuid4().hex for _ in range(12)]
    user = "order-" + uuid.uuid4().hex[:6]  # one key: one response partition, read back in offset order
    raws = [RecRequest(rid, user, 3).to_json() for rid in ids]
    raws.insert(5, b"{broken")  # an invalid request in the middle does not reorder the others
    responses = run_worker_batch(settings, generator, raws, expected=len(ids))
    assert [r["request_id"] for r in responses] == ids


def test_diversity_caps_items_per_category(settings, producer, redis, generator, uid):
    vocab_items = generator.checkpoint.vocab.items
    redis.hset(ITEM_CATEGORY, mapping={item: "same" if n % 2 == 0 else f"c{n}" for n, item in enumerate(vocab_items)})
    shopper, now = uid("div-shopper"), int(time.time() * 1000)  # trending holds both kinds, whatever ran before
    producer.send_many(
        [
            {"event_id": uid(f"div-{n}"), "user_id": shopper, "item_id": item, "type": "purchase", "ts": now}
            for n, item in enumerate(vocab_items[:8])
        ]
    )
    producer.flush()
    wait_for(lambda: redis.hget(f"rt:u:{shopper}:h", "n") == "8", what="trending filled")
    user = "div-" + uuid.uuid4().hex[:6]
    [plain] = run_worker_batch(settings, generator, [request(user, k=10)])  # unknown user: trending fallback
    [capped] = run_worker_batch(settings, generator, [request(user, k=10)], diversity=1)
    categories = redis.hmget(ITEM_CATEGORY, [it["item_id"] for it in capped["items"]])
    assert categories.count("same") <= 1
    assert len(capped["items"]) >= 1 and plain["items"]


class Exhausted:
    """A recommender with nothing left for anyone (e.g. a user who has seen every candidate)."""

    version = "exhausted-1"

    def recommend_batch(self, states, k):
        return [[] for _ in states]


def test_a_user_whose_candidates_are_exhausted_gets_trending_backfill(settings, producer, redis, uid):
    user = uid("exhausted")
    producer.send(
        {
            "event_id": uid("e"),
            "user_id": user,
            "item_id": uid("seen-item"),
            "type": "click",
            "ts": int(time.time() * 1000),
        }
    )
    producer.flush()
    wait_for(lambda: redis.hget(f"rt:u:{user}:h", "n"), what="user state")
    [response] = run_worker_batch(settings, Exhausted(), [request(user, k=5)])
    assert "error" not in response and len(response["items"]) == 5  # backfilled, never an empty answer
    trending = {item for item, _ in redis.zrevrange("rt:pop", 0, settings.trending_pool - 1, withscores=True)}
    assert {it["item_id"] for it in response["items"]} <= trending
    assert uid("seen-item") not in {it["item_id"] for it in response["items"]}  # exclude_seen holds


def test_backfill_tops_up_with_unseen_trending_items_or_gives_nothing():
    from rtrec.model.ranking import backfilled

    state = UserState("u", trending=[("a", 3.0), ("b", 2.0), ("c", 1.0)], exclude=frozenset({"b"}))
    assert backfilled([("x", 0.9)], state, 3) == [("x", 0.9), ("a", 0.0), ("c", 0.0)]
    assert backfilled([("a", 0.9), ("x", 0.5)], state, 2) == [("a", 0.9), ("x", 0.5)]
    assert backfilled([], UserState("u", trending=[("b", 1.0)], exclude=frozenset({"b"})), 5) == []


def pipeline_rankings(settings, recommender, queries: list[RankQuery]):
    """The ranking pipeline called directly, on the same Redis the worker reads."""

    async def go():
        redis = async_redis_client(settings)
        try:
            return await RankingPipeline(settings, recommender).rank(redis, queries)
        finally:
            await redis.aclose()

    return asyncio.run(go())


def test_the_worker_answers_exactly_what_the_ranking_pipeline_ranks(settings, producer, redis, synthetic, generator):
    """The worker only carries records: its items (ids, order, scores, reasons) are the pipeline's ranking."""
    user = synthetic[1]["user_id"]
    tag = uuid.uuid4().hex[:6]
    # longer than the model's window and with more recent items than its reason anchors: the served (light)
    # read differs from the full one, so a worker reading otherwise than the pipeline would answer otherwise
    mine = [e for e in synthetic if e["user_id"] == user][-30:]
    for e in mine:
        producer.send({**e, "event_id": f"{e['event_id']}-{tag}", "user_id": f"{user}-{tag}"})
    producer.flush()
    wait_for(lambda: redis.hget(f"rt:u:{user}-{tag}:h", "n") == str(len(mine)), what="history applied")
    items = generator.checkpoint.vocab.items
    redis.hset(ITEM_CATEGORY, mapping={item: "same" if n % 2 == 0 else f"c{n}" for n, item in enumerate(items)})
    # fused serving with the category cap on: every stage between the request and the response is exercised
    s = settings.model_copy(update={"serve_blend_weight": 0.5, "diversity_max_per_category": 2})
    known, unknown = f"{user}-{tag}", f"nobody-{tag}"
    queries = [RankQuery(known, 10, True), RankQuery(unknown, 7, True), RankQuery(known, 4, False)]
    raws = [RecRequest(uuid.uuid4().hex, q.user_id, q.k, exclude_seen=q.exclude_seen).to_json() for q in queries]
    responses = run_worker_batch(s, generator, raws, diversity=2)
    direct = pipeline_rankings(s, generator, queries)
    by_request = {r["request_id"]: r for r in responses}
    for raw, ranking in zip(raws, direct):
        got = by_request[json.loads(raw)["request_id"]]
        assert [it["item_id"] for it in got["items"]] == [it.item_id for it in ranking.items]
        assert [it["score"] for it in got["items"]] == pytest.approx([it.score for it in ranking.items], abs=1e-6)
        assert [it["reason"] for it in got["items"]] == [it.reason for it in ranking.items]
        assert (got["model_version"], got["fallback"]) == (ranking.version, ranking.fallback)
    assert direct[0].version == generator.version and direct[1].version == "trending"
    assert len(direct[0].items) == 10 and len(direct[2].items) == 4
    assert not {e["item_id"] for e in mine} & {it.item_id for it in direct[0].items}  # exclude_seen


class Fixed:
    """A recommender that ranks the same items for everyone."""

    def __init__(self, version: str, items: list[str]) -> None:
        self.version, self.items = version, items

    def recommend_batch(self, states, k):
        return [[(item, 1.0 - n / 100) for n, item in enumerate(self.items[:k])] for _ in states]


def test_a_swapped_in_model_answers_the_next_batch(settings, producer, redis, uid, generator):
    """The model watcher assigns worker.recommender; the pipeline must rank with the new model from then on."""
    user = uid("swapped")
    producer.send(
        {"event_id": uid("e"), "user_id": user, "item_id": uid("seen"), "type": "click", "ts": int(time.time() * 1000)}
    )
    producer.flush()
    wait_for(lambda: redis.hget(f"rt:u:{user}:h", "n"), what="user state")
    swapped = Fixed("fixed-2", ["p", "q", "r"])
    [response] = run_worker_batch(settings, generator, [request(user, k=3)], swap_to=swapped)
    assert response["model_version"] == "fixed-2"
    assert [it["item_id"] for it in response["items"]] == ["p", "q", "r"]


def test_candidates_are_ranked_by_the_models_scores_from_one_forward_pass(
    settings, producer, redis, synthetic, generator
):
    """A re-ranking keeps the model's order among the candidates (softmax over them alone); an item the
    model does not know is still placed, after them, with a reason saying so."""
    user = synthetic[2]["user_id"]
    tag = uuid.uuid4().hex[:6]
    mine = [e for e in synthetic if e["user_id"] == user][-15:]
    for e in mine:
        producer.send({**e, "event_id": f"{e['event_id']}-{tag}", "user_id": f"{user}-{tag}"})
    producer.flush()
    known = f"{user}-{tag}"
    wait_for(lambda: redis.hget(f"rt:u:{known}:h", "n") == str(len(mine)), what="history applied")
    s = settings.model_copy(update={"serve_blend_weight": 0.0})  # the model alone
    [full] = pipeline_rankings(s, generator, [RankQuery(known, 50, True)])
    in_model_order = [it.item_id for it in full.items][::5][:8]
    sent = [*reversed(in_model_order), f"never-seen-{tag}"]
    [ranked] = pipeline_rankings(s, generator, [RankQuery(known, len(sent), True, candidates=tuple(sent))])
    assert [it.item_id for it in ranked.items] == [*in_model_order, f"never-seen-{tag}"]
    assert sum(it.score for it in ranked.items[:8]) == pytest.approx(1.0, abs=1e-4)
    assert ranked.items[-1].reason == REASON_PLACED and ranked.version == generator.version
    raws = [RecRequest(uuid.uuid4().hex, known, len(sent), candidates=tuple(sent)).to_json()]
    [response] = run_worker_batch(s, generator, raws)
    assert [it["item_id"] for it in response["items"]] == [it.item_id for it in ranked.items]


def test_similar_items_are_what_the_model_ranks_after_the_anchor(settings, synthetic, generator):
    """Without a user, a similar-items query is the model's next item after [anchor], never the anchor."""
    anchor = synthetic[0]["item_id"]
    s = settings.model_copy(update={"serve_blend_weight": 0.0})
    [ranked] = pipeline_rankings(s, generator, [RankQuery("", 5, True, anchor=anchor)])
    state = UserState("", sequence=[SeqEntry(anchor, "click", 0, "x")], exclude=frozenset({anchor}))
    [direct] = generator.recommend_batch([state], 5)
    assert [it.item_id for it in ranked.items] == [item for item, _ in direct]
    assert anchor not in [it.item_id for it in ranked.items]
    assert all(it.reason.endswith(anchor) for it in ranked.items)
    [response] = run_worker_batch(s, generator, [RecRequest(uuid.uuid4().hex, "", 5, item_id=anchor).to_json()])
    assert response["item_id"] == anchor and [it["item_id"] for it in response["items"]] == [
        it.item_id for it in ranked.items
    ]
