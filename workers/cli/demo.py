"""`rtrec demo`: the whole loop on the embedded stack, in a minute.

0. train the generative model on the bundled sample (once; later runs reuse the checkpoint);
1. start Tansu, Redis, a state worker and a recommendation worker serving that model;
2. replay the bundled sample (shifted so that it ends a minute ago);
3. ask for recommendations for a few active users;
4. each of them now browses and clicks in a category they never visited;
5. ask again: the answers follow the new interest, with reasons.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from rtrec.model.checkpoint import latest_checkpoint, set_current
from rtrec.model.pipeline import train_checkpoint
from rtrec.stream.catalog import store_categories
from rtrec.stream.connections import redis_client
from rtrec.stream.eventfile import read_events
from rtrec.stream.producer import EventProducer
from rtrec.stream.rec_client import RecClient
from rtrec.stream.replay import replay_events
from rtrec.stream.sample import SAMPLE_CONFIG, SAMPLE_PATH
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import StateStore
from rtrec.stream.synthetic import item_catalog, item_cluster_map, trending_items
from rtrec.workers.stack import Stack

if TYPE_CHECKING:
    from redis import Redis

K = 8
DEMO_TRAINING = {
    "model_max_events": 50,
    "train_epochs": 25,
    "train_min_epochs": 5,
    "train_patience": 4,
    "train_min_steps": 1,
}  # full 128 batches: the demo trains in ~40 s


def _wait_applied(store: StateStore, client, target: int, timeout_s: float = 120) -> None:
    """Progress bar until the state worker has processed `target` events (new or duplicate)."""
    with tqdm(total=target, unit="ev", desc="state worker") as bar:
        deadline = time.monotonic() + timeout_s
        done = 0
        while done < target and time.monotonic() < deadline:
            stats = store.stats(client)
            done = stats.get("applied", 0) + stats.get("duplicates", 0)
            bar.update(min(done, target) - bar.n)
            time.sleep(0.1)


def _new_interest(events: list[dict], users: list[str], clusters: dict[str, int]) -> dict[str, list[str]]:
    """For each user, popular items of the category they touched least.

    Items that were trending at some point are skipped: everyone views those, so
    they say little about a category.
    """
    trending = {item for period in trending_items(SAMPLE_CONFIG) for item in period}
    popular_by_cluster: dict[int, list[str]] = {}
    for item, _ in Counter(e["item_id"] for e in events).most_common():
        if item not in trending:
            popular_by_cluster.setdefault(clusters[item], []).append(item)
    plan = {}
    for user in users:
        touched = Counter(clusters[e["item_id"]] for e in events if e["user_id"] == user)
        fresh = min(popular_by_cluster, key=lambda c: (touched.get(c, 0), c))
        plan[user] = popular_by_cluster[fresh][:4]
    return plan


def ensure_demo_checkpoint(settings: Settings, root: Path, console: Console) -> Path:
    """Train on the bundled sample unless a checkpoint is already there."""
    existing = latest_checkpoint(root)
    if existing is not None:
        console.print(f"reusing checkpoint {existing} (delete {root} to retrain)")
        return existing
    # sample users have ~60 events: a 50-event window and a short schedule train in seconds
    quick = settings.model_copy(update=DEMO_TRAINING)
    path, report = train_checkpoint(quick, list(read_events(SAMPLE_PATH)), root)
    set_current(root, path.name)
    console.print(
        f"trained {path.name} in {report.seconds:.0f}s (best epoch {report.best_epoch}, "
        f"validation HR@10 {report.best.get('HR@10', 0):.3f})"
    )
    return path


def run_demo(settings: Settings, n_users: int, console: Console) -> None:
    console.rule("[bold]0. the generative model")
    root = settings.run_dir.parent / "demo-checkpoints"
    ensure_demo_checkpoint(settings, root, console)
    console.rule("[bold]1. start the embedded stack")
    with Stack(settings.model_copy(update={"checkpoint_dir": root})) as stack:
        s = stack.start()
        console.print(f"kafka {s.kafka_bootstrap}   redis {s.redis_url}   workers ready")
        store_categories(s, ((item["item_id"], str(item["cluster"])) for item in item_catalog(SAMPLE_CONFIG)))
        client = redis_client(s)
        store = StateStore(s)
        events = _replay_sample(s, store, client, console)

        clusters = item_cluster_map(SAMPLE_CONFIG)
        users = [u for u, _ in Counter(e["user_id"] for e in events).most_common(n_users)]
        plan = _new_interest(events, users, clusters)

        with RecClient(s) as rc:
            console.rule("[bold]3. recommendations now")
            before = _recommendations(rc, users)

            console.rule("[bold]4. new events: each user explores a category new to them")
            _explore(s, store, client, users, plan, clusters, console)

            console.rule("[bold]5. recommendations after the new events")
            after = _recommendations(rc, users)

        for user in users:
            _show(console, user, before[user], after[user], clusters, clusters[plan[user][0]])
        console.print("Done: stopping the stack.")


def _replay_sample(s: Settings, store: StateStore, client: Redis, console: Console) -> list[dict]:
    """Step 2: the bundled sample, shifted to end a minute ago, sent and applied; returns its events."""
    before_stats = store.stats(client)
    already = before_stats.get("applied", 0) + before_stats.get("duplicates", 0)

    console.rule("[bold]2. replay the bundled sample")
    events = list(read_events(SAMPLE_PATH))
    shift = int(time.time() * 1000) - 60_000 - max(e["ts"] for e in events)
    with EventProducer(s) as producer:
        report = replay_events(producer, events, ts_shift_ms=shift, total=len(events))
    console.print(f"sent {report.sent} events ({report.rate:,.0f}/s)")
    _wait_applied(store, client, already + report.sent)
    return events


def _recommendations(rc: RecClient, users: list[str]) -> dict[str, dict]:
    answers = rc.collect([rc.send(u, K) for u in users])
    return {r["user_id"]: r for r in answers.values()}


def _explore(
    s: Settings,
    store: StateStore,
    client: Redis,
    users: list[str],
    plan: dict[str, list[str]],
    clusters: dict[str, int],
    console: Console,
) -> None:
    """Step 4: send each user's new-category events and wait until Redis counts them all."""
    now = int(time.time() * 1000)
    expected = {u: _events_seen(client, store, u) + len(plan[u]) + 2 for u in users}
    _send_plan(s, plan, clusters, now, console)
    sent_at = time.monotonic()
    while any(_events_seen(client, store, u) < expected[u] for u in users):
        if time.monotonic() - sent_at > 60:
            raise TimeoutError("the new events did not reach Redis within 60 s")
        time.sleep(0.005)
    visible_ms = (time.monotonic() - sent_at) * 1000
    console.print(f"all new events visible in Redis {visible_ms:.0f} ms after the producer flushed")


