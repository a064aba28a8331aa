"""The item catalog in Redis: category, availability and info (title, price) per item.

Fed two ways with the same record: ``rtrec catalog FILE`` (JSON lines or CSV) and upserts on the
``RTREC_TOPIC_CATALOG`` topic, which the state worker applies (workers/state.py). The ranking reads
it back through ``item_rules`` (categories for filters and diversity, unavailable items never shown).

Every field of an upsert comes from a client: a record is validated like an event
(``parse_catalog_record``) and a bad one is dead-lettered with its reason. The catalog is capped at
``RTREC_CATALOG_MAX_ITEMS``: an upsert of a *new* item into a full catalog is refused
(``catalog_full``), updates of known items always apply.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtrec.stream import redis_calls
from rtrec.stream.connections import is_cluster, redis_client
from rtrec.stream.eventfile import file_format, open_text
from rtrec.stream.events import InvalidEvent, canonical_id, checked_price, decode_json, encodable
from rtrec.stream.keys import ITEM_CATEGORY, ITEM_INFO, ITEM_UNAVAILABLE
from rtrec.stream.redis_calls import AsyncClient, Command, Plan, Round, ScriptCall, SyncClient
from rtrec.stream.settings import Settings

MAX_CATEGORY = 64
MAX_TITLE = 200
CATALOG_FULL = "catalog_full"
"""The refusal reason of an upsert of a new item into a full catalog."""
CHUNK = 1000  # entries per script call: one call blocks Redis for about a millisecond
CALLS_PER_ROUND = 20  # script calls per pipeline (a file of a million items: 50 round trips)
_KEYS = (ITEM_CATEGORY, ITEM_UNAVAILABLE, ITEM_INFO)
_CSV_TRUE = frozenset({"true", "1", "yes"})
_CSV_FALSE = frozenset({"false", "0", "no"})
_CSV_COLUMNS = frozenset({"category", "cluster", "available", "title", "price"})


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One item's upsert; None leaves a field as it is (``available`` None only from ``store_categories``)."""

    item_id: str
    category: str | None = None
    available: bool | None = True
    title: str | None = None
    price: float | None = None

    def info(self) -> dict[str, Any]:
        """The info fields this upsert sets (merged into what ITEM_INFO holds)."""
        out: dict[str, Any] = {}
        if self.title is not None:
            out["title"] = self.title
        if self.price is not None:
            out["price"] = self.price
        return out


def catalog_entry(data: Any) -> CatalogEntry:
    """Validate a decoded upsert (a JSON object; unknown keys ignored) or raise InvalidEvent with the reason."""
    if not isinstance(data, dict):
        raise InvalidEvent("not_an_object", "a catalog upsert must be a JSON object")
    if data.get("item_id") is None:
        raise InvalidEvent("missing_field", "item_id")
    item_id = canonical_id(data["item_id"], "item_id")
    category = data.get("category")
    if category is not None:
        if not isinstance(category, str):
            raise InvalidEvent("wrong_type", "category must be a string")
        category = encodable(category.strip(), "category")
        if not 1 <= len(category) <= MAX_CATEGORY:
            raise InvalidEvent("bad_value", f"category must be 1..{MAX_CATEGORY} characters (after strip)")
    available = data.get("available")
    if available is None:
        available = True
    elif not isinstance(available, bool):
        raise InvalidEvent("wrong_type", "available must be true or false")
    title = data.get("title")
    if title is not None:
        if not isinstance(title, str):
            raise InvalidEvent("wrong_type", "title must be a string")
        if len(encodable(title, "title")) > MAX_TITLE:
            raise InvalidEvent("bad_value", f"title is longer than {MAX_TITLE} characters")
    price = data.get("price")
    if price is not None:
        price = checked_price(price)
    return CatalogEntry(item_id, category, available, title, price)


def parse_catalog_record(raw: bytes, settings: Settings) -> CatalogEntry:
    """Bytes from the catalog topic -> CatalogEntry, or InvalidEvent with the reason (dead-lettered)."""
    return catalog_entry(decode_json(raw, settings.max_event_bytes))


