"""Item metadata (category) in Redis, for diversity re-ranking and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from stream.connections import redis_client
from stream.eventfile import file_format, open_text
from stream.events import canonical_id
from stream.settings import Settings

CATEGORY_KEY = "rt:item:category"


def store_categories(settings: Settings, categories: Iterable[tuple[str, str]]) -> int:
    client = redis_client(settings)
    mapping = {canonical_id(item, "item_id"): str(cat)[:64] for item, cat in categories}
    if mapping:
        client.hset(CATEGORY_KEY, mapping=mapping)
    client.close()
    return len(mapping)


def load_catalog(settings: Settings, path: Path) -> int:
    """Read item_id/category rows from JSON lines or CSV (same formats as event files)."""
    import csv
    import json

    kind, gz = file_format(Path(path))
    with open_text(Path(path), gz, write=False) as f:
        rows = csv.DictReader(f) if kind == "csv" else (json.loads(line) for line in f if line.strip())
        pairs = [(r["item_id"], r.get("category", r.get("cluster"))) for r in rows]
    return store_categories(settings, pairs)
