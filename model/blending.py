"""The CPU baseline: blend co-visitation of recent items, user affinity and trending popularity.

score(j) = a * sum_r 0.85^pos(r) * covis(r, j) / max_covis(r)   (r: recent distinct items, newest first)
         + b * affinity(j)                                      (time-decayed, max-normalised)
         + c * trending(j)                                      (time-decayed, max-normalised)

Users without history get the trending list alone (the fallback).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Sequence

from rtrec.model.recommender import Recommender, Scored
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import UserState

RECENCY_DECAY = 0.85


def recent_distinct_items(state: UserState, limit: int) -> list[str]:
    """The user's most recent distinct items, newest first."""
    seen: dict[str, None] = {}
    for entry in reversed(state.sequence):
        if entry.item_id not in seen:
            seen[entry.item_id] = None
            if len(seen) >= limit:
                break
    return list(seen)


class BlendingRecommender(Recommender):
    """Covisitation + affinity + trending, computed from the state the worker fetched."""

    version = "blend-v1"

    def __init__(self, settings: Settings) -> None:
        self.w_covis = settings.blend_covis
        self.w_affinity = settings.blend_affinity
        self.w_trending = settings.blend_trending
        self.recent_items = settings.blend_recent_items

    def scores(self, state: UserState) -> dict[str, float]:
        scores: dict[str, float] = defaultdict(float)
        for pos, item in enumerate(recent_distinct_items(state, self.recent_items)):
            neighbours = state.covis.get(item) or []
            if not neighbours:
                continue
            top = neighbours[0][1] or 1.0
            weight = self.w_covis * RECENCY_DECAY**pos / top
            for other, count in neighbours:
                scores[other] += weight * count
        for item, affinity in state.affinities.items():
            scores[item] += self.w_affinity * affinity
        for item, trend in state.trending:
            scores[item] += self.w_trending * trend
        return scores

    def recommend_one(self, state: UserState, k: int) -> Scored:
        scores = self.scores(state)
        allow = state.allow
        candidates = (
            (item, s) for item, s in scores.items() if item not in state.exclude and (allow is None or item in allow)
        )
        return heapq.nlargest(k, candidates, key=lambda pair: (pair[1], pair[0]))

    def recommend_batch(self, states: Sequence[UserState], k: int) -> list[Scored]:
        return [self.recommend_one(state, k) for state in states]
