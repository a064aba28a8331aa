"""Recommendation requests and responses as they travel on Kafka (JSON)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from rtrec.stream.events import InvalidEvent, canonical_id, decode_json, encodable
from rtrec.stream.settings import LimitsSettings, Settings
from rtrec.stream.topics import internal_topics, is_legal_topic_name

BASE_REQUEST_BYTES = 4096
"""What a request without candidates or filter may take: ids, k, flags, a reply topic, unknown keys."""
BYTES_PER_VALUE = 72
"""Room for one listed value: a 64-character id or category, its quotes, a comma and a space (68), plus slack."""
FILTER_KEYS = ("categories", "exclude_categories", "exclude_items")
MAX_CATEGORY_CHARS = 64  # the catalog keeps a category's first 64 characters (catalog.store_categories)


def _request_bytes(max_candidates: int, max_filter_values: int) -> int:
    return BASE_REQUEST_BYTES + (max_candidates + len(FILTER_KEYS) * max_filter_values) * BYTES_PER_VALUE


def max_request_bytes(settings: Settings) -> int:
    """The largest request payload accepted: the plain form's 4096 bytes plus room for the longest lists the
    limits allow (RTREC_MAX_CANDIDATES candidates and RTREC_MAX_FILTER_VALUES values in each of the filter's
    three lists, each value up to 64 ASCII characters), so that a request within every limit also fits."""
    return _request_bytes(settings.max_candidates, settings.max_filter_values)


MAX_REQUEST_BYTES = _request_bytes(
    LimitsSettings.model_fields["max_candidates"].default, LimitsSettings.model_fields["max_filter_values"].default
)
"""max_request_bytes under the default limits (what best_effort_ids reads when it is given no settings)."""


@dataclass(frozen=True, slots=True)
class ItemFilter:
    """A request's business rules: only items of `categories` (when given), never those of
    `exclude_categories`, never `exclude_items`. Categories come from the catalog."""

    categories: frozenset[str] = frozenset()
    exclude_categories: frozenset[str] = frozenset()
    exclude_items: frozenset[str] = frozenset()

    @property
    def by_category(self) -> bool:
        """Whether the catalog must be read to apply it."""
        return bool(self.categories or self.exclude_categories)

    def __bool__(self) -> bool:
        return bool(self.categories or self.exclude_categories or self.exclude_items)

    def to_dict(self) -> dict[str, list[str]]:
        """The wire form: only the non-empty lists, sorted (the same filter always writes the same JSON)."""
        d = {}
        for name in FILTER_KEYS:
            values = getattr(self, name)
            if values:
                d[name] = sorted(values)
        return d


NO_FILTER = ItemFilter()


@dataclass(frozen=True, slots=True)
class RecRequest:
    """Ask for the top-k items of one user; the answer goes to reply_topic (or the default).

    Three forms: a user's top k; with `item_id`, items similar to that item (`user_id` then
    optional, "" when absent: it only adds personal context); with `candidates`, those items
    ranked for the user. Any form may carry a `filter`.
    """

    request_id: str
    user_id: str
    k: int = 10
    exclude_seen: bool = True
    reply_topic: str | None = None
    item_id: str | None = None  # similar items: the anchor
    candidates: tuple[str, ...] | None = None  # re-ranking: the client's items
    filter: ItemFilter = NO_FILTER

    def to_json(self) -> bytes:
        d: dict[str, Any] = {"request_id": self.request_id}
        if self.user_id or self.item_id is None:  # "" only stands for "no user" beside an item_id
            d["user_id"] = self.user_id
        d["k"] = self.k
        d["exclude_seen"] = self.exclude_seen
        if self.reply_topic:
            d["reply_topic"] = self.reply_topic
        if self.item_id is not None:
            d["item_id"] = self.item_id
        if self.candidates is not None:
            d["candidates"] = list(self.candidates)
        if self.filter:
            d["filter"] = self.filter.to_dict()
        return json.dumps(d, separators=(",", ":")).encode()


@dataclass(slots=True)
class RecItem:
    item_id: str
    score: float
    reason: str = ""


@dataclass(slots=True)
class RecResponse:
    """The answer to one request; ``error`` is set instead of items when it could not be served."""

    request_id: str
    user_id: str
    items: list[RecItem]
    model_version: str
    generated_at: int = field(default_factory=lambda: int(time.time() * 1000))
    latency_ms: float = 0.0
    fallback: bool = False
    error: str | None = None
    item_id: str | None = None  # a similar-items answer: its anchor
    arm: str = "control"  # A/B split: "control" (CURRENT) or "candidate" (RTREC_AB_CANDIDATE)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "request_id": self.request_id,
            "user_id": self.user_id,
            "items": [{"item_id": it.item_id, "score": round(it.score, 6), "reason": it.reason} for it in self.items],
            "model_version": self.model_version,
            "generated_at": self.generated_at,
            "latency_ms": round(self.latency_ms, 3),
            "fallback": self.fallback,
            "arm": self.arm,
        }
        if self.error is not None:
            d["error"] = self.error
        if self.item_id is not None:
            d["item_id"] = self.item_id
        return d

    def to_json(self) -> bytes:
        """One per request on the serving path: orjson (several times json's speed); json for what orjson
        refuses, e.g. a lone surrogate echoed from an invalid request's id (json escapes it)."""
        d = self.to_dict()
        try:
            return orjson.dumps(d)
        except TypeError:
            return json.dumps(d, separators=(",", ":")).encode()


def parse_request(raw: bytes, settings: Settings) -> RecRequest:
    """Validate a request payload; raises InvalidEvent (same reasons as events, plus too_many_candidates and
    unknown_field for the filter). Unknown top-level keys are ignored. The forms (see RecRequest): a user's
    top k; `item_id`, similar items (user_id then optional); `candidates`, a re-ranking; any with a `filter`."""
    data = decode_json(raw, max_request_bytes(settings))
    if not isinstance(data, dict):
        raise InvalidEvent("not_an_object", "a request must be a JSON object")
    user_id = data.get("user_id")
    item_id = data.get("item_id")
    if user_id is None or data.get("request_id") is None:
        _check_required(data, item_id)
    candidates = data.get("candidates")
    k = data.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int):
        raise InvalidEvent("wrong_type", "k must be an integer")
    if candidates is None and not 1 <= k <= settings.max_k:
        raise InvalidEvent("bad_value", f"k must be between 1 and {settings.max_k}")
    exclude_seen = data.get("exclude_seen", True)
    if not isinstance(exclude_seen, bool):
        raise InvalidEvent("wrong_type", "exclude_seen must be a boolean")
    reply_topic = data.get("reply_topic")
    if reply_topic is not None:
        check_reply_topic(reply_topic, settings)
    filter_ = data.get("filter")
    if item_id is None and candidates is None and filter_ is None:  # the plain form: nothing more to read
        return RecRequest(
            request_id=canonical_id(data["request_id"], "request_id"),
            user_id=canonical_id(user_id, "user_id"),
            k=k,
            exclude_seen=exclude_seen,
            reply_topic=reply_topic,
        )
    if item_id is not None:
        if candidates is not None:
            raise InvalidEvent(
                "bad_value", "a request is either similar items (item_id) or a re-ranking (candidates), not both"
            )
        item_id = canonical_id(item_id, "item_id")
    if candidates is not None:  # a re-ranking returns all its candidates unless k asks for fewer
        candidates = parse_candidates(candidates, settings)
        k = data.get("k", len(candidates))
        if not 1 <= k <= settings.max_candidates:
            raise InvalidEvent("bad_value", f"k must be between 1 and {settings.max_candidates} (RTREC_MAX_CANDIDATES)")
    return RecRequest(
        request_id=canonical_id(data["request_id"], "request_id"),
        user_id="" if user_id is None else canonical_id(user_id, "user_id"),
        k=k,
        exclude_seen=exclude_seen,
        reply_topic=reply_topic,
        item_id=item_id,
        candidates=candidates,
        filter=NO_FILTER if filter_ is None else parse_filter(filter_, settings),
    )


