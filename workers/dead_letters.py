"""The dead-letter topic: bad input is kept, explained and counted, never fatal.

Each dead letter carries the *original bytes* as its value (and the original
key), and the context in headers, as Kafka Connect's DLQ does:
``rtrec.reason``, ``rtrec.detail``, ``rtrec.source.topic``,
``rtrec.source.partition``, ``rtrec.source.offset``.
Counts live in Redis (``rt:dlq`` hash by reason) behind a per-source-offset
marker, so a redelivered bad message is not counted twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, ConsumerRecord

from stream.connections import is_cluster
from stream.settings import Settings
from workers.metrics import DEAD_LETTERS

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

    def __init__(self, settings: Settings, producer: AIOKafkaProducer, redis_client, prefix: str = "rt") -> None:
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
        futures = []
        for dl in letters:
            rec = dl.record
            headers = [
                ("rtrec.reason", dl.reason.encode()),
                ("rtrec.detail", dl.detail[:500].encode()),
                ("rtrec.source.topic", rec.topic.encode()),
                ("rtrec.source.partition", str(rec.partition).encode()),
                ("rtrec.source.offset", str(rec.offset).encode()),
            ]
            futures.append(
                await self.producer.send(
                    self.settings.topic_dead_letters,
                    value=rec.value if rec.value is not None else b"",
                    key=rec.key,
                    headers=headers,
                )
            )
        for fut in futures:
            await fut
        for dl in letters:
            DEAD_LETTERS.labels(reason=dl.reason).inc()
        counts = f"{self.prefix}:dlq"
        calls = []
        for dl in letters:
            rec = dl.record
            # "{rt:dlq}" hashes like "rt:dlq": marker and counts share a Cluster slot, as a script needs
            marker = f"{{{counts}}}:seen:{rec.topic}:{rec.partition}:{rec.offset}"
            calls.append(([marker, counts], [dl.reason, self.settings.dedupe_ttl_s]))
        if is_cluster(self.redis):  # cluster clients refuse scripts in pipelines
            await asyncio.gather(*(self._count_once(keys=k, args=a) for k, a in calls))
        else:
            pipe = self.redis.pipeline(transaction=False)
            for k, a in calls:
                await self._count_once(keys=k, args=a, client=pipe)
            await pipe.execute()
        self.published += len(letters)


def dlq_counts(redis_client, prefix: str = "rt") -> dict[str, int]:
    """Dead letters counted so far, by reason (sync client)."""
    return {k: int(v) for k, v in redis_client.hgetall(f"{prefix}:dlq").items()}
