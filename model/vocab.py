"""Items as tokens: a vocabulary that grows with the stream without reshaping the model each time.

Token layout (fixed ids first, so growing never renumbers anything)::

    0 PAD   1 BOS   2 EOS   3 UNK   4 browse   5 click   6 purchase   7 (spare)
    8 .. 8+B-1           hash buckets: shared rows for items that arrive when capacity is full
    8+B .. 8+B+C-1       item rows: C reserved rows, assigned in order of first appearance

New items take the next free item row (no reshape: the embedding already has
the row). When every row is taken, further new items map to a hash bucket
(deterministic, shared with other overflow items) until the next fine-tune
calls `grow()`, which adds capacity and resizes the model's embeddings once.
Bucket and free rows are never recommended.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

PAD, BOS, EOS, UNK = 0, 1, 2, 3
TYPE_TOKENS = {"browse": 4, "click": 5, "purchase": 6}
N_SPECIAL = 8


@dataclass
class ItemVocab:
    """item_id <-> token id, with reserved capacity and hashed overflow."""

    capacity: int = 4096
    hash_buckets: int = 64
    items: list[str] = field(default_factory=list)  # row order = assignment order
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {item: row for row, item in enumerate(self.items)}
        if len(self.items) > self.capacity:
            raise ValueError(f"{len(self.items)} items exceed capacity {self.capacity}")

    # ---- layout -------------------------------------------------------------------
    @property
    def bucket_offset(self) -> int:
        return N_SPECIAL

    @property
    def item_offset(self) -> int:
        return N_SPECIAL + self.hash_buckets

    @property
    def size(self) -> int:
        """Rows the model's embedding needs (including free reserved rows)."""
        return self.item_offset + self.capacity

    def __len__(self) -> int:
        return len(self.items)

    @property
    def free_rows(self) -> int:
        return self.capacity - len(self.items)

    # ---- lookups --------------------------------------------------------------------
    def add(self, item_id: str) -> int:
        """Token of `item_id`, assigning a free row to a new item (a bucket when full)."""
        row = self._index.get(item_id)
        if row is not None:
            return self.item_offset + row
        if len(self.items) < self.capacity:
            self._index[item_id] = len(self.items)
            self.items.append(item_id)
            return self.item_offset + len(self.items) - 1
        return self.bucket(item_id)

    def token(self, item_id: str) -> int:
        """Token of a known item; unknown items map to their hash bucket (no assignment)."""
        row = self._index.get(item_id)
        return self.item_offset + row if row is not None else self.bucket(item_id)

    def bucket(self, item_id: str) -> int:
        if self.hash_buckets == 0:
            return UNK
        digest = hashlib.blake2b(item_id.encode(), digest_size=8).digest()
        return self.bucket_offset + int.from_bytes(digest, "little") % self.hash_buckets

    def item(self, token: int) -> str | None:
        """The item of an item-row token, else None (special, type, bucket, free row)."""
        row = token - self.item_offset
        return self.items[row] if 0 <= row < len(self.items) else None

    def item_token_range(self) -> range:
        """Tokens that may be recommended: assigned item rows only."""
        return range(self.item_offset, self.item_offset + len(self.items))

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    # ---- growth ---------------------------------------------------------------------
    def grow(self, min_free: int, factor: float = 1.5) -> bool:
        """Raise capacity so that at least `min_free` rows are free; True if the model must resize."""
        if self.free_rows >= min_free:
            return False
        self.capacity = max(int(self.capacity * factor), len(self.items) + min_free)
        return True

    # ---- persistence ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "hash_buckets": self.hash_buckets,
            "type_tokens": TYPE_TOKENS,
            "items": self.items,
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> ItemVocab:
        data = json.loads(path.read_text())
        if data.get("type_tokens", TYPE_TOKENS) != TYPE_TOKENS:
            raise ValueError("vocabulary was written with a different token layout")
        return cls(
            capacity=int(data["capacity"]),
            hash_buckets=int(data["hash_buckets"]),
            items=[str(i) for i in data["items"]],
        )
