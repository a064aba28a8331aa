"""`rtrec eval stream`: prequential replay — predict each sampled event before learning from it.

The event file is replayed in time order through the real state store (a
Redis started here). Before a sampled event is applied, its user's state is
read, exactly as the serving worker would read it. The stream after an initial
period is cut into periods of the shortest update interval; each variant
scores a period's sampled events with the model it holds at the period's start
and then (if due) fine-tunes on the period's events — the trainer's own
`build_data` / `fine_tune` / `gate`. Variants: the model frozen after the
initial period, incremental fine-tuning every T for each T given, and the
blending baseline on the same states.
"""

from __future__ import annotations

import csv
import random
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rtrec.model.blending import BlendingRecommender
from rtrec.model.checkpoint import Checkpoint
from rtrec.model.finetune import build_data, fine_tune, gate
from rtrec.model.generator import TorchGenerator, resolve_device
from rtrec.model.histories import extend_histories, newest, user_histories
from rtrec.stream.events import event_from_dict
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import StateStore, UserState

DAY_MS = 86_400_000


@dataclass
class Period:
    events: list[dict[str, Any]] = field(default_factory=list)
    cases: list[tuple[UserState, str]] = field(default_factory=list)  # (state before the event, its item)


def replay_periods(
    events: Sequence[dict[str, Any]],
    settings: Settings,
    client,
    start_ts: int,
    period_ms: int,
    sample: float,
    seed: int,
) -> tuple[list[dict[str, Any]], list[Period]]:
    """Apply events in time order; collect sampled (state, next item) cases per period after `start_ts`."""
    store = StateStore(settings, prefix=f"rt-stream-{uuid.uuid4().hex[:10]}")
    rng = random.Random(seed)
    initial: list[dict[str, Any]] = []
    periods: list[Period] = []
    pending: list = []

    def flush() -> None:
        if pending:
            store.apply(client, pending)
            pending.clear()

    for e in tqdm(events, desc="replay", unit="ev", leave=False):
        ev = event_from_dict({k: v for k, v in e.items() if k != "rating"}, settings, now_ms=e["ts"] + DAY_MS)
        if e["ts"] < start_ts:
            initial.append(e)
        else:
            index = (e["ts"] - start_ts) // period_ms
            while len(periods) <= index:
                periods.append(Period())
            periods[index].events.append(e)
            if rng.random() < sample:
                flush()
                [state] = store.fetch(client, [ev.user_id])
                if state.known:
                    periods[index].cases.append((state, ev.item_id))
        pending.append(ev)
        if len(pending) >= 1000:
            flush()
    flush()
    return initial, periods


def hit_rate(recommender: Any, cases: Sequence[tuple[UserState, str]], k: int = 10) -> float:
    if not cases:
        return float("nan")
    hits = 0
    for start in range(0, len(cases), 256):
        chunk = cases[start : start + 256]
        for (_, target), ranked in zip(chunk, recommender.recommend_batch([s for s, _ in chunk], k)):
            hits += target in {item for item, _ in ranked}
    return hits / len(cases)


def run_stream_eval(
    settings: Settings,
    events: list[dict[str, Any]],
    every: Sequence[float],
    period_days: float,
    initial_frac: float,
    sample: float,
    out_dir: Path,
    console: Any,
) -> list[dict[str, Any]]:
    """HR@10 per period for: frozen, fine-tune every T (days, multiples of `period_days`), blending."""
    events = sorted(events, key=lambda e: e["ts"])
    t0, t1 = events[0]["ts"], events[-1]["ts"]
    start_ts = t0 + int((t1 - t0) * initial_frac)
    period_ms = int(period_days * DAY_MS)
    initial, periods = _replay_in_redis(events, settings, start_ts, period_ms, sample)
    device = resolve_device(settings.device)
    console.print(
        f"{len(events):,} events; initial period {len(initial):,} events; then {len(periods)} periods of "
        f"{period_days:g} days with {sum(len(p.cases) for p in periods):,} sampled predictions"
    )
    first = _frozen_model(initial, settings, device)
    variants: dict[str, dict[str, Any]] = {"frozen": {"ck": first, "every": None}}
    for days in every:
        variants[f"every {days:g} d"] = {"ck": first, "every": max(1, round(days / period_days))}
    blending = BlendingRecommender(settings)
    history = user_histories(initial)
    rows: list[dict[str, Any]] = []
    pending: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for n, period in enumerate(tqdm(periods, desc="periods", unit="period")):
        start_day = round((start_ts + n * period_ms - t0) / DAY_MS, 1)
        rows.append(_score_period(n, start_day, period, variants, blending, settings, device))
        _train_due(n, period, variants, pending, history, settings, device)
        extend_histories(history, period.events)
    _write(rows, list(variants) + ["blending"], out_dir, console)
    return rows


