"""`rtrec bench freshness`: the pure figures (freshness from samples of (time, version, window end), the warm-up,
swaps, trainer cycles, requests) with exact values, the input check through the CLI, and the trainer's windows
that freshness rests on (a due window reads its backlog, then trains on its newest events; histories are cut).
No timing is asserted; the full-stack run is marked slow."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from rtrec.model.finetune import build_data
from rtrec.model.store import CheckpointStore
from rtrec.stream.settings import Settings
from rtrec.workers.bench.freshness import (
    Sample,
    WindowEnds,
    after_warm_up,
    cycle_figures,
    freshness_figures,
    freshness_series,
    request_figures,
    swaps,
)
from rtrec.workers.cli import app
from rtrec.workers.trainer import TrainerLoop, Window

T0 = 1_796_000_000_000  # a wall clock, ms


def sample(t: float, version: str | None, age_s: float | None) -> Sample:
    """A sample at `t` s whose serving version learned from an event `age_s` old (None: no window)."""
    now = T0 + int(t * 1000)
    return Sample(t, now, version, None if age_s is None else now - int(age_s * 1000))


# blend for 3 s, then v1 (window end 20 s before its first sample) ages until v2 (5 s old) swaps in at t=6
SAMPLES = [
    sample(0, None, None),
    sample(1, "blend-v1", None),
    sample(2, "blend-v1", None),
    sample(3, "v1", 20),
    sample(4, "v1", 21),
    sample(5, "v1", 22),
    sample(6, "v2", 5),
    sample(7, "v2", 6),
]


def test_freshness_is_the_sample_time_minus_the_serving_versions_window_end() -> None:
    assert SAMPLES[3].age_s == 20.0 and SAMPLES[1].age_s is None
    series = freshness_series(SAMPLES)
    assert [t for t, _ in series] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert all(math.isnan(a) for _, a in series[:3])
    assert [a for _, a in series[3:]] == [20.0, 21.0, 22.0, 5.0, 6.0]


def test_the_warm_up_ends_when_a_trained_version_answers() -> None:
    assert after_warm_up(SAMPLES) == SAMPLES[3:]
    assert after_warm_up(SAMPLES, versions=2) == SAMPLES[6:]  # the steady state: the first fine-tune on
    assert after_warm_up(SAMPLES[:3]) == []
    figures = freshness_figures(SAMPLES)
    ages = [20.0, 21.0, 22.0, 5.0, 6.0]
    assert figures["p50_s"] == pytest.approx(float(np.percentile(ages, 50))) == pytest.approx(20.0)
    assert figures["p99_s"] == pytest.approx(float(np.percentile(ages, 99)))
    assert figures["max_s"] == 22.0
    assert (figures["samples"], figures["unknown"], figures["warm_up_s"]) == (5, 0, 3)
    steady = freshness_figures(SAMPLES, versions=2)
    assert (steady["max_s"], steady["samples"], steady["warm_up_s"]) == (6.0, 2, 6)


def test_no_trained_version_gives_no_figures() -> None:
    figures = freshness_figures(SAMPLES[:3])
    assert math.isnan(figures["p99_s"]) and math.isnan(figures["warm_up_s"]) and figures["samples"] == 0


def test_a_later_sample_without_a_window_is_counted_unknown_not_fresh() -> None:
    figures = freshness_figures([*SAMPLES[3:5], sample(5, "blend-v1", None)])
    assert (figures["samples"], figures["unknown"], figures["max_s"]) == (2, 1, 21.0)


def test_swaps_are_the_samples_where_the_answering_version_changed() -> None:
    assert swaps(SAMPLES) == [(3, "v1"), (6, "v2")]  # the first answer is no swap; no answer is skipped
    assert swaps([sample(0, "v1", 1), sample(1, None, None), sample(2, "v1", 3)]) == []


def test_cycle_figures_count_each_outcome() -> None:
    decisions = [
        {"promoted": True, "reason": "first model", "candidate_metrics": {}, "seconds": 30.0, "train_seconds": 28.0},
        {"promoted": True, "candidate_metrics": {}, "seconds": 10.0, "train_seconds": 8.0},
        {"promoted": False, "candidate_metrics": {}, "seconds": 12.0, "train_seconds": 9.0},  # kept by the gate
        {"promoted": False, "reason": "no history", "seconds": 0.5},  # skipped: nothing to train on
        {"promoted": False, "failed": True, "reason": "failed: ValueError: x"},
        {"promoted": False, "rolled_back": "v2", "version": "v1"},
    ]
    c = cycle_figures(decisions)
    assert (c["cycles"], c["promoted"], c["kept"], c["skipped"], c["failed"], c["rollbacks"]) == (5, 2, 1, 1, 1, 1)
    assert (c["seconds_p50"], c["seconds_max"]) == (11.0, 30.0)  # median of 30, 10, 12, 0.5
    assert (c["train_seconds_p50"], c["train_seconds_max"]) == (9.0, 28.0)
    assert math.isnan(cycle_figures([])["seconds_p50"])


def test_request_figures() -> None:
    sent = {"a": 0.0, "b": 1.0, "c": 2.0}
    responses = {"a": {"model_version": "v1"}, "b": {"error": "nothing to recommend"}}
    r = request_figures(sent, responses, {"a": 0.1, "b": 1.3})
    assert (r["sent"], r["answered"], r["failed"], r["unanswered"]) == (3, 2, 1, 1)
    assert r["max_ms"] == pytest.approx(300.0) and r["p50_ms"] == pytest.approx(200.0)


def test_window_ends_are_read_from_the_checkpoint_manifest(tmp_path) -> None:
    root = tmp_path / "checkpoints"
    for version, window in (("v1", {"first_ts": 1, "last_ts": 1234}), ("v0", {})):
        (root / version).mkdir(parents=True)
        (root / version / "manifest.json").write_text(json.dumps({"version": version, "training_window": window}))
    ends = WindowEnds(CheckpointStore(root))
    assert ends.last_ts("v1") == 1234
    assert ends.last_ts("v0") is None  # a checkpoint without a window (saved by hand)
    assert ends.last_ts("blend-v1") is None and ends.last_ts(None) is None  # not a checkpoint


def test_cli_refuses_bad_options_before_starting_anything() -> None:
    result = CliRunner().invoke(app, ["bench", "freshness", "--rate", "0", "--seconds", "-1"])
    assert result.exit_code == 2
    assert "--rate > 0" in result.output and "--seconds > 0" in result.output


# ---- the trainer's windows ---------------------------------------------------------------------------------------
def event(n: int, user: str = "u1") -> dict:
    return {"event_id": f"e{n}", "user_id": user, "item_id": f"i{n % 7}", "type": "browse", "ts": T0 + n}


def test_a_bounded_window_trains_on_its_newest_events_and_covers_every_offset() -> None:
    w = Window(keep=3)
    for n in range(10):
        w.add("events", n % 2, n // 2, event(n), record_ms=T0 + n)
    assert [e["event_id"] for e in w.newest()] == ["e7", "e8", "e9"]
    assert w.read == 10 and len(w.events) < 6  # a backlog is not held whole
    assert w.next_offsets == {"events:0": 5, "events:1": 5}  # the dropped events' offsets are covered too
    assert w.newest_record_ms == T0 + 9
    unbounded = Window()
    for offset, n in enumerate((3, 1, 2)):  # partitions interleave: offsets in order, event times not
        unbounded.add("events", 0, offset, event(n))
    assert [e["event_id"] for e in unbounded.newest()] == ["e1", "e2", "e3"]  # by event time


def test_a_due_window_first_reads_what_arrived_while_the_last_cycle_ran() -> None:
    s = Settings(trainer_every_s=20.0)
    w = Window(opened_ms=T0)
    loop = SimpleNamespace(window=w, settings=s)
    w.add("events", 0, 0, event(0), record_ms=T0 - 5000)  # sent during the last cycle: a backlog
    assert not TrainerLoop.caught_up(loop)
    w.due_since = time.monotonic()
    assert not TrainerLoop.caught_up(loop, now=w.due_since + 19.0)
    assert TrainerLoop.caught_up(loop, now=w.due_since + 20.0)  # waits at most trainer_every_s
    w.add("events", 0, 1, event(1), record_ms=T0 + 10)  # sent after the window opened: the end is reached
    assert TrainerLoop.caught_up(loop)


def test_a_fine_tune_trains_on_the_newest_events_of_each_history() -> None:
    s = Settings(finetune_min_history=3)
    window = [event(n) for n in range(100, 104)]
    context = {"u1": [(f"old{n}", "browse") for n in range(50)]}
    replay = [[(f"r{n}", "click") for n in range(30)]]
    capped = build_data(window, context, replay, s, max_history=10)
    [case] = capped.holdout
    assert case.target == "i5"  # e103: the newest event is held out
    assert len(case.history) == 9 and case.history[-3:] == [("i2", "browse"), ("i3", "browse"), ("i4", "browse")]
    assert [len(h) for h in capped.train] == [9, 10]  # the window user's (held-out event removed), the replayed
    assert capped.train[1][0] == ("r20", "click") and "old0" not in capped.items
    whole = build_data(window, context, replay, s)  # without a bound (the stream evaluation): whole histories
    assert [len(h) for h in whole.train] == [53, 30]


# ---- the whole stack -----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_bench_freshness_on_the_full_stack(tmp_path) -> None:
    """A short run on the stack `rtrec up` runs: the trainer promotes a model learned from this run's events, the
    served version's window end is measured, and no request is lost through the swaps."""
    from rich.console import Console

    from rtrec.workers.bench.freshness import run_freshness_bench

    started_ms = int(time.time() * 1000)
    plot = tmp_path / "fresh.png"
    settings = Settings(trainer_every_events=2000, finetune_first_epochs=2, finetune_epochs=1)
    result = run_freshness_bench(settings, 300.0, 35.0, 10.0, plot, Console(width=120))
    r = result["requests"]
    assert r["sent"] > 0 and r["answered"] == r["sent"] and r["failed"] == 0
    assert result["cycles"]["promoted"] >= 1 and result["freshness"]["samples"] >= 1
    trained = [s for s in result["samples"] if s["last_ts"] is not None]
    assert trained and all(s["last_ts"] >= started_ms for s in trained)  # learned from events stamped in the run
    assert plot.is_file() and json.loads(plot.with_suffix(".json").read_text())["requests"]["failed"] == 0
