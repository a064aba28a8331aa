"""Replaying event files onto the events topic, at full speed, a fixed rate, or sped-up event time."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rtrec.stream.eventfile import read_events
from rtrec.stream.events import InvalidEvent
from rtrec.stream.producer import EventProducer


@dataclass
class ReplayReport:
    sent: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    bad_lines: list[int] = field(default_factory=list)  # the first few rejected lines (or event numbers)
    interrupted: bool = False  # Ctrl-C: what was sent so far went out

    def reject(self, reason: str, line: int | None = None) -> None:
        self.rejected += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if line is not None and len(self.bad_lines) < MAX_BAD_LINES:
            self.bad_lines.append(line)

    def summary(self) -> str:
        """'sent N, rejected M' and, when M > 0, why and where."""
        text = f"sent {self.sent}, rejected {self.rejected}"
        if self.rejected:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.reasons.items()))
            more = ", ..." if self.rejected > len(self.bad_lines) else ""
            text += f" ({reasons}; lines {', '.join(map(str, self.bad_lines))}{more})"
        return text

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


MAX_BAD_LINES = 5


def derived_event_id(event: dict[str, Any]) -> str:
    """A stable id for files without event_id: an event of a file replayed again is a duplicate while it is
    among its user's last RTREC_DEDUPE_WINDOW events (stream/state_store.py)."""
    key = f"{event.get('user_id')}|{event.get('item_id')}|{event.get('type')}|{event.get('ts')}"
    return "f" + hashlib.blake2b(key.encode(), digest_size=10).hexdigest()


class Pacer:
    """Sleeps so that events go out at `rate`/s, or at event-time gaps divided by `speedup`."""

    def __init__(self, rate: float = 0.0, speedup: float = 0.0) -> None:
        self.rate = rate
        self.speedup = speedup
        self.start = time.monotonic()
        self.first_ts: int | None = None
        self.n = 0

    def wait(self, ts: int | None) -> None:
        due = None
        if self.speedup and isinstance(ts, int):
            if self.first_ts is None:
                self.first_ts = ts
            due = self.start + (ts - self.first_ts) / 1000 / self.speedup
        if self.rate:
            by_rate = self.start + self.n / self.rate
            due = by_rate if due is None else max(due, by_rate)
        self.n += 1
        if due is not None:
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def replay_events(
    producer: EventProducer,
    events: Iterable[dict[str, Any]] | Iterable[tuple[int, dict[str, Any]]],
    rate: float = 0.0,
    speedup: float = 0.0,
    total: int | None = None,
    ts_shift_ms: int = 0,
    progress: bool = True,
    numbered: bool = False,
    report: ReplayReport | None = None,
) -> ReplayReport:
    """Validate and send each event; invalid ones are counted by reason, never sent, never fatal.

    With `numbered`, `events` are (line number, event) pairs and rejects remember their lines
    (else their position). Ctrl-C stops sending: what was sent is flushed and the report says so.
    """
    report = report or ReplayReport()
    pacer = Pacer(rate, speedup)
    started = time.monotonic()
    try:
        for n, item in enumerate(tqdm(events, total=total, unit="ev", disable=not progress, desc="replay"), 1):
            line, raw = item if numbered else (n, item)
            if not isinstance(raw, dict):
                report.reject("not_an_object", line)
                continue
            event = dict(raw)
            event.setdefault("event_id", derived_event_id(event))
            if ts_shift_ms and isinstance(event.get("ts"), int):
                event["ts"] += ts_shift_ms
            pacer.wait(event.get("ts"))
            try:
                producer.send(event)
                report.sent += 1
            except InvalidEvent as exc:
                report.reject(exc.reason, line)
    except KeyboardInterrupt:
        report.interrupted = True
    producer.flush()
    report.seconds = time.monotonic() - started
    return report


def replay_file(producer: EventProducer, path: str | Path, **kwargs: Any) -> ReplayReport:
    return replay_events(producer, read_events(path), **kwargs)
