"""Recommendation requests and responses as they travel on Kafka (JSON)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from stream.events import InvalidEvent, canonical_id, decode_json
from stream.settings import Settings

TOPIC_PATTERN = re.compile(r"^[A-Za-z0-9._\-]{1,249}$")
MAX_REQUEST_BYTES = 4096


@dataclass(frozen=True, slots=True)
class RecRequest:
    """Ask for the top-k items of one user; the answer goes to reply_topic (or the default)."""

    request_id: str
    user_id: str
    k: int = 10
    exclude_seen: bool = True
    reply_topic: str | None = None

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
            "items": [
                {"item_id": it.item_id, "score": round(it.score, 6), "reason": it.reason}
                for it in self.items
            ],
            "model_version": self.model_version,
            "generated_at": self.generated_at,
            "latency_ms": round(self.latency_ms, 3),
            "fallback": self.fallback,
        }
        if self.error is not None:
            d["error"] = self.error
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


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
    if reply_topic is not None and (
        not isinstance(reply_topic, str) or not TOPIC_PATTERN.fullmatch(reply_topic)
    ):
        raise InvalidEvent("bad_value", "reply_topic must be a valid topic name")
    return RecRequest(
        request_id=canonical_id(data["request_id"], "request_id"),
        user_id=canonical_id(data["user_id"], "user_id"),
        k=k,
        exclude_seen=exclude_seen,
        reply_topic=reply_topic,
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
