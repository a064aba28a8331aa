"""`rtrec generate`, `produce`, `replay`, `catalog` and `rebuild-state`: events and items into the stack.

Files are checked before anything connects; a line that is not a valid event is counted and reported,
never sent, and a run that rejected any exits 1 (130 after Ctrl-C).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from rtrec.workers.cli.running_stack import connected_settings
from rtrec.workers.cli.terminal import console, error_line


def generate(
    out: Path = typer.Argument(..., help="output file (.jsonl/.csv, optionally .gz)"),
    events: int = typer.Option(20_000, help="number of events"),
    users: int = typer.Option(300),
    items: int = typer.Option(1000),
    clusters: int = typer.Option(20),
    days: float = typer.Option(14.0, help="event-time span"),
    seed: int = typer.Option(7),
    sample: bool = typer.Option(False, help="write the bundled demo sample instead"),
    catalog: Path | None = typer.Option(
        None, help="also write the items as a catalog CSV (item_id,category,available,price) for `rtrec catalog`"
    ),
) -> None:
    """Write deterministic synthetic events (tastes, Zipf popularity, funnels, drifting trends)."""
    from rtrec.stream.eventfile import write_events
    from rtrec.stream.sample import SAMPLE_CONFIG
    from rtrec.stream.synthetic import SyntheticConfig, generate_events

    cfg = (
        SAMPLE_CONFIG
        if sample
        else SyntheticConfig(
            n_users=users,
            n_items=items,
            n_clusters=clusters,
            n_events=events,
            duration_ms=int(days * 86_400_000),
            seed=seed,
        )
    )
    n = write_events(out, generate_events(cfg))
    console.print(f"wrote {n} events to {out}")
    if catalog is not None:
        import csv

        from rtrec.stream.synthetic import item_catalog

        rows = item_catalog(cfg)
        with open(catalog, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["item_id", "category", "available", "price"])
            writer.writerows([r["item_id"], f"c{r['cluster']}", "true", r["price"]] for r in rows)
        console.print(f"wrote {len(rows)} items to {catalog}")


def produce(
    user: str | None = typer.Option(None, help="user_id (one event from options)"),
    item: str | None = typer.Option(None, help="item_id"),
    type: str = typer.Option("click", "--type", help="browse | click | purchase"),
    ts: int | None = typer.Option(None, help="event time, ms since epoch (default now)"),
    event_id: str | None = typer.Option(None, help="default: a new uuid"),
    file: Path | None = typer.Option(None, help="JSON lines / CSV file; '-' or no options: stdin"),
) -> None:
    """Send one event from options, or JSON lines from stdin/a file. Invalid events are reported, not sent."""
    import uuid

    from rtrec.stream.eventfile import read_numbered_events
    from rtrec.stream.events import InvalidEvent
    from rtrec.stream.producer import EventProducer
    from rtrec.stream.replay import ReplayReport, replay_events

    settings = connected_settings()
    with EventProducer(settings) as producer:
        if user is not None or item is not None:
            event = {
                "event_id": event_id or uuid.uuid4().hex,
                "user_id": user,
                "item_id": item,
                "type": type,
                "ts": ts if ts is not None else int(time.time() * 1000),
            }
            try:
                producer.send(event)
            except InvalidEvent as exc:
                console.print(f"[red]invalid event: {exc}")
                error_line(f"invalid event: {exc}")
                raise typer.Exit(1) from None
            console.print(f"sent {json.dumps(event)}")
            return
        report = ReplayReport()
        if file is not None and str(file) != "-":
            lines = read_numbered_events(file, on_error=lambda n, msg: report.reject("unparseable", n))
        else:
            lines = _stdin_events(report)
        replay_events(producer, lines, progress=False, numbered=True, report=report)
    _finish_replay(report)


def _stdin_events(report):
    """(line number, object) for each JSON line on stdin; unparseable lines are rejected, not fatal."""
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            report.reject("malformed_json", n)


def _finish_replay(report) -> None:
    """'sent N, rejected M' on stdout; exit 1 when M > 0 (with one line on stderr), 130 after Ctrl-C."""
    console.print(
        report.summary() + (f" in {report.seconds:.1f}s ({report.rate:,.0f}/s)" if report.seconds else ""),
        soft_wrap=True,
        markup=False,
    )
    if report.interrupted:
        error_line(f"interrupted: {report.summary()} before Ctrl-C")
        raise typer.Exit(130)
    if report.rejected:
        error_line(f"{report.rejected} invalid event(s) not sent: {report.summary()}")
        raise typer.Exit(1)


def replay(
    file: Path = typer.Argument(..., help="JSON lines or CSV event file (optionally .gz)"),
    rate: float = typer.Option(0.0, help="events per second (0 = as fast as possible)"),
    speedup: float = typer.Option(0.0, help="replay event-time gaps divided by this (0 = ignore event time)"),
    shift_to_now: bool = typer.Option(False, help="shift timestamps so the last event is 'now'"),
) -> None:
    """Replay an event file onto the events topic with a progress bar. Lines that are not valid events are
    reported (count, first line numbers) and not sent; the others are. Exit 1 if any was rejected."""
    import itertools

    from rtrec.stream.eventfile import count_records, read_numbered_events
    from rtrec.stream.producer import EventProducer
    from rtrec.stream.replay import ReplayReport, replay_events

    report = ReplayReport()
    lines = read_numbered_events(file, on_error=lambda n, msg: report.reject("unparseable", n))
    first = list(itertools.islice(lines, 1))  # the file's format, header and compression are checked here
    settings = connected_settings()
    show = sys.stderr.isatty()
    # the bar's total (for its ETA): the file's non-blank lines, counted without parsing (~0.1 s per 50 MB)
    total = count_records(file) if show else None
    shift = 0
    if shift_to_now:
        stamps = [
            e["ts"] for _, e in read_numbered_events(file, on_error=lambda n, msg: None) if isinstance(e.get("ts"), int)
        ]
        shift = int(time.time() * 1000) - 60_000 - max(stamps) if stamps else 0
    with EventProducer(settings) as producer:
        replay_events(
            producer,
            itertools.chain(first, lines),
            rate=rate,
            speedup=speedup,
            total=total,
            ts_shift_ms=shift,
            numbered=True,
            report=report,
            progress=show,
        )
    _finish_replay(report)


def catalog(
    file: Path = typer.Argument(..., help="JSON lines/CSV with item_id and any of category, available, title, price"),
) -> None:
    """Load the item catalog into Redis: categories (filters, diversity), availability, title and price.

    The file is checked before connecting (a bad row is named by line); items beyond
    RTREC_CATALOG_MAX_ITEMS are refused, reported, and the command exits 1."""
    from rtrec.stream.catalog import read_catalog, store_catalog
    from rtrec.stream.connections import redis_client

    entries = read_catalog(file)  # the file is checked before connecting
    settings = connected_settings()
    client = redis_client(settings)
    try:
        refusals = store_catalog(client, entries, settings)
    finally:
        client.close()
    latest = {e.item_id: e for e, refused in zip(entries, refusals) if refused is None}
    unavailable = sum(e.available is False for e in latest.values())
    console.print(f"loaded {len(latest)} items ({unavailable} unavailable)")
    refused = {e.item_id for e, reason in zip(entries, refusals) if reason is not None}
    if refused:
        error_line(
            f"{len(refused)} new items refused: the catalog is full "
            f"(RTREC_CATALOG_MAX_ITEMS={settings.catalog_max_items})"
        )
        raise typer.Exit(1)


def rebuild_state(
    since_hours: float = typer.Option(
        0.0,
        min=0.0,
        help="build the state from the events the broker received in the last H hours only; "
        "state from older events is dropped (0: the whole topic)",
    ),
) -> None:
    """Rebuild Redis state from the events topic (after Redis lost data) into a fresh namespace, then switch to it
    atomically; gives the same state whether or not Redis still holds any. Other keys (logs, metrics, models) stay."""
    from rich.markup import escape
    from tqdm import tqdm

    from rtrec.stream.rebuild import RebuildError, rebuild

    settings = connected_settings()
    try:
        with tqdm(unit="rec", desc="rebuild") as bar:
            report = rebuild(settings, since_ms=int(since_hours * 3_600_000) or None, progress=bar.update)
    except RebuildError as exc:  # unreachable broker or Redis, a rebuild already running: one line, not a traceback
        console.print(f"[red]{escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(escape(report.summary()), soft_wrap=True)
