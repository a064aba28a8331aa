"""Reciprocal-rank fusion: one ranking from several recommenders, no score calibration needed.

The generative model and the blending baseline rank from different signals (the
learned sequence vs co-visitation and time-decayed popularity), and their scores
live on different scales (a softmax probability vs a weighted sum). Fusing ranks
(score = sum of weight / (c + rank)) needs neither calibration nor training, and
measures how much the two signals complement each other (`rtrec eval`).
"""

from __future__ import annotations

from collections.abc import Sequence

from rtrec.model.recommender import GenerativeRecommender, Recommender, Scored
from rtrec.stream.state_store import UserState

FUSION_DEPTH = 100  # how far down each ranking counts


def fuse(rankings: Sequence[tuple[Scored, float]], k: int, c: int = 10) -> Scored:
    """One user's fused top-k from (ranking, weight) pairs: score = sum of weight / (c + rank)."""
    scores: dict[str, float] = {}
    for ranked, weight in rankings:
        for rank, (item, _) in enumerate(ranked):
            scores[item] = scores.get(item, 0.0) + weight / (c + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


class RankFusion(Recommender):
    """A `Recommender` whose ranking is the weighted reciprocal-rank fusion of its members'.

    The first member leads: a fused ranking is served under its version (`recommend_versioned`),
    the others only help it rank.
    """

    def __init__(self, members: Sequence[tuple[Recommender, float]], depth: int = FUSION_DEPTH, c: int = 10) -> None:
        if not members:
            raise ValueError("RankFusion needs at least one member")
        self.members = list(members)
        self.depth = depth  # how far down each member's list counts
        self.c = c  # damping: a larger c flattens the gap between the first ranks
        self.version = "+".join(rec.version for rec, _ in self.members)

    def recommend_batch(self, states: Sequence[UserState], k: int) -> list[Scored]:
        return self.recommend_versioned(states, k)[0]

    def recommend_versioned(self, states: Sequence[UserState], k: int) -> tuple[list[Scored], str]:
        """The fused rankings and the lead member's version, read together with its ranking."""
        ranked = [versioned(rec, states, max(k, self.depth)) for rec, _ in self.members]
        weights = [weight for _, weight in self.members]
        fused = [fuse(list(zip((lists[row] for lists, _ in ranked), weights)), k, self.c) for row in range(len(states))]
        return fused, ranked[0][1]


def versioned(recommender: Recommender, states: Sequence[UserState], k: int) -> tuple[list[Scored], str]:
    """Rankings and the version that made them: a model whose weights are updated in place (or a fusion it
    leads) reports both under one lock, any other recommender its fixed version."""
    if isinstance(recommender, (GenerativeRecommender, RankFusion)):
        return recommender.recommend_versioned(states, k)
    return recommender.recommend_batch(states, k), recommender.version
