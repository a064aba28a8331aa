"""`rtrec bench ...`: benchmarks that print figures (not tests); each runs a module of rtrec.workers.bench.

The bench modules import torch, matplotlib and the stack: they are imported when their command runs,
so `rtrec --help` stays fast.
"""

from __future__ import annotations

from enum import Enum
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


class StackMode(str, Enum):
    minimal = "minimal"
    up = "up"


DEFAULT_PLOTS = {StackMode.minimal: Path("bench-generate.png"), StackMode.up: Path("bench-generate-up.png")}


@bench_app.command("generate")
def bench_generate(
    stack: StackMode = typer.Option(
        StackMode.minimal,
        "--stack",
        help="minimal: batch timings, then one state + one recommendation worker serving a default-size model at "
        "--rate; up: the stack as `rtrec up` runs it (trainer, ops, events flowing), swept over --rates",
    ),
    batches: str = typer.Option("1,8,32,128", help="--stack minimal: batch sizes to time"),
    forms: str = typer.Option(
        "topk",
        help="--stack minimal: request forms to time in turn at --rate (topk, similar, candidates: 100 of them, "
        "filter: 3 of 20 categories); topk is the baseline of the ratios",
    ),
    rate: float = typer.Option(200.0, help="--stack minimal: requests/s for the over-Kafka latency run"),
    seconds: float = typer.Option(10.0, help="duration of the over-Kafka run (--stack up: of each rate)"),
    rates: str = typer.Option(
        "100,200,500,1000,2000",
        help="--stack up: requests/s to sweep, lowest first; stops after the first whose p99 passes 200 ms",
    ),
    event_rate: float = typer.Option(1000.0, help="--stack up: events/s flowing during the whole measurement"),
    runs: int = typer.Option(1, help="--stack up: sweeps on the same stack; the per-rate median is reported"),
    serve: str = typer.Option(
        "model",
        help="--stack up: model = a default-size generative model is CURRENT (fused with the baseline, as served "
        "once a model is trained); blend = no checkpoint (what `rtrec up` serves before the first training)",
    ),
    plot: Path | None = typer.Option(
        None,
        help="PNG (default bench-generate.png; --stack up: bench-generate-up.png, figures in the same name .json)",
    ),
) -> None:
    """recs/s and per-batch latency of the default model on this machine, and request->response over Kafka;
    with --stack up, latency, freshness and CPU per process vs request rate on the full stack."""
    from rich.markup import escape

    from rtrec.workers.bench.serving import BenchInputError, check_inputs

    try:
        rate_list = check_inputs(rates, seconds, event_rate, runs)
        if stack is StackMode.minimal and not rate > 0:
            raise BenchInputError("bench generate: need --rate > 0")
        form_list = tuple(f.strip() for f in forms.split(",") if f.strip())
        unknown = [f for f in form_list if f not in ("topk", "similar", "candidates", "filter")]
        if unknown or not form_list:
            raise BenchInputError(
                f"bench generate: --forms takes topk, similar, candidates, filter (comma-separated), not {forms!r}"
            )
        if serve not in ("model", "blend"):
            raise BenchInputError(f"bench generate: --serve must be 'model' or 'blend', not {serve!r}")
    except BenchInputError as exc:  # one line before anything starts, not a traceback
        console.print(f"[red]{escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    plot = plot or DEFAULT_PLOTS[stack]
    if stack is StackMode.up:
        from rtrec.workers.bench.serving import run_serving_bench

        run_serving_bench(
            get_settings(), rate_list, seconds, event_rate, runs, plot, console, serve_model=serve == "model"
        )
        return
    from rtrec.workers.bench.generate import run_bench

    run_bench(get_settings(), [int(b) for b in batches.split(",")], rate, seconds, plot, console, form_list)


@bench_app.command("idle")
def bench_idle(
    seconds: float = typer.Option(20.0, help="how long to measure, after all workers are ready and 3 s of settling"),
) -> None:
    """CPU of every process of the stack `rtrec up` runs (workers, broker, Redis) with no traffic, in % of one
    core, and their total (target: under 10 %)."""
    from rich.markup import escape

    from rtrec.workers.bench.serving import BenchInputError, check_idle_inputs, run_idle

    try:
        check_idle_inputs(seconds)
    except BenchInputError as exc:
        console.print(f"[red]{escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    run_idle(get_settings(), seconds, console)


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


@bench_app.command("freshness")
def bench_freshness(
    rate: float = typer.Option(1000.0, help="events/s, stamped with the wall clock as sent"),
    seconds: float = typer.Option(300.0, help="duration of the load"),
    request_rate: float = typer.Option(20.0, help="steady requests/s during the load"),
    plot: Path | None = typer.Option(
        Path("bench-freshness.png"), help="freshness-over-time PNG (figures in the same name .json)"
    ),
) -> None:
    """Model freshness on the stack `rtrec up` runs (trainer included) under steady events and requests: now -
    the newest event the served model learned from, p50/p99/max; trainer cycles; requests sent/answered/failed."""
    from rich.markup import escape

    from rtrec.workers.bench.freshness import BenchInputError, check_inputs, run_freshness_bench

    try:
        check_inputs(rate, seconds, request_rate)
    except BenchInputError as exc:  # one line before anything starts, not a traceback
        console.print(f"[red]{escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    result = run_freshness_bench(get_settings(), rate, seconds, request_rate, plot, console)
    if result["requests"]["failed"] or result["requests"]["unanswered"]:
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


@bench_app.command("new-items")
def bench_new_items(
    events: int = typer.Option(20_000, help="synthetic events (the first half trains the model)"),
    items: int = typer.Option(1000, help="synthetic items (categories: one per 50 items)"),
    holdout: float = typer.Option(0.1, help="share of the second half's items held out of the first half"),
    sample: float = typer.Option(0.15, help="share of the second half's first-touch events ranked"),
    k: int = typer.Option(10, help="recommendations per ranking"),
    seed: int = typer.Option(7, help="which items are held out, which events are sampled"),
    plot: Path | None = typer.Option(
        Path("bench-new-items.png"), help="bar chart PNG (figures in the same name .json)"
    ),
) -> None:
    """Items new after training: their share of recommendations and hit rate, today vs rows given while serving."""
    from rtrec.workers.bench.new_items import run_bench

    if not 0 < holdout < 1 or not 0 < sample <= 1 or k < 1 or events < 1000:
        console.print("[red]need 0 < --holdout < 1, 0 < --sample <= 1, --k >= 1, --events >= 1000[/red]")
        raise typer.Exit(2)
    run_bench(get_settings(), events, items, holdout, sample, k, seed, plot, console)
