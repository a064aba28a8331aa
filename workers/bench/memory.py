"""`rtrec bench memory`: Redis bytes per event, per user and per item, dedupe state, and what a rate costs over a week.

Replays a generated stream through the real stack (embedded broker and Redis unless
RTREC_KAFKA_BOOTSTRAP / RTREC_REDIS_URL are set, one state worker) *time-compressed*: the
events' timestamps span ``days`` of event time ending now, but they are sent as fast as
the worker applies them. The stream goes out in ``samples`` chunks; after each chunk the
bench waits until the worker applied it (``rt:stats`` ``applied``) and records Redis
``INFO memory`` ``used_memory``, ``DBSIZE``, the distinct users sent so far and a quick
breakdown by key family (as below, ``MEMORY USAGE`` of up to 5,000 keys per family, so
every key of smaller families; its time is left out of the replay rate); the baseline is
taken before any event.

At the end every key is classified into a family (``rt:u:*:h``, ``rt:u:*:seq``, ...,
``rt:u:*:ids``, ``rt:covis:*``, ``rt:pop``, ``rt:items:n``; keys of no family are counted as
"other") with one SCAN, and ``MEMORY USAGE`` of up to 500 randomly chosen keys per family
gives its average size and estimated total.

Dedupe state (stream/state_store.py) is per user, not per event: the ``rt:u:*:ids`` family
(fingerprints of the user's last RTREC_DEDUPE_WINDOW event ids) plus the applied-offset
watermark fields ``o:<topic>:<partition>`` in each user's ``rt:u:*:h`` hash. The watermarks'
cost is measured, not assumed: for the sampled ``:h`` hashes the bench COPYs each to a scratch
key, takes its ``MEMORY USAGE``, HDELs the ``o:*`` fields from the copy and takes it again; the
average difference (what the fields cost as Redis encodes that hash, allocator size classes
included) times the number of ``:h`` keys is the watermarks' total. Their raw bytes (field +
value lengths) and count per hash are reported next to it.

Figures:

* bytes per event: used_memory growth / events applied (falls as events grow once state is full);
* bytes per active user: the ``rt:u:*`` families' total (dedupe state included) / distinct users;
* bytes per item: ``rt:covis:*`` + ``rt:pop`` + ``rt:items:n`` / distinct items in the stream;
* dedupe bytes: ``rt:u:*:ids`` total + watermarks, per active user and per event amortized
  (dedupe bytes / events applied);
* flatness, two ways: the largest deviation of used_memory over the second half of the events
  from its value at the half, in % of that value (the "flat within +-10%" test; ``flat``), and
  the second half's growth as a percentage of the first half's (0%: flat, 100%: linear); and
  per family, its growth over the second half (which state is still filling);
* projection for ``rate`` events/s over 7 days and ``project_users`` users: user state =
  users x bytes per active user (as measured at this stream's events per user: once the
  per-user caps are full, more events per user add nothing; when memory was not flat yet, a
  note says the projected user state is a floor), dedupe bytes = users x dedupe bytes per
  user, amortized over rate x 7 d events; item state at this stream's items.

Key TTLs (RTREC_USER_TTL_DAYS, RTREC_ITEM_TTL_DAYS) run in wall-clock time: during a
time-compressed replay nothing expires, so every user of the stream is counted as active.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from rtrec.stream.connections import redis_client
from rtrec.stream.keys import BENCH_SCRATCH, PREFIX
from rtrec.stream.producer import EventProducer
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import StateStore
from rtrec.stream.synthetic import SyntheticConfig, generate_events
from rtrec.workers.bench.stack_load import wait_applied
from rtrec.workers.stack import Stack

DAY_MS = 86_400_000
PROJECTION_DAYS = 7
FLAT_PCT = 10.0  # "used_memory flat within +-10% over the second half"
SAMPLE_KEYS = 500  # MEMORY USAGE calls per family
SERIES_SAMPLE_KEYS = 5000  # the same at each memory sample during the replay (every key of smaller families)
USER_PARTS = ("h", "seq", "aff", "bought", "ids")  # always listed; other rt:u:*:<part> families are found by the scan
FAMILIES = tuple(f"{PREFIX}:u:*:{p}" for p in USER_PARTS) + (f"{PREFIX}:covis:*", f"{PREFIX}:pop", f"{PREFIX}:items:n")
ITEM_FAMILIES = (f"{PREFIX}:covis:*", f"{PREFIX}:pop", f"{PREFIX}:items:n")
HASH_FAMILY, IDS_FAMILY = f"{PREFIX}:u:*:h", f"{PREFIX}:u:*:ids"
WATERMARK = "o:"  # a user's applied-offset watermark fields: o:<topic>:<partition> -> "epoch:offset"
OTHER = "other"
_USER_KEY = re.compile(rf"^{PREFIX}:u:[^:]+:([^:]+)$")  # ids cannot contain ':' (stream.events.ID_PATTERN)
PRODUCER_LINGER_MS = 50  # fuller record batches: the embedded broker prefers few large ones (see bench/soak.py)


class BenchInputError(ValueError):
    """Options the bench cannot run with (checked before anything starts)."""


def check_inputs(
    settings: Settings,
    users: int,
    items: int,
    events: int,
    days: float,
    rate: float,
    project_users: int | None,
    samples: int,
) -> None:
    problems = [
        rule
        for rule, ok in {
            "--users >= 1": users >= 1,
            "--items >= 1": items >= 1,
            "--events >= 1": events >= 1,
            "--days > 0": days > 0,
            "--rate > 0": rate > 0,
            "--project-users >= 1": project_users is None or project_users >= 1,
            "--samples >= 1": samples >= 1,
        }.items()
        if not ok
    ]
    if problems:
        raise BenchInputError(f"bench memory: need {', '.join(problems)}")
    if settings.redis_cluster:
        raise BenchInputError("bench memory measures one Redis server; unset RTREC_REDIS_CLUSTER")


def bench_events(users: int, items: int, events: int, days: float, end_ms: int, seed: int = 11) -> list[dict]:
    """`events` synthetic events whose timestamps span `days` ending at `end_ms`, with uuid-sized event ids.

    Only the required fields are kept; event ids are 32 hex digits (as `rtrec produce` makes them), not the
    generator's short ones, since the id is part of every sequence member.
    """
    span = max(1, int(days * DAY_MS))
    cfg = SyntheticConfig(
        n_users=users,
        n_items=items,
        n_clusters=min(20, items),
        n_events=events,
        start_ts_ms=end_ms - span,
        duration_ms=span,
        seed=seed,
    )
    rng = random.Random(seed)
    return [
        {
            "event_id": uuid.UUID(int=rng.getrandbits(128)).hex,
            "user_id": e["user_id"],
            "item_id": e["item_id"],
            "type": e["type"],
            "ts": e["ts"],
        }
        for e in generate_events(cfg)
    ]


def family_of(key: str) -> str:
    m = _USER_KEY.match(key)
    if m:
        return f"{PREFIX}:u:*:{m.group(1)}"
    if key.startswith(f"{PREFIX}:covis:"):
        return f"{PREFIX}:covis:*"
    if key in (f"{PREFIX}:pop", f"{PREFIX}:items:n"):
        return key
    return OTHER


def _scan(client, sample: int, seed: int) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Keys per family and a reservoir sample of up to `sample` key names per family, in one SCAN."""
    rng = random.Random(seed)
    counts: dict[str, int] = dict.fromkeys(FAMILIES, 0)
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
    return counts, chosen


