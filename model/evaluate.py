"""Offline leave-one-out evaluation of recommenders on the state the live system would hold.

Why through Redis and the ranking pipeline: the blending baseline (and any model served by the
workers) sees users only through ``StateStore`` — capped sequences, decayed affinities,
co-visitation. The training events are replayed through the real store, and every recommender
ranks through a ``RankingPipeline``, the object the recommend worker serves with: the same
state reads, fusion, backfill and filters. So the numbers measure what production would serve,
not an idealised offline copy.

The extra baselines need no Redis: ``PopularityRecommender`` (train counts),
``BiasedMFRecommender`` (river's online biased matrix factorisation, trained in time order) and
``rtrec.model.ease.EaseRecommender`` (EASE, the closed-form item-item linear model).

Three kinds of rows (``KINDS``), each a set of ``RankQuery`` per test user through the same pipelines:

* ``full``       the next item, ranked over the whole catalogue (the leave-one-out protocol);
* ``similar``    items similar to the user's last training item as an anchor, without the user's
                 context (``RankQuery("", anchor=...)``); a hit is the held-out item in the top 10;
* ``rerank100``  the held-out item and 99 sampled items as a re-ranking's candidates
                 (``RankQuery(user, candidates=...)``), the sampled-candidates protocol.
"""

from __future__ import annotations

import asyncio
import csv
import random
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import redis
from tqdm import tqdm

from rtrec.model.datasets import Split
from rtrec.model.metrics import summarize
from rtrec.model.ranking import RankingPipeline, RankQuery
from rtrec.model.recommender import Recommender, Scored, top_of_scores
from rtrec.stream.connections import async_redis_client
from rtrec.stream.events import event_from_dict
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import StateStore, UserState

DAY_MS = 86_400_000
APPLY_BATCH = 5_000  # events per StateStore.apply call (one pipelined round-trip each)
TYPE_TARGET = {"browse": 1.0, "click": 2.0, "purchase": 4.0}  # MF target when an event has no rating
COLUMNS = ("name", "HR@10", "NDCG@10", "Recall@20", "coverage@10", "novelty@10", "users", "seconds")
FULL, SIMILAR, RERANK, UNMASKED = "full", "similar", "rerank100", "unmasked"
RERANK_CANDIDATES = 100  # the held-out item and 99 sampled ones
RERANK_SEED = 100  # the candidates are the same for every recommender and every run


# ---- states in the real store ------------------------------------------------------------
@contextmanager
def replayed(
    split: Split, settings: Settings, redis_client: redis.Redis, progress: bool = True
) -> Iterator[StateStore]:
    """``split.train_events`` applied to Redis under a fresh key prefix; yields the store that reads them.

    The prefix's keys are deleted afterwards, so a shared Redis is left as it was found.
    """
    prefix = f"rt-eval-{uuid.uuid4().hex[:12]}"
    store = StateStore(settings, prefix=prefix)
    now_ms = max((e["ts"] for e in split.train_events), default=0) + DAY_MS
    events = [
        event_from_dict({k: v for k, v in e.items() if k != "rating"}, settings, now_ms=now_ms)
        for e in split.train_events
    ]
    try:
        with tqdm(total=len(events), desc="apply events", unit="ev", disable=not progress, leave=False) as bar:
            for start in range(0, len(events), APPLY_BATCH):
                chunk = events[start : start + APPLY_BATCH]
                store.apply(redis_client, chunk)
                bar.update(len(chunk))
        yield store
    finally:
        _delete_prefix(redis_client, prefix)


def _delete_prefix(client: redis.Redis, prefix: str) -> None:
    batch: list[Any] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)


# ---- baselines --------------------------------------------------------------------------
class PopularityRecommender(Recommender):
    """Most-interacted items in the training events, minus the user's history.

    The floor every personalised model must beat; ties break by item id for determinism. A
    re-ranking (``state.allow``) orders its candidates by the same counts.
    """

    version = "popularity-v1"

    def __init__(self, split: Split) -> None:
        counts = split.item_popularity
        self.ranked = sorted(split.items, key=lambda i: (-counts.get(i, 0), i))
        self.counts = counts

    def recommend_batch(self, states: Sequence[UserState], k: int) -> list[Scored]:
        out = []
        for state in states:
            top: Scored = []
            allow = state.allow
            items = self.ranked if allow is None else sorted(allow, key=lambda i: (-self.counts.get(i, 0), i))
            for item in items:
                if item not in state.exclude:
                    top.append((item, float(self.counts.get(item, 0))))
                    if len(top) >= k:
                        break
            out.append(top)
        return out


