"""Commits, and the guard against positions that point past a log that was reset.

A broker that comes back with an empty log (a memory-only broker restarted, a
log truncated by an unclean leader election) leaves a running consumer at its
old position: past the new log end. Kafka would answer OFFSET_OUT_OF_RANGE and
the consumer would reset, but only if it fetches before producers have refilled
the log past that position; otherwise the new records below it are silently
skipped. The guard:

* resets a partition to its earliest offset (handlers dedupe, so re-reading is
  safe) when the high watermark of its last fetch is below our position; no
  request is needed, and a restarted broker answers the first fetch that way;
* never commits an offset ahead of the consumer's position: a batch fetched from
  the old log, committed after the group re-joined and restarted from the new
  log's beginning, would otherwise point the group past records it never read.

Measured against a restarted embedded broker (15 runs, a producer running
through the restart): the restarted broker forgets members and offsets, the
consumer re-joins after ~2 s and starts at the beginning; fetches before that
see a high watermark below their position, which the guard counts. A check of
the broker's committed offsets before each commit was tried as well: it fired
only after the re-join had already reset, and doubled the commit time.
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from rtrec.workers.metrics import OFFSET_RESETS

log = logging.getLogger(__name__)


class OffsetGuard:
    """Commits offsets for one consumer and resets partitions whose log was reset under it."""

    def __init__(self, consumer: AIOKafkaConsumer, worker: str) -> None:
        self.consumer = consumer
        self.worker = worker

    def reset_beyond_log_end(self) -> None:
        """Reset every assigned partition whose position is past the high watermark of its last fetch."""
        for tp in self.consumer.assignment():
            state = self._state(tp)
            if state is None or not state.has_valid_position or state.highwater is None:
                continue
            if state.position > state.highwater:
                self._reset(tp, f"position {state.position} is past the log end {state.highwater}")

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit what this process still owns and has not been moved back from since it was read."""
        offsets = {tp: off for tp, off in offsets.items() if self._committable(tp, off)}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:  # rebalanced away or broker away: the owner re-reads, dedupe absorbs it
            log.warning("%s: commit failed (%s: %s); records will be redelivered", self.worker, type(exc).__name__, exc)

    def _committable(self, tp: TopicPartition, offset: int) -> bool:
        """Assigned, and not ahead of the position (a batch from before a reset or a re-join is not)."""
        if tp not in self.consumer.assignment():
            return False
        state = self._state(tp)
        if state is None or not state.has_valid_position:
            return False  # being reset right now: the next batch commits
        if offset > state.position:
            log.warning(
                "%s: %s: not committing %d, past the position %d (the log was reset since)",
                self.worker,
                tp,
                offset,
                state.position,
            )
            return False
        return True

    def _state(self, tp: TopicPartition):
        """aiokafka's fetch state of an assigned partition (position, high watermark), or None."""
        subscription = self.consumer._subscription.subscription
        if subscription is None or subscription.assignment is None:
            return None
        return subscription.assignment.state_value(tp)

    def _reset(self, tp: TopicPartition, why: str) -> None:
        log.warning("%s: %s: %s; the log was reset: reading it again from the start", self.worker, tp, why)
        self.consumer.seek_to_beginning(tp)
        OFFSET_RESETS.labels(worker=self.worker, topic=tp.topic).inc()
