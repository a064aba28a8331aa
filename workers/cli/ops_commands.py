"""`rtrec recommend`, `state`, `dlq`, `lag` and `quality`: ask the running stack how it is doing.

Each reads what the workers keep (Redis, committed offsets) or sends one request; none changes state.
"""

from __future__ import annotations

import json
import time

import typer
from rich.table import Table

from rtrec.stream.settings import get_settings
from rtrec.workers.cli.errors import UserError
from rtrec.workers.cli.running_stack import connected_settings
from rtrec.workers.cli.terminal import console, error_line


def recommend(
    user: str = typer.Argument(..., help="user_id"),
    k: int = typer.Option(10, "-k", min=1, help="how many items (1 to RTREC_MAX_K)"),
    include_seen: bool = typer.Option(False, help="allow items the user already interacted with"),
    as_json: bool = typer.Option(False, "--json", help="print the raw response"),
    timeout: float = typer.Option(30.0, min=0.1, help="seconds to wait for the answer"),
) -> None:
    """Send a recommendation request and print its response. Exit 1 on an error response."""
    from rtrec.stream.rec_client import RecClient

    if k > get_settings().max_k:
        raise UserError(f"-k {k}: more than RTREC_MAX_K ({get_settings().max_k}); ask for fewer items")
    settings = connected_settings()
    with RecClient(settings) as client:
        try:
            resp = client.recommend(user, k=k, exclude_seen=not include_seen, timeout_s=timeout)
        except TimeoutError as exc:
            raise UserError(f"{exc}; is a recommendation worker running (`rtrec status`)?", code=1) from None
    if as_json:
        print(json.dumps(resp, indent=2))
    else:
        print_response(resp)
    if resp.get("error"):
        error_line(f"the recommendation worker answered with an error: {resp['error']}")
        raise typer.Exit(1)


def print_response(resp: dict, title: str | None = None) -> None:
    table = Table(
        title=title
        or f"user {resp.get('user_id')}  model {resp.get('model_version')}  "
        f"latency {resp.get('latency_ms') or 0:.1f} ms{'  (fallback)' if resp.get('fallback') else ''}"
    )
    table.add_column("#", justify="right")
    table.add_column("item")
    table.add_column("score", justify="right")
    table.add_column("reason")
    for n, it in enumerate(resp.get("items") or [], 1):
        table.add_row(str(n), it["item_id"], f"{it['score']:.3f}", it.get("reason", ""))
    if resp.get("error"):
        console.print(f"[red]error: {resp['error']}")
    console.print(table)


def state(user: str = typer.Argument(..., help="user_id")) -> None:
    """Print a user's state as stored in Redis."""
    from rtrec.stream.connections import redis_client
    from rtrec.stream.state_store import StateStore

    settings = connected_settings()
    [st] = StateStore(settings).fetch(redis_client(settings), [user])
    console.print(f"user {user}: counts {st.counts}, first_ts {st.first_ts}, last_ts {st.last_ts}")
    console.print(f"recent: {[(e.type, e.item_id) for e in st.sequence[-10:]]}")
    top = sorted(st.affinities.items(), key=lambda kv: -kv[1])[:10]
    console.print(f"affinities: {[(i, round(a, 3)) for i, a in top]}")
    console.print(f"purchased: {sorted(st.purchased)}")


def dlq() -> None:
    """Dead-lettered messages counted so far, by reason."""
    from rtrec.stream.connections import redis_client
    from rtrec.workers.dead_letters import dlq_counts

    counts = dlq_counts(redis_client(connected_settings()))
    console.print(counts or "no dead letters")