def mf_target(event: Mapping[str, Any]) -> float:
    """The regression target for an event: its rating if it has one, else a type weight."""
    rating = event.get("rating")
    return float(rating) if rating is not None else TYPE_TARGET[event["type"]]


class BiasedMFRecommender(Recommender):
    """river ``reco.BiasedMF`` trained online, one pass over ``split.train_events`` in time order.

    Scoring calls ``predict_one`` per (user, item) would be ~catalogue x users Python calls, so
    after training the learned parameters are copied into numpy arrays and all items are scored
    with one matrix product per batch: score = mean + b_u + b_i + <v_u, v_i>, exactly the
    model's prediction. Items the model never trained on rank below every known item; users it
    never saw get zero bias and latent vector (``predict_one`` would draw random ones). A
    re-ranking (``state.allow``) ranks only its candidates.

    The defaults are river's documented MovieLens-100K setup (MAE 0.7486 progressive validation).
    """

    version = "biasedmf-v1"

    def __init__(
        self,
        split: Split,
        seed: int = 73,
        n_factors: int = 10,
        bias_lr: float = 0.025,
        latent_lr: float = 0.05,
        l2: float = 0.0,
        progress: bool = True,
    ) -> None:
        from river import optim, reco  # lazy: only evaluation needs river

        self.model = reco.BiasedMF(
            n_factors=n_factors,
            bias_optimizer=optim.SGD(bias_lr),
            latent_optimizer=optim.SGD(latent_lr),
            l2_bias=l2,
            l2_latent=l2,
            weight_initializer=optim.initializers.Zeros(),
            latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed),
            seed=seed,
        )
        for e in tqdm(split.train_events, desc="BiasedMF", unit="ev", disable=not progress, leave=False):
            self.model.learn_one(e["user_id"], e["item_id"], mf_target(e))
        self.n_factors = n_factors
        self.items = list(split.items)
        self.index = {item: j for j, item in enumerate(self.items)}
        m = self.model
        zeros = np.zeros(n_factors)
        self.known = np.array([i in m.i_latents for i in self.items], dtype=bool)
        self.item_bias = np.array([m.i_biases.get(i, 0.0) for i in self.items], dtype=np.float64)
        self.item_vecs = np.stack([np.asarray(m.i_latents.get(i, zeros), dtype=np.float64) for i in self.items])
        self.mean = float(m.global_mean.get())

    def score_users(self, user_ids: Sequence[str]) -> np.ndarray:
        """(len(user_ids), n_items) model predictions over ``self.items`` (unknown items included)."""
        m = self.model
        zeros = np.zeros(self.n_factors)
        ub = np.array([m.u_biases.get(u, 0.0) for u in user_ids], dtype=np.float64)
        uv = np.stack([np.asarray(m.u_latents.get(u, zeros), dtype=np.float64) for u in user_ids])
        return self.mean + ub[:, None] + self.item_bias[None, :] + uv @ self.item_vecs.T

    def recommend_batch(self, states: Sequence[UserState], k: int) -> list[Scored]:
        if not states:
            return []
        scores = self.score_users([s.user_id for s in states])
        out: list[Scored] = []
        for row, state in zip(scores, states):
            if self.known.any() and not self.known.all():
                row[~self.known] = row[self.known].min() - 1.0
            out.append(top_of_scores(row, self.items, self.index, state, k))
        return out


# ---- evaluation and reporting ------------------------------------------------------------
UserQueries = list[tuple[str, RankQuery]]  # (the test user a query is scored for, the query)


def _train_items(split: Split, user: str) -> frozenset[str]:
    return frozenset(e["item_id"] for e in split.history(user))


def eval_queries(split: Split, k: int) -> list[RankQuery]:
    """One query per test user; each excludes the user's whole training history (the sequence in Redis is
    capped, so the served exclude_seen alone could let an early item through)."""
    return [RankQuery(u, k, exclude=_train_items(split, u)) for u in split.test_users]


def unmasked_queries(split: Split, k: int) -> UserQueries:
    """The full ranking without removing the user's history: papers differ on masking, so both are reported."""
    return [(u, RankQuery(u, k, exclude_seen=False)) for u in split.test_users]


def similar_queries(split: Split, k: int) -> UserQueries:
    """Per test user, a similar-items query without user context: the anchor is the user's last training
    item, and the user's other training items are excluded, as in the full ranking (so only the held-out
    item, or another unseen one, can be hit)."""
    out: UserQueries = []
    for u in split.test_users:
        anchor = split.history(u)[-1]["item_id"]
        out.append((u, RankQuery("", k, exclude_seen=False, exclude=_train_items(split, u), anchor=anchor)))
    return out


