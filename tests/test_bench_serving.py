"""`rtrec bench generate --stack up` and `rtrec bench idle`: input checks through the CLI, and the pure figures
(percentiles from Prometheus bucket deltas, latency percentiles with lost requests, the sustainable rate, medians
of runs) with exact values. No timing is asserted; the full-stack run is marked slow."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from rtrec.workers.bench.serving import (
    BenchInputError,
    bucket_delta,
    check_inputs,
    histogram_quantile,
    latency_percentiles,
    median_by_rate,
    parse_histogram,
    parse_rates,
    save_figures,
    sustainable_rate,
)
from rtrec.workers.cli import app

INF = math.inf

SCRAPE = """# HELP rtrec_freshness_seconds A user's newest event (event time) -> the first response that reflects it
# TYPE rtrec_freshness_seconds histogram
rtrec_freshness_seconds_bucket{le="0.1"} 10.0
rtrec_freshness_seconds_bucket{le="0.25"} 60.0
rtrec_freshness_seconds_bucket{le="0.5"} 100.0
rtrec_freshness_seconds_bucket{le="+Inf"} 100.0
rtrec_freshness_seconds_count 100.0
rtrec_freshness_seconds_sum 22.5
rtrec_request_latency_seconds_bucket{le="0.1"} 7.0
rtrec_batch_size_bucket{le="1.0",worker="recommend"} 3.0
rtrec_batch_size_bucket{le="1.0",worker="state"} 4.0
"""


# ---- the CLI: one red line and exit 2 before anything starts ------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "rule"),
    [
        (["--rates", "100,abc"], "--rates"),
        (["--rates", "100,0"], "--rates"),
        (["--rates", "-5"], "--rates"),
        (["--rates", ""], "--rates"),
        (["--rates", "nan"], "--rates"),
        (["--seconds", "0"], "--seconds > 0"),
        (["--seconds", "-1"], "--seconds > 0"),
        (["--event-rate", "-1"], "--event-rate >= 0"),
        (["--runs", "0"], "--runs >= 1"),
    ],
)
def test_generate_up_bad_input_exits_2_with_one_line(tmp_path, monkeypatch, args, rule):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["bench", "generate", "--stack", "up", *args], env={"COLUMNS": "200"})
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and rule in lines[0], res.output
    assert "Traceback" not in res.output
    assert not list(tmp_path.iterdir())  # no plot, no JSON, no run folder: nothing started


def test_generate_up_names_every_broken_rule():
    res = CliRunner().invoke(
        app, ["bench", "generate", "--stack", "up", "--seconds", "0", "--runs", "0"], env={"COLUMNS": "200"}
    )
    assert res.exit_code == 2
    assert "--seconds > 0" in res.output and "--runs >= 1" in res.output


def test_generate_unknown_stack_mode_is_a_usage_error():
    res = CliRunner().invoke(app, ["bench", "generate", "--stack", "full"])
    assert res.exit_code == 2


def test_idle_bad_seconds_exits_2_with_one_line():
    res = CliRunner().invoke(app, ["bench", "idle", "--seconds", "0"], env={"COLUMNS": "200"})
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == ["bench idle: need --seconds > 0"]


def test_help_lists_the_new_options():
    out = CliRunner().invoke(app, ["bench", "generate", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--stack", "--rates", "--event-rate", "--runs"):
        assert option in out
    assert CliRunner().invoke(app, ["bench", "idle", "--help"]).exit_code == 0


# ---- inputs ----------------------------------------------------------------------------------------------------
def test_parse_rates_keeps_order_and_accepts_spaces_and_decimals():
    assert parse_rates("100, 200,50.5") == [100.0, 200.0, 50.5]


def test_check_inputs_returns_the_rates():
    assert check_inputs("100,200", 10, 0, 1) == [100.0, 200.0]
    with pytest.raises(BenchInputError, match="--event-rate >= 0"):
        check_inputs("100", 10, -0.5, 1)


# ---- Prometheus histograms ----------------------------------------------------------------------------------
def test_parse_histogram_reads_only_the_named_buckets_and_sums_label_sets():
    assert parse_histogram(SCRAPE, "rtrec_freshness_seconds") == {0.1: 10.0, 0.25: 60.0, 0.5: 100.0, INF: 100.0}
    assert parse_histogram(SCRAPE, "rtrec_batch_size") == {1.0: 7.0}
    assert parse_histogram(SCRAPE, "rtrec_missing") == {}
    assert parse_histogram("", "rtrec_freshness_seconds") == {}


def test_quantile_interpolates_linearly_within_the_bucket():
    buckets = {0.1: 10.0, 0.25: 60.0, 0.5: 100.0, INF: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.15 * 40 / 50)  # 0.22
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.25 + 0.25 * 39 / 40)  # 0.49375
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.05)  # the first bucket starts at 0
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.1)


def test_quantile_of_the_difference_between_two_scrapes():
    before = {0.1: 5.0, 0.25: 5.0, 0.5: 5.0, INF: 5.0}
    after = {0.1: 15.0, 0.25: 65.0, 0.5: 105.0, INF: 105.0}
    delta = bucket_delta(before, after)
    assert delta == {0.1: 10.0, 0.25: 60.0, 0.5: 100.0, INF: 100.0}
    assert histogram_quantile(0.5, delta) == pytest.approx(0.22)
    assert bucket_delta({}, {0.1: 3.0, INF: 4.0}) == {0.1: 3.0, INF: 4.0}  # a worker that had not observed yet


def test_quantile_beyond_the_last_bound_is_inf_and_none_observed_is_nan():
    assert histogram_quantile(0.99, {0.1: 90.0, 0.5: 95.0, INF: 100.0}) == INF
    assert histogram_quantile(0.9, {0.1: 90.0, 0.5: 95.0, INF: 100.0}) == pytest.approx(0.1)
    assert math.isnan(histogram_quantile(0.5, {0.1: 0.0, INF: 0.0}))
    assert math.isnan(histogram_quantile(0.5, {}))


def test_quantile_skips_empty_buckets_to_the_one_that_holds_the_rank():
    # nothing between 0.1 and 0.5: rank 50 of 100 lies in (0.5, 1.0]
    assert histogram_quantile(0.5, {0.1: 20.0, 0.25: 20.0, 0.5: 20.0, 1.0: 100.0, INF: 100.0}) == pytest.approx(
        0.5 + 0.5 * 30 / 80
    )


# ---- client latency ----------------------------------------------------------------------------------------
def test_latency_percentiles_without_losses_are_numpys_linear_ones():
    assert latency_percentiles([10.0, 20.0, 30.0, 40.0, 50.0], 0, (50, 99)) == [30.0, pytest.approx(49.6)]


def test_lost_requests_count_as_infinitely_late():
    answered = [float(v) for v in range(1, 100)]  # 99 answered, 1 lost
    p50, p99, p999 = latency_percentiles(answered, 1, (50, 99, 99.9))
    assert p50 == pytest.approx(50.5)
    assert p99 == INF  # index 98.01 of 0..99 reaches into the lost one
    assert p999 == INF
    assert latency_percentiles([5.0], 0, (50,)) == [5.0]
    assert latency_percentiles([], 3, (50,)) == [INF]
    assert math.isnan(latency_percentiles([], 0, (50,))[0])


# ---- the sweep's verdict and the median of runs ----------------------------------------------------------------
def _rows(*pairs):
    return [{"rate": rate, "client_p99_ms": p99} for rate, p99 in pairs]


def test_sustainable_rate_is_the_last_under_the_limit_before_the_first_over():
    assert sustainable_rate(_rows((100, 20.0), (200, 40.0), (500, 250.0))) == 200
    assert sustainable_rate(_rows((100, 20.0), (200, 199.9))) == 200
    assert sustainable_rate(_rows((100, 20.0), (200, 200.0))) == 100  # "under": 200 ms itself fails
    assert sustainable_rate(_rows((100, 300.0), (200, 40.0))) is None  # the sweep had stopped at 100
    assert sustainable_rate(_rows((100, 20.0), (200, INF), (500, 40.0))) == 100
    assert sustainable_rate(_rows((100, 20.0), (200, math.nan))) == 100
    assert sustainable_rate([]) is None
    assert sustainable_rate(_rows((100, 20.0), (200, 60.0)), limit_ms=50) == 100


def test_median_by_rate_over_the_runs_that_reached_each_rate():
    runs = [
        [
            {"rate": 100.0, "client_p99_ms": 10.0, "sent": 1000, "cpu": {"tansu": 10.0, "state-1": 30.0}},
            {"rate": 200.0, "client_p99_ms": 300.0, "sent": 2000, "cpu": {"tansu": 20.0, "state-1": 40.0}},
        ],
        [{"rate": 100.0, "client_p99_ms": 30.0, "sent": 1000, "cpu": {"tansu": 14.0, "state-1": 50.0}}],
        [{"rate": 100.0, "client_p99_ms": 20.0, "sent": 998, "cpu": {"tansu": 12.0, "state-1": 20.0}}],
    ]
    median = median_by_rate(runs)
    assert median == [
        {"rate": 100.0, "runs": 3, "client_p99_ms": 20.0, "sent": 1000.0, "cpu": {"state-1": 30.0, "tansu": 12.0}},
        {"rate": 200.0, "runs": 1, "client_p99_ms": 300.0, "sent": 2000.0, "cpu": {"state-1": 40.0, "tansu": 20.0}},
    ]
    assert sustainable_rate(median) == 100.0


def test_median_keeps_inf_and_ignores_nan():
    runs = [
        [{"rate": 1.0, "p": INF}],
        [{"rate": 1.0, "p": INF}],
        [{"rate": 1.0, "p": 5.0}],
        [{"rate": 1.0, "p": math.nan}],
    ]
    assert median_by_rate(runs)[0]["p"] == INF


# ---- the real thing (minutes; excluded by default) -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_generate_up_smoke_writes_plot_and_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plot = tmp_path / "up.png"
    args = ["bench", "generate", "--stack", "up", "--rates", "20", "--seconds", "2", "--event-rate", "100"]
    res = CliRunner().invoke(app, [*args, "--plot", str(plot)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    figures = json.loads(plot.with_suffix(".json").read_text())
    row = figures["runs"][0][0]
    assert row["rate"] == 20 and row["sent"] == 40 and row["answered"] == 40
    assert {"tansu", "state-1", "recommend-1", "trainer-1", "ops-1"} <= set(row["cpu"])
    assert plot.stat().st_size > 0


def test_a_bench_leaves_its_plot_and_its_figures_as_strict_json(tmp_path):
    from rich.console import Console

    drawn: list = []
    result = {"p99_ms": math.nan, "max_ms": math.inf, "runs": [{"rate": 100, "p50_ms": 1.5}]}
    save_figures(result, tmp_path / "b.png", lambda r, path: drawn.append((r, path)), Console(quiet=True))
    assert drawn == [(result, tmp_path / "b.png")]
    saved = json.loads((tmp_path / "b.json").read_text())  # strict JSON: no NaN / Infinity tokens
    assert saved == {"p99_ms": None, "max_ms": "inf", "runs": [{"rate": 100, "p50_ms": 1.5}]}
    save_figures(result, None, lambda r, path: drawn.append(path), Console(quiet=True))
    assert len(drawn) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]
