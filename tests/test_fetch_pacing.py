"""Adaptive fetch waits (workers/fetch_pacing.py) on a real consumer against the embedded broker."""

from __future__ import annotations

import asyncio
import uuid

from rtrec.stream.topics import ensure_topics
from rtrec.workers.runtime import ConsumerRuntime


def test_the_fetch_wait_grows_while_polls_are_empty_and_drops_back_at_the_first_record(settings):
    from aiokafka import AIOKafkaProducer

    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(update={"topic_events": f"pace-{tag}", "idle_fetch_wait_ms": 40})
    ensure_topics(s, [s.topic_events])

    async def go() -> tuple[list[int], list[int], int, list[bytes]]:
        runtime = ConsumerRuntime(s, [s.topic_events], f"pace-{tag}", 100, 5, worker="state")
        runtime.pacer.quiet_s = 0  # idle at once (a worker waits QUIET_S without records first)
        await runtime.start()
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap)
        await producer.start()
        try:
            idle_waits, fetcher_waits = [], []
            for _ in range(5):  # an empty topic: every poll comes back empty
                assert await runtime.poll() == {}
                idle_waits.append(runtime.pacer.wait_ms)
                fetcher_waits.append(runtime.consumer._fetcher._fetch_max_wait_ms)
            await producer.send_and_wait(s.topic_events, b"after a quiet spell", key=b"k")
            got: list[bytes] = []
            for _ in range(200):  # until the record arrives (bounded: 200 polls of at most 40 ms)
                got += [r.value for recs in (await runtime.poll()).values() for r in recs]
                if got:
                    break
            return idle_waits, fetcher_waits, runtime.pacer.wait_ms, got
        finally:
            await producer.stop()
            await runtime.stop()

    idle_waits, fetcher_waits, after_record, got = asyncio.run(go())
    assert idle_waits == [10, 20, 40, 40, 40]  # doubled from the batch wait, capped at RTREC_IDLE_FETCH_WAIT_MS
    assert fetcher_waits == idle_waits  # the consumer's next fetch request carries it (aiokafka's fetcher)
    assert got == [b"after a quiet spell"]
    assert after_record == 5  # records flow again: back to the batch wait


def test_the_fetch_wait_stays_short_while_records_arrived_within_the_quiet_time():
    from types import SimpleNamespace

    from rtrec.workers.fetch_pacing import FetchPacer

    fetcher = SimpleNamespace(_fetch_max_wait_ms=5)  # the pacing rule alone (the test above: a real consumer)
    pacer = FetchPacer(SimpleNamespace(_fetcher=fetcher), busy_ms=5, idle_ms=100, quiet_s=3600)  # type: ignore[arg-type]
    assert [pacer.after_poll(False) for _ in range(5)] == [5] * 5  # gaps in traffic: no slowdown
    pacer.quiet_s = 0
    assert [pacer.after_poll(False) for _ in range(6)] == [10, 20, 40, 80, 100, 100]
    assert fetcher._fetch_max_wait_ms == 100
    assert pacer.after_poll(True) == 5
    assert fetcher._fetch_max_wait_ms == 5
