"""The CPU baseline ranks from hand-built user states; explain() names the strongest link."""

from __future__ import annotations

import random

import pytest

from rtrec.model.blending import RECENCY_DECAY, BlendingRecommender, recent_distinct_items
from rtrec.model.reasons import explain
from rtrec.model.recommender import GenerativeRecommender, Recommender
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import SeqEntry, UserState

CFG = Settings(
    kafka_bootstrap=None,
    redis_url=None,
    blend_covis=1.0,
    blend_affinity=0.6,
    blend_trending=0.3,
    blend_recent_items=10,
)
T0 = 1_767_225_600_000


def seq(*steps: str) -> list[SeqEntry]:
    """seq("a:browse", "b:purchase") -> entries oldest -> newest, one second apart."""
    entries = []
    for n, step in enumerate(steps):
        item, _, etype = step.partition(":")
        entries.append(SeqEntry(item, etype or "browse", T0 + n * 1000, f"e{n}"))
    return entries


def state(steps=(), covis=None, trending=(), affinities=None, exclude=(), user="u1") -> UserState:
    return UserState(
        user_id=user,
        sequence=seq(*steps),
        covis=dict(covis or {}),
        trending=list(trending),
        affinities=dict(affinities or {}),
        exclude=frozenset(exclude),
    )


def ids(scored) -> list[str]:
    return [item for item, _ in scored]


@pytest.fixture
def rec() -> BlendingRecommender:
    return BlendingRecommender(CFG)


# ---- ranking -----------------------------------------------------------------------------------


def test_is_a_recommender(rec: BlendingRecommender) -> None:
    assert isinstance(rec, Recommender)
    assert not isinstance(rec, GenerativeRecommender)  # the worker fuses a served model with it, never itself
    assert rec.version == "blend-v1"


def test_recent_distinct_items_newest_first() -> None:
    s = state(["a", "b", "a", "c", "c"])
    assert recent_distinct_items(s, 10) == ["c", "a", "b"]
    assert recent_distinct_items(s, 2) == ["c", "a"]
    assert recent_distinct_items(state(), 5) == []


def test_neighbours_of_the_most_recent_item_outrank_older_ones(rec: BlendingRecommender) -> None:
    s = state(["old", "new"], covis={"old": [("x", 5.0)], "new": [("y", 5.0)]})
    assert ids(rec.recommend_one(s, 2)) == ["y", "x"]
    # and the order flips when the user goes back to "old"
    s = state(["old", "new", "old"], covis={"old": [("x", 5.0)], "new": [("y", 5.0)]})
    assert ids(rec.recommend_one(s, 2)) == ["x", "y"]


def test_covis_scores_follow_the_recency_decay(rec: BlendingRecommender) -> None:
    s = state(["a", "b", "c"], covis={c: [(f"n{c}", 10.0)] for c in "abc"})
    scores = dict(rec.recommend_one(s, 3))
    assert scores["nc"] == pytest.approx(CFG.blend_covis)
    assert scores["nb"] == pytest.approx(CFG.blend_covis * RECENCY_DECAY)
    assert scores["na"] == pytest.approx(CFG.blend_covis * RECENCY_DECAY**2)


def test_covis_is_normalised_by_the_strongest_neighbour(rec: BlendingRecommender) -> None:
    s = state(["a"], covis={"a": [("x", 8.0), ("y", 2.0)]})
    assert dict(rec.recommend_one(s, 2)) == pytest.approx({"x": 1.0, "y": 0.25})


def test_neighbours_shared_by_several_recent_items_add_up(rec: BlendingRecommender) -> None:
    s = state(["a", "b"], covis={"a": [("shared", 1.0)], "b": [("only_b", 1.0), ("shared", 1.0)]})
    scores = dict(rec.recommend_one(s, 2))
    assert scores["shared"] == pytest.approx(1.0 + RECENCY_DECAY)
    assert ids(rec.recommend_one(s, 2)) == ["shared", "only_b"]


def test_only_the_configured_number_of_recent_items_count() -> None:
    rec = BlendingRecommender(CFG.model_copy(update={"blend_recent_items": 2}))
    s = state(["a", "b", "c"], covis={c: [(f"n{c}", 1.0)] for c in "abc"})
    assert set(ids(rec.recommend_one(s, 10))) == {"nb", "nc"}


def test_affinity_and_trending_are_blended_with_their_weights(rec: BlendingRecommender) -> None:
    s = state(["a"], affinities={"a": 1.0, "b": 0.5}, trending=[("b", 1.0), ("t", 0.5)])
    assert dict(rec.recommend_one(s, 10)) == pytest.approx({"a": 0.6, "b": 0.6 * 0.5 + 0.3 * 1.0, "t": 0.3 * 0.5})


def test_excluded_items_never_appear(rec: BlendingRecommender) -> None:
    s = state(
        ["a", "b"],
        covis={"a": [("x", 3.0), ("y", 1.0)], "b": [("z", 2.0)]},
        affinities={"a": 1.0, "b": 0.9},
        trending=[("x", 1.0), ("t1", 0.9), ("t2", 0.8)],
        exclude={"a", "b", "x"},
    )
    for k in (1, 3, 100):
        got = ids(rec.recommend_one(s, k))
        assert not set(got) & {"a", "b", "x"}
    assert ids(rec.recommend_one(s, 100)) == ["z", "y", "t1", "t2"]


