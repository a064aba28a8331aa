"""`rtrec bench soak`: minutes of steady mixed load with promotions; counts what went wrong.

Starts the stack (state + recommendation worker serving a default-size model),
then for `minutes` sends events and requests at steady rates and promotes a new
checkpoint version every `promote_every_s` (store promote + `model-updates`, as
the trainer does). At the end it waits for the backlog to drain and prints:

* events lost / counted twice: each soak user's event count in Redis vs what was sent;
* requests answered / failed (error responses) / unanswered / answered twice;
* each worker's resident memory at the end of the warm-up and at the end, as growth
  in MB and %/hour (target: flat), plus a PNG of memory over time.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from rtrec.model.checkpoint import save_checkpoint
from rtrec.model.store import CheckpointStore
from rtrec.stream.connections import redis_client
from rtrec.stream.producer import EventProducer
from rtrec.stream.rec_client import RecClient
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import StateStore
from rtrec.workers.bench.stack_load import N_ITEMS, default_generator, responses_read_in_background
from rtrec.workers.stack import Stack
from rtrec.workers.trainer import announce_sync

TICK_S = 0.01  # the load loop sends whatever is due every tick
REQUESTS_AFTER_S = 2.0  # seconds of events before the first request
# Events go out in 100 ms producer batches: the embedded Tansu broker (memory storage) slows
# down as a partition collects many small record batches — measured: at 500 events/s in 5 ms
# batches the state worker's fetches stalled after ~70k events (~2.5 min). Apache Kafka does not.
SOAK_LINGER_MS = 100
TYPES = ("browse", "browse", "browse", "click", "click", "purchase")


@dataclass(frozen=True)
class SoakPlan:
    """The load: how long, how fast, how often a promotion and a memory sample."""

    minutes: float
    event_rate: float
    request_rate: float
    promote_every_s: float
    sample_s: float


@dataclass
class SoakLog:
    """What the load loop did: events sent per user, request ids, promotion times, memory samples per worker."""

    sent_events: Counter[str] = field(default_factory=Counter)
    requests: list[str] = field(default_factory=list)
    promotions: list[float] = field(default_factory=list)
    memory: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def run_soak(
    settings: Settings,
    minutes: float,
    event_rate: float,
    request_rate: float,
    promote_every_s: float,
    users: int,
    sample_s: float,
    plot: Path | None,
    console: Console,
) -> dict:
    generator = default_generator(settings)
    ck = generator.checkpoint
    tag = uuid.uuid4().hex[:6]
    pool = [f"soak-{tag}-{n}" for n in range(users)]
    plan = SoakPlan(minutes, event_rate, request_rate, promote_every_s, sample_s)
    with tempfile.TemporaryDirectory(prefix="rtrec-soak-") as tmp:
        root = Path(tmp) / "checkpoints"
        store = CheckpointStore(root)
        store.promote(save_checkpoint(ck.model, ck.vocab, root, ck.manifest["meta"]).name, reason="soak start")
        with Stack(settings.model_copy(update={"checkpoint_dir": root}), run_dir=Path(tmp) / "run") as stack:
            s = stack.start()
            redis = redis_client(s)
            processes = {w.name: psutil.Process(w.proc.pid) for w in stack.workers}
            log = SoakLog(memory={name: [] for name in processes})

            def promote() -> None:
                version = save_checkpoint(ck.model, ck.vocab, root, ck.manifest["meta"]).name
                store.promote(version, reason="soak")
                announce_sync(s, version, "soak")

            events_settings = s.model_copy(update={"producer_linger_ms": SOAK_LINGER_MS})
            with EventProducer(events_settings) as producer, RecClient(s) as client:
                with responses_read_in_background(client):
                    _run_load(plan, producer, client, pool, processes, promote, log)
                    producer.flush()
                    client.producer.flush()
                    drained = _wait_drained(s, redis, log.sent_events, client, log.requests)
                responses, duplicates = dict(client.responses), client.duplicates
            counts = _event_counts(s, redis, sorted(log.sent_events))
    return _report(
        log.sent_events, counts, log.requests, responses, duplicates, log.memory, log.promotions, drained, plot, console
    )


def _run_load(
    plan: SoakPlan,
    producer: EventProducer,
    client: RecClient,
    pool: list[str],
    processes: dict[str, psutil.Process],
    promote: Callable[[], None],
    log: SoakLog,
) -> None:
    """Every tick for the plan's minutes: send the events and requests now due, sample memory, start promotions."""
    rng = random.Random(7)
    seconds = plan.minutes * 60
    start = time.monotonic()
    next_sample = next_promotion = 0.0
    with tqdm(total=int(seconds), desc=f"soak {plan.minutes:g} min", unit="s") as bar:
        while (elapsed := time.monotonic() - start) < seconds:
            for _ in range(int(elapsed * plan.event_rate) - sum(log.sent_events.values())):
                user = rng.choice(pool)
                producer.send(
                    {
                        "event_id": uuid.uuid4().hex,
                        "user_id": user,
                        "item_id": f"i{rng.randrange(N_ITEMS)}",
                        "type": rng.choice(TYPES),
                        "ts": int(time.time() * 1000),
                    }
                )
                log.sent_events[user] += 1
            # requests start once events have flowed a moment: before any event is applied there is nothing to
            # recommend (no history, no trending) and the answer is, rightly, an error response
            asking = max(0.0, elapsed - REQUESTS_AFTER_S)
            for _ in range(int(asking * plan.request_rate) - len(log.requests)):
                log.requests.append(client.send(rng.choice(pool), k=10))
            if elapsed >= next_sample:
                for name, proc in processes.items():
                    log.memory[name].append((elapsed, proc.memory_info().rss / 2**20))
                next_sample += plan.sample_s
            if elapsed >= next_promotion + plan.promote_every_s:
                next_promotion += plan.promote_every_s
                log.promotions.append(elapsed)
                threading.Thread(target=promote, daemon=True).start()
            bar.update(int(elapsed) - bar.n)
            time.sleep(TICK_S)


