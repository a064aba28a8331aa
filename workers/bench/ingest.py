"""`rtrec bench ingest`: state-worker throughput and event->visible latency, against a naive baseline.

Three phases on one freshly started stack (same broker, same Redis):

1. throughput: N events are produced first, then a state worker process is
   started and timed until all N are applied (so the producer's speed does not
   count); events/s = N / drain time.
2. latency: with the worker running, events are produced at a steady rate;
   the worker records (Redis-visible time - producer timestamp) per event.
3. naive baseline, same process as this bench: one kafka-python consumer,
   one unpipelined Redis round-trip (the same update script) per event,
   timed over the same kind of pre-produced backlog.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from rtrec.stream.connections import kafka_bootstrap, kafka_python_auth, redis_client
from rtrec.stream.events import parse_event
from rtrec.stream.keys import INGEST_LATENCY
from rtrec.stream.producer import EventProducer
from rtrec.stream.replay import Pacer
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import StateStore
from rtrec.stream.synthetic import SyntheticConfig, generate_events
from rtrec.workers.bench.stack_load import wait_applied
from rtrec.workers.stack import Stack
from rtrec.workers.state import decode_samples


def _events(n: int, seed: int) -> list[dict]:
    return generate_events(SyntheticConfig(n_users=max(200, n // 50), n_items=5000, n_events=n, seed=seed))


def _produce(settings: Settings, events: list[dict], rate: float = 0.0, desc: str = "produce") -> None:
    pacer = Pacer(rate=rate)
    with EventProducer(settings) as producer:
        for e in tqdm(events, desc=desc, unit="ev"):
            if rate:
                pacer.wait(None)
            producer.send(e)


def naive_baseline(settings: Settings, topic: str, n: int) -> float:
    """events/s of the naive consumer over `n` pre-produced events in `topic`."""
    store = StateStore(settings, prefix="naive")
    client = redis_client(settings)
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap(settings),
        group_id="rtrec-bench-naive",
        auto_offset_reset="earliest",
        enable_auto_commit=True,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        **kafka_python_auth(settings),
    )
    done, started = 0, None
    with tqdm(total=n, desc="naive", unit="ev") as bar:
        while done < n:
            for records in consumer.poll(timeout_ms=100).values():
                if started is None:
                    started = time.monotonic()
                for rec in records:
                    store.apply(client, [parse_event(rec.value, settings)])  # one round-trip per event
                    done += 1
                bar.update(len(records))
    elapsed = time.monotonic() - started if started is not None else 0.0
    consumer.close()
    return done / elapsed


def run_bench(settings: Settings, n_events: int, baseline_events: int, plot: Path | None, console: Console) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="rtrec-bench-"))
    results: dict[str, float] = {}
    with Stack(settings, run_dir=run_dir) as stack:
        s = stack.start_servers()
        client = redis_client(s)
        store = StateStore(s)

        console.rule(f"1. throughput: {n_events:,} events pre-produced, then drained by a state worker")
        _produce(s, _events(n_events, seed=1))
        stack.start_worker("state", RTREC_RECORD_LATENCY="1")
        stack.wait_ready("state")
        start = time.monotonic()
        end = wait_applied(store, client, n_events, stack, timeout_s=600)
        results["rtrec_events_per_s"] = n_events / (end - start)
        while len(decode_samples(client.lrange(INGEST_LATENCY, 0, -1))) < n_events:  # pushed just after each apply
            time.sleep(0.05)
        client.delete(INGEST_LATENCY)

        rate = min(5000.0, results["rtrec_events_per_s"] / 2)
        n_paced = min(n_events, int(rate * 5))
        console.rule(f"2. latency: {n_paced:,} events at a steady {rate:,.0f}/s")
        _produce(s, _events(n_paced, seed=2), rate=rate, desc="paced")
        wait_applied(store, client, n_events + n_paced, stack, timeout_s=600)
        deadline = time.monotonic() + 10  # the last batch's samples follow its apply
        while len(decode_samples(client.lrange(INGEST_LATENCY, 0, -1))) < n_paced and time.monotonic() < deadline:
            time.sleep(0.05)
        lat = np.array(decode_samples(client.lrange(INGEST_LATENCY, 0, -1)))
        results["p50_ms"], results["p99_ms"] = np.percentile(lat, [50, 99])

        console.rule(f"3. naive baseline: {baseline_events:,} events, one Redis round-trip each")
        baseline_topic = "bench-naive-events"
        s_naive = s.model_copy(update={"topic_events": baseline_topic})
        from rtrec.stream.topics import ensure_topics

        ensure_topics(s_naive)
        _produce(s_naive, _events(baseline_events, seed=3))
        results["naive_events_per_s"] = naive_baseline(s, baseline_topic, baseline_events)
        results["ratio"] = results["rtrec_events_per_s"] / results["naive_events_per_s"]

    table = Table(title=f"rtrec bench ingest  ({os.cpu_count()} cores)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("rtrec state worker, events/s", f"{results['rtrec_events_per_s']:,.0f}")
    table.add_row("naive consumer, events/s", f"{results['naive_events_per_s']:,.0f}")
    table.add_row("ratio", f"{results['ratio']:.1f}x")
    table.add_row(f"event->visible p50 at {rate:,.0f} ev/s", f"{results['p50_ms']:.1f} ms")
    table.add_row(f"event->visible p99 at {rate:,.0f} ev/s", f"{results['p99_ms']:.1f} ms")
    console.print(table)
    if plot:
        _plot(lat, rate, plot)
        console.print(f"latency histogram: {plot}")
    return results


def _plot(lat_ms: np.ndarray, rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lat_ms, bins=60, color="#3a7")
    for q, style in ((50, "--"), (99, ":")):
        v = np.percentile(lat_ms, q)
        ax.axvline(v, color="k", linestyle=style, label=f"p{q} {v:.1f} ms")
    ax.set_xlabel("event -> Redis-visible latency (ms)")
    ax.set_ylabel("events")
    ax.set_title(f"State worker: event -> Redis-visible latency at {rate:,.0f} events/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
