"""Adaptive fetch waits: short while records flow, longer after empty polls.

The embedded broker (Tansu) never wakes a long-poll when data arrives: an
empty fetch is held for its full ``fetch_max_wait_ms`` and then answered
empty. A worker polling with the short wait that keeps a busy stream fast
(5 ms) therefore sends ~200 fetches a second per consumer while idle, and
the broker and worker burn CPU the serving path needs. Here each empty poll
doubles the wait, up to ``RTREC_IDLE_FETCH_WAIT_MS``; the first poll that
returns records drops it back to the batch wait. The first record after a
quiet spell waits at most the idle cap; under load the wait stays short.

aiokafka reads the fetch wait from its fetcher for every fetch request it
builds, so changing it takes effect from the next request; there is no
public setter (``fetch_max_wait_ms`` is a constructor argument only).
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer


class FetchPacer:
    """Holds the current fetch wait of one consumer; `after_poll` moves it."""

    def __init__(self, consumer: AIOKafkaConsumer, busy_ms: int, idle_ms: int) -> None:
        self.consumer = consumer
        self.busy_ms = max(1, busy_ms)
        self.idle_ms = max(self.busy_ms, idle_ms)
        self.wait_ms = self.busy_ms
        self._apply()

    def after_poll(self, got_records: bool) -> int:
        """The wait for the next poll: the batch wait after records, doubled (to the idle cap) after none."""
        wait = self.busy_ms if got_records else min(self.idle_ms, self.wait_ms * 2)
        if wait != self.wait_ms:
            self.wait_ms = wait
            self._apply()
        return self.wait_ms

    def _apply(self) -> None:
        fetcher = getattr(self.consumer, "_fetcher", None)  # created by start(); absent before it
        if fetcher is not None:
            fetcher._fetch_max_wait_ms = self.wait_ms
