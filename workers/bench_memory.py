"""`rtrec bench memory`: Redis bytes per event, per user and per item, and what a rate costs over a week.

Replays a generated stream through the real stack (embedded broker and Redis unless
RTREC_KAFKA_BOOTSTRAP / RTREC_REDIS_URL are set, one state worker) *time-compressed*: the
events' timestamps span ``days`` of event time ending now, but they are sent as fast as
the worker applies them. The stream goes out in ``samples`` chunks; after each chunk the
bench waits until the worker applied it (``rt:stats`` ``applied``) and records Redis
``INFO memory`` ``used_memory`` and ``DBSIZE``; the baseline is taken before any event.

At the end every key is classified into a family (``rt:u:*:h``, ``rt:u:*:seq``, ...,
``rt:covis:*``, ``rt:dedupe:*``, ``rt:pop``, ``rt:items:n``; keys of no family are
counted as "other") with one SCAN, and ``MEMORY USAGE`` of up to 500 randomly chosen
keys per family gives its average size and estimated total.

Figures:

* bytes per event: used_memory growth / events applied;
* bytes per active user: the ``rt:u:*`` families' total / distinct users in the stream;
* bytes per item: ``rt:covis:*`` + ``rt:pop`` + ``rt:items:n`` / distinct items in the stream;
* second-half growth: used_memory growth over the second half of the events as a percentage
  of the growth over the first half (0%: memory flat after the first half, 100%: linear);
* projection for ``rate`` events/s over 7 days: dedupe markers (one per event, living
  RTREC_DEDUPE_TTL_S: rate x min(ttl, 7 d) x average marker bytes) and user state
  (``project_users`` x bytes per active user, as measured at this stream's events per user).

Note that key TTLs run in wall-clock time: during a time-compressed replay nothing expires,
so the markers of the whole stream are all present at the end.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from stream.connections import redis_client
from stream.producer import EventProducer
from stream.settings import Settings
from stream.state_store import PREFIX, StateStore
from stream.synthetic import SyntheticConfig, generate_events
from workers.stack import Stack

DAY_MS = 86_400_000
PROJECTION_DAYS = 7
SAMPLE_KEYS = 500  # MEMORY USAGE calls per family
USER_PARTS = ("h", "seq", "aff", "bought")  # always listed; other rt:u:*:<part> families are found by the scan
FAMILIES = tuple(f"{PREFIX}:u:*:{p}" for p in USER_PARTS) + (
    f"{PREFIX}:covis:*", f"{PREFIX}:dedupe:*", f"{PREFIX}:pop", f"{PREFIX}:items:n")
ITEM_FAMILIES = (f"{PREFIX}:covis:*", f"{PREFIX}:pop", f"{PREFIX}:items:n")
OTHER = "other"
_USER_KEY = re.compile(rf"^{PREFIX}:u:[^:]+:([^:]+)$")  # ids cannot contain ':' (stream.events.ID_PATTERN)
PRODUCER_LINGER_MS = 50  # fuller record batches: the embedded broker prefers few large ones (see bench_soak)


class BenchInputError(ValueError):
    """Options the bench cannot run with (checked before anything starts)."""


def check_inputs(settings: Settings, users: int, items: int, events: int, days: float, rate: float,
                 project_users: int | None, samples: int) -> None:
    problems = [rule for rule, ok in {
        "--users >= 1": users >= 1,
        "--items >= 1": items >= 1,
        "--events >= 1": events >= 1,
        "--days > 0": days > 0,
        "--rate > 0": rate > 0,
        "--project-users >= 1": project_users is None or project_users >= 1,
        "--samples >= 1": samples >= 1,
    }.items() if not ok]
    if problems:
        raise BenchInputError(f"bench memory: need {', '.join(problems)}")
    if settings.redis_cluster:
        raise BenchInputError("bench memory measures one Redis server; unset RTREC_REDIS_CLUSTER")


def bench_events(users: int, items: int, events: int, days: float, end_ms: int, seed: int = 11) -> list[dict]:
    """`events` synthetic events whose timestamps span `days` ending at `end_ms`, with uuid-sized event ids.

    Only the required fields are kept; event ids are 32 hex digits (as `rtrec produce` makes them), not the
    generator's short ones, since the id is part of every dedupe marker and sequence member.
    """
    span = max(1, int(days * DAY_MS))
    cfg = SyntheticConfig(n_users=users, n_items=items, n_clusters=min(20, items), n_events=events,
                          start_ts_ms=end_ms - span, duration_ms=span, seed=seed)
    rng = random.Random(seed)
    return [{"event_id": uuid.UUID(int=rng.getrandbits(128)).hex, "user_id": e["user_id"], "item_id": e["item_id"],
             "type": e["type"], "ts": e["ts"]} for e in generate_events(cfg)]


def family_of(key: str) -> str:
    m = _USER_KEY.match(key)
    if m:
        return f"{PREFIX}:u:*:{m.group(1)}"
    for prefix in ("covis", "dedupe"):
        if key.startswith(f"{PREFIX}:{prefix}:"):
            return f"{PREFIX}:{prefix}:*"
    if key in (f"{PREFIX}:pop", f"{PREFIX}:items:n"):
        return key
    return OTHER


def key_families(client, sample: int = SAMPLE_KEYS, seed: int = 0) -> dict[str, dict]:
    """Per family: keys, sampled keys, average MEMORY USAGE bytes and estimated total (avg x keys).

    One SCAN over the whole keyspace, a reservoir sample of up to `sample` keys per family, then
    MEMORY USAGE ... SAMPLES 0 (every element counted) for the sampled keys, pipelined.
    """
    rng = random.Random(seed)
    counts: dict[str, int] = {f: 0 for f in FAMILIES}
    chosen: dict[str, list[str]] = {f: [] for f in FAMILIES}
    for key in client.scan_iter(count=5000):
        fam = family_of(key)
        n = counts.get(fam, 0) + 1
        counts[fam] = n
        picks = chosen.setdefault(fam, [])
        if len(picks) < sample:
            picks.append(key)
        else:
            j = rng.randrange(n)
            if j < sample:
                picks[j] = key
    out: dict[str, dict] = {}
    found = sorted(f for f in counts if f not in FAMILIES and f != OTHER)  # e.g. a user part added later
    users = [f for f in FAMILIES if f.startswith(f"{PREFIX}:u:")] + [f for f in found if f.startswith(f"{PREFIX}:u:")]
    rest = [f for f in FAMILIES if f not in users] + [f for f in found if f not in users]
    for fam in [*users, *rest, *([OTHER] if OTHER in counts else [])]:
        keys = chosen[fam]
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key, samples=0)
        sizes = [s for s in pipe.execute() if s is not None]  # a key may have expired since the scan
        avg = float(np.mean(sizes)) if sizes else 0.0
        out[fam] = {"keys": counts[fam], "sampled": len(sizes), "avg_bytes": avg, "total_bytes": avg * counts[fam]}
        if fam == OTHER:
            out[fam]["examples"] = sorted(keys)[:20]
    return out


def _wait_applied(store: StateStore, client, target: int, stack: Stack, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while (applied := store.stats(client).get("applied", 0)) < target:
        dead = [w for w in stack.workers if not w.alive()]
        if dead:
            raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {applied} of {target} events applied after {timeout_s:g}s")
        time.sleep(0.02)


def _sample(client, applied: int, started: float) -> dict:
    info = client.info("memory")
    return {"events": applied, "used_memory": int(info["used_memory"]),
            "used_memory_dataset": int(info.get("used_memory_dataset", 0)), "keys": int(client.dbsize()),
            "seconds": round(time.monotonic() - started, 3)}


def run_memory_bench(settings: Settings, users: int = 2000, items: int = 5000, events: int = 200_000,
                     days: float = 7.0, rate: float = 1000.0, project_users: int | None = None, samples: int = 20,
                     plot: Path | None = Path("bench-memory.png"), console: Console | None = None,
                     run_dir: Path | None = None) -> dict:
    """Replay, sample, break down, print; returns the figures (also written as JSON next to `plot`)."""
    check_inputs(settings, users, items, events, days, rate, project_users, samples)
    console = console or Console()
    project_users = project_users or users
    stream = bench_events(users, items, events, days, end_ms=int(time.time() * 1000) - 1000)
    active_users = len({e["user_id"] for e in stream})
    active_items = len({e["item_id"] for e in stream})
    bounds = np.linspace(0, events, min(samples, events) + 1).round().astype(int)

    with tempfile.TemporaryDirectory(prefix="rtrec-bench-memory-") as tmp:
        with Stack(settings, run_dir=run_dir or Path(tmp)) as stack:
            s = stack.start_servers()
            stack.start_worker("state")
            stack.wait_ready("state")
            client = redis_client(s)
            store = StateStore(s)
            already = store.stats(client).get("applied", 0)
            if already:
                console.print(f"[yellow]this Redis already holds state ({already:,} events applied): "
                              "the key families below include it")
            started = time.monotonic()
            series = [_sample(client, 0, started)]
            console.rule(f"replaying {events:,} events ({active_users:,} users, {active_items:,} items) "
                         f"spanning {days:g} days of event time")
            with EventProducer(s.model_copy(update={"producer_linger_ms": PRODUCER_LINGER_MS})) as producer, \
                    tqdm(total=events, desc="replay", unit="ev") as bar:
                for lo, hi in zip(bounds[:-1], bounds[1:]):
                    for n in range(lo, hi):
                        producer.send(stream[n])
                        if n % 1000 == 999:
                            bar.update(1000)
                    producer.flush()
                    _wait_applied(store, client, already + int(hi), stack)
                    series.append(_sample(client, int(hi), started))
                    bar.update(int(hi) - bar.n)
                    bar.set_postfix(used_mb=f"{series[-1]['used_memory'] / 2**20:.1f}", keys=series[-1]["keys"])
            seconds = time.monotonic() - started
            console.print("breaking memory down by key family (SCAN + MEMORY USAGE) ...")
            families = key_families(client)
            dbsize = int(client.dbsize())
            client.close()

    result = _figures(series, families, dbsize, events, active_users, active_items, days, rate, project_users,
                      settings.dedupe_ttl_s, seconds)
    _print(result, console)
    if plot is not None:
        plot = Path(plot)
        plot.parent.mkdir(parents=True, exist_ok=True)
        _plot(result, plot)
        json_path = plot.with_suffix(".json")
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        result["plot"], result["json"] = str(plot), str(json_path)
        console.print(f"memory over events: {plot}   figures: {json_path}")
    return result


def _figures(series: list[dict], families: dict[str, dict], dbsize: int, events: int, users: int, items: int,
             days: float, rate: float, project_users: int, dedupe_ttl_s: int, seconds: float) -> dict:
    applied = np.array([p["events"] for p in series], dtype=float)
    used = np.array([p["used_memory"] for p in series], dtype=float)
    baseline, end = float(used[0]), float(used[-1])
    mid = float(np.interp(events / 2, applied, used))
    first, second = mid - baseline, end - mid
    second_half_pct = second / first * 100 if first > 0 else None
    user_bytes = sum(f["total_bytes"] for name, f in families.items() if name.startswith(f"{PREFIX}:u:"))
    item_bytes = sum(families[name]["total_bytes"] for name in ITEM_FAMILIES if name in families)
    marker_bytes = families.get(f"{PREFIX}:dedupe:*", {}).get("avg_bytes", 0.0)
    per_user = user_bytes / users
    horizon_s = PROJECTION_DAYS * 86_400
    markers = rate * min(dedupe_ttl_s, horizon_s)
    projection = {
        "rate_events_per_s": rate, "days": PROJECTION_DAYS, "users": project_users,
        "dedupe_ttl_s": dedupe_ttl_s, "dedupe_markers": markers, "dedupe_bytes": markers * marker_bytes,
        "user_state_bytes": project_users * per_user,
        "measured_events_per_user": events / users,
    }
    projection["total_bytes"] = projection["dedupe_bytes"] + projection["user_state_bytes"]
    return {
        "events": events, "users": users, "items": items, "days": days, "seconds": round(seconds, 1),
        "events_per_s": round(events / seconds, 1) if seconds > 0 else None,
        "baseline_used_memory": int(baseline), "end_used_memory": int(end), "growth_bytes": int(end - baseline),
        "bytes_per_event": (end - baseline) / events,
        "bytes_per_user": per_user, "bytes_per_item": item_bytes / items,
        "dedupe_marker_bytes": marker_bytes,
        "families_total_bytes": sum(f["total_bytes"] for f in families.values()),
        "first_half_growth_bytes": first, "second_half_growth_bytes": second,
        "second_half_growth_pct": second_half_pct,
        "flat": None if second_half_pct is None else abs(second_half_pct) <= 10,
        "dbsize": dbsize, "families": families, "projection": projection, "samples": series,
    }


def _mb(b: float) -> str:
    return f"{b / 2**20:,.2f}"


def _size(b: float) -> str:
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if b >= scale:
            return f"{b / scale:,.1f} {unit}"
    return f"{b / 2**10:,.1f} KB"


def _print(r: dict, console: Console) -> None:
    table = Table(title=f"rtrec bench memory  ({r['events']:,} events over {r['days']:g} simulated days, "
                        f"{r['seconds']:.0f} s)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("events applied", f"{r['events']:,}")
    table.add_row("active users / items", f"{r['users']:,} / {r['items']:,}")
    table.add_row("used_memory baseline -> end (MB)",
                  f"{_mb(r['baseline_used_memory'])} -> {_mb(r['end_used_memory'])}")
    table.add_row("used_memory growth (MB)", _mb(r["growth_bytes"]))
    table.add_row("bytes per event (growth / events)", f"{r['bytes_per_event']:,.0f}")
    table.add_row("bytes per active user (rt:u:* families)", f"{r['bytes_per_user']:,.0f}")
    table.add_row("bytes per item (covis + pop + items:n)", f"{r['bytes_per_item']:,.0f}")
    table.add_row("dedupe marker, bytes each", f"{r['dedupe_marker_bytes']:,.0f}")
    pct = r["second_half_growth_pct"]
    table.add_row("second-half growth vs first half (0% flat, 100% linear)",
                  "-" if pct is None else f"{pct:+.0f}%{'  (flat)' if r['flat'] else ''}")
    console.print(table)

    fam = Table(title=f"Redis keys by family  ({r['dbsize']:,} keys; MEMORY USAGE of up to {SAMPLE_KEYS} per family)")
    for col in ("family", "keys", "sampled", "avg bytes", "total MB", "share of growth"):
        fam.add_column(col, justify="left" if col == "family" else "right")
    for name, f in r["families"].items():
        share = f["total_bytes"] / r["growth_bytes"] * 100 if r["growth_bytes"] > 0 else 0.0
        fam.add_row(name, f"{f['keys']:,}", f"{f['sampled']:,}", f"{f['avg_bytes']:,.0f}", _mb(f["total_bytes"]),
                    f"{share:.0f}%")
    fam.add_row("[b]all families", f"[b]{sum(f['keys'] for f in r['families'].values()):,}", "", "",
                f"[b]{_mb(r['families_total_bytes'])}", "")
    console.print(fam)

    p = r["projection"]
    console.print(
        f"projection at {p['rate_events_per_s']:,.0f} events/s over {p['days']} days, {p['users']:,} users: "
        f"dedupe markers {p['dedupe_markers']:,.0f} (TTL {p['dedupe_ttl_s']:,} s) x {r['dedupe_marker_bytes']:.0f} B "
        f"= {_size(p['dedupe_bytes'])}; user state {p['users']:,} x {r['bytes_per_user']:,.0f} B = "
        f"{_size(p['user_state_bytes'])} (at {p['measured_events_per_user']:,.0f} events/user); "
        f"total {_size(p['total_bytes'])}")


def _plot(r: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    pts = r["samples"]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    ax.plot([p["events"] for p in pts], [p["used_memory"] / 2**20 for p in pts], marker="o", markersize=3,
            label="used_memory")
    ax.axvline(r["events"] / 2, color="grey", linestyle=":", linewidth=0.8, label="half of the events")
    ax.set(xlabel="events applied", ylabel="Redis used_memory (MB)",
           title=f"Redis memory while replaying {r['events']:,} events "
                 f"({r['users']:,} users, {r['days']:g} simulated days)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
