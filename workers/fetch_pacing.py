"""Adaptive fetch waits: short while records flow, longer once a worker has been quiet a while.

The embedded broker (Tansu) never wakes a long-poll when data arrives: an
empty fetch is held for its full ``fetch_max_wait_ms`` and then answered
empty. A worker polling with the short wait that keeps a busy stream fast
(5 ms) therefore sends ~200 fetches a second per consumer while idle, and
the broker and the workers burn CPU the serving path needs. Here, once no
record has arrived for ``QUIET_S``, each empty poll doubles the wait up to
``RTREC_IDLE_FETCH_WAIT_MS``; the first poll that returns records drops it
back to the batch wait. Traffic with gaps shorter than ``QUIET_S`` keeps the
short wait; the first record after a longer quiet spell waits at most the
idle cap. Apache Kafka answers a waiting fetch as soon as data arrives, so
there a long idle wait costs no latency (the default, 500 ms); `rtrec up`
sets a shorter one for the embedded broker (``EMBEDDED_IDLE_FETCH_WAIT_MS``
in workers/stack.py).

aiokafka reads the fetch wait from its fetcher for every fetch request it
builds, so changing it takes effect from the next request; there is no
public setter (``fetch_max_wait_ms`` is a constructor argument only).
"""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer

QUIET_S = 1.0  # no record for this long: the worker is idle, its fetch waits may grow


class FetchPacer:
    """Holds the current fetch wait of one consumer; `after_poll` moves it."""

    def __init__(self, consumer: AIOKafkaConsumer, busy_ms: int, idle_ms: int, quiet_s: float = QUIET_S) -> None:
        self.consumer = consumer
        self.busy_ms = max(1, busy_ms)
        self.idle_ms = max(self.busy_ms, idle_ms)
        self.quiet_s = quiet_s
        self.wait_ms = self.busy_ms
        self._last_records = time.monotonic()

    def after_poll(self, got_records: bool) -> int:
        """The wait for the next poll: the batch wait while records flow (or arrived within `quiet_s`),
        then doubled after each empty poll, up to the idle cap."""
        now = time.monotonic()
        if got_records:
            self._last_records = now
        quiet = not got_records and now - self._last_records >= self.quiet_s
        wait = min(self.idle_ms, self.wait_ms * 2) if quiet else self.busy_ms
        if wait != self.wait_ms:
            self.wait_ms = wait
            self._apply()
        return self.wait_ms

    def _apply(self) -> None:
        fetcher = getattr(self.consumer, "_fetcher", None)  # created by start(); absent before it
        if fetcher is not None:
            fetcher._fetch_max_wait_ms = self.wait_ms
