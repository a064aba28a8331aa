"""Log epochs: a partition's log that restarts at offset 0 with other records gets a new epoch."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import redis

from rtrec.stream.log_positions import (
    AsyncLogEpochs,
    LogEpochs,
    LogIdentity,
    LogPosition,
    assign_positions,
    record_fingerprint,
)


@dataclass
class Rec:
    offset: int
    value: bytes
    topic: str = "events"
    partition: int = 0
    timestamp: int = 1_000
    key: bytes | None = b"u1"


def log(n: int, tag: str, start: int = 0) -> list[Rec]:
    return [Rec(start + i, f"{tag}{start + i}".encode()) for i in range(n)]


def test_the_first_batch_of_a_partition_sets_its_identity() -> None:
    positions, changes = assign_positions(log(3, "a"), {})
    assert changes == {"events:0": LogIdentity(0, 0, record_fingerprint(log(1, "a")[0]))}
    assert positions == [LogPosition("events:0", 0, n) for n in range(3)]


def test_the_same_log_read_again_keeps_its_epoch() -> None:
    _, changes = assign_positions(log(3, "a"), {})
    positions, again = assign_positions(log(5, "a"), changes)
    assert again == {} and positions == [LogPosition("events:0", 0, n) for n in range(5)]


def test_a_restarted_log_gets_the_next_epoch() -> None:
    _, changes = assign_positions(log(3, "a"), {})
    positions, bumped = assign_positions(log(2, "b"), changes)  # offset 0 holds another record now
    assert bumped["events:0"].epoch == 1
    assert positions == [LogPosition("events:0", 1, 0), LogPosition("events:0", 1, 1)]


def test_records_below_the_first_applied_one_carry_no_position() -> None:
    """Started mid-log (committed offsets from before), then reset to the beginning: those records were never
    applied from this log, so no watermark may call them duplicates."""
    _, changes = assign_positions(log(2, "a", start=100), {})
    positions, again = assign_positions(log(3, "a", start=98), changes)
    assert again == {} and positions == [None, None, LogPosition("events:0", 0, 100)]


def test_partitions_are_independent() -> None:
    records = [Rec(0, b"x", partition=0), Rec(0, b"y", partition=1)]
    positions, changes = assign_positions(records, {})
    assert set(changes) == {"events:0", "events:1"}
    assert [p.field for p in positions] == ["events:0", "events:1"]


def test_epochs_are_kept_in_redis_and_bumped_once(redis_only) -> None:
    key = f"t{uuid.uuid4().hex}:logs"
    first, second = LogEpochs(redis_only, key), LogEpochs(redis_only, key)  # two owners during a rebalance
    assert first.positions(log(2, "a"))[0] == LogPosition("events:0", 0, 0)
    new_log = log(2, "b")
    assert first.positions(new_log)[0].epoch == 1
    assert second.positions(new_log)[0].epoch == 1  # the other owner sees the bump, does not bump again
    assert LogIdentity.decode(redis_only.hget(key, "events:0")).epoch == 1


def test_the_state_worker_and_the_rebuild_share_the_epochs(redis_only) -> None:
    """AsyncLogEpochs (the worker) and LogEpochs (the rebuild) run one plan on one key: either sees the other's bump."""
    key = f"t{uuid.uuid4().hex}:logs"
    kw = redis_only.connection_pool.connection_kwargs

    async def worker_positions(*batches: list[Rec]) -> list[list[LogPosition | None]]:
        client = redis.asyncio.Redis(host=kw["host"], port=kw["port"], decode_responses=True)
        try:
            return [await AsyncLogEpochs(client, key).positions(batch) for batch in batches]
        finally:
            await client.aclose()

    assert asyncio.run(worker_positions([])) == [[]]
    [first] = asyncio.run(worker_positions(log(2, "a")))
    assert LogEpochs(redis_only, key).positions(log(3, "a")) == [*first, LogPosition("events:0", 0, 2)]
    assert LogEpochs(redis_only, key).positions(log(2, "b"))[0].epoch == 1  # the rebuild reads a restarted log
    [again] = asyncio.run(worker_positions(log(2, "b")))
    assert again == [LogPosition("events:0", 1, 0), LogPosition("events:0", 1, 1)]
