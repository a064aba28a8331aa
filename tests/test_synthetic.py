"""The synthetic generator must show the behaviours the recommender is meant to learn."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np
import pytest

from rtrec.stream.synthetic import (
    SyntheticConfig,
    generate_events,
    item_catalog,
    item_cluster_map,
    trending_items,
    user_tastes,
)

CFG = SyntheticConfig()


@pytest.fixture(scope="module")
def events() -> list[dict]:
    return generate_events(CFG)


def _events_by_user(events: list[dict]) -> dict[str, list[dict]]:
    by_user: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        by_user[e["user_id"]].append(e)
    return by_user


def test_schema_and_ids(events: list[dict]) -> None:
    assert len(events) == CFG.n_events
    assert len({e["event_id"] for e in events}) == len(events)
    item_ids = {c["item_id"] for c in item_catalog(CFG)}
    for e in events:
        assert e["event_id"].startswith(f"syn{CFG.seed}-")
        assert e["user_id"][0] == "u" and 0 <= int(e["user_id"][1:]) < CFG.n_users
        assert e["item_id"] in item_ids
        assert e["type"] in ("browse", "click", "purchase")
        assert isinstance(e["ts"], int) and isinstance(e["session_id"], str)
        if e["type"] == "purchase":
            assert set(e) == {"event_id", "user_id", "item_id", "type", "ts", "session_id", "price", "quantity"}
            assert isinstance(e["price"], float) and e["price"] > 0
            assert e["quantity"] in (1, 2, 3)
        else:
            assert "price" not in e and "quantity" not in e


def test_events_pass_the_wire_validation(events: list[dict]) -> None:
    events_mod = pytest.importorskip("rtrec.stream.events")
    settings_mod = pytest.importorskip("rtrec.stream.settings")
    settings = settings_mod.Settings()
    now = CFG.start_ts_ms + CFG.duration_ms
    for e in events[:2000]:
        assert events_mod.event_from_dict(e, settings, now_ms=now).to_dict() == e


def test_catalog_is_deterministic_and_consistent() -> None:
    catalog = item_catalog(CFG)
    assert catalog == item_catalog(CFG)
    assert [c["item_id"] for c in catalog] == [f"i{n}" for n in range(CFG.n_items)]
    assert {c["item_id"]: c["cluster"] for c in catalog} == item_cluster_map(CFG)
    sizes = Counter(c["cluster"] for c in catalog)
    assert set(sizes) == set(range(CFG.n_clusters))
    assert max(sizes.values()) - min(sizes.values()) <= 1  # clusters are balanced
    assert all(isinstance(c["price"], float) and c["price"] > 0 for c in catalog)


def test_purchase_price_is_the_catalog_price(events: list[dict]) -> None:
    price = {c["item_id"]: c["price"] for c in item_catalog(CFG)}
    for e in events:
        if e["type"] == "purchase":
            assert e["price"] == price[e["item_id"]]


def test_users_mostly_stay_in_their_top3_clusters(events: list[dict]) -> None:
    clusters = item_cluster_map(CFG)
    shares = []
    for evs in _events_by_user(events).values():
        if len(evs) < 10:
            continue
        counts = Counter(clusters[e["item_id"]] for e in evs)
        shares.append(sum(n for _, n in counts.most_common(3)) / len(evs))
    assert len(shares) > 0.8 * CFG.n_users
    # Uniform tastes would put ~15% (3 of 20 clusters) in the top 3; we want a clear majority.
    assert np.mean(np.array(shares) > 0.5) > 0.8


def test_user_events_follow_their_latent_tastes(events: list[dict]) -> None:
    clusters = item_cluster_map(CFG)
    tastes = user_tastes(CFG)
    assert len(tastes) == CFG.n_users
    for weights in tastes.values():
        assert len(weights) == CFG.user_tastes
        assert sum(weights.values()) == pytest.approx(1.0)
        assert list(weights.values()) == sorted(weights.values(), reverse=True)
    in_taste = [
        np.mean([clusters[e["item_id"]] in tastes[u] for e in evs])
        for u, evs in _events_by_user(events).items()
        if len(evs) >= 10
    ]
    assert np.median(in_taste) > 0.6


def test_zipf_popularity_inside_clusters(events: list[dict]) -> None:
    clusters = item_cluster_map(CFG)
    trending = {i for period in trending_items(CFG) for i in period}
    counts = Counter(e["item_id"] for e in events if e["item_id"] not in trending)
    ratios = []
    for c in range(CFG.n_clusters):
        per_item = sorted(
            (counts.get(i, 0) for i, ic in clusters.items() if ic == c and i not in trending), reverse=True
        )
        ratios.append(per_item[0] / max(float(np.median(per_item)), 1.0))
    # With a=1.2 over ~50 items the head gets ~40x the median item; the bounds leave a wide margin.
    assert np.median(ratios) > 8
    assert min(ratios) > 3


def test_funnel_counts(events: list[dict]) -> None:
    counts = Counter(e["type"] for e in events)
    assert counts["browse"] > 2 * counts["click"] > 0
    assert counts["click"] > 3 * counts["purchase"] > 0


def test_sessions_are_funnels(events: list[dict]) -> None:
    sessions: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        sessions[e["session_id"]].append(e)
    sizes = [len(s) for s in sessions.values()]
    assert np.mean(sizes) > 4  # several events per session
    for evs in sessions.values():
        assert len({e["user_id"] for e in evs}) == 1
        ts = [e["ts"] for e in evs]
        gaps = np.diff(ts)
        assert np.all(gaps >= 1_000) and np.all(gaps <= 600_000)  # seconds to minutes apart
        browsed: set[str] = set()
        clicked: set[str] = set()
        for e in evs:
            if e["type"] == "browse":
                browsed.add(e["item_id"])
            elif e["type"] == "click":
                assert e["item_id"] in browsed, "a click is on an item browsed earlier in the session"
                clicked.add(e["item_id"])
            else:
                assert e["item_id"] in clicked, "a purchase is of an item clicked earlier in the session"


def test_trends_drift(events: list[dict]) -> None:
    def top20(period: int) -> set[str]:
        lo = CFG.start_ts_ms + period * CFG.drift_period_ms
        counts = Counter(e["item_id"] for e in events if lo <= e["ts"] < lo + CFG.drift_period_ms)
        return {item for item, _ in counts.most_common(20)}

    first, last = top20(0), top20(CFG.n_periods - 1)
    assert len(first & last) / len(first | last) < 0.5

    # The boost is what drives it: a period's trending items are popular in it, not outside it.
    trending = trending_items(CFG)
    assert len(trending) == CFG.n_periods
    assert len(set(trending[0]) & set(trending[-1])) == 0
    assert len(first & set(trending[0])) >= 10
    assert len(last & set(trending[0])) <= 2


def test_timestamps_in_window_and_sorted(events: list[dict]) -> None:
    ts = np.array([e["ts"] for e in events])
    assert ts.min() >= CFG.start_ts_ms
    assert ts.max() <= CFG.start_ts_ms + CFG.duration_ms
    assert np.all(np.diff(ts) >= 0)
    # Events spread over the whole window rather than bunching up.
    per_day = np.bincount((ts - CFG.start_ts_ms) // 86_400_000, minlength=14)
    assert per_day.min() > 0.5 * per_day.mean()


def test_deterministic_for_a_seed_and_different_across_seeds(events: list[dict]) -> None:
    assert generate_events(CFG) == events
    other = generate_events(replace(CFG, seed=8))
    assert len(other) == len(events)
    assert [(e["user_id"], e["item_id"], e["ts"]) for e in other] != [
        (e["user_id"], e["item_id"], e["ts"]) for e in events
    ]
    assert other[0]["event_id"] == "syn8-0"


@pytest.mark.parametrize(
    "overrides",
    [
        {"n_events": 0},
        {"n_events": 1},
        {"n_events": 137, "n_users": 1, "n_items": 3, "n_clusters": 3, "user_tastes": 3},
        {"n_events": 500, "duration_ms": 3_600_000, "drift_period_ms": 600_000},
        {"n_events": 300, "duration_ms": 60_000},  # sessions longer than the window get clipped
    ],
)
def test_exact_count_and_window_for_odd_configs(overrides: dict) -> None:
    cfg = replace(CFG, **overrides)
    evs = generate_events(cfg)
    assert len(evs) == cfg.n_events
    assert all(cfg.start_ts_ms <= e["ts"] <= cfg.start_ts_ms + cfg.duration_ms for e in evs)
    assert [e["ts"] for e in evs] == sorted(e["ts"] for e in evs)


@pytest.mark.parametrize(
    "overrides",
    [{"n_clusters": 0}, {"n_items": 5, "n_clusters": 6}, {"user_tastes": 21}, {"n_events": -1}, {"seed": -1}],
)
def test_invalid_config_is_rejected(overrides: dict) -> None:
    with pytest.raises(ValueError, match="invalid SyntheticConfig"):
        replace(CFG, **overrides)


def test_a_large_run_keeps_count_order_and_unique_ids() -> None:
    # what must hold at scale; generation speed is not asserted here (wall time is the machine's, not the code's)
    evs = generate_events(replace(CFG, n_events=100_000))
    assert len(evs) == 100_000
    assert len({e["event_id"] for e in evs}) == 100_000
    ts = [e["ts"] for e in evs]
    assert ts == sorted(ts) and CFG.start_ts_ms <= ts[0] and ts[-1] <= CFG.start_ts_ms + CFG.duration_ms