def catalog_full_detail(settings: Settings) -> str:
    """The dead letter's detail of a ``catalog_full`` refusal: which setting to raise."""
    return f"the catalog holds RTREC_CATALOG_MAX_ITEMS={settings.catalog_max_items} items; a new item is refused"


# ---- storing -------------------------------------------------------------------------------------
STORE_LUA = r"""
-- KEYS: category hash, unavailable set, info hash. ARGV[1]: the cap; then per entry
-- item, category ('' keeps it), available ('1', '0', '' keeps it), info JSON ('' keeps it).
-- Returns per entry '' (applied) or the refusal reason.
local cap = tonumber(ARGV[1])
local function size()
  return math.max(redis.call('HLEN', KEYS[1]), redis.call('SCARD', KEYS[2]), redis.call('HLEN', KEYS[3]))
end
local n = size()  -- the catalog's items: at least its largest key's
local out = {}
for i = 2, #ARGV, 4 do
  local item, cat, avail, info = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local known = redis.call('HEXISTS', KEYS[1], item) == 1 or redis.call('SISMEMBER', KEYS[2], item) == 1
    or redis.call('HEXISTS', KEYS[3], item) == 1
  if not known and n >= cap then
    out[#out + 1] = 'catalog_full'
  else
    if cat ~= '' then redis.call('HSET', KEYS[1], item, cat) end
    if avail == '1' then
      redis.call('SREM', KEYS[2], item)
    elseif avail == '0' then
      redis.call('SADD', KEYS[2], item)
    end
    if info ~= '' then
      local old = redis.call('HGET', KEYS[3], item)
      if old then
        local ok, cur = pcall(cjson.decode, old)
        if ok and type(cur) == 'table' then
          for k, v in pairs(cjson.decode(info)) do cur[k] = v end
          info = cjson.encode(cur)
        end
      end
      redis.call('HSET', KEYS[3], item, info)
    end
    n = size()
    out[#out + 1] = ''
  end
end
return out
"""


def store_catalog(client: SyncClient, entries: Sequence[CatalogEntry], settings: Settings) -> list[str | None]:
    """Upsert `entries` in order; per entry None (applied) or the refusal reason (``catalog_full``)."""
    return redis_calls.run(client, store_plan(entries, settings.catalog_max_items, is_cluster(client)))


async def store_catalog_async(
    client: AsyncClient, entries: Sequence[CatalogEntry], settings: Settings
) -> list[str | None]:
    """``store_catalog`` with an asyncio client (the state worker's)."""
    return await redis_calls.run_async(client, store_plan(entries, settings.catalog_max_items, is_cluster(client)))


def store_plan(entries: Sequence[CatalogEntry], cap: int, cluster: bool = False) -> Plan[list[str | None]]:
    """The Redis work of an upsert batch: one script call per CHUNK entries, CALLS_PER_ROUND per round trip
    (a worker's batch: one). In a cluster the three keys live in different slots, which one script may not
    touch: there a read round and a write round per chunk instead, the cap checked between them (not
    atomic: concurrent writers may overshoot it by a batch each)."""
    chunks = [entries[i : i + CHUNK] for i in range(0, len(entries), CHUNK)]

    def steps() -> Generator[Round, list[Any], list[str | None]]:
        out: list[str | None] = []
        if cluster:
            for chunk in chunks:
                out += yield from _cluster_steps(chunk, cap)
            return out
        calls = [ScriptCall(STORE_LUA, _KEYS, [cap, *_script_args(chunk)]) for chunk in chunks]
        for start in range(0, len(calls), CALLS_PER_ROUND):
            replies = yield Round(calls[start : start + CALLS_PER_ROUND])
            out += [redis_calls.text(r) or None for reply in replies for r in reply]
        return out

    return Plan(steps)


def _script_args(chunk: Sequence[CatalogEntry]) -> list[str]:
    args = []
    for e in chunk:
        info = e.info()
        avail = "" if e.available is None else "1" if e.available else "0"
        args += [e.item_id, e.category or "", avail, json.dumps(info, separators=(",", ":")) if info else ""]
    return args