def _replay_in_redis(
    events: list[dict[str, Any]], settings: Settings, start_ts: int, period_ms: int, sample: float
) -> tuple[list[dict[str, Any]], list[Period]]:
    """`replay_periods` through a Redis started for it and stopped after."""
    from rtrec.stream.connections import redis_client
    from rtrec.stream.embedded import start_redis

    with tempfile.TemporaryDirectory(prefix="rtrec-stream-eval-") as tmp:
        server, url = start_redis(settings, Path(tmp), die_with_parent=True)  # an interrupted run leaves none
        try:
            client = redis_client(settings.model_copy(update={"redis_url": url}))
            return replay_periods(events, settings, client, start_ts, period_ms, sample, settings.train_seed)
        finally:
            server.stop()


def _frozen_model(initial: list[dict[str, Any]], settings: Settings, device: Any) -> Checkpoint:
    """A model trained from scratch on the initial period only (no user history counts as context)."""
    first, _ = fine_tune(
        None,
        build_data(initial, {}, [], settings.model_copy(update={"finetune_min_history": 10**9})),
        settings,
        device,
        progress=False,
    )
    first.manifest["version"] = "frozen"
    return first


def _score_period(
    n: int,
    start_day: float,
    period: Period,
    variants: dict[str, dict[str, Any]],
    blending: BlendingRecommender,
    settings: Settings,
    device: Any,
) -> dict[str, Any]:
    """HR@10 of the blending baseline and of each variant's model as it stands at the period's start."""
    row: dict[str, Any] = {
        "period": n,
        "start_day": start_day,
        "cases": len(period.cases),
        "blending": hit_rate(blending, period.cases),
    }
    for name, v in variants.items():
        row[name] = hit_rate(TorchGenerator(v["ck"], device, settings.serve_max_events), period.cases)
    return row


def _train_due(
    n: int,
    period: Period,
    variants: dict[str, dict[str, Any]],
    pending: dict[str, list[dict[str, Any]]],
    history: dict[str, list],
    settings: Settings,
    device: Any,
) -> None:
    """Queue the period's events for each incremental variant; fine-tune those whose interval ends here."""
    for name, v in variants.items():
        if v["every"] is None:
            continue
        pending[name] += period.events
        if (n + 1) % v["every"] == 0 and len(pending[name]) >= 2:
            v["ck"] = _update(v["ck"], pending[name], history, settings, device)
            pending[name] = []


def _update(
    current: Checkpoint, window: list[dict[str, Any]], history: dict[str, list], settings: Settings, device
) -> Checkpoint:
    """One trainer step on a window: context = each user's earlier events, replay = a sample of others."""
    users = {str(e["user_id"]) for e in window}
    context = {u: newest(history.get(u, []), current.max_events) for u in users}
    others = [u for u in history if u not in users]
    rng = random.Random(len(window))
    replay = [
        newest(history[u], current.max_events)
        for u in rng.sample(others, min(settings.finetune_replay_users, len(others)))
    ]
    data = build_data(window, context, replay, settings)
    candidate, _ = fine_tune(current, data, settings, device)
    result = gate(candidate, current, data.holdout, settings.promote_tolerance, device, settings.promote_min_cases)
    return candidate if result.promote else current


def _write(rows: list[dict[str, Any]], names: list[str], out_dir: Path, console: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.table import Table

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "stream-eval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["period"])
        writer.writeheader()
        writer.writerows(rows)
    table = Table(title="prequential HR@10 (sampled events, predicted before they are learned)")
    table.add_column("variant")
    table.add_column("HR@10 (all periods)", justify="right")
    table.add_column("HR@10 (second half)", justify="right")
    half = len(rows) // 2
    for name in names:
        table.add_row(name, f"{_weighted(rows, name):.4f}", f"{_weighted(rows[half:], name):.4f}")
    console.print(table)
    fig, ax = plt.subplots(figsize=(9, 4))
    for name in names:
        ax.plot([r["start_day"] for r in rows], [r[name] for r in rows], label=name, marker=".")
    ax.set(
        xlabel="stream day (period start)",
        ylabel="HR@10 (0-1, higher is better)",
        title="Prequential HR@10 over the stream (each event predicted before it is learned)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "stream-eval.png", dpi=110)
    plt.close(fig)
    console.print(f"table: {out_dir / 'stream-eval.csv'}  chart: {out_dir / 'stream-eval.png'}")


def _weighted(rows: list[dict[str, Any]], name: str) -> float:
    cases = sum(r["cases"] for r in rows if r[name] == r[name])
    return sum(r[name] * r["cases"] for r in rows if r[name] == r[name]) / cases if cases else float("nan")
