"""`rtrec bench memory` on a tiny stream: its figures agree with each other and with Redis; bad options exit 2."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from rich.console import Console

from rtrec.stream.settings import Settings
from rtrec.workers.bench.memory import FAMILIES, OTHER, BenchInputError, bench_events, family_of, run_memory_bench
from tests.helpers import run_cli


def test_family_of_sorts_every_key_layout_name():
    assert family_of("rt:u:u1:h") == "rt:u:*:h"
    assert family_of("rt:u:u-1.x_2:seq") == "rt:u:*:seq"
    assert family_of("rt:u:u1:fair") == "rt:u:*:fair"  # a user part the bench does not list is still found
    assert family_of("rt:covis:i7") == "rt:covis:*"
    assert family_of("rt:u:u1:ids") == "rt:u:*:ids"
    assert family_of("rt:dedupe:abc") == OTHER  # per-event markers are gone: one would be unexplained
    assert family_of("rt:pop") == "rt:pop" and family_of("rt:items:n") == "rt:items:n"
    assert family_of("rt:pop:L") == OTHER and family_of("rt:stats") == OTHER and family_of("rt:workers:state") == OTHER


def test_bench_events_span_the_days_ending_at_the_given_time():
    end = 1_800_000_000_000
    events = bench_events(users=20, items=50, events=500, days=2, end_ms=end)
    assert len(events) == 500 and len({e["event_id"] for e in events}) == 500
    assert all(set(e) == {"event_id", "user_id", "item_id", "type", "ts"} for e in events)
    assert all(end - 2 * 86_400_000 <= e["ts"] <= end for e in events)
    assert max(e["ts"] for e in events) - min(e["ts"] for e in events) > 86_400_000  # spread, not bunched


@pytest.mark.integration
def test_a_tiny_run_gives_consistent_figures_and_writes_png_and_json(tmp_path):
    plot = tmp_path / "out" / "bench-memory.png"
    r = run_memory_bench(
        Settings(kafka_bootstrap=None, redis_url=None),
        users=50,
        items=100,
        events=3000,
        days=3,
        rate=500,
        samples=3,
        plot=plot,
        console=Console(width=120),
        run_dir=tmp_path / "run",
    )

    assert r["events"] == 3000 and 1 <= r["users"] <= 50 and 1 <= r["items"] <= 100
    assert [p["events"] for p in r["samples"]] == [0, 1000, 2000, 3000]
    assert r["growth_bytes"] > 0 and r["bytes_per_event"] > 0
    assert r["bytes_per_event"] == pytest.approx(r["growth_bytes"] / 3000)
    assert r["bytes_per_user"] > 0 and r["bytes_per_item"] > 0

    fam = r["families"]
    assert set(FAMILIES) <= set(fam) and "rt:dedupe:*" not in fam
    assert sum(f["keys"] for f in fam.values()) == r["dbsize"] == r["samples"][-1]["keys"]  # every key counted once
    assert fam.get(OTHER, {"keys": 0})["keys"] <= 5  # rt:stats, rt:pop:L, the ready set: nothing unexplained
    assert fam["rt:u:*:h"]["keys"] == fam["rt:u:*:seq"]["keys"] == fam["rt:u:*:ids"]["keys"] == r["users"]
    assert fam["rt:pop"]["keys"] == fam["rt:items:n"]["keys"] == 1
    assert 0 < r["families_total_bytes"] <= 1.5 * r["growth_bytes"]
    assert r["samples"][0]["active_users"] == 0 and r["samples"][-1]["active_users"] == r["users"]
    assert all(set(FAMILIES) <= set(p["families"]) for p in r["samples"])  # a breakdown at every sample
    half = r["samples"][1]["families"]  # 1000 and 2000 are equally near the half: the first is taken
    assert fam["rt:u:*:seq"]["second_half_growth_bytes"] == (
        r["samples"][-1]["families"]["rt:u:*:seq"] - half["rt:u:*:seq"]
    )

    d = r["dedupe"]  # per user: the id window plus one watermark field per partition the user's events came from
    assert d["window"] == Settings().dedupe_window == r["caps"]["dedupe_window"]
    assert r["caps"]["sequence_length"] == Settings().sequence_length
    assert d["ids_bytes"] == pytest.approx(fam["rt:u:*:ids"]["total_bytes"])
    per_user = Counter(e["user_id"] for e in bench_events(50, 100, 3000, 3, end_ms=0))  # the same users, any end
    window_bytes = 8 * sum(min(n, d["window"]) for n in per_user.values())  # each user's last `window` ids
    assert window_bytes <= d["ids_bytes"] <= window_bytes + 100 * r["users"]  # + per-key overhead
    assert d["watermark_fields_per_user"] == pytest.approx(1.0)  # one partition per user (keyed by user)
    assert 0 < d["watermark_bytes_per_user"] < 200 and d["watermark_raw_bytes_per_user"] > 10
    assert d["bytes"] == pytest.approx(d["ids_bytes"] + d["watermark_bytes_per_user"] * r["users"])
    assert d["bytes_per_user"] == pytest.approx(d["bytes"] / r["users"])
    assert d["bytes_per_event"] == pytest.approx(d["bytes"] / 3000)
    assert d["bytes_per_user"] < r["bytes_per_user"]  # a part of the user state

    p = r["projection"]
    assert p["users"] == 50  # --project-users defaults to --users
    assert p["events"] == 500 * 7 * 86_400
    assert p["user_state_bytes"] == pytest.approx(50 * r["bytes_per_user"])
    assert p["dedupe_bytes"] == pytest.approx(50 * d["bytes_per_user"])
    assert p["dedupe_bytes_per_event"] == pytest.approx(p["dedupe_bytes"] / p["events"])
    assert p["total_bytes"] == pytest.approx(p["user_state_bytes"] + r["items"] * r["bytes_per_item"])

    assert r["second_half_growth_pct"] is not None
    later = [s["used_memory"] for s in r["samples"] if s["events"] > 1500]
    assert r["second_half_deviation_pct"] == pytest.approx(
        max(abs(u - r["half_used_memory"]) for u in later) / r["half_used_memory"] * 100, rel=1e-3, abs=1e-6
    )
    assert r["flat"] == (r["second_half_deviation_pct"] <= 10)

    assert plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads(plot.with_suffix(".json").read_text())
    assert written["bytes_per_event"] == pytest.approx(r["bytes_per_event"])
    assert written["families"].keys() == fam.keys()


def test_bad_options_raise_before_anything_starts(tmp_path):
    with pytest.raises(BenchInputError, match="--users >= 1"):
        run_memory_bench(
            Settings(kafka_bootstrap=None, redis_url=None), users=0, plot=tmp_path / "x.png", run_dir=tmp_path / "run"
        )
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "args,rule",
    [
        (["--users", "0"], "--users >= 1"),
        (["--days", "0"], "--days > 0"),
        (["--events", "-5", "--items", "0"], "--items >= 1, --events >= 1"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, rule):
    res = run_cli(["bench", "memory", *args, "--plot", str(tmp_path / "m.png")], env={"COLUMNS": "80"}, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and rule in lines[0], out
    assert not (tmp_path / "m.png").exists()