def key_families(
    client, sample: int = SAMPLE_KEYS, seed: int = 0, chosen_out: dict[str, list[str]] | None = None
) -> dict[str, dict]:
    """Per family: keys, sampled keys, average MEMORY USAGE bytes and estimated total (avg x keys).

    One SCAN over the whole keyspace, a reservoir sample of up to `sample` keys per family, then
    MEMORY USAGE ... SAMPLES 0 (every element counted) for the sampled keys, pipelined. The sampled
    key names go to `chosen_out` when given.
    """
    counts, chosen = _scan(client, sample, seed)
    if chosen_out is not None:
        chosen_out.update(chosen)
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


def watermark_cost(client, hash_keys: list[str]) -> dict:
    """What the ``o:*`` watermark fields cost in the given user hashes, on average per hash.

    For each hash: COPY to a scratch key, MEMORY USAGE, HDEL its ``o:*`` fields from the copy, MEMORY
    USAGE again; the difference is the fields' cost in that hash as Redis encodes it. Hashes without
    such fields count as 0. Also the fields' count and raw bytes (field name + value lengths).
    """
    pipe = client.pipeline(transaction=False)
    for key in hash_keys:
        pipe.hgetall(key)
    fields = [{f: v for f, v in h.items() if f.startswith(WATERMARK)} for h in pipe.execute()]
    pipe = client.pipeline(transaction=False)
    measured = [(key, fs) for key, fs in zip(hash_keys, fields) if fs]
    for key, fs in measured:
        pipe.copy(key, BENCH_SCRATCH, replace=True)
        pipe.memory_usage(BENCH_SCRATCH, samples=0)
        pipe.hdel(BENCH_SCRATCH, *fs)
        pipe.memory_usage(BENCH_SCRATCH, samples=0)
    pipe.delete(BENCH_SCRATCH)
    res = pipe.execute()
    costs = []
    for n in range(len(measured)):
        copied, with_fields, _, without = res[4 * n : 4 * n + 4]
        if copied and with_fields is not None and without is not None:  # else it expired since the scan
            costs.append(with_fields - without)
    hashes = len(hash_keys) - len(measured) + len(costs)
    n_fields = sum(len(fs) for fs in fields)
    raw = sum(len(f) + len(v) for fs in fields for f, v in fs.items())
    return {
        "sampled": hashes,
        "fields_per_hash": n_fields / len(hash_keys) if hash_keys else 0.0,
        "raw_bytes_per_hash": raw / len(hash_keys) if hash_keys else 0.0,
        "bytes_per_hash": sum(costs) / hashes if hashes else 0.0,
    }


