"""`rtrec bench new-items`: items that appear only after the served model was trained, today vs with rows.

A synthetic stream (catalog clusters stored as categories) is cut at its midpoint in time. A share of
the items that occur in the second half is held out of the first half (their events there dropped),
a small model is trained on the first half, and the whole stream is replayed in time order through
the real state store (a Redis started here). At sampled events of the second half where the user
meets an item for the first time, the user (state read before the event, as served) is ranked
through the `RankingPipeline` by each variant:

    today     `serve_new_item_rows` off: a new item has no vocabulary row, the model never ranks it
    rows      on: the pipeline gives new items rows as it sees them (model/new_items.py)

each fused with the blending baseline as served (`serve_blend_weight`, default 0.5) and with the
model alone (weight 0). Reported: the share of the top-k slots that are new items, HR@k on the
events whose item is a new one, HR@k on all sampled events (a regression elsewhere shows there),
the rows given, and the mean time of a rank call. "rows: mean" initialises a row with its peers'
plain mean embedding, "rows" with that mean scaled to the peers' mean norm (the default).
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rtrec.stream.settings import Settings

DAY_MS = 86_400_000


@dataclass
class Variant:
    name: str
    pipeline: Any
    slots: int = 0
    new_slots: int = 0
    hits: int = 0
    new_cases: int = 0  # sampled events whose item is a new one
    new_hits: int = 0
    seconds: float = 0.0
    calls: int = 0
    registered: list[str] = field(default_factory=list)


def run_bench(
    settings: Settings,
    events: int,
    items: int,
    holdout: float,
    sample: float,
    k: int,
    seed: int,
    plot: Path | None,
    console: Console,
) -> dict[str, Any]:
    from rtrec.stream.synthetic import SyntheticConfig, generate_events, item_cluster_map

    cfg = SyntheticConfig(n_users=max(50, events // 60), n_items=items, n_clusters=max(2, items // 50), n_events=events)
    stream = generate_events(cfg)
    clusters = item_cluster_map(cfg)
    mid = stream[0]["ts"] + (stream[-1]["ts"] - stream[0]["ts"]) // 2
    later = sorted({e["item_id"] for e in stream if e["ts"] >= mid})
    rng = random.Random(seed)
    new = set(rng.sample(later, int(len(later) * holdout)))
    replay = [e for e in stream if e["ts"] >= mid or e["item_id"] not in new]
    first = [e for e in replay if e["ts"] < mid]
    console.print(
        f"{len(stream):,} synthetic events, {items} items in {cfg.n_clusters} categories; {len(new)} items "
        f"({holdout:.0%} of the second half's) held out of the first half; training on {len(first):,} events"
    )
    s = settings.model_copy(
        update=dict(
            kafka_bootstrap=None,
            model_family="llama",
            model_layout="item",
            model_hidden=64,
            model_heads=2,
            model_layers=1,
            model_intermediate=128,
            model_max_events=20,
            serve_max_events=20,
            model_item_capacity=items,
            train_epochs=2,
        )
    )
    started = time.perf_counter()
    path = _train(first, s)
    console.print(f"trained in {time.perf_counter() - started:.0f} s; replaying through Redis")
    with tempfile.TemporaryDirectory(prefix="rtrec-bench-new-items-") as tmp:
        from rtrec.stream.embedded import start_redis

        server, url = start_redis(s, Path(tmp), die_with_parent=True)  # an interrupted bench leaves none
        try:
            s = s.model_copy(update={"redis_url": url})
            variants = asyncio.run(_replay(replay, mid, new, clusters, path, s, sample, k, seed))
        finally:
            server.stop()
    figures = _report(variants, new, k, console)
    if plot is not None:
        _plot(figures, k, plot)
        plot.with_suffix(".json").write_text(json.dumps(figures, indent=2))
        console.print(f"wrote {plot} and {plot.with_suffix('.json')}")
    return figures


def _train(first: list[dict[str, Any]], s: Settings) -> Path:
    import torch

    from rtrec.model.checkpoint import save_checkpoint
    from rtrec.model.histories import user_histories
    from rtrec.model.pipeline import model_meta
    from rtrec.model.sequence_model import build_model
    from rtrec.model.train import train_model, vocab_for

    hist = list(user_histories(first).values())
    vocab = vocab_for(hist, s)
    torch.manual_seed(s.train_seed)
    model = build_model(s, vocab)
    train_model(model, vocab, hist, s, torch.device("cpu"), progress=False)
    return save_checkpoint(model, vocab, Path(tempfile.mkdtemp(prefix="rtrec-bench-ck-")), model_meta(s))


async def _replay(
    replay: list[dict[str, Any]],
    mid: int,
    new: set[str],
    clusters: dict[str, int],
    path: Path,
    s: Settings,
    sample: float,
    k: int,
    seed: int,
) -> list[Variant]:
    from rtrec.model.generator import TorchGenerator
    from rtrec.model.ranking import RankingPipeline, RankQuery
    from rtrec.stream.connections import async_redis_client
    from rtrec.stream.events import event_from_dict
    from rtrec.stream.keys import ITEM_CATEGORY
    from rtrec.stream.state_store import StateStore

    redis = async_redis_client(s)
    store = StateStore(s, prefix=f"rt-bench-new-{uuid.uuid4().hex[:8]}")
    await redis.hset(ITEM_CATEGORY, mapping={item: f"c{c}" for item, c in clusters.items()})
    variants = []
    for blend, rows in [(s.serve_blend_weight, r) for r in ("today", "rows: mean", "rows")] + [
        (0.0, r) for r in ("today", "rows")
    ]:
        vs = s.model_copy(update={"serve_new_item_rows": rows != "today", "serve_blend_weight": blend})
        gen = TorchGenerator.from_path(path, device="cpu", max_events=s.serve_max_events)
        pipeline = RankingPipeline(vs, gen, store=store)
        pipeline.new_items.match_norm = rows == "rows"  # "rows: mean": the peers' plain mean
        variants.append(Variant(f"{rows}, {'fused' if blend else 'model alone'}", pipeline))
    rng = random.Random(seed)
    seen: dict[str, set[str]] = {}
    pending: list[Any] = []
    try:
        for e in replay:
            user, item = e["user_id"], e["item_id"]
            first_touch = item not in seen.setdefault(user, set())
            seen[user].add(item)
            if e["ts"] >= mid and first_touch and len(seen[user]) > 1 and rng.random() < sample:
                if pending:
                    await store.apply_async(redis, pending)
                    pending.clear()
                query = RankQuery(user, k)
                for v in variants:
                    started = time.perf_counter()
                    [ranking] = await v.pipeline.rank(redis, [query])
                    v.seconds += time.perf_counter() - started
                    v.calls += 1
                    top = [rec.item_id for rec in ranking.items]
                    v.slots += len(top)
                    v.new_slots += sum(i in new for i in top)
                    v.hits += item in top
                    v.new_cases += item in new
                    v.new_hits += item in top and item in new
            ev = {key: value for key, value in e.items() if key != "rating"}
            pending.append(event_from_dict(ev, s, now_ms=e["ts"] + DAY_MS))
            if len(pending) >= 1000:
                await store.apply_async(redis, pending)
                pending.clear()
    finally:
        await redis.aclose()
    for v in variants:
        served = v.pipeline.new_items.served
        v.registered = list(served.registered) if served is not None else []
    return variants


def _report(variants: list[Variant], new: set[str], k: int, console: Console) -> dict[str, Any]:
    cases = variants[0].calls
    new_cases = variants[0].new_cases
    table = Table(title=f"New items: {cases} sampled first-touch events, {new_cases} of them a new item")
    for column in (
        "variant",
        f"new items in top-{k} slots",
        f"HR@{k} on new items",
        f"HR@{k} overall",
        "rows given",
        "ms per rank call",
    ):
        table.add_column(column, justify="right" if column != "variant" else "left")
    rows = []
    for v in variants:
        row = {
            "variant": v.name,
            "new_slot_share": v.new_slots / max(v.slots, 1),
            "hr_new": v.new_hits / max(new_cases, 1),
            "hr_all": v.hits / max(cases, 1),
            "rows_given": len(v.registered),
            "rows_given_new": sum(i in new for i in v.registered),
            "ms_per_call": 1000 * v.seconds / max(v.calls, 1),
        }
        rows.append(row)
        table.add_row(
            v.name,
            f"{row['new_slot_share']:.1%}",
            f"{row['hr_new']:.3f}",
            f"{row['hr_all']:.3f}",
            f"{row['rows_given']} ({row['rows_given_new']} held out)",
            f"{row['ms_per_call']:.1f}",
        )
    console.print(table)
    return {"cases": cases, "new_item_cases": new_cases, "new_items": len(new), "k": k, "variants": rows}


def _plot(figures: dict[str, Any], k: int, path: Path) -> None:
    from matplotlib.figure import Figure

    rows = figures["variants"]
    metrics = [
        ("new_slot_share", f"new items in top-{k} slots"),
        ("hr_new", f"HR@{k}, target a new item"),
        ("hr_all", f"HR@{k}, all sampled events"),
    ]
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    width = 0.8 / len(rows)
    for n, row in enumerate(rows):
        xs = [m + n * width for m in range(len(metrics))]
        ax.bar(xs, [100 * row[key] for key, _ in metrics], width, label=row["variant"])
    ax.set_xticks([m + width * (len(rows) - 1) / 2 for m in range(len(metrics))], [label for _, label in metrics])
    ax.set(
        ylabel="percent (%)",
        xlabel="measure",
        title=f"Items new after training: today vs rows given while serving ({figures['cases']} sampled events)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
