"""Reciprocal-rank fusion: one ranking from several recommenders, no score calibration needed.

The generative model and the blending baseline rank from different signals (the
learned sequence vs co-visitation and time-decayed popularity), and their scores
live on different scales (a softmax probability vs a weighted sum). Fusing ranks
(score = sum of weight / (c + rank)) needs neither calibration nor training, and
measures how much the two signals complement each other (`rtrec eval`).
"""

from __future__ import annotations

from typing import Sequence

from model.recommender import Recommender, Scored
from stream.state_store import UserState


class RankFusion:
    """A `Recommender` whose ranking is the weighted reciprocal-rank fusion of its members'."""

    def __init__(self, members: Sequence[tuple[Recommender, float]], depth: int = 100, c: int = 10) -> None:
        if not members:
            raise ValueError("RankFusion needs at least one member")
        self.members = list(members)
        self.depth = depth  # how far down each member's list counts
        self.c = c  # damping: a larger c flattens the gap between the first ranks
        self.version = "+".join(rec.version for rec, _ in self.members)

    def recommend_batch(self, states: Sequence[UserState], k: int) -> list[Scored]:
        lists = [rec.recommend_batch(states, max(k, self.depth)) for rec, _ in self.members]
        fused: list[Scored] = []
        for row in range(len(states)):
            scores: dict[str, float] = {}
            for (_, weight), ranked in zip(self.members, lists):
                for rank, (item, _) in enumerate(ranked[row]):
                    scores[item] = scores.get(item, 0.0) + weight / (self.c + rank)
            fused.append(sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k])
        return fused
