"""Item metadata (category) in Redis, for diversity re-ranking and the demo."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtrec.stream.connections import redis_client
from rtrec.stream.eventfile import file_format, open_text
from rtrec.stream.events import canonical_id
from rtrec.stream.keys import ITEM_CATEGORY
from rtrec.stream.settings import Settings

if TYPE_CHECKING:
    from redis.typing import EncodableT, FieldT


def store_categories(settings: Settings, categories: Iterable[tuple[str, str]]) -> int:
    client = redis_client(settings)
    mapping: dict[FieldT, EncodableT] = {canonical_id(item, "item_id"): str(cat)[:64] for item, cat in categories}
    if mapping:
        client.hset(ITEM_CATEGORY, mapping=mapping)
    client.close()
    return len(mapping)


def read_catalog(path: Path) -> list[tuple[str, str]]:
    """item_id/category rows from JSON lines or CSV (same formats as event files); EventFileError names the
    file and line of anything else (a missing column, a line that is not a JSON object)."""
    import csv

    from rtrec.stream.eventfile import EventFileError

    path = Path(path)
    kind, gz = file_format(path)
    if not path.is_file():
        raise FileNotFoundError(2, "no such file", str(path))
    pairs = []
    try:
        with open_text(path, gz, write=False) as f:
            if kind == "csv":
                reader = csv.DictReader(f)
                fields = [n.strip() for n in reader.fieldnames or []]
                if "item_id" not in fields or not ({"category", "cluster"} & set(fields)):
                    raise EventFileError(
                        f"{path}:1: a catalog CSV needs the columns item_id and category "
                        f"(header is {','.join(fields) or 'empty'})"
                    )
                rows: Iterable[tuple[int, Any]] = ((reader.line_num, r) for r in reader)
            else:
                rows = _json_rows(f, path)
            for n, r in rows:
                item, cat = (
                    (r.get("item_id"), r.get("category", r.get("cluster"))) if isinstance(r, dict) else (None, None)
                )
                if item in (None, "") or cat in (None, ""):
                    raise EventFileError(f"{path}:{n}: a catalog row needs item_id and category")
                pairs.append((item, cat))
    except (UnicodeDecodeError, EOFError, OSError, csv.Error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise EventFileError(f"{path}: not a readable catalog file ({type(exc).__name__}: {exc})") from None
    return pairs


def _json_rows(f: Iterable[str], path: Path) -> Iterator[tuple[int, Any]]:
    import json

    from rtrec.stream.eventfile import EventFileError

    for n, line in enumerate(f, 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise EventFileError(f"{path}:{n}: not valid JSON ({exc.msg})") from None


def load_catalog(settings: Settings, path: Path) -> int:
    """Read item_id/category rows from JSON lines or CSV (same formats as event files)."""
    return store_categories(settings, read_catalog(path))