def caps_of(settings: Settings) -> dict[str, int]:
    """The settings that bound the state, recorded with the figures."""
    return {
        "sequence_length": settings.sequence_length,
        "affinity_cap": settings.affinity_cap,
        "covis_cap": settings.covis_cap,
        "items_cap": settings.items_cap,
        "dedupe_window": settings.dedupe_window,
    }


def _sample(client, applied: int, active_users: int, started: float) -> dict:
    """used_memory etc. first, then the family breakdown (its SCAN's buffers are not in the figure)."""
    info = client.info("memory")
    point: dict[str, Any] = {
        "events": applied,
        "active_users": active_users,
        "used_memory": int(info["used_memory"]),
        "used_memory_dataset": int(info.get("used_memory_dataset", 0)),
        "keys": int(client.dbsize()),
        "seconds": round(time.monotonic() - started, 3),
    }
    t0 = time.monotonic()
    point["families"] = {
        name: round(f["total_bytes"]) for name, f in key_families(client, sample=SERIES_SAMPLE_KEYS).items()
    }
    point["breakdown_seconds"] = round(time.monotonic() - t0, 3)
    return point


@dataclass
class ReplayMeasurement:
    """What a replay measured: memory samples, the final key-family breakdown, watermark cost, DBSIZE, seconds."""

    series: list[dict]
    families: dict[str, dict]
    watermarks: dict
    dbsize: int
    seconds: float  # replay time, the samples' family breakdowns left out


def run_memory_bench(
    settings: Settings,
    users: int = 2000,
    items: int = 5000,
    events: int = 200_000,
    days: float = 7.0,
    rate: float = 1000.0,
    project_users: int | None = None,
    samples: int = 20,
    plot: Path | None = Path("bench-memory.png"),
    console: Console | None = None,
    run_dir: Path | None = None,
) -> dict:
    """Replay, sample, break down, print; returns the figures (also written as JSON next to `plot`)."""
    check_inputs(settings, users, items, events, days, rate, project_users, samples)
    console = console or Console()
    project_users = project_users or users
    stream = bench_events(users, items, events, days, end_ms=int(time.time() * 1000) - 1000)
    bounds = np.linspace(0, events, min(samples, events) + 1).round().astype(int)
    active_at = _active_users_at(stream, bounds)
    active_users = active_at[-1]
    active_items = len({e["item_id"] for e in stream})
    title = (
        f"replaying {events:,} events ({active_users:,} users, {active_items:,} items) "
        f"spanning {days:g} days of event time"
    )
    with tempfile.TemporaryDirectory(prefix="rtrec-bench-memory-") as tmp:
        m = _replay(settings, stream, bounds, active_at, run_dir or Path(tmp), title, console)
    result = _figures(
        m.series,
        m.families,
        m.watermarks,
        m.dbsize,
        events,
        active_users,
        active_items,
        days,
        rate,
        project_users,
        settings.dedupe_window,
        m.seconds,
    )
    result["caps"] = caps_of(settings)
    _print(result, console)
    if plot is not None:
        _save(result, Path(plot), console)
    return result