def _lag_table(rows, problems, silent: list[str] | None = None) -> Table:
    from rich.markup import escape

    from rtrec.workers.lag import summarize

    table = Table(title=f"consumer lag at {time.strftime('%H:%M:%S')}")
    for col in ("group", "topic", "partition", "committed", "end", "lag", "lag s"):
        table.add_column(col, justify="right" if col not in ("group", "topic") else "left")
    for r in rows:
        table.add_row(
            escape(r.group),
            escape(r.topic),
            str(r.partition),
            "-" if r.committed is None else str(r.committed),
            str(r.end),
            str(r.lag),
            f"{r.lag_seconds:.1f}",
        )
    for group, g in summarize(rows).items():
        table.add_row(f"[b]{escape(group)}", "all", "", "", "", f"[b]{int(g['lag'])}", f"[b]{g['max_lag_seconds']:.1f}")
    notes = [f"[red]{escape('; '.join(problems))}"] if problems else []
    quiet = [g for g in silent or [] if g not in {r.group for r in rows}]
    if quiet:  # a --group that committed nothing (or a typo) would otherwise just be missing
        notes.append(f"[yellow]no committed offsets: {escape(', '.join(quiet))}")
    table.caption = "\n".join(notes) or None
    return table


def _lag_report(
    monitor, watch: float, as_json: bool, max_lag: int | None, max_lag_seconds: float | None, silent: list[str]
) -> list[str]:
    """Measure, print (once, as JSON, or refreshed every `watch` s); returns the last breaches."""
    from rich.live import Live

    from rtrec.workers.lag import breaches, summarize

    rows = monitor.measure()
    problems = breaches(rows, max_lag, max_lag_seconds)
    if watch > 0:
        with Live(_lag_table(rows, problems, silent), console=console, refresh_per_second=4) as live:
            try:
                while True:
                    time.sleep(watch)
                    rows = monitor.measure()
                    problems = breaches(rows, max_lag, max_lag_seconds)
                    live.update(_lag_table(rows, problems, silent))
            except KeyboardInterrupt:
                pass
    elif as_json:
        print(json.dumps({"partitions": [r.to_dict() for r in rows], "groups": summarize(rows), "breaches": problems}))
    else:
        console.print(_lag_table(rows, problems, silent))
    return problems


def lag(
    watch: float = typer.Option(0.0, help="refresh every this many seconds (0: print once)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    max_lag: int | None = typer.Option(None, help="exit 1 when a group is more messages behind"),
    max_lag_seconds: float | None = typer.Option(None, help="exit 1 when a group is more seconds behind"),
    group: list[str] | None = typer.Option(
        None, "--group", help="also measure this consumer group, on the topics it committed on (repeatable)"
    ),
) -> None:
    """Consumer lag of every rtrec group (state, recommend, trainer, quality) and any --group, per partition,
    in messages and seconds. Exit 0: within bounds; 1: a group above a threshold; 2: the broker could not be asked."""
    from rtrec.workers.lag import LagError, LagMonitor

    extra = group or []
    try:
        with LagMonitor(connected_settings(), extra_groups=extra) as monitor:
            problems = _lag_report(monitor, watch, as_json, max_lag, max_lag_seconds, extra)
    except LagError as exc:  # unreachable broker, refused credentials: one line, not a traceback
        raise UserError(str(exc)) from None
    if problems:
        raise typer.Exit(1)


def quality() -> None:
    """Online hit rate per model version: responses whose items the user then browsed/clicked/bought."""
    from rtrec.model.store import CheckpointStore
    from rtrec.stream.connections import redis_client
    from rtrec.stream.keys import QUALITY
    from rtrec.workers.quality import hit_rates

    settings = connected_settings()
    rates = hit_rates(redis_client(settings).hgetall(QUALITY))
    current = CheckpointStore(settings.checkpoint_dir).current_version()
    table = Table(title=f"online hit rate (window {settings.quality_window_s:g} s)")
    for col in ("", "model version", "served", "hits", "hit rate"):
        table.add_column(col, justify="right" if col in ("served", "hits", "hit rate") else "left")
    for version, r in sorted(rates.items()):
        table.add_row(
            "*" if version == current else "",
            version,
            str(int(r["served"])),
            str(int(r["hits"])),
            f"{r['hit_rate']:.4f}",
        )
    console.print(table)
