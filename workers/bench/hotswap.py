"""`rtrec bench hotswap`: a steady request load through several promotions; nothing may fail.

Starts the stack with a recommendation worker serving a default-size model,
sends requests at a steady rate, and promotes a new version (store promote +
`model-updates` announcement, as the trainer does) at evenly spaced moments.
Prints requests sent / answered / failed, client-side latency before, during
(from each announcement until one second after the worker reported the swap)
and after the swaps, and each swap's time (announcement -> first response
from the new version; the worker's own load + warm-up time).
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from rtrec.model.checkpoint import save_checkpoint
from rtrec.model.store import CheckpointStore
from rtrec.stream.connections import redis_client
from rtrec.stream.keys import RECOMMEND_STATS
from rtrec.stream.rec_client import RecClient
from rtrec.stream.replay import Pacer
from rtrec.stream.settings import Settings
from rtrec.stream.synthetic import SyntheticConfig
from rtrec.workers.bench.stack_load import (
    N_ITEMS,
    default_generator,
    fill_histories,
    responses_read_in_background,
    wait_for_answers,
)
from rtrec.workers.stack import Stack
from rtrec.workers.trainer import announce_sync


def run_bench(settings: Settings, rate: float, seconds: float, swaps: int, plot: Path | None, console: Console) -> dict:
    generator = default_generator(settings)
    ck = generator.checkpoint
    with tempfile.TemporaryDirectory(prefix="rtrec-bench-swap-") as tmp:
        root = Path(tmp) / "checkpoints"
        store = CheckpointStore(root)
        versions = [save_checkpoint(ck.model, ck.vocab, root, ck.manifest["meta"]).name for _ in range(swaps + 1)]
        store.promote(versions[0], reason="bench start")
        with Stack(settings.model_copy(update={"checkpoint_dir": root}), run_dir=Path(tmp) / "run") as stack:
            s = stack.start()
            users = fill_histories(s, SyntheticConfig(n_users=300, n_items=N_ITEMS, n_events=10_000, seed=7))
            redis = redis_client(s)
            sent: dict[str, float] = {}
            swap_at: list[tuple[str, float]] = []
            n = int(rate * seconds)
            moments = {int(n * (i + 1) / (swaps + 1)): v for i, v in enumerate(versions[1:])}
            with RecClient(s) as client:
                client.collect([client.send(users[0])], timeout_s=60)  # warm, partitions assigned
                pacer = Pacer(rate=rate)
                with responses_read_in_background(client):
                    for i in tqdm(range(n), desc=f"requests at {rate:.0f}/s, {swaps} swaps", unit="req"):
                        pacer.wait(None)
                        if i in moments:
                            store.promote(moments[i], reason="bench")
                            threading.Thread(target=announce_sync, args=(s, moments[i], "bench"), daemon=True).start()
                            swap_at.append((moments[i], time.perf_counter()))
                        sent[client.send(users[i % len(users)], k=10)] = time.perf_counter()
                    wait_for_answers(client, len(sent) + 1)
                responses, arrivals = dict(client.responses), dict(client.arrivals)
            worker_swap_ms = float(redis.hget(RECOMMEND_STATS, "last_swap_ms") or "nan")
    return _report(sent, responses, arrivals, swap_at, worker_swap_ms, rate, plot, console)


def _report(sent, responses, arrivals, swap_at, worker_swap_ms, rate, plot, console) -> dict:
    answered = [r for r in sent if r in responses]
    failed = [r for r in answered if responses[r].get("error")]
    missing = len(sent) - len(answered)
    # each swap's time: announcement -> first response produced by the new version
    swap_s = []
    for version, t0 in swap_at:
        firsts = [arrivals[r] for r in answered if responses[r]["model_version"] == version]
        swap_s.append(min(firsts) - t0 if firsts else float("nan"))
    during = [(t0, t0 + (s if s == s else 0) + 1.0) for (_, t0), s in zip(swap_at, swap_s)]
    phases: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    first_swap = swap_at[0][1] if swap_at else float("inf")
    for r in answered:
        t, lat = sent[r], (arrivals[r] - sent[r]) * 1000
        if any(a <= t <= b for a, b in during):
            phases["during"].append(lat)
        elif t < first_swap:
            phases["before"].append(lat)
        else:
            phases["after"].append(lat)  # between and after swaps: steady state on a new model

    table = Table(title=f"rtrec bench hotswap ({rate:.0f} req/s, {len(swap_at)} promotions)")
    for col in ("phase", "requests", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right")
    figures = {}
    for phase, lats in phases.items():
        p50, p99 = np.percentile(lats, [50, 99]) if lats else (float("nan"), float("nan"))
        figures[phase] = (p50, p99)
        table.add_row(phase, str(len(lats)), f"{p50:.1f}", f"{p99:.1f}")
    console.print(table)
    steady = figures["before"][1]
    ratio = figures["during"][1] / steady if steady == steady and steady else float("nan")
    console.print(f"sent {len(sent)}  answered {len(answered)}  failed {len(failed)}  unanswered {missing}")
    console.print(f"p99 during swaps / p99 before: {ratio:.2f}x  (target < 2x)")
    console.print(
        "swap time (announce -> first response from the new version): "
        + ", ".join(f"{s * 1000:.0f} ms" for s in swap_s)
        + f"; last load + warm-up in the worker: {worker_swap_ms:.0f} ms"
    )
    versions = {responses[r]["model_version"] for r in answered}
    console.print(f"versions that answered: {len(versions)}")
    if plot is not None and answered:
        _plot(sent, arrivals, answered, swap_at, plot)
        console.print(f"latency over time: {plot}")
    return {
        "sent": len(sent),
        "answered": len(answered),
        "failed": len(failed),
        "unanswered": missing,
        "phases": figures,
        "swap_s": swap_s,
        "ratio": ratio,
    }


def _plot(sent, arrivals, answered, swap_at, path: Path) -> None:
    from matplotlib.figure import Figure

    t0 = min(sent.values())
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    ax.scatter([sent[r] - t0 for r in answered], [(arrivals[r] - sent[r]) * 1000 for r in answered], s=3)
    for _version, t in swap_at:
        ax.axvline(t - t0, color="r", linestyle="--")
    ax.set(
        xlabel="time (s); red: promotion announced",
        ylabel="request -> response (ms)",
        title=f"Recommendation latency through {len(swap_at)} model hot-swaps (one dot per request)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