def _cluster_steps(chunk: Sequence[CatalogEntry], cap: int) -> Generator[Round, list[Any], list[str | None]]:
    """A chunk on a cluster: read the sizes and what each item has, decide here as the script does, then write."""
    items = sorted({e.item_id for e in chunk})
    cat, unavailable, info_key = _KEYS
    reads = [
        Command(("HLEN", cat), {"keys": [cat]}),
        Command(("SCARD", unavailable), {"keys": [unavailable]}),
        Command(("HLEN", info_key), {"keys": [info_key]}),
        redis_calls.hmget(cat, items),
        Command(("SMISMEMBER", unavailable, *items), {"keys": [unavailable]}),
        redis_calls.hmget(info_key, items),
    ]
    n_cat, n_unav, n_info, cats, flags, infos = yield Round(reads, pipelined=False)
    sizes = [int(n_cat), int(n_unav), int(n_info)]
    has_cat = {i for i, c in zip(items, cats) if c is not None}
    in_set = {i for i, f in zip(items, flags) if f}
    info: dict[str, str] = {i: redis_calls.text(x) for i, x in zip(items, infos) if x is not None}
    categories: dict[str, str] = {}
    availability: dict[str, bool] = {}
    infos_out: dict[str, str] = {}
    out: list[str | None] = []
    for e in chunk:
        item = e.item_id
        if item not in has_cat and item not in in_set and item not in info and max(sizes) >= cap:
            out.append(CATALOG_FULL)
            continue
        if e.category is not None:
            categories[item] = e.category
            sizes[0] += item not in has_cat
            has_cat.add(item)
        if e.available is not None:
            availability[item] = e.available
            if e.available:
                sizes[1] -= item in in_set
                in_set.discard(item)
            else:
                sizes[1] += item not in in_set
                in_set.add(item)
        fields = e.info()
        if fields:
            sizes[2] += item not in info
            info[item] = infos_out[item] = json.dumps({**_info_fields(info.get(item)), **fields}, separators=(",", ":"))
        out.append(None)
    writes: list[redis_calls.Call] = []
    if categories:
        writes.append(Command(("HSET", cat, *_flat(categories)), {"keys": [cat]}))
    gone = [i for i, ok in availability.items() if not ok]
    back = [i for i, ok in availability.items() if ok]
    if gone:
        writes.append(Command(("SADD", unavailable, *gone), {"keys": [unavailable]}))
    if back:
        writes.append(Command(("SREM", unavailable, *back), {"keys": [unavailable]}))
    if infos_out:
        writes.append(Command(("HSET", info_key, *_flat(infos_out)), {"keys": [info_key]}))
    if writes:
        yield Round(writes, pipelined=False)
    return out


def _flat(mapping: dict[str, str]) -> list[str]:
    return [x for kv in mapping.items() for x in kv]


def _info_fields(stored: str | None) -> dict[str, Any]:
    """What ITEM_INFO holds for an item, as a dict ({} when absent or unreadable: the upsert replaces it)."""
    if stored is None:
        return {}
    try:
        value = json.loads(stored)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def store_categories(settings: Settings, categories: Iterable[tuple[str, str]]) -> int:
    """Set item categories (the demo's clusters), availability untouched; returns how many were stored
    (items beyond RTREC_CATALOG_MAX_ITEMS are not)."""
    entries = [CatalogEntry(canonical_id(item, "item_id"), str(cat)[:MAX_CATEGORY], None) for item, cat in categories]
    return _stored(settings, entries)


def load_catalog(settings: Settings, path: Path) -> int:
    """Read a catalog file (``read_catalog``) and store it; returns how many entries were stored."""
    return _stored(settings, read_catalog(path))


def _stored(settings: Settings, entries: Sequence[CatalogEntry]) -> int:
    """Store entries on the configured Redis; how many were stored (the rest refused at the cap)."""
    client = redis_client(settings)
    try:
        refused = store_catalog(client, entries, settings)
    finally:
        client.close()
    return sum(r is None for r in refused)


