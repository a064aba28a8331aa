"""The interface every recommender implements: the blending baseline now, the generative model later."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from stream.state_store import UserState

Scored = list[tuple[str, float]]


@runtime_checkable
class Recommender(Protocol):
    """Ranks items for a batch of users in one call (so a model can batch its forward pass)."""

    version: str

    def recommend_batch(self, states: Sequence[UserState], k: int) -> list[Scored]:
        """Top-k (item_id, score) per state, best first, never containing ``state.exclude``."""
        ...
