"""Online quality: join each served response with the same user's later events.

A response counts as served for its model version; it counts as a hit when
one of its items is browsed, clicked or bought by that user within
`RTREC_QUALITY_WINDOW_S` after it was generated (at most one hit per
response). The ops worker reads the responses and the events topics in its
own group (`rtrec-quality`), keeps the latest answered response per user in
memory, and adds the counts to one Redis hash (`rt:quality`), which
`rtrec quality`, the metrics and the trainer's rollback check read.
Fallback (trending) and error responses are not counted. Records it cannot
read (null, not JSON, not a JSON object) are skipped and counted in
``rtrec_records_skipped_total{worker="quality"}``: the state worker
dead-letters bad events, and responses are rtrec's own.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import ConsumerRecord

from rtrec.stream.settings import Settings
from rtrec.workers.metrics import ONLINE_HITS, ONLINE_SERVED, RECORDS_SKIPPED

TRACKED_USERS = 200_000


@dataclass
class Served:
    version: str
    items: frozenset[str]
    at_ms: int
    hit: bool = False


class QualityJoin:
    """Response/event join with bounded memory (oldest users are forgotten first)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.window_ms = int(settings.quality_window_s * 1000)
        self.latest: OrderedDict[str, Served] = OrderedDict()

    def handle(self, records: Iterable[ConsumerRecord]) -> dict[str, int]:
        """Counts to add to Redis: '<version>|served' and '<version>|hits'."""
        counts: dict[str, int] = {}
        for rec in records:
            msg = readable(rec.value)
            if msg is None:
                continue
            if rec.topic == self.settings.topic_events:
                self._event(msg, counts)
            else:
                self._response(msg, counts)
        return counts

    def _response(self, msg: dict[str, Any], counts: dict[str, int]) -> None:
        items, at_ms = msg.get("items"), msg.get("generated_at")
        if msg.get("error") or msg.get("fallback") or not items or not isinstance(items, list):
            return
        if isinstance(at_ms, bool) or not isinstance(at_ms, int):
            at_ms = int(time.time() * 1000)
        version, user = str(msg.get("model_version")), str(msg.get("user_id"))
        item_ids = frozenset(str(it.get("item_id")) for it in items if isinstance(it, dict))
        self.latest[user] = Served(version, item_ids, at_ms)
        self.latest.move_to_end(user)
        if len(self.latest) > TRACKED_USERS:
            self.latest.popitem(last=False)
        counts[f"{version}|served"] = counts.get(f"{version}|served", 0) + 1
        ONLINE_SERVED.labels(model_version=version).inc()

    def _event(self, msg: dict[str, Any], counts: dict[str, int]) -> None:
        served = self.latest.get(str(msg.get("user_id")))
        if served is None or served.hit:
            return
        ts = msg.get("ts")
        if not isinstance(ts, int) or not served.at_ms <= ts <= served.at_ms + self.window_ms:
            return
        if str(msg.get("item_id")) in served.items:
            served.hit = True
            counts[f"{served.version}|hits"] = counts.get(f"{served.version}|hits", 0) + 1
            ONLINE_HITS.labels(model_version=served.version).inc()


def readable(raw: bytes | None) -> dict[str, Any] | None:
    """The record as a JSON object, or None (counted by why) when it is not one."""
    if raw is None:
        reason = "null_value"
    else:
        try:
            msg = orjson.loads(raw)  # every event and response passes here: orjson, several times json's speed
        except (ValueError, TypeError, RecursionError):  # orjson.JSONDecodeError is a ValueError
            reason = "not_json"
        else:
            if isinstance(msg, dict):
                return msg
            reason = "not_an_object"
    RECORDS_SKIPPED.labels(worker="quality", reason=reason).inc()
    return None


def hit_rates(raw: Mapping[Any, Any]) -> dict[str, dict[str, float]]:
    """{'version': {'served': n, 'hits': h, 'hit_rate': h/n}} from the Redis hash (read with decoded responses)."""
    out: dict[str, dict[str, float]] = {}
    for field, value in raw.items():
        version, _, kind = field.rpartition("|")
        out.setdefault(version, {"served": 0, "hits": 0})[kind] = int(value)
    for row in out.values():
        row["hit_rate"] = row["hits"] / row["served"] if row["served"] else 0.0
    return out
