"""New items recommendable at once: an item first seen while serving takes a free vocabulary row.

Without this, an item that appears after the served checkpoint was trained maps to a shared hash
bucket (model/vocab.py) and is never recommended until the next fine-tune. The model keeps
`vocab.free_rows` reserved rows and ties its input and output embeddings, so giving a new item a
row needs no reshape: `vocab.add(item)`, then write the row. The row is initialised from

(a) its category's items: the mean embedding of the vocabulary items of its category (the catalog's
    `ITEM_CATEGORY` hash), else
(b) the items co-visited with it in the batch's states: X in `covis[A]` makes A a peer of X, and
    X's own neighbours are its peers when X is a recent item; the mean of their embeddings, else
(c) no row yet: tried again on later batches, at most `MAX_ATTEMPTS` times per served model.

Where new items are seen: the ranking pipeline's states (the trending pool, the co-visited
neighbours of recent items, the users' own recent items). `NewItemRows.prepare` runs in stage one
(the event loop): it reads the categories of unknown items (one HMGET per batch) and, once per
served model, the categories of every vocabulary item (category -> rows, then kept up to date).
`NewItemRows.register` runs in the scoring thread just before the forward pass, so a row is never
written while the model reads it; at most `per_batch` items per batch, so a burst cannot stall one.

Only the transformers backend (`TorchGenerator`); vLLM keeps its weights in its engine. The
registrations live in the served model's memory: a hot swap starts from the new model's own
vocabulary (the trainer's fine-tune gives these items real rows), and the version does not change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rtrec.model.recommender import GenerativeRecommender, Recommender
from rtrec.stream import redis_calls
from rtrec.stream.keys import ITEM_CATEGORY
from rtrec.stream.state_store import UserState

if TYPE_CHECKING:
    from rtrec.model.generator import TorchGenerator

log = logging.getLogger(__name__)

PER_BATCH = 64  # registrations per batch at most
MAX_ATTEMPTS = 20  # batches an item without peers is retried in, per served model
MAX_PENDING = 50_000  # items remembered (categories read, attempts): cleared beyond, re-read later
HMGET_CHUNK = 1000  # items per HMGET when the vocabulary's categories are read
UNREAD = object()  # an item whose category is not (or no longer) read


@dataclass
class ServedRows:
    """What one served model has registered and what is known about its unknown items."""

    model: TorchGenerator
    by_category: dict[str, list[int]] | None = None  # category -> vocabulary tokens; None until read
    categories: dict[str, str | None] = field(default_factory=dict)  # unknown item -> its category (read)
    attempts: dict[str, int] = field(default_factory=dict)  # unknown item -> batches without peers
    registered: list[str] = field(default_factory=list)

    def waiting(self, item: str) -> bool:
        """An item not in the vocabulary that may still get a row."""
        return item not in self.model.vocab and self.attempts.get(item, 0) < MAX_ATTEMPTS


class NewItemRows:
    """Gives items first seen while serving their own vocabulary row in the served `TorchGenerator`."""

    def __init__(self, enabled: bool = True, per_batch: int = PER_BATCH, match_norm: bool = True) -> None:
        self.enabled = enabled
        self.per_batch = per_batch
        self.match_norm = match_norm  # scale the peers' mean to their mean norm (see `initial_row`)
        self.served: ServedRows | None = None  # the latest served model's; a swap replaces it

    def rows_for(self, recommender: Recommender, swap: bool = False) -> ServedRows | None:
        """The served model's state; with `swap`, a new model starts fresh (None: nothing to do)."""
        if not self.enabled or not isinstance(recommender, GenerativeRecommender):
            return None  # the blending baseline: no rows (and no torch import for a blend-only worker)
        from rtrec.model.generator import TorchGenerator

        if not isinstance(recommender, TorchGenerator):  # vLLM: its weights live in its engine
            return None
        if self.served is not None and self.served.model is recommender:
            return self.served
        if not swap:  # a batch of a model swapped out meanwhile: leave it as it is
            return None
        self.served = ServedRows(recommender)
        return self.served

    # ---- stage one (event loop): what Redis knows of the unknown items ---------------------------
    async def prepare(self, redis: Any, recommender: Recommender, states: Sequence[UserState]) -> None:
        """Read the categories the next `register` needs: the vocabulary's (once per model), the unknown items'."""
        rows = self.rows_for(recommender, swap=True)
        if rows is None or rows.model.vocab.free_rows == 0:
            return
        if rows.by_category is None:
            rows.by_category = await self._vocabulary_categories(redis, rows.model)
        unread = [item for item in unknown_items(states, rows) if item not in rows.categories]
        unread = unread[: 4 * self.per_batch]
        if not unread:
            return
        if len(rows.categories) + len(unread) > MAX_PENDING:
            rows.categories.clear()
            rows.attempts.clear()
        found = await redis.hmget(ITEM_CATEGORY, unread)
        for item, category in zip(unread, found):
            rows.categories[item] = None if category is None else redis_calls.text(category)

    @staticmethod
    async def _vocabulary_categories(redis: Any, model: TorchGenerator) -> dict[str, list[int]]:
        vocab = model.vocab
        items = list(vocab.items)
        by_category: dict[str, list[int]] = {}
        for start in range(0, len(items), HMGET_CHUNK):
            chunk = items[start : start + HMGET_CHUNK]
            for item, category in zip(chunk, await redis.hmget(ITEM_CATEGORY, chunk)):
                if category is not None:
                    by_category.setdefault(redis_calls.text(category), []).append(vocab.token(item))
        return by_category

    # ---- stage two (the scoring thread, before the forward pass) ---------------------------------
    def register(self, recommender: Recommender, states: Sequence[UserState]) -> list[str]:
        """Give rows to the batch's new items whose category was read; returns the items registered."""
        rows = self.rows_for(recommender)
        if rows is None or rows.by_category is None:
            return []
        import torch

        vocab = rows.model.vocab
        ready = [item for item in unknown_items(states, rows) if item in rows.categories]
        ready = ready[: self.per_batch]
        if not ready or vocab.free_rows == 0:
            return []
        covisited = co_visited(states, set(ready), vocab)
        weight = rows.model.checkpoint.model.get_input_embeddings().weight
        done = []
        with torch.no_grad():
            for item in ready:
                if vocab.free_rows == 0:
                    break
                category = rows.categories.get(item, UNREAD)  # `prepare` may clear it meanwhile (event loop)
                if category is UNREAD:
                    continue
                peers = rows.by_category.get(category, []) if isinstance(category, str) else []
                peers = peers or sorted(covisited.get(item, ()))
                if not peers:
                    rows.attempts[item] = rows.attempts.get(item, 0) + 1
                    continue
                index = torch.tensor(peers, device=weight.device)
                token = vocab.add(item)
                weight[token] = initial_row(weight.index_select(0, index).float(), self.match_norm).to(weight.dtype)
                if isinstance(category, str):
                    rows.by_category.setdefault(category, []).append(token)
                rows.categories.pop(item, None)
                rows.attempts.pop(item, None)
                done.append(item)
        if done:
            rows.registered += done
            log.debug("new item rows: %d registered (%d free)", len(done), vocab.free_rows)
        return done


