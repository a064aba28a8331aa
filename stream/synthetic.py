"""Deterministic synthetic shopping events, so the demo, tests and benchmarks need no external data.

The model, in four parts:

* items belong to clusters (think categories) and have Zipf popularity inside their cluster;
* every user likes a few clusters, with Dirichlet weights over them;
* users shop in sessions, each a funnel: several browses, clicks on some browsed items,
  and sometimes the purchase of a clicked item, seconds to minutes apart;
* every ``drift_period_ms`` a fresh small set of trending items is boosted for everyone,
  so what is popular drifts over time.

Everything is drawn with numpy from generators seeded by ``cfg.seed`` alone, so the same
config always gives the same catalog and the same event list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Behaviour knobs the config does not expose, kept together so they are easy to find and tune.
TREND_SHARE = 0.25  # chance that a browse goes to one of the period's trending items
EXPLORE_SHARE = 0.05  # chance that a browse goes to a random cluster instead of the session's
N_TRENDING = 15  # trending items per drift period (fewer for catalogs under 300 items)
EXTRA_BROWSES = 3.0  # browses per session = 2 + Poisson(EXTRA_BROWSES)
CLICK_PROB = 0.35  # chance that a browse is followed by a click on the same item
PURCHASE_PROB = 0.25  # chance that a session with clicks ends in buying one clicked item
QUANTITY_P = (0.75, 0.18, 0.07)  # probabilities of buying 1, 2 or 3
# Gap before an event, by type (browse, click, purchase): minimum + exponential(mean), in ms.
GAP_MIN_MS = np.array([3_000, 1_000, 10_000])
GAP_MEAN_MS = np.array([45_000.0, 10_000.0, 60_000.0])
MAX_GAP_MS = 600_000  # no gap inside a session is longer than 10 minutes

EVENT_TYPES = ("browse", "click", "purchase")
BROWSE, CLICK, PURCHASE = 0, 1, 2


@dataclass(frozen=True)
class SyntheticConfig:
    """Size, shape and seed of a synthetic data set; equal configs give identical data."""

    n_users: int = 300
    n_items: int = 1000
    n_clusters: int = 20
    n_events: int = 20_000
    zipf_a: float = 1.2  # item popularity skew inside a cluster
    user_tastes: int = 3  # clusters a user likes (Dirichlet weights over them)
    start_ts_ms: int = 1_767_225_600_000  # 2026-01-01T00:00Z
    duration_ms: int = 14 * 86_400_000
    drift_period_ms: int = 2 * 86_400_000  # trends shift this often
    seed: int = 7

    def __post_init__(self) -> None:
        checks = {
            "n_users >= 1": self.n_users >= 1,
            "1 <= n_clusters <= n_items": 1 <= self.n_clusters <= self.n_items,
            "n_events >= 0": self.n_events >= 0,
            "zipf_a >= 0": self.zipf_a >= 0,
            "1 <= user_tastes <= n_clusters": 1 <= self.user_tastes <= self.n_clusters,
            "duration_ms > 0": self.duration_ms > 0,
            "drift_period_ms > 0": self.drift_period_ms > 0,
            "seed >= 0": self.seed >= 0,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid SyntheticConfig: need {', '.join(failed)}")

    @property
    def n_periods(self) -> int:
        """Number of drift periods in the time window (the last one may be partial)."""
        return math.ceil(self.duration_ms / self.drift_period_ms)


@dataclass(frozen=True)
class _Catalog:
    cluster: np.ndarray  # cluster of each item
    price: np.ndarray  # price of each item
    order: np.ndarray  # item indices grouped by cluster, most popular first within a cluster
    cdf: np.ndarray  # along `order`: cluster id + cumulative Zipf share, so cluster c spans (c, c+1]
    last: np.ndarray  # position in `order` of each cluster's last item


def _rng(cfg: SyntheticConfig, stream: int) -> np.random.Generator:
    """Separate streams per part, so e.g. the catalog does not change when n_events does."""
    return np.random.default_rng([cfg.seed, stream])


def _catalog(cfg: SyntheticConfig) -> _Catalog:
    rng = _rng(cfg, 0)
    cluster = rng.permutation(cfg.n_items) % cfg.n_clusters  # balanced, every cluster non-empty
    base = rng.lognormal(math.log(25.0), 0.7, cfg.n_clusters)
    price = np.maximum(np.round(base[cluster] * rng.lognormal(0.0, 0.3, cfg.n_items), 2), 0.99)
    order = np.lexsort((rng.random(cfg.n_items), cluster))  # random popularity rank inside a cluster
    sorted_cluster = cluster[order]
    first = np.searchsorted(sorted_cluster, np.arange(cfg.n_clusters))
    last = np.append(first[1:], cfg.n_items) - 1
    rank = np.arange(cfg.n_items) - first[sorted_cluster]
    csum = np.cumsum(1.0 / (rank + 1.0) ** cfg.zipf_a)
    before = np.concatenate(([0.0], csum))[first]  # weight of all earlier clusters
    within = csum - before[sorted_cluster]
    cdf = sorted_cluster + within / within[last][sorted_cluster]
    cdf[last] = np.arange(cfg.n_clusters) + 1.0  # exact upper ends despite rounding
    return _Catalog(cluster, price, order, cdf, last)


def _sample_items(cat: _Catalog, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One Zipf-popular item from each given cluster (inverse CDF, all at once)."""
    pos = np.searchsorted(cat.cdf, clusters + rng.random(len(clusters)), side="right")
    items: np.ndarray = cat.order[np.minimum(pos, cat.last[clusters])]
    return items