def _active_users_at(stream: list[dict], bounds: np.ndarray) -> list[int]:
    """Distinct users among the events sent up to each bound (0 before any event)."""
    seen: set[str] = set()
    active_at = [0]
    for lo, hi in itertools.pairwise(bounds):
        seen.update(e["user_id"] for e in stream[lo:hi])
        active_at.append(len(seen))
    return active_at


def _replay(
    settings: Settings,
    stream: list[dict],
    bounds: np.ndarray,
    active_at: list[int],
    run_dir: Path,
    title: str,
    console: Console,
) -> ReplayMeasurement:
    """Start the stack, send the stream chunk by chunk (sampling memory after each is applied), break memory down."""
    with Stack(settings, run_dir=run_dir) as stack:
        s = stack.start_servers()
        stack.start_worker("state")
        stack.wait_ready("state")
        client = redis_client(s)
        store = StateStore(s)
        already = store.stats(client).get("applied", 0)
        if already:
            console.print(
                f"[yellow]this Redis already holds state ({already:,} events applied): "
                "the key families below include it"
            )
        started = time.monotonic()
        series = [_sample(client, 0, 0, started)]
        console.rule(title)
        with (
            EventProducer(s.model_copy(update={"producer_linger_ms": PRODUCER_LINGER_MS})) as producer,
            tqdm(total=len(stream), desc="replay", unit="ev") as bar,
        ):
            for k, (lo, hi) in enumerate(itertools.pairwise(bounds), start=1):
                for n in range(lo, hi):
                    producer.send(stream[n])
                    if n % 1000 == 999:
                        bar.update(1000)
                producer.flush()
                wait_applied(store, client, already + int(hi), stack)
                series.append(_sample(client, int(hi), active_at[k], started))
                bar.update(int(hi) - bar.n)
                bar.set_postfix(used_mb=f"{series[-1]['used_memory'] / 2**20:.1f}", keys=series[-1]["keys"])
        seconds = time.monotonic() - started - sum(p["breakdown_seconds"] for p in series)
        console.print("breaking memory down by key family (SCAN + MEMORY USAGE) ...")
        chosen: dict[str, list[str]] = {}
        families = key_families(client, chosen_out=chosen)
        watermarks = watermark_cost(client, chosen.get(HASH_FAMILY, []))
        dbsize = int(client.dbsize())
        client.close()
    return ReplayMeasurement(series, families, watermarks, dbsize, seconds)


def _save(result: dict, plot: Path, console: Console) -> None:
    """The PNG at `plot` and the figures as JSON beside it; their paths go into `result`."""
    plot.parent.mkdir(parents=True, exist_ok=True)
    _plot(result, plot)
    json_path = plot.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    result["plot"], result["json"] = str(plot), str(json_path)
    console.print(f"memory over events: {plot}   figures: {json_path}")


@dataclass(frozen=True)
class _Growth:
    """used_memory at the baseline, the half and the end, and the flatness figures derived from them."""

    baseline: float
    mid: float
    end: float
    first: float  # growth over the first half
    second: float  # growth over the second half
    second_half_pct: float | None
    later: list[float]  # used_memory from the half (interpolated) to the end
    deviation_pct: float


def _growth(series: list[dict], half: float) -> _Growth:
    applied = np.array([p["events"] for p in series], dtype=float)
    used = np.array([p["used_memory"] for p in series], dtype=float)
    baseline, end = float(used[0]), float(used[-1])
    mid = float(np.interp(half, applied, used))
    first, second = mid - baseline, end - mid
    second_half_pct = second / first * 100 if first > 0 else None
    later = [mid, *used[applied > half].tolist()]
    deviation_pct = max(abs(u - mid) for u in later) / mid * 100
    return _Growth(baseline, mid, end, first, second, second_half_pct, later, deviation_pct)


