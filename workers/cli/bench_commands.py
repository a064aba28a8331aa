"""`rtrec bench ...`: benchmarks that print figures (not tests); each runs a module of rtrec.workers.bench.

The bench modules import torch, matplotlib and the stack: they are imported when their command runs,
so `rtrec --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from rtrec.stream.settings import get_settings
from rtrec.workers.cli.terminal import console

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures (not tests).")


@bench_app.command("ingest")
def bench_ingest(
    events: int = typer.Option(50_000, help="synthetic events to replay"),
    baseline_events: int = typer.Option(10_000, help="events for the naive baseline"),
    plot: Path | None = typer.Option(Path("bench-ingest.png"), help="latency histogram PNG"),
) -> None:
    """Events/s and event->Redis-visible latency through broker + state worker, vs a naive consumer."""
    from rtrec.workers.bench.ingest import run_bench

    run_bench(get_settings(), events, baseline_events, plot, console)


@bench_app.command("generate")
def bench_generate(
    batches: str = typer.Option("1,8,32,128", help="batch sizes to time"),
    rate: float = typer.Option(200.0, help="requests/s for the over-Kafka latency run"),
    seconds: float = typer.Option(10.0, help="duration of the over-Kafka run"),
    plot: Path | None = typer.Option(Path("bench-generate.png"), help="latency histogram PNG"),
) -> None:
    """recs/s and per-batch latency of the default model on this machine, and request->response over Kafka."""
    from rtrec.workers.bench.generate import run_bench

    run_bench(get_settings(), [int(b) for b in batches.split(",")], rate, seconds, plot, console)


@bench_app.command("hotswap")
def bench_hotswap(
    rate: float = typer.Option(100.0, help="steady requests/s"),
    seconds: float = typer.Option(20.0, help="duration of the load"),
    swaps: int = typer.Option(3, help="promotions during the load"),
    plot: Path | None = typer.Option(Path("bench-hotswap.png"), help="latency-over-time PNG"),
) -> None:
    """Requests sent/answered/failed and latency before/during/after several promotions."""
    from rtrec.workers.bench.hotswap import run_bench

    result = run_bench(get_settings(), rate, seconds, swaps, plot, console)
    if result["failed"] or result["unanswered"]:
        raise typer.Exit(1)


@bench_app.command("soak")
def bench_soak(
    minutes: float = typer.Option(10.0, help="duration of the load"),
    event_rate: float = typer.Option(500.0, help="events/s"),
    request_rate: float = typer.Option(50.0, help="requests/s"),
    promote_every_s: float = typer.Option(120.0, help="seconds between promotions"),
    users: int = typer.Option(2000, help="distinct users in the load"),
    sample_s: float = typer.Option(5.0, help="seconds between memory samples"),
    plot: Path | None = typer.Option(Path("bench-soak.png"), help="memory-over-time PNG"),
) -> None:
    """Steady events + requests with promotions: lost/duplicated/failed counts and worker memory growth."""
    from rtrec.workers.bench.soak import run_soak

    result = run_soak(
        get_settings(), minutes, event_rate, request_rate, promote_every_s, users, sample_s, plot, console
    )
    if result["lost"] or result["twice"] or result["failed"] or result["unanswered"]:
        raise typer.Exit(1)


@bench_app.command("memory")
def bench_memory(
    users: int = typer.Option(2000, help="distinct users in the generated stream"),
    items: int = typer.Option(5000, help="items in the generated catalog"),
    events: int = typer.Option(200_000, help="events to replay"),
    days: float = typer.Option(7.0, help="event-time span of the stream, ending now (replayed time-compressed)"),
    rate: float = typer.Option(
        1000.0, help="events/s for the 7-day projection (dedupe bytes are amortized over rate x 7 days of events)"
    ),
    project_users: int | None = typer.Option(
        None, help="users for the projection, each at the replay's bytes per active user (default: --users)"
    ),
    plot: Path | None = typer.Option(
        Path("bench-memory.png"),
        help="memory-over-events PNG (used_memory, key families stacked, the "
        "second half's ±10% band); the figures go to the same name .json",
    ),
    samples: int = typer.Option(20, help="memory samples over the replay"),
) -> None:
    """Redis bytes per event, per user (dedupe state included) and per item, memory over the replay and whether it
    stays flat, and a 7-day projection for a rate."""
    from rich.markup import escape

    from rtrec.workers.bench.memory import BenchInputError, check_inputs, run_memory_bench

    settings = get_settings()
    try:
        check_inputs(settings, users, items, events, days, rate, project_users, samples)
    except BenchInputError as exc:  # one line before anything starts, not a traceback
        console.print(f"[red]{escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    run_memory_bench(settings, users, items, events, days, rate, project_users, samples, plot, console)
