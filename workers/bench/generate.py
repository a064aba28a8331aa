"""`rtrec bench generate`: generative-model throughput per batch size, and request->response over Kafka.

Part 1 times `TorchGenerator.recommend_batch` directly for each batch size on
the default model size (weights initialised from the config: speed does not
depend on training). Part 2 saves that model as a checkpoint, starts the
stack with a recommendation worker serving it, fills Redis with synthetic
histories, sends requests at a steady rate and measures each request's
send -> response-received time at the client: for each request form of
`--forms` in turn on the same stack (a user's top k first: the baseline the
other forms are compared with).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from rtrec.model.checkpoint import save_checkpoint
from rtrec.model.generator import TorchGenerator
from rtrec.stream.catalog import store_categories
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


FORMS = ("topk", "similar", "candidates", "filter")
CATEGORIES = 20  # the bench's catalog: item i{n} is in category c{n % 20}
FILTER = {"categories": ["c1", "c2", "c3"]}  # 15 % of the items
N_CANDIDATES = 100

Sender = Callable[[RecClient, int], str]


def form_senders(users: list[str], seed: int = 0) -> dict[str, Sender]:
    """How each request form is sent; request i asks for user users[i % n] (and item i{...} at random)."""
    rng = np.random.default_rng(seed)
    items = [f"i{n}" for n in rng.integers(N_ITEMS, size=4096)]
    candidates = [tuple(f"i{n}" for n in rng.choice(N_ITEMS, N_CANDIDATES, replace=False)) for _ in range(64)]

    def user(i: int) -> str:
        return users[i % len(users)]

    return {
        "topk": lambda client, i: client.send(user(i), k=10),
        "similar": lambda client, i: client.send(item_id=items[i % len(items)], k=10),
        "candidates": lambda client, i: client.send(user(i), k=10, candidates=candidates[i % len(candidates)]),
        "filter": lambda client, i: client.send(user(i), k=10, filter=FILTER),
    }


def kafka_latency(
    settings: Settings,
    generator: TorchGenerator,
    rate: float,
    seconds: float,
    console: Console,
    forms: tuple[str, ...] = ("topk",),
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per request form: client-side send->receive latencies and the worker's own request->publish latencies (ms)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="rtrec-bench-gen-") as tmp:
        root = Path(tmp) / "checkpoints"
        ck = generator.checkpoint
        save_checkpoint(ck.model, ck.vocab, root, ck.manifest["meta"])
        with Stack(settings.model_copy(update={"checkpoint_dir": root}), run_dir=Path(tmp) / "run") as stack:
            s = stack.start()
            users = fill_histories(s, SyntheticConfig(n_users=500, n_items=N_ITEMS, n_events=20_000, seed=5))
            store_categories(s, ((f"i{n}", f"c{n % CATEGORIES}") for n in range(N_ITEMS)))
            senders = form_senders(users)
            with RecClient(s) as client:
                client.collect([client.send(users[0])], timeout_s=60)  # model warm, partitions assigned
                for form in forms:
                    out[form] = _run_form(client, senders[form], rate, seconds, form, console)
    return out


def _run_form(
    client: RecClient, send: Sender, rate: float, seconds: float, form: str, console: Console
) -> tuple[np.ndarray, np.ndarray]:
    n = int(rate * seconds)
    sent: dict[str, float] = {}
    pacer = Pacer(rate=rate)
    with responses_read_in_background(client):  # stamped as they arrive, not when the sender has time
        for i in tqdm(range(n), desc=f"{form} requests at {rate:.0f}/s", unit="req"):
            pacer.wait(None)
            started = time.perf_counter()
            sent[send(client, i)] = started  # linger 0: sent at once
        _wait_for(client, sent)
    got = [r for r in sent if r in client.responses and "error" not in client.responses[r]]
    errors = sum(1 for r in sent if r in client.responses and "error" in client.responses[r])
    missing = len(sent) - len(got) - errors
    if missing or errors:
        console.print(f"[red]{form}: {missing} requests unanswered, {errors} answered with an error")
    arrivals = dict(client.arrivals)
    worker_ms = np.array([client.responses[r]["latency_ms"] for r in got])
    return np.array([(arrivals[r] - sent[r]) * 1000 for r in got]), worker_ms


def _wait_for(client: RecClient, sent: dict[str, Any], timeout_s: float = 60) -> None:
    """Until every request of `sent` is answered (or the timeout: then the bench reports them missing)."""
    deadline = time.monotonic() + timeout_s
    while any(r not in client.responses for r in sent) and time.monotonic() < deadline:
        time.sleep(0.01)


def run_bench(
    settings: Settings,
    batch_sizes: list[int],
    rate: float,
    seconds: float,
    plot: Path | None,
    console: Console,
    forms: tuple[str, ...] = ("topk",),
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

    console.rule(f"2. request -> response over Kafka at {rate:.0f} req/s for {seconds:.0f}s per request form")
    by_form = kafka_latency(settings, generator, rate, seconds, console, forms)
    table = Table(title=f"request -> response at the client, {rate:.0f} req/s (ratio: to topk in this run)")
    for col in ("form", "answered", "p50 ms", "p99 ms", "worker p50 ms", "worker p99 ms", "p99 / topk"):
        table.add_column(col, justify="right")
    figures: dict[str, dict[str, float]] = {}
    for form, (lat, worker_ms) in by_form.items():
        p50, p99 = np.percentile(lat, [50, 99]) if len(lat) else (float("nan"), float("nan"))
        w50, w99 = np.percentile(worker_ms, [50, 99]) if len(worker_ms) else (float("nan"), float("nan"))
        figures[form] = {"answered": len(lat), "p50_ms": p50, "p99_ms": p99, "worker_p50_ms": w50, "worker_p99_ms": w99}
        base = figures.get("topk", {}).get("p99_ms", float("nan"))
        table.add_row(form, str(len(lat)), f"{p50:.1f}", f"{p99:.1f}", f"{w50:.1f}", f"{w99:.1f}", f"{p99 / base:.2f}x")
    console.print(table)
    console.print("worker ms: request produced -> response produced (the response's latency_ms)")
    if plot is not None and any(len(lat) for lat, _ in by_form.values()):
        _plot({form: lat for form, (lat, _) in by_form.items()}, rate, plot)
        console.print(f"latency histogram: {plot}")
    first = figures[forms[0]]
    return {
        "batches": rows,
        "kafka_p50_ms": first["p50_ms"],
        "kafka_p99_ms": first["p99_ms"],
        "answered": first["answered"],
        "forms": figures,
    }


def _plot(lat_by_form: dict[str, np.ndarray], rate: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    top = max(float(np.percentile(lat, 99.5)) for lat in lat_by_form.values() if len(lat))
    bins = np.linspace(0, top, 60).tolist()
    for form, lat in lat_by_form.items():
        if len(lat):
            p50, p99 = np.percentile(lat, [50, 99])
            ax.hist(lat, bins=bins, histtype="step", linewidth=1.5, label=f"{form}: p50 {p50:.1f}, p99 {p99:.1f} ms")
    ax.set(
        xlabel="request -> response (ms, at the client)",
        ylabel="requests",
        title=f"Generative recommendations over Kafka: latency at {rate:.0f} req/s per request form",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
