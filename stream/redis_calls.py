"""Redis work built once, run by a sync or an asyncio client: redis-py's split of command builders and clients.

The state store (stream/state_store.py) and the log epochs (stream/log_positions.py)
describe what a batch needs from Redis as a *plan*: a generator that yields
*rounds* of calls (Lua script calls and plain commands), receives each round's
replies in call order, and returns the parsed result. A plan does no I/O, so the
one copy of the keys, the script arguments and the reply parsing serves the state
and recommend workers (asyncio) as well as the CLI, the rebuild and the trainer
(sync), and a test can read a plan's calls without a server.

Two runners execute plans, each a few lines: ``run(client, plan)`` with a
``redis.Redis`` or ``redis.RedisCluster``, ``await run_async(client, plan)`` with
their asyncio twins. A round goes out either as one pipeline (one network
round-trip on one Redis) or, where a pipeline cannot carry it (cluster clients
refuse scripts in pipelines: each call goes to the master of its first key), call
by call: in call order with a sync client; with an asyncio client its *lanes*
(calls that must stay in order, such as one bucket's chunks) run concurrently.

A plan marked ``repeatable`` (a read) runs once more on a dropped connection
(Redis restarted since the last call): redis-py pipelines do not retry one, since a
pipeline may not be idempotent, but a read is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio
from redis.commands.core import AsyncScript, Script

T = TypeVar("T")

SyncClient = redis.Redis | redis.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.RedisCluster


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One run of a Lua script (EVALSHA, loaded on first use); in a cluster its first key routes it."""

    source: str
    keys: Sequence[str]
    args: Sequence[str | int | float]


@dataclass(frozen=True, slots=True)
class Command:
    """One plain command, with the options redis-py's command methods pass to the reply parser."""

    args: tuple[str | bytes | int | float, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


Call = ScriptCall | Command


@dataclass(frozen=True, slots=True)
class Round:
    """Calls sent together; the plan receives their replies in call order."""

    calls: Sequence[Call]
    pipelined: bool = True  # one pipeline; else call by call (a cluster client, or calls on other keys' masters)
    lanes: Sequence[Sequence[int]] | None = None  # unpipelined: numbers of calls kept in order; None: each alone

    def lane_numbers(self) -> list[Sequence[int]]:
        return list(self.lanes) if self.lanes is not None else [[n] for n in range(len(self.calls))]

    def in_call_order(self, lane_replies: Sequence[Sequence[Any]]) -> list[Any]:
        """The replies of lanes run concurrently, back in the order of the calls."""
        replies: list[Any] = [None] * len(self.calls)
        for numbers, outs in zip(self.lane_numbers(), lane_replies):
            for n, out in zip(numbers, outs):
                replies[n] = out
        return replies

    def sources(self) -> set[str]:
        return {call.source for call in self.calls if isinstance(call, ScriptCall)}


Steps = Generator[Round, list[Any], T]


@dataclass(frozen=True, slots=True)
class Plan(Generic[T]):
    """What a batch asks of Redis: `steps` starts the rounds afresh (a repeatable plan may run twice)."""

    steps: Callable[[], Steps[T]]
    repeatable: bool = False


def hmget(key: str, fields: Sequence[str]) -> Command:
    """Reply: the fields' values, None where missing."""
    return Command(("HMGET", key, *fields), {"keys": [key]})


def zrevrange_with_scores(key: str, start: int, end: int) -> Command:
    """Reply: (member, score) pairs, highest score first, as ``zrevrange(..., withscores=True)`` returns them."""
    return Command(
        ("ZREVRANGE", key, start, end, b"WITHSCORES"), {"withscores": True, "score_cast_func": float, "keys": [key]}
    )


def text(reply: str | bytes) -> str:
    """A reply as text, whether the client decodes responses or not."""
    return reply.decode() if isinstance(reply, bytes) else reply


# ---- the sync runner ------------------------------------------------------------------------
def run(client: SyncClient, plan: Plan[T]) -> T:
    """Execute `plan` on a sync client; returns what the plan returns."""
    try:
        return _drive(client, plan.steps())
    except redis.ConnectionError:
        if not plan.repeatable:
            raise
    return _drive(client, plan.steps())


def _drive(client: SyncClient, steps: Steps[T]) -> T:
    try:
        round_ = next(steps)
        while True:
            round_ = steps.send(_send(client, round_))
    except StopIteration as done:
        result: T = done.value
        return result


def _send(client: SyncClient, round_: Round) -> list[Any]:
    scripts = {source: client.register_script(source) for source in round_.sources()}
    if not round_.pipelined:
        return [_call(call, scripts, client) for call in round_.calls]
    pipe = client.pipeline(transaction=False)
    for call in round_.calls:
        _call(call, scripts, pipe)
    return pipe.execute()


def _call(call: Call, scripts: Mapping[str, Script], target: Any) -> Any:
    if isinstance(call, ScriptCall):
        return scripts[call.source](keys=call.keys, args=call.args, client=target)
    return target.execute_command(*call.args, **call.options)


# ---- the asyncio runner ----------------------------------------------------------------------
async def run_async(client: AsyncClient, plan: Plan[T]) -> T:
    """Execute `plan` on an asyncio client; returns what the plan returns."""
    try:
        return await _drive_async(client, plan.steps())
    except redis.ConnectionError:
        if not plan.repeatable:
            raise
    return await _drive_async(client, plan.steps())


async def _drive_async(client: AsyncClient, steps: Steps[T]) -> T:
    try:
        round_ = next(steps)
        while True:
            round_ = steps.send(await _send_async(client, round_))
    except StopIteration as done:
        result: T = done.value
        return result


async def _send_async(client: AsyncClient, round_: Round) -> list[Any]:
    scripts = {source: client.register_script(source) for source in round_.sources()}
    if round_.pipelined:
        pipe = client.pipeline(transaction=False)
        for call in round_.calls:
            await _call_async(call, scripts, pipe)
        return await pipe.execute()

    async def lane(numbers: Sequence[int]) -> list[Any]:
        return [await _call_async(round_.calls[n], scripts, client) for n in numbers]

    return round_.in_call_order(await asyncio.gather(*map(lane, round_.lane_numbers())))


async def _call_async(call: Call, scripts: Mapping[str, AsyncScript], target: Any) -> Any:
    if isinstance(call, ScriptCall):
        return await scripts[call.source](keys=call.keys, args=call.args, client=target)
    return await target.execute_command(*call.args, **call.options)