def rerank_queries(split: Split, k: int, n: int = RERANK_CANDIDATES, seed: int = RERANK_SEED) -> UserQueries:
    """Per test user, a re-ranking of ``n`` candidates: the held-out item and ``n - 1`` items drawn uniformly
    (without replacement) from the training items the user has not seen, shuffled; fixed seed."""
    pool = sorted(split.item_popularity)
    rng = random.Random(seed)
    out: UserQueries = []
    for u in split.test_users:
        target = split.target(u)
        banned = _train_items(split, u) | {target}
        free = len(pool) - sum(1 for item in banned if item in split.item_popularity)
        want = min(n - 1, free)
        if want * 2 >= free:  # a dense draw: sample from the list of the free items
            sampled = rng.sample([item for item in pool if item not in banned], want)
        else:  # a sparse one: rejection is much cheaper than listing the catalogue per user
            picked: dict[str, None] = {}
            while len(picked) < want:
                item = pool[rng.randrange(len(pool))]
                if item not in banned:
                    picked[item] = None
            sampled = list(picked)
        candidates = [*sampled, target]
        rng.shuffle(candidates)
        out.append((u, RankQuery(u, k, exclude_seen=True, candidates=tuple(candidates))))
    return out


def kind_queries(kind: str, split: Split, k: int) -> UserQueries:
    """The (test user, query) pairs of one kind of row."""
    if kind == FULL:
        return [(q.user_id, q) for q in eval_queries(split, k)]
    if kind == SIMILAR:
        return similar_queries(split, k)
    if kind == RERANK:
        return rerank_queries(split, k)
    if kind == UNMASKED:
        return unmasked_queries(split, k)
    raise ValueError(f"unknown kind of row {kind!r}; known: {', '.join(KINDS)}")


KINDS = (FULL, UNMASKED, SIMILAR, RERANK)


def evaluate(
    pipelines: Mapping[str, RankingPipeline],
    split: Split,
    redis_settings: Settings,
    batch_size: int = 256,
    k: int = 20,
    kind: str = FULL,
) -> list[dict[str, Any]]:
    """One metrics row per pipeline over the split's test users, ranked exactly as the recommend worker serves.

    Each pipeline reads its users' states from the Redis of ``redis_settings`` (its store's key prefix
    holds the replayed training events) with the served reads, fusion, backfill and filters.
    ``kind`` picks the queries (see ``KINDS``): ``full`` ranks the catalogue for each test user (the rows
    are named as the pipelines), ``unmasked`` the same without removing the user's history, ``similar``
    ranks what goes with the user's last training item and
    ``rerank100`` re-ranks 100 candidates holding the held-out item (rows named ``"<kind>: <name>"``).
    Raises AssertionError if a ranking holds an excluded (already seen) item, or a re-ranking an item
    that is not a candidate: that is a contract violation, and it would also make hit rates meaningless.
    """
    queries = kind_queries(kind, split, k)
    return asyncio.run(_evaluate(pipelines, split, redis_settings, batch_size, queries, kind))


async def _evaluate(
    pipelines: Mapping[str, RankingPipeline],
    split: Split,
    redis_settings: Settings,
    batch_size: int,
    queries: UserQueries,
    kind: str,
) -> list[dict[str, Any]]:
    users = [u for u, _ in queries]
    targets = {u: split.target(u) for u in users}
    client = async_redis_client(redis_settings)
    rows = []
    try:
        for name, pipeline in pipelines.items():
            t0 = time.perf_counter()
            ranked = await _ranked(name, pipeline, client, [q for _, q in queries], batch_size)
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {"name": name if kind == FULL else f"{kind}: {name}", "kind": kind}
            row.update(summarize(dict(zip(users, ranked)), targets, split.item_popularity, split.items))
            row["seconds"] = seconds
            rows.append(row)
    finally:
        await client.aclose()
    return rows


async def _ranked(
    name: str, pipeline: RankingPipeline, client: Any, queries: Sequence[RankQuery], batch_size: int
) -> list[list[str]]:
    """Every query's ranked item ids from ``pipeline.rank``, in query order, checked against the query's
    exclusions (and a re-ranking's candidates)."""
    ranked: list[list[str]] = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        rankings = await pipeline.rank(client, chunk)
        if len(rankings) != len(chunk):
            raise AssertionError(f"{name}: {len(rankings)} rankings for {len(chunk)} queries")
        for query, ranking in zip(chunk, rankings):
            items = [it.item_id for it in ranking.items]
            who = query.user_id or f"anchor {query.anchor}"
            leaked = ranking.state.exclude.union(query.exclude).intersection(items)
            if leaked:
                raise AssertionError(f"{name} recommended excluded items to {who}: {sorted(leaked)[:5]}")
            if query.candidates is not None:
                foreign = set(items).difference(query.candidates)
                if foreign:
                    raise AssertionError(f"{name} re-ranked non-candidates for {who}: {sorted(foreign)[:5]}")
            ranked.append(items)
    return ranked