def _tastes(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(liked clusters, their weights, favourite first; activity weight) per user."""
    rng = _rng(cfg, 1)
    liked = np.argsort(rng.random((cfg.n_users, cfg.n_clusters)), axis=1)[:, : cfg.user_tastes]
    weights = rng.dirichlet(np.full(cfg.user_tastes, 1.5), size=cfg.n_users)
    by_weight = np.argsort(-weights, axis=1)
    liked = np.take_along_axis(liked, by_weight, axis=1)
    weights = np.take_along_axis(weights, by_weight, axis=1)
    activity = rng.lognormal(0.0, 0.6, cfg.n_users)  # some users shop much more than others
    return liked, weights, activity


def _trending(cfg: SyntheticConfig) -> np.ndarray:
    """Trending item indices, shape (n_periods, k); periods take fresh items while any are left."""
    k = max(1, min(N_TRENDING, cfg.n_items // 20))
    perm = _rng(cfg, 2).permutation(cfg.n_items)
    trending: np.ndarray = perm[(np.arange(cfg.n_periods)[:, None] * k + np.arange(k)) % cfg.n_items]
    return trending


def item_catalog(cfg: SyntheticConfig) -> list[dict[str, Any]]:
    """The items the events refer to, with their cluster and price (for demos and content features)."""
    cat = _catalog(cfg)
    return [
        {"item_id": f"i{i}", "cluster": c, "price": p}
        for i, (c, p) in enumerate(zip(cat.cluster.tolist(), cat.price.tolist()))
    ]


def item_cluster_map(cfg: SyntheticConfig) -> dict[str, int]:
    """item_id -> cluster: the ground truth for judging whether recommendations stay on taste."""
    return {f"i{i}": c for i, c in enumerate(_catalog(cfg).cluster.tolist())}


def user_tastes(cfg: SyntheticConfig) -> dict[str, dict[int, float]]:
    """user_id -> {cluster: weight}, favourite first: the latent tastes the events are drawn from."""
    liked, weights, _ = _tastes(cfg)
    return {f"u{u}": dict(zip(cs, ws)) for u, (cs, ws) in enumerate(zip(liked.tolist(), weights.tolist()))}


def trending_items(cfg: SyntheticConfig) -> list[list[str]]:
    """Per drift period, the item ids boosted for everyone during it."""
    return [[f"i{i}" for i in row] for row in _trending(cfg).tolist()]


def _group_cumsum(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at each group of a grouped array (group sizes in `counts`)."""
    csum = np.cumsum(values)
    starts = np.cumsum(counts) - counts
    restarted: np.ndarray = csum - np.repeat(csum[starts] - values[starts], counts)
    return restarted


def _simulate(cfg: SyntheticConfig, n_sessions: int) -> dict[str, np.ndarray]:
    """Simulate sessions; per-event arrays in generation order (session by session, funnel order)."""
    cat, trending = _catalog(cfg), _trending(cfg)
    liked, weights, activity = _tastes(cfg)
    rng = _rng(cfg, 3)
    sessions = np.arange(n_sessions)

    # Session shape: who, which of their clusters, how many browses, which get clicked, any purchase.
    user = rng.choice(cfg.n_users, size=n_sessions, p=activity / activity.sum())
    pick = (rng.random(n_sessions)[:, None] > np.cumsum(weights[user], axis=1)).sum(axis=1)
    home = liked[user, np.minimum(pick, cfg.user_tastes - 1)]
    n_browse = 2 + rng.poisson(EXTRA_BROWSES, n_sessions)
    b_sess = np.repeat(sessions, n_browse)
    b_k = _group_cumsum(np.ones_like(b_sess), n_browse) - 1  # browse number inside its session
    clicked = rng.random(len(b_sess)) < CLICK_PROB
    n_clicks = np.bincount(b_sess[clicked], minlength=n_sessions)
    buys = (n_clicks > 0) & (rng.random(n_sessions) < PURCHASE_PROB)

    # Events: browse k has sequence 2k, its click 2k+1, the purchase comes last.
    c_idx = np.flatnonzero(clicked)
    p_sess = np.flatnonzero(buys)
    sess = np.concatenate((b_sess, b_sess[c_idx], p_sess))
    seq = np.concatenate((2 * b_k, 2 * b_k[c_idx] + 1, 2 * n_browse[p_sess]))
    etype = np.repeat([BROWSE, CLICK, PURCHASE], [len(b_sess), len(c_idx), len(p_sess)])
    src = np.concatenate((np.arange(len(b_sess)), c_idx, np.zeros(len(p_sess), dtype=np.int64)))
    order = np.lexsort((seq, sess))
    sess, etype, src = sess[order], etype[order], src[order]
    counts = np.bincount(sess, minlength=n_sessions)

    # Times: gaps of seconds to minutes; the session is then placed at random inside the window.
    gap = GAP_MIN_MS[etype] + rng.exponential(GAP_MEAN_MS[etype])
    gap = np.minimum(gap, MAX_GAP_MS).astype(np.int64)
    gap[np.cumsum(counts) - counts] = 0
    offset = _group_cumsum(gap, counts)
    span = offset[np.cumsum(counts) - 1]
    room = np.maximum(cfg.duration_ms - span, 0)
    start = cfg.start_ts_ms + (rng.random(n_sessions) * room).astype(np.int64)
    end_ts = cfg.start_ts_ms + cfg.duration_ms
    ts = np.minimum(start[sess] + offset, end_ts)  # clipping only bites if a session outlasts the window
    period = np.minimum((start - cfg.start_ts_ms) // cfg.drift_period_ms, cfg.n_periods - 1)

    # Browsed items: mostly Zipf-popular in the session's cluster, some exploring, some trending.
    u = rng.random(len(b_sess))
    cluster = home[b_sess]
    explore = (u >= TREND_SHARE) & (u < TREND_SHARE + EXPLORE_SHARE)
    cluster[explore] = rng.integers(cfg.n_clusters, size=int(explore.sum()))
    b_item = _sample_items(cat, cluster, rng)
    trend = u < TREND_SHARE
    slot = rng.integers(trending.shape[1], size=int(trend.sum()))
    b_item[trend] = trending[period[b_sess[trend]], slot]

    # A purchase buys one of the session's clicked items.
    first_click = np.cumsum(n_clicks) - n_clicks
    chosen = first_click[p_sess] + (rng.random(len(p_sess)) * n_clicks[p_sess]).astype(np.int64)
    p_item = b_item[c_idx[chosen]]
    item = b_item[src]
    item[etype == PURCHASE] = p_item  # purchases are in session order, as p_sess is
    quantity = np.zeros(len(sess), dtype=np.int64)
    quantity[etype == PURCHASE] = rng.choice([1, 2, 3], size=len(p_sess), p=QUANTITY_P)
    return {"session": sess, "user": user[sess], "item": item, "type": etype, "ts": ts, "quantity": quantity}


def generate_events(cfg: SyntheticConfig) -> list[dict[str, Any]]:
    """Exactly ``cfg.n_events`` wire-format event dicts, sorted by ts; identical for identical configs."""
    if cfg.n_events == 0:
        return []
    mean_events = (2 + EXTRA_BROWSES) * (1 + CLICK_PROB) + PURCHASE_PROB
    n_sessions = int(cfg.n_events / mean_events * 1.25) + 20
    while True:  # a shortfall is astronomically unlikely; retrying larger keeps it deterministic
        ev = _simulate(cfg, n_sessions)
        if len(ev["ts"]) >= cfg.n_events:
            break
        n_sessions *= 2
    # Sessions are independent and randomly placed in time, so dropping the surplus (the tail of
    # the last kept session and all later ones) biases nothing and keeps every funnel prefix-closed.
    keep = np.argsort(ev["ts"][: cfg.n_events], kind="stable")
    cols = [ev[name][keep].tolist() for name in ("session", "user", "item", "type", "ts", "quantity")]
    prices = _catalog(cfg).price.tolist()
    prefix = f"syn{cfg.seed}-"
    out: list[dict[str, Any]] = []
    for n, (s, u, i, t, ts, q) in enumerate(zip(*cols)):
        event: dict[str, Any] = {
            "event_id": f"{prefix}{n}",
            "user_id": f"u{u}",
            "item_id": f"i{i}",
            "type": EVENT_TYPES[t],
            "ts": ts,
            "session_id": f"{prefix}s{s}",
        }
        if t == PURCHASE:
            event["price"] = prices[i]
            event["quantity"] = q
        out.append(event)
    return out