def _second_half_growth(series: list[dict], families: dict[str, dict], half: float) -> None:
    """Each family's growth over the second half, from the sample nearest the half: which state is still filling."""
    at_half = min(series, key=lambda p: abs(p["events"] - half))["families"]
    for name, f in families.items():
        f["second_half_growth_bytes"] = series[-1]["families"].get(name, 0) - at_half.get(name, 0)


def _dedupe_figures(families: dict[str, dict], watermarks: dict, dedupe_window: int, users: int, events: int) -> dict:
    ids = families.get(IDS_FAMILY, {"keys": 0, "avg_bytes": 0.0, "total_bytes": 0.0})
    hashes = families.get(HASH_FAMILY, {"keys": 0})["keys"]
    watermark_bytes = watermarks["bytes_per_hash"] * hashes
    dedupe_bytes = ids["total_bytes"] + watermark_bytes
    return {
        "window": dedupe_window,
        "ids_keys": ids["keys"],
        "ids_avg_bytes": ids["avg_bytes"],
        "ids_bytes": ids["total_bytes"],
        "watermark_hashes": hashes,
        "watermark_sampled": watermarks["sampled"],
        "watermark_fields_per_user": watermarks["fields_per_hash"],
        "watermark_raw_bytes_per_user": watermarks["raw_bytes_per_hash"],
        "watermark_bytes_per_user": watermarks["bytes_per_hash"],
        "watermark_bytes": watermark_bytes,
        "bytes": dedupe_bytes,
        "bytes_per_user": dedupe_bytes / users,
        "bytes_per_event": dedupe_bytes / events,
    }


def _projection(
    rate: float,
    project_users: int,
    events: int,
    users: int,
    items: int,
    per_user: float,
    per_item: float,
    dedupe_per_user: float,
) -> dict:
    horizon_events = rate * PROJECTION_DAYS * 86_400
    projection = {
        "rate_events_per_s": rate,
        "days": PROJECTION_DAYS,
        "users": project_users,
        "events": horizon_events,
        "events_per_user": horizon_events / project_users,
        "measured_events_per_user": events / users,
        "user_state_bytes": project_users * per_user,
        "dedupe_bytes": project_users * dedupe_per_user,
        "items": items,
        "item_state_bytes": items * per_item,
    }
    projection["dedupe_bytes_per_event"] = projection["dedupe_bytes"] / horizon_events
    projection["total_bytes"] = projection["user_state_bytes"] + projection["item_state_bytes"]
    return projection


def _figures(
    series: list[dict],
    families: dict[str, dict],
    watermarks: dict,
    dbsize: int,
    events: int,
    users: int,
    items: int,
    days: float,
    rate: float,
    project_users: int,
    dedupe_window: int,
    seconds: float,
) -> dict:
    half = events / 2
    g = _growth(series, half)
    _second_half_growth(series, families, half)
    user_bytes = sum(f["total_bytes"] for name, f in families.items() if name.startswith(f"{PREFIX}:u:"))
    item_bytes = sum(families[name]["total_bytes"] for name in ITEM_FAMILIES if name in families)
    per_user = user_bytes / users
    per_item = item_bytes / items
    dedupe = _dedupe_figures(families, watermarks, dedupe_window, users, events)
    projection = _projection(rate, project_users, events, users, items, per_user, per_item, dedupe["bytes_per_user"])
    return {
        "events": events,
        "users": users,
        "items": items,
        "days": days,
        "seconds": round(seconds, 1),
        "events_per_s": round(events / seconds, 1) if seconds > 0 else None,
        "baseline_used_memory": int(g.baseline),
        "half_used_memory": int(g.mid),
        "end_used_memory": int(g.end),
        "growth_bytes": int(g.end - g.baseline),
        "bytes_per_event": (g.end - g.baseline) / events,
        "second_half_bytes_per_event": g.second / (events - half),
        "bytes_per_user": per_user,
        "bytes_per_item": per_item,
        "dedupe": dedupe,
        "families_total_bytes": sum(f["total_bytes"] for f in families.values()),
        "first_half_growth_bytes": g.first,
        "second_half_growth_bytes": g.second,
        "second_half_growth_pct": g.second_half_pct,
        "second_half_min_used_memory": int(min(g.later)),
        "second_half_max_used_memory": int(max(g.later)),
        "second_half_deviation_pct": g.deviation_pct,
        "flat": g.deviation_pct <= FLAT_PCT,
        "dbsize": dbsize,
        "families": families,
        "projection": projection,
        "samples": series,
    }


