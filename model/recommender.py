"""The interfaces recommenders implement: any ranking (`Recommender`) and a served generative model.

`Recommender` is all the evaluation and the fused ranking need: a version and one
batched call. `GenerativeRecommender` is what a recommend worker serves from a
checkpoint, on either backend (model/generator.py, model/vllm_backend.py): it
also says how much history it reads, which vocabulary it ranks, and how to read
its ranking and version together and free what it holds. The worker, the loader
and the model watcher use these members directly; nothing is probed.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rtrec.model.vocab import ItemVocab
from rtrec.stream.state_store import UserState

Scored = list[tuple[str, float]]


@runtime_checkable
class Recommender(Protocol):
    """Ranks items for a batch of users in one call (so a model can batch its forward pass)."""

    version: str

    def recommend_batch(self, states: Sequence[UserState], k: int) -> list[Scored]:
        """Top-k (item_id, score) per state, best first, never containing ``state.exclude``."""
        ...


class GenerativeRecommender(Recommender):
    """A sequence model served from a checkpoint: the base class of both serving backends.

    A nominal base, not a protocol: ``isinstance(r, GenerativeRecommender)`` tells a served
    model from the blending baseline (which only implements `Recommender`).
    """

    version: str
    max_events: int  # the most recent events of a user's history in a prompt (serving may read fewer than training)
    vocab: ItemVocab  # the items it can rank
    device: Any  # where it runs: a torch.device or a device name, for logs

    @abstractmethod
    def recommend_batch(self, states: Sequence[UserState], k: int) -> list[Scored]:
        """Top-k (item_id, score) per state, best first, never containing ``state.exclude``."""

    def recommend_versioned(self, states: Sequence[UserState], k: int) -> tuple[list[Scored], str]:
        """The rankings and the version that made them (a backend updating weights in place reads both at once)."""
        return self.recommend_batch(states, k), self.version

    def close(self) -> None:
        """Frees what the model holds outside the Python heap (an engine process); nothing by default."""


def top_of_scores(row: np.ndarray, items: Sequence[str], index: dict[str, int], state: UserState, k: int) -> Scored:
    """The k best of one user's score row over `items` (index: item -> column), never an item of
    ``state.exclude`` and, for a re-ranking, only its candidates (``state.allow``); ties by column order.

    For the numpy baselines of the evaluation (BiasedMF, EASE); `row` is changed in place.
    """
    if state.allow is not None:  # a re-ranking: only its candidates
        allowed = np.zeros(len(items), dtype=bool)
        allowed[[index[i] for i in state.allow if i in index]] = True
        row[~allowed] = -np.inf
    row[[index[i] for i in state.exclude if i in index]] = -np.inf
    n = min(k, int(np.isfinite(row).sum()))
    if n <= 0:
        return []
    top = np.argpartition(-row, n - 1)[:n]
    top = top[np.lexsort((top, -row[top]))]  # best first, ties by column order
    return [(items[j], float(row[j])) for j in top]
