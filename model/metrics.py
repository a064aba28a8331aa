"""Single-target, full-ranking metrics for leave-one-out evaluation.

Each user has exactly one held-out item and every recommender ranks the whole catalogue
(minus the user's history), which is the protocol the published SASRec/BERT4Rec/HSTU numbers
use. With one target, recall@k equals hit rate@k; both are kept so tables read familiarly.

>>> summarize({"u": ["a", "b"], "v": ["c", "a"]}, {"u": "b", "v": "x"}, {"a": 3, "b": 1}, ["a", "b", "c", "x"])["HR@10"]
0.5
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence


def _rank(ranked: Sequence[str], target: str, k: int) -> int | None:
    """0-based position of target in the first k, or None."""
    for pos, item in enumerate(ranked[:k]):
        if item == target:
            return pos
    return None


def hit_rate_at(ranked: Sequence[str], target: str, k: int) -> float:
    """1.0 if the target is among the first k items.

    >>> hit_rate_at(["a", "b", "c"], "b", 2), hit_rate_at(["a", "b", "c"], "c", 2)
    (1.0, 0.0)
    """
    return 0.0 if _rank(ranked, target, k) is None else 1.0


def recall_at(ranked: Sequence[str], target: str, k: int) -> float:
    """Recall@k with one relevant item: the same as the hit rate.

    >>> recall_at(["a", "b"], "a", 1)
    1.0
    """
    return hit_rate_at(ranked, target, k)


def ndcg_at(ranked: Sequence[str], target: str, k: int) -> float:
    """1 / log2(rank + 2) for a 0-based rank < k (ideal DCG is 1 with one target), else 0.

    >>> ndcg_at(["a", "b"], "a", 10), round(ndcg_at(["a", "b"], "b", 10), 4), ndcg_at(["a"], "z", 10)
    (1.0, 0.6309, 0.0)
    """
    pos = _rank(ranked, target, k)
    return 0.0 if pos is None else 1.0 / math.log2(pos + 2)


def coverage(all_top_lists: Iterable[Sequence[str]], catalogue_size: int) -> float:
    """Fraction of the catalogue that appears in at least one list (pass top-10 lists).

    >>> coverage([["a", "b"], ["b", "c"]], 6)
    0.5
    """
    if catalogue_size <= 0:
        return 0.0
    seen = {item for top in all_top_lists for item in top}
    return len(seen) / catalogue_size


def novelty(all_top_lists: Iterable[Sequence[str]], popularity: Mapping[str, int], n_train_events: int) -> float:
    """Mean self-information -log2 p(item) of recommended items, p = train count / n_train_events.

    Items never seen in training get p = 1/n (as rare as one event). Higher = less mainstream.

    >>> novelty([["a"], ["b"]], {"a": 2, "b": 2}, 4)
    1.0
    """
    n = max(n_train_events, 1)
    total, count = 0.0, 0
    for top in all_top_lists:
        for item in top:
            total -= math.log2(max(popularity.get(item, 0), 1) / n)
            count += 1
    return total / count if count else 0.0


def summarize(
    per_user_ranked: Mapping[str, Sequence[str]],
    targets: Mapping[str, str],
    popularity: Mapping[str, int],
    catalogue: Collection[str],
) -> dict[str, float]:
    """HR@10, NDCG@10, Recall@20, coverage@10, novelty@10 averaged over the users in ``targets``.

    A user without a ranked list counts as a miss (so silently dropped users cannot inflate scores).
    """
    users = list(targets)
    n = len(users)
    empty: Sequence[str] = ()
    ranked = [per_user_ranked.get(u, empty) for u in users]
    tops = [r[:10] for r in ranked]

    def mean(values: Iterable[float]) -> float:
        return sum(values) / n if n else 0.0

    return {
        "HR@10": mean(hit_rate_at(r, targets[u], 10) for u, r in zip(users, ranked)),
        "NDCG@10": mean(ndcg_at(r, targets[u], 10) for u, r in zip(users, ranked)),
        "Recall@20": mean(recall_at(r, targets[u], 20) for u, r in zip(users, ranked)),
        "coverage@10": coverage(tops, len(catalogue)),
        "novelty@10": novelty(tops, popularity, sum(popularity.values())),
        "users": n,
    }