def test_unknown_user_gets_the_trending_order(rec: BlendingRecommender) -> None:
    trending = [("t1", 1.0), ("t2", 0.8), ("t3", 0.5), ("t4", 0.1)]
    s = state(trending=trending)
    assert not s.known
    assert ids(rec.recommend_one(s, 10)) == ["t1", "t2", "t3", "t4"]
    assert dict(rec.recommend_one(s, 10)) == pytest.approx({i: 0.3 * v for i, v in trending})


def test_unknown_user_with_nothing_trending_gets_nothing(rec: BlendingRecommender) -> None:
    assert rec.recommend_one(state(), 10) == []


@pytest.mark.parametrize("k", [1, 2, 5])
def test_k_is_respected(rec: BlendingRecommender, k: int) -> None:
    s = state(trending=[(f"t{i}", 1.0 - i / 100) for i in range(20)])
    got = ids(rec.recommend_one(s, k))
    assert got == [f"t{i}" for i in range(k)]


def test_fewer_candidates_than_k(rec: BlendingRecommender) -> None:
    assert len(rec.recommend_one(state(trending=[("t1", 1.0), ("t2", 0.5)]), 10)) == 2


def test_results_are_sorted_by_score(rec: BlendingRecommender) -> None:
    rng = random.Random(7)
    s = state(
        ["a", "b", "c"],
        covis={c: [(f"i{rng.randrange(30)}", rng.uniform(1, 9)) for _ in range(8)] for c in "abc"},
        affinities={f"i{rng.randrange(30)}": rng.random() for _ in range(10)},
        trending=[(f"i{rng.randrange(30)}", rng.random()) for _ in range(10)],
    )
    scores = [score for _, score in rec.recommend_one(s, 30)]
    assert scores == sorted(scores, reverse=True)
    assert len(scores) == len(set(ids(rec.recommend_one(s, 30))))  # no duplicates


def test_tie_break_is_deterministic_and_independent_of_input_order(rec: BlendingRecommender) -> None:
    trending = [(f"t{i}", 0.5) for i in range(10)]
    first = rec.recommend_one(state(trending=trending), 4)
    rng = random.Random(3)
    for _ in range(20):
        shuffled = trending[:]
        rng.shuffle(shuffled)
        assert rec.recommend_one(state(trending=shuffled), 4) == first
    assert len(set(ids(first))) == 4 and all(score == pytest.approx(0.15) for _, score in first)


def test_recommend_batch_returns_one_list_per_state(rec: BlendingRecommender) -> None:
    trending = [("t1", 1.0), ("t2", 0.5)]
    states = [
        state(trending=trending, user="new"),
        state(["a"], covis={"a": [("x", 1.0)]}, trending=trending, user="a-fan"),
        state(trending=trending, exclude={"t1"}, user="excl"),
    ]
    out = rec.recommend_batch(states, 2)
    assert len(out) == 3
    assert out == [rec.recommend_one(s, 2) for s in states]
    assert ids(out[0]) == ["t1", "t2"]
    assert ids(out[1])[0] == "x"
    assert ids(out[2]) == ["t2"]
    assert rec.recommend_batch([], 5) == []


# ---- explain ---------------------------------------------------------------------------------------


def test_explain_because_you_browsed() -> None:
    s = state(["a"], covis={"a": [("x", 1.0)]})
    assert explain(s, "x") == "because you browsed a"


def test_explain_because_you_clicked() -> None:
    s = state(["a:click"], covis={"a": [("x", 1.0)]})
    assert explain(s, "x") == "because you clicked a"


def test_explain_bought_together_when_the_latest_event_was_a_purchase() -> None:
    s = state(["a:browse", "a:purchase"], covis={"a": [("x", 1.0)]})
    assert explain(s, "x") == "bought together with a"


def test_explain_uses_the_latest_event_type_of_the_linked_item() -> None:
    s = state(["a:purchase", "a:browse"], covis={"a": [("x", 1.0)]})
    assert explain(s, "x") == "because you browsed a"


def test_explain_prefers_the_most_recent_linked_item() -> None:
    covis = {"a": [("x", 9.0)], "b": [("x", 1.0)]}
    assert explain(state(["a", "b:purchase"], covis=covis), "x") == "bought together with b"
    assert explain(state(["b:purchase", "a"], covis=covis), "x") == "because you browsed a"


def test_explain_item_the_user_interacted_with() -> None:
    s = state(["x:click", "y"], covis={"y": [("z", 1.0)]}, trending=[("x", 1.0)])
    assert explain(s, "x") == "you clicked it recently"


def test_explain_trending_now() -> None:
    s = state(["a"], covis={"a": [("x", 1.0)]}, trending=[("t1", 1.0), ("t2", 0.5)])
    assert explain(s, "t2") == "trending now"
    assert explain(state(trending=[("t1", 1.0)]), "t1") == "trending now"


def test_explain_popular_pick_beyond_the_top_50_trending() -> None:
    trending = [(f"t{i}", 1.0 - i / 100) for i in range(60)]
    s = state(trending=trending)
    assert explain(s, "t49") == "trending now"
    assert explain(s, "t50") == "popular pick"
    assert explain(s, "never-seen") == "popular pick"


def test_every_recommendation_gets_a_reason(rec: BlendingRecommender) -> None:
    s = state(
        ["a", "b:purchase"],
        covis={"a": [("x", 2.0)], "b": [("y", 1.0)]},
        affinities={"a": 1.0},
        trending=[("t", 1.0)],
    )
    reasons = {item: explain(s, item) for item, _ in rec.recommend_one(s, 10)}
    assert reasons == {
        "x": "because you browsed a",
        "y": "bought together with b",
        "a": "you browsed it recently",
        "t": "trending now",
    }
