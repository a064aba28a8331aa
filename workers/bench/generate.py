"""`rtrec bench generate`: generative-model throughput per batch size, and request->response over Kafka.

Part 1 times `TorchGenerator.recommend_batch` directly for each batch size on
the default model size (weights initialised from the config: speed does not
depend on training). Part 2 saves that model as a checkpoint, starts the
stack with a recommendation worker serving it, fills Redis with synthetic
histories, sends requests at a steady rate and measures each request's
send -> response-received time at the client.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from rtrec.model.checkpoint import save_checkpoint
from rtrec.model.generator import TorchGenerator
from rtrec.stream.rec_client import RecClient
from rtrec.stream.replay import Pacer
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import SeqEntry, UserState
from rtrec.stream.synthetic import SyntheticConfig
from rtrec.workers.bench.stack_load import (
    N_ITEMS,
    default_generator,
    fill_histories,
    responses_read_in_background,
    wait_for_answers,
)
from rtrec.workers.stack import Stack


def _states(n: int, length: int, rng: np.random.Generator) -> list[UserState]:
    types = ("browse", "click", "purchase")
    out = []
    for u in range(n):
        seq = [SeqEntry(f"i{rng.integers(N_ITEMS)}", types[rng.integers(3)], t, f"e{t}") for t in range(length)]
        out.append(UserState(f"u{u}", sequence=seq, exclude=frozenset(e.item_id for e in seq)))
    return out


def time_batches(generator: TorchGenerator, batch_sizes: list[int], length: int, repeats: int = 20) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for size in batch_sizes:
        states = _states(size, length, rng)
        generator.recommend_batch(states, 10)  # warm-up
        lat = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            generator.recommend_batch(states, 10)
            lat.append((time.perf_counter() - t0) * 1000)
        p50, p99 = np.percentile(lat, [50, 99])
        rows.append({"batch": size, "recs_per_s": size / (np.mean(lat) / 1000), "p50_ms": p50, "p99_ms": p99})
    return rows


def kafka_latency(
    settings: Settings, generator: TorchGenerator, rate: float, seconds: float, console: Console
) -> tuple[np.ndarray, np.ndarray]:
    """Client-side send->receive latencies and the worker's own request->publish latencies (ms)."""
    with tempfile.TemporaryDirectory(prefix="rtrec-bench-gen-") as tmp:
        root = Path(tmp) / "checkpoints"
        ck = generator.checkpoint
        save_checkpoint(ck.model, ck.vocab, root, ck.manifest["meta"])
        with Stack(settings.model_copy(update={"checkpoint_dir": root}), run_dir=Path(tmp) / "run") as stack:
            s = stack.start()
            users = fill_histories(s, SyntheticConfig(n_users=500, n_items=N_ITEMS, n_events=20_000, seed=5))
            n = int(rate * seconds)
            sent: dict[str, float] = {}
            pacer = Pacer(rate=rate)
            with RecClient(s) as client:
                client.collect([client.send(users[0])], timeout_s=60)  # model warm, partitions assigned
                with responses_read_in_background(client):  # stamped as they arrive, not when the sender has time
                    for i in tqdm(range(n), desc=f"requests at {rate:.0f}/s", unit="req"):
                        pacer.wait(None)
                        started = time.perf_counter()
                        rid = client.send(users[i % len(users)], k=10)  # linger 0: sent at once
                        sent[rid] = started
                    wait_for_answers(client, len(sent) + 1)
                got = [r for r in sent if r in client.responses]
                arrivals = dict(client.arrivals)
                worker_ms = np.array([client.responses[r]["latency_ms"] for r in got])
            missing = len(sent) - len(got)
            if missing:
                console.print(f"[red]{missing} requests unanswered")
            return np.array([(arrivals[r] - sent[r]) * 1000 for r in got]), worker_ms


def run_bench(
    settings: Settings, batch_sizes: list[int], rate: float, seconds: float, plot: Path | None, console: Console
) -> dict:
    generator = default_generator(settings)
    params = sum(p.numel() for p in generator.checkpoint.model.parameters())
    console.rule(
        f"1. {settings.model_family} ({params / 1e6:.2f} M parameters) on {generator.device}, "
        f"{generator.max_events}-event histories (RTREC_SERVE_MAX_EVENTS)"
    )
    rows = time_batches(generator, batch_sizes, generator.max_events)
    table = Table(title=f"rtrec bench generate ({torch.get_num_threads()} threads)")
    for col in ("batch", "recs/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["batch"]), f"{r['recs_per_s']:,.0f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}")
    console.print(table)

    console.rule(f"2. request -> response over Kafka at {rate:.0f} req/s for {seconds:.0f}s")
    lat, worker_ms = kafka_latency(settings, generator, rate, seconds, console)
    p50, p99 = np.percentile(lat, [50, 99]) if len(lat) else (float("nan"), float("nan"))
    console.print(f"answered {len(lat)} requests: p50 {p50:.1f} ms, p99 {p99:.1f} ms at the client")
    if len(worker_ms):
        w50, w99 = np.percentile(worker_ms, [50, 99])
        console.print(
            f"  of which request produced -> response produced (the worker's latency_ms): "
            f"p50 {w50:.1f} ms, p99 {w99:.1f} ms"
        )
    if plot is not None and len(lat):
        _plot(lat, rate, plot)
        console.print(f"latency histogram: {plot}")
    return {"batches": rows, "kafka_p50_ms": p50, "kafka_p99_ms": p99, "answered": len(lat)}


def _plot(lat_ms: np.ndarray, rate: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.hist(lat_ms, bins=60, color="#37a")
    for q, style in ((50, "--"), (99, ":")):
        v = np.percentile(lat_ms, q)
        ax.axvline(v, color="k", linestyle=style, label=f"p{q} {v:.1f} ms")
    ax.set(
        xlabel="request -> response (ms, at the client)",
        ylabel="requests",
        title=f"Generative recommendations over Kafka: latency at {rate:.0f} req/s",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
