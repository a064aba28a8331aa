"""EASE: a closed-form item-item linear model, the strong non-neural baseline of ``rtrec eval``.

Steck, "Embarrassingly Shallow Autoencoders for Sparse Data" (WWW 2019). With ``X`` the binary
user x item matrix of the training interactions:

    G = XᵀX + λI,   P = G⁻¹,   B_ij = -P_ij / P_jj,   B_jj = 0,   scores(u) = x_u · B

``λ`` (``DEFAULT_LAMBDA`` = 500, the paper's order of magnitude for MovieLens-sized data) is the only
parameter. The inverse is a dense items x items matrix, so the model keeps at most ``MAX_ITEMS``
(20,000) items, the most popular in the training events; items outside them are never recommended by
EASE (a catalogue that large backfills from the served pipeline's trending list instead).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from rtrec.model.datasets import Split
from rtrec.model.recommender import Recommender, Scored, top_of_scores
from rtrec.stream.state_store import UserState

DEFAULT_LAMBDA = 500.0
MAX_ITEMS = 20_000  # a dense float64 inverse of 20k x 20k is 3.2 GB; beyond that only the most popular items
_GRAM_CHUNK = 4_096  # users per block when accumulating XᵀX, so X is never held whole


def ease_weights(x: np.ndarray, lam: float = DEFAULT_LAMBDA) -> np.ndarray:
    """The EASE item-item matrix ``B`` of a dense binary user x item matrix ``x`` (the closed form above)."""
    return _weights(x.T.astype(np.float64) @ x.astype(np.float64), lam)


def _weights(gram: np.ndarray, lam: float) -> np.ndarray:
    g = gram.astype(np.float64, copy=True)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]  # column j divided by P_jj
    b[np.diag_indices_from(b)] = 0.0
    return b


class EaseRecommender(Recommender):
    """EASE fitted on ``split.train_events`` (each (user, item) pair counts once, whatever its type).

    A user is scored from their training items (``state.user_id``); a user the training matrix does not
    hold is scored from the items of their state's sequence, and one with neither gets ``[]`` (the served
    pipeline backfills). Only ``state.allow`` (when set) may be returned and never ``state.exclude``;
    ties break by catalogue order. Items outside the kept ``max_items`` are never returned.
    """

    version = "ease-v1"

    def __init__(self, split: Split, lam: float = DEFAULT_LAMBDA, max_items: int = MAX_ITEMS) -> None:
        if lam <= 0:
            raise ValueError(f"EASE needs lam > 0 (got {lam})")
        counts = split.item_popularity
        trained = sorted((i for i, c in counts.items() if c > 0), key=lambda i: (-counts[i], i))
        kept = set(trained[:max_items])
        self.lam = lam
        self.truncated = len(trained) > max_items
        self.items = [i for i in split.items if i in kept]  # catalogue order: the tie-break
        self.index = {item: j for j, item in enumerate(self.items)}
        by_user: dict[str, set[int]] = {}
        for e in split.train_events:
            j = self.index.get(e["item_id"])
            if j is not None:
                by_user.setdefault(e["user_id"], set()).add(j)
        self.user_items = {u: np.fromiter(sorted(js), dtype=np.int64) for u, js in by_user.items()}
        n = len(self.items)
        gram = np.zeros((n, n), dtype=np.float64)
        rows = list(self.user_items.values())
        for start in range(0, len(rows), _GRAM_CHUNK):
            block = np.zeros((len(rows[start : start + _GRAM_CHUNK]), n), dtype=np.float64)
            for r, js in enumerate(rows[start : start + _GRAM_CHUNK]):
                block[r, js] = 1.0
            gram += block.T @ block
        self.weights = _weights(gram, lam) if n else np.zeros((0, 0))

    def _user_vector(self, state: UserState) -> np.ndarray | None:
        js = self.user_items.get(state.user_id)
        if js is None:  # unknown to the training matrix: what the state holds
            js = _indices(self.index, (entry.item_id for entry in state.sequence))
        if not len(js):
            return None
        x = np.zeros(len(self.items), dtype=np.float64)
        x[js] = 1.0
        return x

    def recommend_batch(self, states: Sequence[UserState], k: int) -> list[Scored]:
        out: list[Scored] = []
        vectors = [self._user_vector(s) for s in states]
        present = [v for v in vectors if v is not None]
        scores = iter(np.stack(present) @ self.weights if present else [])
        for state, vec in zip(states, vectors):
            if vec is None:
                out.append([])
                continue
            out.append(top_of_scores(next(scores), self.items, self.index, state, k))
        return out


def _indices(index: dict[str, int], items: Iterable[str]) -> np.ndarray:
    return np.fromiter({index[i] for i in items if i in index}, dtype=np.int64)
