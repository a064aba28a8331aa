"""`rtrec recommend`, `similar`, `state`, `dlq`, `lag` and `quality`: ask the running stack how it is doing.

Each reads what the workers keep (Redis, committed offsets) or sends one request; none changes state.
"""

from __future__ import annotations

import json
import time
from typing import Any

import typer
from rich.table import Table

from rtrec.stream.settings import get_settings
from rtrec.workers.cli.errors import UserError
from rtrec.workers.cli.running_stack import connected_settings
from rtrec.workers.cli.terminal import console, error_line

_CATEGORY_HELP = "only items of this category (repeatable)"
_EXCLUDE_CATEGORY_HELP = "never items of this category (repeatable)"
_EXCLUDE_ITEM_HELP = "never this item (repeatable)"


def recommend(
    user: str = typer.Argument(..., help="user_id"),
    k: int = typer.Option(10, "-k", min=1, help="how many items (1 to RTREC_MAX_K)"),
    include_seen: bool = typer.Option(False, help="allow items the user already interacted with"),
    candidates: str | None = typer.Option(
        None, "--candidates", help="rank only these items, comma-separated (a,b,c; at most RTREC_MAX_CANDIDATES)"
    ),
    category: list[str] | None = typer.Option(None, "--category", help=_CATEGORY_HELP),
    exclude_category: list[str] | None = typer.Option(None, "--exclude-category", help=_EXCLUDE_CATEGORY_HELP),
    exclude_item: list[str] | None = typer.Option(None, "--exclude-item", help=_EXCLUDE_ITEM_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the raw response"),
    timeout: float = typer.Option(30.0, min=0.1, help="seconds to wait for the answer"),
) -> None:
    """Send a recommendation request and print its response. Exit 1 on an error response."""
    wire: dict[str, Any] = {"user_id": user}
    if candidates is not None:
        wire["candidates"] = _candidate_list(candidates)
    _ask(wire, k, include_seen, _filter(category, exclude_category, exclude_item), as_json, timeout)


def similar(
    item: str = typer.Argument(..., help="item_id: recommend items like this one"),
    user: str | None = typer.Option(None, "--user", help="user_id, for personal context (optional)"),
    k: int = typer.Option(10, "-k", min=1, help="how many items (1 to RTREC_MAX_K)"),
    include_seen: bool = typer.Option(False, help="allow items the user already interacted with"),
    category: list[str] | None = typer.Option(None, "--category", help=_CATEGORY_HELP),
    exclude_category: list[str] | None = typer.Option(None, "--exclude-category", help=_EXCLUDE_CATEGORY_HELP),
    exclude_item: list[str] | None = typer.Option(None, "--exclude-item", help=_EXCLUDE_ITEM_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the raw response"),
    timeout: float = typer.Option(30.0, min=0.1, help="seconds to wait for the answer"),
) -> None:
    """Ask for the items most similar to ITEM and print the response. Exit 1 on an error response."""
    wire: dict[str, Any] = {"item_id": item}
    if user is not None:
        wire["user_id"] = user
    title = f"similar to {item}" + (f" for user {user}" if user else "")
    _ask(wire, k, include_seen, _filter(category, exclude_category, exclude_item), as_json, timeout, title)


def _candidate_list(text: str) -> list[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise UserError("--candidates: no item ids; give them comma-separated, e.g. --candidates i1,i2,i3")
    return ids


def _filter(category: list[str] | None, exclude_category: list[str] | None, exclude_item: list[str] | None) -> dict:
    given = {"categories": category, "exclude_categories": exclude_category, "exclude_items": exclude_item}
    return {key: values for key, values in given.items() if values}


def _ask(
    wire: dict[str, Any],
    k: int,
    include_seen: bool,
    filter_: dict[str, list[str]],
    as_json: bool,
    timeout: float,
    title: str | None = None,
) -> None:
    """Check the request as the worker will (a mistake is one line before any connection), send it, print the
    answer; exit 1 on an error response."""
    from rtrec.stream.events import InvalidEvent
    from rtrec.stream.rec_client import RecClient
    from rtrec.stream.rec_messages import parse_request

    limits = get_settings()
    if k > limits.max_k:
        raise UserError(f"-k {k}: more than RTREC_MAX_K ({limits.max_k}); ask for fewer items")
    wire = {"request_id": "cli", **wire, "k": k, "exclude_seen": not include_seen}
    if filter_:
        wire["filter"] = filter_
    try:
        request = parse_request(json.dumps(wire).encode(), limits)
    except InvalidEvent as exc:
        raise UserError(f"invalid request ({exc.reason}): {exc.detail}") from None
    settings = connected_settings()
    with RecClient(settings) as client:
        try:
            resp = client.recommend(
                request.user_id,
                k=request.k,
                exclude_seen=request.exclude_seen,
                timeout_s=timeout,
                item_id=request.item_id,
                candidates=request.candidates,
                filter=request.filter,
            )
        except TimeoutError as exc:
            raise UserError(f"{exc}; is a recommendation worker running (`rtrec status`)?", code=1) from None
    if as_json:
        print(json.dumps(resp, indent=2))
    else:
        print_response(resp, title)
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
    """Online hit rate per model version: responses whose items the user then browsed/clicked/bought.

    With an A/B split, also per arm with a 95 % (Wilson) interval; when the intervals separate it names the
    winner and prints the `rtrec model promote` command for it."""
    from rtrec.model.store import CheckpointStore
    from rtrec.stream.connections import redis_client
    from rtrec.stream.keys import QUALITY
    from rtrec.workers.quality import arm_hit_rates, hit_rates

    settings = connected_settings()
    raw = redis_client(settings).hgetall(QUALITY)
    rates = hit_rates(raw)
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
    arms = arm_hit_rates(raw)
    if any(arm == "candidate" for arm, _ in arms):
        _print_arms(arms, current, settings.ab_candidate)


def _print_arms(arms: dict, current: str | None, candidate: str | None) -> None:
    """The A/B table, and the verdict: the winner and its promote command, or why there is none yet."""
    from rtrec.workers.quality import arm_rows, arm_winner

    table = Table(title="A/B split: hit rate per arm (95 % Wilson interval)")
    for col in ("arm", "model version", "responses", "hits", "hit rate", "95 % interval"):
        table.add_column(col, justify="left" if col in ("arm", "model version") else "right")
    for (arm, version), r in arms.items():
        interval = f"{r['low']:.4f} - {r['high']:.4f}"
        table.add_row(arm, version, str(int(r["served"])), str(int(r["hits"])), f"{r['hit_rate']:.4f}", interval)
    console.print(table)
    rows = arm_rows(arms, current, candidate)
    winner = arm_winner(arms, current, candidate)
    judged = ", ".join(f"{arm} {version} ({int(r['served'])} responses)" for arm, (version, r) in sorted(rows.items()))
    if winner is None:
        print(f"no winner yet: the intervals of {judged} overlap; keep the split running", flush=True)
        return
    arm, version = winner
    print(f"winner: {arm} {version} (its interval is above the other arm's; judged {judged})", flush=True)
    print(f"promote it: rtrec model promote {version}", flush=True)
    already = " (it is CURRENT already)" if version == current else ""
    print(f"then end the split{already}: unset RTREC_AB_CANDIDATE and restart the recommend workers", flush=True)
