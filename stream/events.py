"""The event schema and its validation.

Validation is hand-written rather than pydantic because it runs on every
consumed message of the hot path; each failure names a short, stable reason
that the dead-letter topic and the counters carry.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rtrec.stream.settings import EVENT_TYPES, Settings

_fast_loads: Callable[[bytes], Any] | None
try:  # parses an event several times faster than json; the state worker parses every consumed event
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - depends on the environment
    _fast_loads = None

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
"""Ids become parts of Redis keys: a closed alphabet keeps one user's keys apart from another's."""
_id_ok = ID_PATTERN.fullmatch
_EVENT_TYPES = frozenset(EVENT_TYPES)
FAST_MAX_DEPTH = 100  # deeper values take json's path, which fails past Python's recursion limit (orjson does not)
_BIG = 2.0**63  # orjson reads an integer beyond 64 bits as a float (json: an int), so any float this large is
# checked by json's path

REQUIRED = ("event_id", "user_id", "item_id", "type", "ts")
OPTIONAL = ("session_id", "price", "quantity", "context")


class InvalidEvent(ValueError):
    """A payload that is not a valid event; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Event:
    """One user interaction: who did what to which item, when (event time, ms)."""

    event_id: str
    user_id: str
    item_id: str
    type: str
    ts: int
    session_id: str | None = None
    price: float | None = None
    quantity: int | None = None
    context: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """The wire form, without absent optional fields."""
        d: dict[str, Any] = {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "type": self.type,
            "ts": self.ts,
        }
        for name in OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


def canonical_id(value: Any, name: str) -> str:
    """Ids are strings; integers are accepted and written in decimal (MovieLens-style ids)."""
    if type(value) is str and _id_ok(value):  # the common case, in one test
        return value
    if isinstance(value, bool):
        raise InvalidEvent("wrong_type", f"{name} must be a string or integer")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidEvent("wrong_type", f"{name} must be a string or integer")
    if not ID_PATTERN.fullmatch(value):
        raise InvalidEvent("bad_id", f"{name} must match {ID_PATTERN.pattern}")
    return value


def _check_ts(value: Any, settings: Settings, now_ms: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEvent("wrong_type", "ts must be an integer (ms since epoch)")
    if value < settings.min_event_ts_ms:
        raise InvalidEvent("ts_out_of_range", f"ts {value} is before {settings.min_event_ts_ms}")
    if value > now_ms + settings.max_future_skew_ms:
        raise InvalidEvent("ts_in_future", f"ts {value} is more than the allowed skew ahead")
    return value


def encodable(value: str, name: str) -> str:
    """`value`, if it can be written as UTF-8 (JSON lets a lone surrogate through as an escape; Redis
    and Kafka cannot store it) — else InvalidEvent, so the record is dead-lettered with its reason."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent("bad_value", f"{name} is not valid UTF-8 text (a lone surrogate)") from None
    return value


def checked_price(value: Any) -> float:
    """A price as sent in an event or a catalog upsert: a finite number >= 0 (never a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidEvent("wrong_type", "price must be a number")
    try:
        price = float(value)
    except OverflowError:
        raise InvalidEvent("bad_value", "price is out of range") from None
    if not math.isfinite(price) or price < 0:
        raise InvalidEvent("bad_value", "price must be finite and >= 0")
    return price


def _check_optional(data: dict[str, Any], settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    session_id = data.get("session_id")
    if session_id is not None:
        out["session_id"] = canonical_id(session_id, "session_id")
    price = data.get("price")
    if price is not None:
        out["price"] = checked_price(price)
    quantity = data.get("quantity")
    if quantity is not None:
        if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 1:
            raise InvalidEvent("wrong_type", "quantity must be a positive integer")
        out["quantity"] = quantity
    context = data.get("context")
    if context is not None:
        if not isinstance(context, dict):
            raise InvalidEvent("wrong_type", "context must be an object")
        if len(context) > settings.max_context_keys:
            raise InvalidEvent("bad_value", f"context has more than {settings.max_context_keys} keys")
        out["context"] = context
    return out


def event_from_dict(data: Any, settings: Settings, now_ms: int | None = None) -> Event:
    """Validate a decoded JSON value and build an Event, or raise InvalidEvent."""
    if not isinstance(data, dict):
        raise InvalidEvent("not_an_object", "an event must be a JSON object")
    get = data.get
    event_id, user_id, item_id, etype, ts = get("event_id"), get("user_id"), get("item_id"), get("type"), get("ts")
    if event_id is None or user_id is None or item_id is None or etype is None or ts is None:
        missing = [name for name in REQUIRED if name not in data or data[name] is None]
        raise InvalidEvent("missing_field", ", ".join(missing))
    if not isinstance(etype, str):
        raise InvalidEvent("wrong_type", "type must be a string")
    if etype not in _EVENT_TYPES:
        raise InvalidEvent("unknown_type", f"{etype[:40]!r} is not one of {', '.join(EVENT_TYPES)}")
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    event_id = canonical_id(event_id, "event_id")
    user_id = canonical_id(user_id, "user_id")
    item_id = canonical_id(item_id, "item_id")
    ts = _check_ts(ts, settings, now_ms)
    if len(data) == len(REQUIRED):  # no optional field: the usual event
        return Event(event_id, user_id, item_id, etype, ts)
    return Event(event_id, user_id, item_id, etype, ts, **_check_optional(data, settings))


def _reject_constant(name: str) -> None:
    raise InvalidEvent("malformed_json", f"{name} is not valid JSON")


def _as_json_reads(value: Any, depth: int = 0) -> bool:
    """Whether orjson's reading of a payload is surely json's: no float that may have been an integer
    beyond 64 bits, nesting well within json's recursion limit. Checked on the result, which costs less
    than scanning the bytes; a payload that fails the check is read again by json."""
    kind = type(value)
    if kind is float:
        return bool(-_BIG < value < _BIG)
    if kind is dict:
        items = value.values()
    elif kind is list:
        items = value
    else:
        return True
    if depth >= FAST_MAX_DEPTH:
        return False
    for item in items:
        if type(item) is not str and type(item) is not int and not _as_json_reads(item, depth + 1):
            return False
    return True


def decode_json(raw: bytes, max_bytes: int) -> Any:
    """Parse a payload with a size limit; NaN/Infinity are rejected (not JSON)."""
    if raw is None:
        raise InvalidEvent("empty_payload", "message has no value")
    if len(raw) > max_bytes:
        raise InvalidEvent("oversized", f"{len(raw)} bytes > limit {max_bytes}")
    if _fast_loads is not None and type(raw) is bytes:
        try:
            value = _fast_loads(raw)  # strict JSON as below; what it refuses, json's path below explains
        except ValueError:
            pass
        else:
            if _as_json_reads(value):
                return value
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent("bad_encoding", f"not UTF-8 at byte {exc.start}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidEvent("malformed_json", "nesting too deep") from None
    except json.JSONDecodeError as exc:
        raise InvalidEvent("malformed_json", f"{exc.msg} at position {exc.pos}") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise InvalidEvent("malformed_json", str(exc)[:200]) from None


def parse_event(raw: bytes, settings: Settings, now_ms: int | None = None) -> Event:
    """Bytes from the wire -> Event, or InvalidEvent with the reason."""
    return event_from_dict(decode_json(raw, settings.max_event_bytes), settings, now_ms)
