"""Drift watch: river's ADWIN on the share of events that hit the last window's most popular items.

When the items people interact with move away from (or towards) what was
popular in the window the model last trained on, that share shifts; ADWIN
detects the change in its mean and the trainer fine-tunes early, recording
this as the trigger.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from river.drift import ADWIN


class DriftWatch:
    """Feeds 1/0 (event on a head item or not) to ADWIN; `fired` stays set until `reset`."""

    def __init__(self, head_items: int = 50, delta: float = 0.002) -> None:
        self.head_items = head_items
        self.delta = delta
        self.head: frozenset[str] = frozenset()
        self.detector = ADWIN(delta=delta)
        self.fired = False
        self.before = self.after = 0.0
        self.seen = 0

    def update(self, item_id: str) -> bool:
        """One event; True when this event makes the detector fire."""
        if not self.head:
            return False  # nothing to compare with until the first window sets the head
        self.seen += 1
        mean_before = self.detector.estimation
        self.detector.update(1.0 if item_id in self.head else 0.0)
        if self.detector.drift_detected and not self.fired:
            self.fired = True
            self.before, self.after = mean_before, self.detector.estimation
            return True
        return False

    def describe(self) -> str:
        return (
            f"drift: ADWIN saw the share of events on the last window's top {self.head_items} items "
            f"move from {self.before:.2f} to {self.after:.2f}"
        )

    def reset(self, window: Iterable[dict[str, Any]]) -> None:
        """A new model trained on `window`: its popular items become the head; start a fresh detector."""
        counts = Counter(str(e["item_id"]) for e in window)
        self.head = frozenset(item for item, _ in counts.most_common(self.head_items))
        self.detector = ADWIN(delta=self.delta)
        self.fired = False
        self.seen = 0