def _event_counts(settings: Settings, redis, users: list[str]) -> dict[str, int]:
    store = StateStore(settings)
    return {u: int(redis.hget(store.user_key(u, "h"), "n") or 0) for u in users}


def _wait_drained(
    settings: Settings, redis, sent: Counter, client: RecClient, requests: list[str], timeout_s: float = 120
) -> bool:
    """Until every event is in Redis and every request answered (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    users = sorted(sent)
    while time.monotonic() < deadline:
        if len(client.responses) >= len(requests) and sum(_event_counts(settings, redis, users).values()) >= sum(
            sent.values()
        ):
            return True
        time.sleep(0.5)
    return False


def _report(
    sent_events: Counter,
    counts: dict[str, int],
    requests: list[str],
    responses: dict,
    duplicates: int,
    memory: dict[str, list[tuple[float, float]]],
    promotions: list[float],
    drained: bool,
    plot: Path | None,
    console: Console,
) -> dict:
    lost = sum(max(0, n - counts.get(u, 0)) for u, n in sent_events.items())
    twice = sum(max(0, counts.get(u, 0) - n) for u, n in sent_events.items())
    answered = [r for r in requests if r in responses]
    failed = sum(1 for r in answered if responses[r].get("error"))
    versions = len({responses[r]["model_version"] for r in answered})

    table = Table(title="rtrec bench soak")
    for col in ("", "sent", "lost", "counted/answered twice", "failed"):
        table.add_column(col, justify="right")
    table.add_row("events", f"{sum(sent_events.values()):,}", str(lost), str(twice), "-")
    table.add_row("requests", f"{len(requests):,}", str(len(requests) - len(answered)), str(duplicates), str(failed))
    console.print(table)
    console.print(
        f"{len(promotions)} promotions; {versions} versions answered (the trending fallback included); "
        f"drained: {drained}"
    )

    mem = Table(title="worker memory (RSS)")
    for col in ("worker", "after warm-up MB", "end MB", "growth MB", "growth %/h"):
        mem.add_column(col, justify="right")
    growth = {}
    for name, series in memory.items():
        if len(series) < 2:
            continue
        warm = series[len(series) // 4]  # the first quarter is warm-up (imports, model load, caches)
        end = series[-1]
        hours = max(1e-9, (end[0] - warm[0]) / 3600)
        pct_h = (end[1] - warm[1]) / warm[1] * 100 / hours
        growth[name] = {"warm_mb": warm[1], "end_mb": end[1], "pct_per_hour": pct_h}
        mem.add_row(name, f"{warm[1]:.0f}", f"{end[1]:.0f}", f"{end[1] - warm[1]:+.1f}", f"{pct_h:+.1f}")
    console.print(mem)
    if plot is not None and memory:
        _plot(memory, promotions, plot)
        console.print(f"memory over time: {plot}")
    return {
        "events": sum(sent_events.values()),
        "lost": lost,
        "twice": twice,
        "requests": len(requests),
        "unanswered": len(requests) - len(answered),
        "answered_twice": duplicates,
        "failed": failed,
        "promotions": len(promotions),
        "memory": growth,
        "drained": drained,
    }


def _plot(memory: dict[str, list[tuple[float, float]]], promotions: list[float], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    for name, series in memory.items():
        ax.plot([t for t, _ in series], [mb for _, mb in series], label=name)
    for t in promotions:
        ax.axvline(t, color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="time (s); dotted: promotions", ylabel="RSS (MB)", title="Worker memory (RSS) during the soak test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