def _mb(b: float) -> str:
    return f"{b / 2**20:,.2f}"


def _size(b: float) -> str:
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if b >= scale:
            return f"{b / scale:,.1f} {unit}"
    return f"{b / 2**10:,.1f} KB"


def _print(r: dict, console: Console) -> None:
    console.print(_summary_table(r))
    console.print(_families_table(r))
    _print_projection(r, console)


def _summary_table(r: dict) -> Table:
    d = r["dedupe"]
    table = Table(
        title=f"rtrec bench memory  ({r['events']:,} events over {r['days']:g} simulated days, {r['seconds']:.0f} s)"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("events applied", f"{r['events']:,}")
    table.add_row("active users / items", f"{r['users']:,} / {r['items']:,}")
    if c := r.get("caps"):
        table.add_row(
            "caps: sequence / affinity / co-visitation / dedupe window",
            f"{c['sequence_length']} / {c['affinity_cap']} / {c['covis_cap']} / {c['dedupe_window']}",
        )
    table.add_row(
        "used_memory baseline -> half -> end (MB)",
        f"{_mb(r['baseline_used_memory'])} -> {_mb(r['half_used_memory'])} -> {_mb(r['end_used_memory'])}",
    )
    table.add_row("used_memory growth (MB)", _mb(r["growth_bytes"]))
    table.add_row("bytes per event (growth / events)", f"{r['bytes_per_event']:,.1f}")
    table.add_row("bytes per event over the second half", f"{r['second_half_bytes_per_event']:,.1f}")
    table.add_row("bytes per active user (rt:u:* families, dedupe included)", f"{r['bytes_per_user']:,.0f}")
    table.add_row("bytes per item (covis + pop + items:n)", f"{r['bytes_per_item']:,.0f}")
    table.add_row(f"dedupe state (rt:u:*:ids, window {d['window']:,} + o:* watermarks), MB", _mb(d["bytes"]))
    table.add_row(
        "dedupe bytes per active user (ids + watermarks)",
        f"{d['bytes_per_user']:,.0f} ({d['ids_avg_bytes']:,.0f} + {d['watermark_bytes_per_user']:,.0f}"
        f" for {d['watermark_fields_per_user']:.2g} fields)",
    )
    table.add_row("dedupe bytes per event, amortized (dedupe bytes / events)", f"{d['bytes_per_event']:,.2f}")
    table.add_row(
        f"used_memory over the second half: largest deviation from the half (flat: within +-{FLAT_PCT:g}%)",
        f"{r['second_half_deviation_pct']:.1f}% ({_mb(r['second_half_min_used_memory'])}-"
        f"{_mb(r['second_half_max_used_memory'])} MB){'  flat' if r['flat'] else '  NOT flat'}",
    )
    pct = r["second_half_growth_pct"]
    table.add_row("second-half growth vs first half (0% flat, 100% linear)", "-" if pct is None else f"{pct:+.0f}%")
    return table


def _families_table(r: dict) -> Table:
    fam = Table(title=f"Redis keys by family  ({r['dbsize']:,} keys; MEMORY USAGE of up to {SAMPLE_KEYS} per family)")
    for col in ("family", "keys", "sampled", "avg bytes", "total MB", "share of growth", "2nd-half growth MB"):
        fam.add_column(col, justify="left" if col == "family" else "right", no_wrap=col == "family")
    for name, f in r["families"].items():
        share = f["total_bytes"] / r["growth_bytes"] * 100 if r["growth_bytes"] > 0 else 0.0
        fam.add_row(
            name,
            f"{f['keys']:,}",
            f"{f['sampled']:,}",
            f"{f['avg_bytes']:,.0f}",
            _mb(f["total_bytes"]),
            f"{share:.0f}%",
            f"{f['second_half_growth_bytes'] / 2**20:+,.2f}",
        )
    fam.add_row(
        "[b]all families",
        f"[b]{sum(f['keys'] for f in r['families'].values()):,}",
        "",
        "",
        f"[b]{_mb(r['families_total_bytes'])}",
        "",
        f"[b]{sum(f['second_half_growth_bytes'] for f in r['families'].values()) / 2**20:+,.2f}",
    )
    return fam


def _print_projection(r: dict, console: Console) -> None:
    p = r["projection"]
    console.print(
        f"projection at {p['rate_events_per_s']:,.0f} events/s over {p['days']} days ({p['events']:,.0f} events), "
        f"{p['users']:,} users ({p['events_per_user']:,.0f} events each; measured at "
        f"{p['measured_events_per_user']:,.0f}): user state {p['users']:,} x {r['bytes_per_user']:,.0f} B = "
        f"{_size(p['user_state_bytes'])}, of which dedupe {_size(p['dedupe_bytes'])} = "
        f"{p['dedupe_bytes_per_event']:.3g} B per event amortized; item state ({p['items']:,} items) "
        f"{_size(p['item_state_bytes'])}; total {_size(p['total_bytes'])}"
    )
    if p["events_per_user"] < p["measured_events_per_user"]:
        console.print("[yellow]the projection has fewer events per user than the replay: user state is overstated")
    elif p["events_per_user"] > p["measured_events_per_user"] and not r["flat"]:
        console.print(
            "[yellow]used_memory was still growing at the end of the replay: with more events per user "
            "the user state is larger than projected (up to what the caps allow)"
        )


def _plot(r: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    pts = r["samples"]
    x = [p["events"] for p in pts]
    caps = _caps_caption(r.get("caps"))
    fig = Figure(figsize=(10, 5.5))
    ax = fig.subplots()
    _stack_families(ax, x, pts)
    ax.plot(x, [p["used_memory"] / 2**20 for p in pts], color="black", marker="o", markersize=3, label="used_memory")
    mid = r["half_used_memory"] / 2**20
    ax.fill_between(
        [r["events"] / 2, r["events"]],
        mid * (1 - FLAT_PCT / 100),
        mid * (1 + FLAT_PCT / 100),
        color="green",
        alpha=0.12,
        label=f"±{FLAT_PCT:g}% of used_memory at the half",
    )
    ax.axvline(r["events"] / 2, color="grey", linestyle=":", linewidth=0.8)
    ax.set(
        xlabel="events applied (count)",
        ylabel="Redis memory (MB): used_memory and MEMORY USAGE by family",
        ylim=(0, None),
        xlim=(0, r["events"]),
        title=f"Redis memory while replaying {r['events']:,} events "
        f"({r['users']:,} users, {r['items']:,} items, {r['days']:g} simulated days)" + caps,
    )
    ax.ticklabel_format(axis="x", style="plain")
    _plot_active_users(ax, x, pts)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _caps_caption(c: dict | None) -> str:
    if not c:
        return ""
    return (
        f"\ncaps: sequence {c['sequence_length']}, affinity {c['affinity_cap']}, "
        f"co-visitation {c['covis_cap']}, dedupe window {c['dedupe_window']}"
    )


def _stack_families(ax: Any, x: list, pts: list[dict]) -> None:
    """MB per key family over the samples; the small ones (< 3% at the end) are stacked together."""
    end = pts[-1]["families"]
    big = [
        f
        for f in sorted(end, key=end.get, reverse=True)
        if end[f] >= 0.03 * max(sum(end.values()), 1) or f == IDS_FAMILY
    ]  # dedupe state always shown
    stacks = [[p["families"].get(f, 0) / 2**20 for p in pts] for f in big]
    stacks.append([sum(v for f, v in p["families"].items() if f not in big) / 2**20 for p in pts])
    ax.stackplot(x, *stacks, labels=[*big, "other families"], alpha=0.45)


def _plot_active_users(ax: Any, x: list, pts: list[dict]) -> None:
    """Active users on a second y axis, and one legend for both axes."""
    users = ax.twinx()
    users.plot(
        x,
        [p.get("active_users", 0) for p in pts],
        color="tab:orange",
        linestyle="--",
        linewidth=1,
        label="active users",
    )
    users.set(ylabel="active users (distinct users so far)", ylim=(0, None))
    lines = ax.get_legend_handles_labels()
    more = users.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
