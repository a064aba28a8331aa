"""Online quality: join each served response with the same user's later events.

A response counts as served for its model version; it counts as a hit when
one of its items is browsed, clicked or bought by that user within
`RTREC_QUALITY_WINDOW_S` after it was generated (at most one hit per
response). The ops worker reads the responses and the events topics in its
own group (`rtrec-quality`), keeps the latest answered response per user in
memory, and adds the counts to one Redis hash (`rt:quality`), which
`rtrec quality`, the metrics and the trainer's rollback check read.
Fallback (trending) and error responses are not counted. With an A/B split
(workers/ab_split.py) each response also counts for its arm, as
'<version>|<arm>|served' and '<version>|<arm>|hits' in the same hash:
`hit_rates` keeps reading the per-version fields, `arm_hit_rates` the per-arm
ones (with a 95 % Wilson interval), and `arm_winner` says which arm wins. Records it cannot
read (null, not JSON, not a JSON object) are skipped and counted in
``rtrec_records_skipped_total{worker="quality"}``: the state worker
dead-letters bad events, and responses are rtrec's own.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import ConsumerRecord

from rtrec.stream.settings import Settings
from rtrec.workers.ab_split import ARMS, CANDIDATE, CONTROL
from rtrec.workers.metrics import ONLINE_HITS, ONLINE_SERVED, RECORDS_SKIPPED

TRACKED_USERS = 200_000


@dataclass
class Served:
    version: str
    items: frozenset[str]
    at_ms: int
    hit: bool = False
    arm: str | None = None  # the A/B arm that served it (None: a response without one)


class QualityJoin:
    """Response/event join with bounded memory (oldest users are forgotten first)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.window_ms = int(settings.quality_window_s * 1000)
        self.latest: OrderedDict[str, Served] = OrderedDict()

    def handle(self, records: Iterable[ConsumerRecord]) -> dict[str, int]:
        """Counts to add to Redis: '<version>|served' and '<version>|hits', and per arm
        '<version>|<arm>|served' and '<version>|<arm>|hits'."""
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
        arm = msg.get("arm") if msg.get("arm") in ARMS else None
        self.latest[user] = Served(version, item_ids, at_ms, arm=arm)
        self.latest.move_to_end(user)
        if len(self.latest) > TRACKED_USERS:
            self.latest.popitem(last=False)
        _add(counts, f"{version}|served")
        if arm is not None:
            _add(counts, f"{version}|{arm}|served")
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
            _add(counts, f"{served.version}|hits")
            if served.arm is not None:
                _add(counts, f"{served.version}|{served.arm}|hits")
            ONLINE_HITS.labels(model_version=served.version).inc()


def _add(counts: dict[str, int], field: str) -> None:
    counts[field] = counts.get(field, 0) + 1


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
        if _arm_field(field) is None:
            version, _, kind = field.rpartition("|")
            out.setdefault(version, {"served": 0, "hits": 0})[kind] = int(value)
    for row in out.values():
        row["hit_rate"] = row["hits"] / row["served"] if row["served"] else 0.0
    return out


def _arm_field(field: str) -> tuple[str, str, str] | None:
    """('version', 'arm', 'served'|'hits') of a per-arm field, None for a per-version one."""
    parts = field.rsplit("|", 2)
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and parts[1] in ARMS else None


def wilson(hits: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a hit rate (95 % by default): sound for small n and rates near 0 or 1."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def arm_hit_rates(raw: Mapping[Any, Any]) -> dict[tuple[str, str], dict[str, float]]:
    """{('control'|'candidate', 'version'): {'served', 'hits', 'hit_rate', 'low', 'high'}} from the Redis hash;
    low-high is the hit rate's 95 % Wilson interval."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for field, value in raw.items():
        parsed = _arm_field(field)
        if parsed is not None:
            version, arm, kind = parsed
            out.setdefault((arm, version), {"served": 0, "hits": 0})[kind] = int(value)
    for row in out.values():
        row["hit_rate"] = row["hits"] / row["served"] if row["served"] else 0.0
        row["low"], row["high"] = wilson(row["hits"], row["served"])
    return dict(sorted(out.items()))


def arm_rows(
    rates: Mapping[tuple[str, str], Mapping[str, float]], control: str | None = None, candidate: str | None = None
) -> dict[str, tuple[str, Mapping[str, float]]]:
    """The row each arm is judged by: the named version's (CURRENT, RTREC_AB_CANDIDATE) when it has one,
    else the arm's most-served version (control's changes whenever CURRENT is hot-swapped)."""
    named = {CONTROL: control, CANDIDATE: candidate}
    out: dict[str, tuple[str, Mapping[str, float]]] = {}
    for (arm, version), row in rates.items():
        if (
            arm not in out
            or version == named[arm]
            or (out[arm][0] != named[arm] and row["served"] > out[arm][1]["served"])
        ):
            out[arm] = (version, row)
    return out


def arm_winner(
    rates: Mapping[tuple[str, str], Mapping[str, float]], control: str | None = None, candidate: str | None = None
) -> tuple[str, str] | None:
    """(arm, version) of the winner when the two arms' 95 % intervals separate, else None (no split, too close)."""
    rows = arm_rows(rates, control, candidate)
    if CONTROL not in rows or CANDIDATE not in rows:
        return None
    (control_version, control_row), (candidate_version, candidate_row) = rows[CONTROL], rows[CANDIDATE]
    if candidate_row["low"] > control_row["high"]:
        return CANDIDATE, candidate_version
    if control_row["low"] > candidate_row["high"]:
        return CONTROL, control_version
    return None