def published_reference() -> dict[str, dict[str, float]]:
    """Published HR@10 / NDCG@10 on the full MovieLens-1M (leave-one-out, full ranking), as the HSTU paper
    (Zhai et al. 2024, table 2) reports them. A guide: beside `rtrec eval --events ml-1m`'s rows, masked and
    unmasked, since papers differ on removing a user's history from the ranking (MovieLens never repeats one).
    """
    return {
        "SASRec": {"HR@10": 0.2853, "NDCG@10": 0.1603},
        "BERT4Rec": {"HR@10": 0.2843, "NDCG@10": 0.1537},
        "GRU4Rec": {"HR@10": 0.2811, "NDCG@10": 0.1648},
        "HSTU": {"HR@10": 0.3097, "NDCG@10": 0.1720},
        "HSTU-large": {"HR@10": 0.3294, "NDCG@10": 0.1893},
    }


def _slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", title).strip("-").lower() or "eval"


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """``<slug>.csv`` with every row and ``<slug>.png``, a grouped bar chart of HR@10 and NDCG@10."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / f"{_slug(title)}.csv", out / f"{_slug(title)}.png"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    # horizontal bars: recommender names (up to "generative-qwen2+blending") stay readable, never overlap;
    # the chart is the full-ranking table (the similar-items and re-ranking rows are in the CSV and printed table)
    rows = [r for r in rows if r.get("kind", FULL) == FULL]
    names = [r["name"] for r in rows]
    y = np.arange(len(names))
    height = 0.38
    fig = Figure(figsize=(8, max(3.0, 0.6 * len(names) + 1.6)), layout="constrained")
    ax = fig.subplots()
    for offset, metric in ((-height / 2, "HR@10"), (height / 2, "NDCG@10")):
        values = [float(r[metric]) for r in rows]
        bars = ax.barh(y + offset, values, height, label=metric)
        ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_yticks(y, names)
    ax.invert_yaxis()  # first row on top, as in the table
    ax.set_xlabel("score (0-1; HR@10: share of users whose held-out item is in the top 10)")
    ax.set_ylabel("recommender")
    users = rows[0]["users"] if rows else 0
    dataset = title[len("eval ") :] if title.startswith("eval ") else title
    ax.set_title(
        f"Next-item accuracy on {dataset}: HR@10 and NDCG@10\n"
        f"(leave-one-out, full ranking, {users:,} test users; higher is better)",
        fontsize=10,
    )
    fig.legend(loc="outside lower center", ncols=2)  # outside the axes: never over a bar's label
    ax.margins(x=0.15)
    fig.savefig(png_path, dpi=120)
    return csv_path, png_path


CAPTION = (
    "similar: the user's last training item as an anchor, no user context; "
    f"rerank100: the held-out item among {RERANK_CANDIDATES} candidates (the rest sampled uniformly)"
)


def print_table(
    rows: Sequence[Mapping[str, Any]], console: Any, reference: Mapping[str, Mapping[str, float]] | None = None
) -> None:
    """A rich table of the rows; ``reference`` rows (e.g. ``published_reference()``) are shown dimmed."""
    from rich.table import Table

    extra = any(r.get("kind", FULL) != FULL for r in rows)
    table = Table(title="leave-one-out, full ranking", caption=CAPTION if extra else None)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "name" else "right")
    previous = None
    for r in rows:
        kind = r.get("kind", FULL)
        if previous is not None and kind != previous:
            table.add_section()
        previous = kind
        table.add_row(
            str(r["name"]),
            *(f"{float(r[c]):.4f}" for c in ("HR@10", "NDCG@10", "Recall@20", "coverage@10")),
            f"{float(r['novelty@10']):.2f}",
            str(r["users"]),
            f"{float(r['seconds']):.2f}",
        )
    if reference and rows:
        table.add_section()
    for name, ref in (reference or {}).items():
        table.add_row(
            f"{name} (published, ML-1M)",
            f"{ref['HR@10']:.4f}",
            f"{ref['NDCG@10']:.4f}",
            "",
            "",
            "",
            "",
            "",
            style="dim",
        )
    console.print(table)