def _events_seen(client: Redis, store: StateStore, user: str) -> int:
    return int(client.hget(store.user_key(user, "h"), "n") or 0)


def _send_plan(s: Settings, plan: dict[str, list[str]], clusters: dict[str, int], now: int, console: Console) -> None:
    """Each planned item is browsed; the first two are clicked as well (events a second apart from `now`)."""
    with EventProducer(s) as producer:
        for user, items in plan.items():
            for n, item in enumerate(items):
                for etype in ("browse", "click") if n < 2 else ("browse",):
                    producer.send(
                        {
                            "event_id": uuid.uuid4().hex,
                            "user_id": user,
                            "item_id": item,
                            "type": etype,
                            "ts": now + n * 1000,
                        }
                    )
            console.print(f"{user}: browses {', '.join(items)} (category {clusters[items[0]]})")


def _show(console: Console, user: str, before: dict, after: dict, clusters: dict[str, int], fresh: int) -> None:
    table = Table(title=f"{user}: before -> after exploring category {fresh}  (model {after['model_version']})")
    table.add_column("#", justify="right")
    table.add_column("before (category)")
    table.add_column("after (category)")
    table.add_column("reason (after)")
    for n in range(K):
        b = before["items"][n] if n < len(before["items"]) else None
        a = after["items"][n] if n < len(after["items"]) else None

        def mark(it: dict) -> str:
            label = f"{it['item_id']} ({clusters.get(it['item_id'], '?')})"
            return f"[bold green]{label}[/]" if clusters.get(it["item_id"]) == fresh else label

        table.add_row(str(n + 1), mark(b) if b else "", mark(a) if a else "", a["reason"] if a else "")
    console.print(table)
    count = lambda r: sum(clusters.get(it["item_id"]) == fresh for it in r["items"])  # noqa: E731
    console.print(
        f"items from category {fresh}: before {count(before)}/{K}, after {count(after)}/{K}; "
        f"response latency {after['latency_ms']:.0f} ms\n"
    )