def _check_required(data: dict[str, Any], item_id: Any) -> None:
    missing = [name for name in ("request_id", "user_id") if data.get(name) is None]
    if item_id is not None and "user_id" in missing:
        missing.remove("user_id")  # similar items: the user only adds personal context
    if missing:
        hint = "; user_id may be left out only with an item_id (similar items)" if "user_id" in missing else ""
        raise InvalidEvent("missing_field", ", ".join(missing) + hint)


def _id_list(values: list[Any], name: str) -> list[str]:
    """Each value as canonical_id; an error names the first bad value's position."""
    try:
        return [canonical_id(value, name) for value in values]
    except InvalidEvent:
        for n, value in enumerate(values):
            canonical_id(value, f"{name}[{n}]")  # raises, naming the position
        raise


def parse_candidates(value: Any, settings: Settings) -> tuple[str, ...]:
    """A re-ranking's `candidates`: 1 to RTREC_MAX_CANDIDATES item ids; duplicates dropped, first one kept."""
    limit = settings.max_candidates
    if type(value) is not list:
        raise InvalidEvent("wrong_type", f"candidates must be a list of 1 to {limit} item ids (strings or integers)")
    if not value:
        raise InvalidEvent("bad_value", f"candidates must not be empty; send 1 to {limit} item ids")
    if len(value) > limit:
        raise InvalidEvent(
            "too_many_candidates",
            f"{len(value)} candidates, more than the limit of {limit} (RTREC_MAX_CANDIDATES); send at most {limit}",
        )
    return tuple(dict.fromkeys(_id_list(value, "candidates")))