def initial_row(peers: Any, match_norm: bool) -> Any:
    """A new item's embedding from its peers' rows: their mean, with `match_norm` scaled to their mean norm.

    The embeddings are tied, so a row is also the item's output vector: the plain mean (shorter than
    its peers) scores the item like an average peer damped towards zero; scaled to a peer's norm it
    scores like a typical item of the direction they share (the measurement is in docs/model.md).
    """
    mean = peers.mean(dim=0)
    if not match_norm:
        return mean
    length = mean.norm()
    return mean * (peers.norm(dim=1).mean() / length) if length > 0 else mean


def unknown_items(states: Sequence[UserState], rows: ServedRows) -> list[str]:
    """The states' items the model has no row for (and may still get one), candidates first: the
    trending pool, then co-visited neighbours, then the users' own recent items."""
    seen: dict[str, None] = {}
    trending = states[0].trending if states else []
    pools: list[Iterable[str]] = [(item for item, _ in trending)]
    pools += [(item for item, _ in neighbours) for s in states for neighbours in s.covis.values()]
    pools += [(e.item_id for e in s.sequence) for s in states]
    for pool in pools:
        for item in pool:
            if item not in seen and rows.waiting(item):
                seen[item] = None
    return list(seen)


def co_visited(states: Sequence[UserState], items: set[str], vocab: Any) -> dict[str, set[int]]:
    """item -> tokens of the vocabulary items co-visited with it in the states: A when the item is
    among A's neighbours, and the item's own neighbours when it is a recent item."""
    peers: dict[str, set[int]] = {}
    for state in states:
        for anchor, neighbours in state.covis.items():
            if anchor in items:
                peers.setdefault(anchor, set()).update(vocab.token(n) for n, _ in neighbours if n in vocab)
            if anchor in vocab:
                for n, _ in neighbours:
                    if n in items:
                        peers.setdefault(n, set()).add(vocab.token(anchor))
    return peers
