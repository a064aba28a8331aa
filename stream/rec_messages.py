"""Recommendation requests and responses as they travel on Kafka (JSON)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from rtrec.stream.events import InvalidEvent, canonical_id, decode_json
from rtrec.stream.settings import Settings
from rtrec.stream.topics import internal_topics, is_legal_topic_name

MAX_REQUEST_BYTES = 4096


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
        d: dict[str, Any] = {
            "request_id": self.request_id,
            "user_id": self.user_id,
            "k": self.k,
            "exclude_seen": self.exclude_seen,
        }
        if self.reply_topic:
            d["reply_topic"] = self.reply_topic
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

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "request_id": self.request_id,
            "user_id": self.user_id,
            "items": [{"item_id": it.item_id, "score": round(it.score, 6), "reason": it.reason} for it in self.items],
            "model_version": self.model_version,
            "generated_at": self.generated_at,
            "latency_ms": round(self.latency_ms, 3),
            "fallback": self.fallback,
        }
        if self.error is not None:
            d["error"] = self.error
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
    """Validate a request payload; raises InvalidEvent (same reasons as events)."""
    data = decode_json(raw, MAX_REQUEST_BYTES)
    if not isinstance(data, dict):
        raise InvalidEvent("not_an_object", "a request must be a JSON object")
    missing = [name for name in ("request_id", "user_id") if data.get(name) is None]
    if missing:
        raise InvalidEvent("missing_field", ", ".join(missing))
    k = data.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int):
        raise InvalidEvent("wrong_type", "k must be an integer")
    if not 1 <= k <= settings.max_k:
        raise InvalidEvent("bad_value", f"k must be between 1 and {settings.max_k}")
    exclude_seen = data.get("exclude_seen", True)
    if not isinstance(exclude_seen, bool):
        raise InvalidEvent("wrong_type", "exclude_seen must be a boolean")
    reply_topic = data.get("reply_topic")
    if reply_topic is not None:
        check_reply_topic(reply_topic, settings)
    return RecRequest(
        request_id=canonical_id(data["request_id"], "request_id"),
        user_id=canonical_id(data["user_id"], "user_id"),
        k=k,
        exclude_seen=exclude_seen,
        reply_topic=reply_topic,
    )


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


def best_effort_ids(raw: bytes) -> tuple[str, str]:
    """request_id/user_id from an invalid request, so its error response can still be correlated."""
    try:
        data = json.loads(raw[:MAX_REQUEST_BYTES])
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
