"""The dead-letter topic: bad input is kept, explained and counted, never fatal.

Each dead letter carries the *original bytes* as its value (and the original
key), and the context in headers, as Kafka Connect's DLQ does:
``rtrec.reason``, ``rtrec.detail``, ``rtrec.source.topic``,
``rtrec.source.partition``, ``rtrec.source.offset``.
A dead letter always fits: when key + value exceed ``RTREC_DLQ_MAX_BYTES`` it
carries a prefix of each, with ``rtrec.truncated``, the original sizes
(``rtrec.original.value_bytes``/``key_bytes``) and the value's sha256
(``rtrec.original.sha256``). If the broker still refuses a letter for a reason
that waiting cannot cure, a letter of headers only is sent instead, and if even
that is refused it is logged and counted (``rtrec_dead_letters_failed_total``):
a dead letter is never retried forever. Transient broker faults propagate, so
the runtime retries the batch visibly.
Counts live in Redis (``rt:dlq`` hash by reason) behind a per-source-offset
marker, so a redelivered bad message is not counted twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError

from rtrec.stream.connections import is_cluster
from rtrec.stream.keys import PREFIX, dead_letter_counts, dead_letter_marker
from rtrec.stream.settings import Settings
from rtrec.workers.faults import is_transient
from rtrec.workers.metrics import DEAD_LETTERS, DEAD_LETTERS_FAILED

log = logging.getLogger(__name__)
Header = tuple[str, bytes]

COUNT_ONCE_LUA = r"""
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
  return 1
end
return 0
"""


@dataclass(frozen=True)
class DeadLetter:
    record: ConsumerRecord
    reason: str
    detail: str


class DeadLetters:
    """Publishes dead letters and keeps exactly-once counts by reason."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer, redis_client, prefix: str = PREFIX) -> None:
        self.settings = settings
        self.producer = producer
        self.redis = redis_client
        self.prefix = prefix
        self.published = 0
        self._count_once = redis_client.register_script(COUNT_ONCE_LUA)

    async def publish(self, letters: list[DeadLetter]) -> None:
        """Send every letter, wait for the broker's acks, then count them once."""
        if not letters:
            return
        sends = [self._send(dl) for dl in letters]
        await asyncio.gather(*sends)
        for dl in letters:
            DEAD_LETTERS.labels(reason=dl.reason).inc()
        counts = dead_letter_counts(self.prefix)
        calls = []
        for dl in letters:
            rec = dl.record
            marker = dead_letter_marker(counts, rec.topic, rec.partition, rec.offset)  # same slot as counts
            calls.append(([marker, counts], [dl.reason, self.settings.dedupe_ttl_s]))
        if is_cluster(self.redis):  # cluster clients refuse scripts in pipelines
            await asyncio.gather(*(self._count_once(keys=k, args=a) for k, a in calls))
        else:
            pipe = self.redis.pipeline(transaction=False)
            for k, a in calls:
                await self._count_once(keys=k, args=a, client=pipe)
            await pipe.execute()
        self.published += len(letters)

    async def _send(self, dl: DeadLetter) -> None:
        """One letter, acked; shrunk to its headers if the broker refuses it for good.

        Only the broker's refusals (KafkaError) are handled here; anything else is a bug in
        building the letter and reaches the runtime, which logs and counts it.
        """
        key, value, headers = fitted(dl, self.settings.dlq_max_bytes)
        try:
            await (await self.producer.send(self.settings.topic_dead_letters, value=value, key=key, headers=headers))
            return
        except KafkaError as exc:  # too large, refused, timed out: the broker's answer, not a bug
            if is_transient(exc):
                raise
            log.error(
                "dead letter of %s:%d@%d refused (%s: %s); sending its headers only",
                dl.record.topic,
                dl.record.partition,
                dl.record.offset,
                type(exc).__name__,
                exc,
            )
        try:
            await (
                await self.producer.send(
                    self.settings.topic_dead_letters,
                    value=b"",
                    key=None,
                    headers=headers + [("rtrec.value_dropped", b"1")],
                )
            )
        except KafkaError as exc:
            if is_transient(exc):
                raise
            DEAD_LETTERS_FAILED.inc()
            log.error(
                "dead letter of %s:%d@%d dropped: %s: %s (reason was %s)",
                dl.record.topic,
                dl.record.partition,
                dl.record.offset,
                type(exc).__name__,
                exc,
                dl.reason,
            )


def fitted(dl: DeadLetter, max_bytes: int) -> tuple[bytes | None, bytes, list[Header]]:
    """Key, value and headers of a letter within `max_bytes` of key + value (prefixes when over)."""
    rec = dl.record
    value = rec.value if rec.value is not None else b""
    key = rec.key
    headers: list[Header] = [
        ("rtrec.reason", dl.reason.encode()),
        ("rtrec.detail", dl.detail[:500].encode("utf-8", "replace")),
        ("rtrec.source.topic", rec.topic.encode()),
        ("rtrec.source.partition", str(rec.partition).encode()),
        ("rtrec.source.offset", str(rec.offset).encode()),
    ]
    key_len = len(key) if key is not None else 0
    if key_len + len(value) <= max_bytes:
        return key, value, headers
    headers += [
        ("rtrec.truncated", b"1"),
        ("rtrec.original.value_bytes", str(len(value)).encode()),
        ("rtrec.original.key_bytes", str(key_len).encode()),
        ("rtrec.original.sha256", hashlib.sha256(value).hexdigest().encode()),
    ]
    if key is not None and key_len > max_bytes // 4:
        key = key[: max_bytes // 4]
    return key, value[: max_bytes - (len(key) if key is not None else 0)], headers


def dlq_counts(redis_client, prefix: str = PREFIX) -> dict[str, int]:
    """Dead letters counted so far, by reason (sync client)."""
    return {k: int(v) for k, v in redis_client.hgetall(dead_letter_counts(prefix)).items()}