def parse_filter(value: Any, settings: Settings) -> ItemFilter:
    """A request's `filter`: an object of up to three lists (FILTER_KEYS), each of at most
    RTREC_MAX_FILTER_VALUES values: categories (strings, stripped, 1-64 characters) or item ids."""
    allowed = ", ".join(FILTER_KEYS)
    if type(value) is not dict:
        raise InvalidEvent("wrong_type", f"filter must be an object with the keys {allowed} (each a list)")
    unknown = [key for key in value if key not in FILTER_KEYS]
    if unknown:
        shown = ", ".join(repr(key[:40]) for key in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise InvalidEvent("unknown_field", f"filter has unknown key(s) {shown}; allowed: {allowed}")
    limit = settings.max_filter_values
    lists: dict[str, frozenset[str]] = {}
    for key, values in value.items():
        if values is None:
            continue
        what = "item ids (strings or integers)" if key == "exclude_items" else "category names (strings)"
        if type(values) is not list:
            raise InvalidEvent("wrong_type", f"filter.{key} must be a list of at most {limit} {what}")
        if len(values) > limit:
            raise InvalidEvent(
                "bad_value",
                f"filter.{key} has {len(values)} values, more than the limit of {limit} (RTREC_MAX_FILTER_VALUES)",
            )
        if key == "exclude_items":
            lists[key] = frozenset(_id_list(values, "filter.exclude_items"))
        else:
            lists[key] = frozenset(_category(c, key, n) for n, c in enumerate(values))
    return ItemFilter(**lists) if lists else NO_FILTER


def _category(value: Any, key: str, n: int) -> str:
    if type(value) is not str:
        raise InvalidEvent("wrong_type", f"filter.{key}[{n}] must be a string (a category name)")
    name = encodable(value.strip(), f"filter.{key}[{n}]")
    if not 1 <= len(name) <= MAX_CATEGORY_CHARS:
        raise InvalidEvent(
            "bad_value",
            f"filter.{key}[{n}] must be 1 to {MAX_CATEGORY_CHARS} characters (without surrounding spaces), "
            f"not {len(name)}",
        )
    return name


def check_reply_topic(topic: Any, settings: Settings) -> None:
    """A reply topic must be a legal Kafka name, the default response topic or prefixed, and never internal.

    Raises InvalidEvent("bad_reply_topic", ...); the request's ids stay readable with best_effort_ids.
    """
    default, prefix = settings.topic_responses, settings.reply_topic_prefix
    allowed = f"use {default!r} or a name starting with {prefix!r}" if prefix else "use a topic that is not internal"
    if not isinstance(topic, str):
        raise InvalidEvent("bad_reply_topic", f"reply_topic must be a string (a Kafka topic name); {allowed}")
    if not is_legal_topic_name(topic):
        raise InvalidEvent(
            "bad_reply_topic", f"reply_topic must be 1-249 characters of [A-Za-z0-9._-], not '.' or '..'; {allowed}"
        )
    # checked even when the prefix matches: an operator's prefix must not open rtrec's or Kafka's own topics
    if topic in internal_topics(settings) or topic.startswith("__"):
        raise InvalidEvent("bad_reply_topic", f"reply_topic {topic!r} is an internal topic; {allowed}")
    if topic != default and not (topic.startswith(prefix) and len(topic) > len(prefix)):
        raise InvalidEvent(
            "bad_reply_topic",
            f"reply_topic {topic!r} is not allowed; use {default!r} or {prefix!r} followed by at least one character",
        )


def best_effort_ids(raw: bytes, settings: Settings | None = None) -> tuple[str, str]:
    """request_id/user_id from an invalid request, so its error response can still be correlated.

    Reads at most max_request_bytes(settings) (MAX_REQUEST_BYTES, the default limits' size, without settings).
    """
    limit = MAX_REQUEST_BYTES if settings is None else max_request_bytes(settings)
    try:
        data = json.loads(raw[:limit])
    except (ValueError, TypeError, RecursionError):
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    ids = []
    for name in ("request_id", "user_id"):
        value = data.get(name)
        usable = isinstance(value, (str, int)) and not isinstance(value, bool)
        ids.append(str(value)[:64] if usable else "")
    return ids[0], ids[1]