# ---- reading -------------------------------------------------------------------------------------
async def item_rules(redis: AsyncClient, items: Sequence[str]) -> tuple[dict[str, str | None], set[str]]:
    """Each item's category (None: none known) and the items marked unavailable, in one round trip
    (a non-transactional pipeline: the two keys may live on different cluster nodes)."""
    if not items:
        return {}, set()
    items = list(items)
    pipe = redis.pipeline(transaction=False)
    pipe.hmget(ITEM_CATEGORY, items)
    pipe.smismember(ITEM_UNAVAILABLE, items)
    categories, flags = await pipe.execute()
    return (
        {item: None if c is None else redis_calls.text(c) for item, c in zip(items, categories)},
        {item for item, flag in zip(items, flags) if flag},
    )


# ---- files ---------------------------------------------------------------------------------------
def read_catalog(path: Path) -> list[CatalogEntry]:
    """Catalog entries from JSON lines (upsert records, as on the topic) or CSV (columns item_id and any of
    category (or cluster), available (true/false/1/0/yes/no), title, price; an empty cell leaves the field
    out). Everything is checked before anything is stored: EventFileError names the file and line of a
    bad row (a missing column, a bad value, a line that is not a JSON object)."""
    import csv

    from rtrec.stream.eventfile import EventFileError

    path = Path(path)
    kind, gz = file_format(path)
    if not path.is_file():
        raise FileNotFoundError(2, "no such file", str(path))
    entries = []
    try:
        with open_text(path, gz, write=False) as f:
            if kind == "csv":
                reader = csv.DictReader(f)
                fields = [n.strip() for n in reader.fieldnames or []]
                if "item_id" not in fields or not (
                    {"category", "cluster", "available", "title", "price"} & set(fields)
                ):
                    raise EventFileError(
                        f"{path}:1: a catalog CSV needs the columns item_id and category "
                        f"(or available, title, price) (header is {','.join(fields) or 'empty'})"
                    )
                rows: Iterable[tuple[int, Any]] = (
                    (reader.line_num, _csv_row(r, path, reader.line_num)) for r in reader
                )
            else:
                rows = _json_rows(f, path)
            for n, r in rows:
                try:
                    entries.append(catalog_entry(_file_record(r)))
                except InvalidEvent as exc:
                    raise EventFileError(f"{path}:{n}: {exc}") from None
    except (UnicodeDecodeError, EOFError, OSError, csv.Error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise EventFileError(f"{path}: not a readable catalog file ({type(exc).__name__}: {exc})") from None
    return entries


def _file_record(row: Any) -> Any:
    """A file row as an upsert record: ``cluster`` stands for ``category``, and a number category (the
    synthetic catalog's clusters) is written in decimal."""
    if not isinstance(row, dict):
        return row
    category = row.get("category", row.get("cluster"))
    if isinstance(category, int) and not isinstance(category, bool):
        category = str(category)
    return {**row, "category": category}


def _csv_row(row: dict[str | None, Any], path: Path, line: int) -> dict[str, Any]:
    """A CSV row as an upsert record: empty cells left out, available and price converted."""
    from rtrec.stream.eventfile import EventFileError

    out: dict[str, Any] = {}
    for name, value in row.items():
        if name is None or not isinstance(value, str) or value.strip() == "":
            continue
        out[name.strip()] = value
    if "available" in out:
        flag = out["available"].strip().lower()
        if flag not in _CSV_TRUE | _CSV_FALSE:
            raise EventFileError(f"{path}:{line}: available must be true/false/1/0/yes/no, not {flag[:40]!r}")
        out["available"] = flag in _CSV_TRUE
    if "price" in out:
        try:
            out["price"] = float(out["price"])
        except ValueError:
            raise EventFileError(f"{path}:{line}: price must be a number, not {out['price'][:40]!r}") from None
    return out


def _json_rows(f: Iterable[str], path: Path) -> Iterator[tuple[int, Any]]:
    from rtrec.stream.eventfile import EventFileError

    for n, line in enumerate(f, 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise EventFileError(f"{path}:{n}: not valid JSON ({exc.msg})") from None


def catalog_group(settings: Settings) -> str:
    """The consumer group of the state workers' catalog loop (its lag is reported with the others)."""
    return f"{settings.state_group}-catalog"
