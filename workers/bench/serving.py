"""`rtrec bench generate --stack up` and `rtrec bench idle`: serving speed and idle CPU of the stack users run.

Why: the minimal bench (generate.py) starts a state and one recommendation worker, with no events
flowing, and sends requests at one rate. Users run `rtrec up`: a trainer and an ops worker run too,
events keep arriving (the state worker applies them, the trainer fine-tunes on them), and the
question is how fast the stack answers *then*, up to what request rate, and what each process costs.

The stack is started as `rtrec up` starts it (one state, one recommendation worker, the trainer and
the ops worker, supervised, Redis with its append-only file), in a temporary folder. With `--serve
model` (the default) a default-size generative model is CURRENT, so requests are ranked as they are
once a model is trained (the model fused with the baseline); `--serve blend` leaves the checkpoint
folder empty: what `rtrec up` serves before the first training. The trainer fine-tunes on the flow
and may promote during the bench (the versions answered are printed).

User histories are filled first; then events for the same users flow at `event_rate` from a thread
of their own (stamped now, fresh ids) during the whole measurement, and each request asks for a user
among those of the newest events (an active user: what a shop asks for), so the freshness figure is
event -> first response that reflects it for users who are being served.

For each request rate (lowest first) requests go out for `seconds` from an independent client whose
responses are stamped on arrival; per rate the bench reports sent / answered, the client's
p50/p99/p99.9 (a request unanswered after the drain wait counts as infinitely late), the worker's own
share (`latency_ms`), freshness from the recommendation worker's `rtrec_freshness_seconds` histogram
and event -> Redis from the state worker's `rtrec_event_to_state_seconds` (both from the difference of
the buckets scraped before and after the rate, interpolated linearly within a bucket, as Prometheus'
histogram_quantile does), and the CPU of every process in % of one core. The sweep stops after the
first rate whose p99 passes 200 ms; the sustainable rate is the last one under it. `runs` repeats the
sweep on the same stack and reports the per-rate median of the runs next to each run.

`rtrec bench idle` starts the same stack, waits until every worker answers /readyz, lets it settle,
and measures each process's CPU over `seconds` with no traffic.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from rtrec.stream.producer import EventProducer
from rtrec.stream.rec_client import RecClient
from rtrec.stream.replay import Pacer
from rtrec.stream.settings import Settings
from rtrec.stream.synthetic import SyntheticConfig, generate_events
from rtrec.workers.bench.stack_load import (
    N_ITEMS,
    default_generator,
    fill_histories,
    responses_read_in_background,
    wait_for_answers,
)
from rtrec.workers.stack import Stack

LIMIT_MS = 200.0  # a rate whose client p99 passes this ends the sweep
GOOD_MS = 50.0  # drawn on the plot as the target for a snappy page
FILL = SyntheticConfig(n_users=500, n_items=N_ITEMS, n_events=20_000, seed=5)
FLOW_POOL = 50_000  # background events are drawn from this many synthetic ones (same users and tastes), cycled
# the embedded broker slows down as a partition collects many small record batches (operations.md, soak):
# at 1k events/s in 5 ms batches a sweep of a few minutes would measure that, so the flow batches 20 ms
FLOW_LINGER_MS = 20
RECENT_USERS = 200  # requests ask for users among the newest events' (about the last 0.2 s at 1k events/s)
WARM_FLOW_S = 3.0  # events flow this long before the warm-up requests
DRAIN_MIN_S = 30.0  # after a rate, answers are awaited at least this long (3x the rate's seconds if longer)
SETTLE_S = 3.0  # bench idle: seconds between all-ready and the measurement
IDLE_TARGET_PCT = 10.0  # acceptance: an idle stack uses less than this % of one core, all processes together
FRESHNESS = "rtrec_freshness_seconds"
EVENT_TO_STATE = "rtrec_event_to_state_seconds"


class BenchInputError(ValueError):
    """Options the bench cannot run with (checked before anything starts)."""


# ---- inputs ----------------------------------------------------------------------------------------------
def parse_rates(text: str) -> list[float]:
    """'100,200,500' -> [100.0, 200.0, 500.0]; BenchInputError unless each is a number > 0."""
    parts = [p.strip() for p in text.split(",")]
    try:
        rates = [float(p) for p in parts]
    except ValueError:
        raise BenchInputError(f"bench generate: need --rates as comma-separated numbers > 0 (got {text!r})") from None
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise BenchInputError(f"bench generate: need --rates as comma-separated numbers > 0 (got {text!r})")
    return rates


def check_inputs(rates: str, seconds: float, event_rate: float, runs: int) -> list[float]:
    """The rates to sweep, in the order given; BenchInputError naming every rule broken."""
    problems = [
        rule
        for rule, ok in {
            "--seconds > 0": seconds > 0 and math.isfinite(seconds),
            "--event-rate >= 0": event_rate >= 0 and math.isfinite(event_rate),
            "--runs >= 1": runs >= 1,
        }.items()
        if not ok
    ]
    if problems:
        raise BenchInputError(f"bench generate: need {', '.join(problems)}")
    return parse_rates(rates)


def check_idle_inputs(seconds: float) -> None:
    if not (seconds > 0 and math.isfinite(seconds)):
        raise BenchInputError("bench idle: need --seconds > 0")


# ---- pure figures ------------------------------------------------------------------------------------------
_BUCKET = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)_bucket\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)")
_LE = re.compile(r'le="(?P<le>[^"]+)"')


def parse_histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of histogram `name` in a Prometheus text exposition, by upper bound
    (+Inf included), summed over its label sets; {} when the histogram is absent."""
    out: dict[float, float] = {}
    for line in text.splitlines():
        m = _BUCKET.match(line)
        if not m or m["name"] != name:
            continue
        le = _LE.search(m["labels"])
        if le:
            bound = float(le["le"])  # "+Inf" parses as inf
            out[bound] = out.get(bound, 0.0) + float(m["value"])
    return out


def bucket_delta(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    """Observations between two scrapes, per cumulative bucket (a bucket missing before counts from 0)."""
    return {bound: count - before.get(bound, 0.0) for bound, count in after.items()}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """The q-quantile (0..1) of cumulative `buckets`, linear within the bucket it falls in (the first bucket
    starts at 0), as Prometheus' histogram_quantile; nan without observations, inf when it falls beyond the
    last finite bound."""
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return math.inf
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return math.inf


def latency_percentiles(answered_ms: Sequence[float], lost: int, qs: Sequence[float]) -> list[float]:
    """Percentiles (0..100, numpy's linear method) of the answered latencies plus `lost` infinitely late
    ones: inf where a percentile reaches into the lost ones, nan when nothing was sent."""
    if not len(answered_ms) and not lost:
        return [math.nan for _ in qs]
    if not len(answered_ms):
        return [math.inf for _ in qs]
    top = max(answered_ms)
    sentinel = top * 2 + 1e9  # larger than any answered one: a percentile touching it is "lost"
    values = np.concatenate([np.asarray(answered_ms, dtype=float), np.full(lost, sentinel)])
    return [math.inf if v > top else float(v) for v in np.percentile(values, list(qs))]


def sustainable_rate(rows: Sequence[dict[str, Any]], limit_ms: float = LIMIT_MS) -> float | None:
    """The last rate, in sweep order, whose client p99 is under `limit_ms` before the first that is not
    (nan: nothing answered, counts as not); None when the first rate already failed."""
    best = None
    for row in rows:
        p99 = row["client_p99_ms"]
        if not p99 < limit_ms:  # nan and inf fail too
            break
        best = row["rate"]
    return best


def _median(values: Sequence[float]) -> float:
    kept = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(statistics.median(kept)) if kept else math.nan


def median_by_rate(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per rate (in the first run's order, then any later ones), the median over the runs that reached it of
    every number, CPU per process included; `runs` says how many runs it is the median of."""
    order: list[float] = []
    for run in runs:
        order += [r["rate"] for r in run if r["rate"] not in order]
    out = []
    for rate in order:
        rows = [r for run in runs for r in run if r["rate"] == rate]
        med: dict[str, Any] = {"rate": rate, "runs": len(rows)}
        for key, value in rows[0].items():
            if key != "rate" and isinstance(value, int | float):
                med[key] = _median([float(r[key]) for r in rows if key in r])
        names = {n for r in rows for n in r.get("cpu", {})}
        med["cpu"] = {n: _median([r["cpu"][n] for r in rows if n in r.get("cpu", {})]) for n in sorted(names)}
        out.append(med)
    return out


# ---- the stack and what runs beside it ---------------------------------------------------------------------
@contextmanager
def full_stack(settings: Settings, console: Console, serve_model: bool = False) -> Iterator[Stack]:
    """The stack as `rtrec up` starts it (state, recommend, trainer, ops; supervised; Redis with its
    append-only file), in a temporary folder; its checkpoint folder is empty (the blend serves) or, with
    `serve_model`, holds a default-size model as CURRENT. Stopped on the way out."""
    with tempfile.TemporaryDirectory(prefix="rtrec-bench-up-") as tmp:
        root = Path(tmp)
        s = settings.model_copy(update={"checkpoint_dir": root / "checkpoints"})
        if serve_model:
            promote_default_model(s)
        stack = Stack(
            s,
            run_dir=root / "run",
            data_dir=root / "data" / "redis",
            supervised=True,
            log=lambda line: console.print(f"[yellow]{line}", soft_wrap=True),
        )
        with stack:
            stack.start(state_workers=1, recommend_workers=1, trainer=True, ops=True)
            yield stack


def promote_default_model(settings: Settings) -> str:
    """A default-size model over the bench's items (weights from a fixed seed: speed does not depend on
    training) saved and promoted in `settings.checkpoint_dir`; its version."""
    from rtrec.model.checkpoint import save_checkpoint
    from rtrec.model.store import CheckpointStore

    checkpoint = default_generator(settings).checkpoint
    path = save_checkpoint(checkpoint.model, checkpoint.vocab, settings.checkpoint_dir, checkpoint.manifest["meta"])
    CheckpointStore(settings.checkpoint_dir).promote(path.name, reason="bench generate --stack up --serve model")
    return path.name


def stack_processes(stack: Stack) -> dict[str, psutil.Process]:
    """Every server and worker of `stack` by name (tansu = the broker, redis* = Redis)."""
    return {p.name: psutil.Process(p.proc.pid) for p in stack.servers + stack.workers}


class CpuMeter:
    """CPU time (user + system) of named processes between `start()` and `percent()`, in % of one core."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = processes
        self._t0 = 0.0
        self._cpu0: dict[str, float] = {}

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        try:
            t = proc.cpu_times()
        except psutil.Error:  # it exited: counted as no CPU from then on
            return math.nan
        return t.user + t.system

    def start(self) -> None:
        self._cpu0 = {name: self._cpu(p) for name, p in self.processes.items()}
        self._t0 = time.monotonic()

    def percent(self) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self._t0)
        return {name: (self._cpu(p) - self._cpu0[name]) / wall * 100 for name, p in self.processes.items()}


def scrape(port: int | None, timeout_s: float = 5) -> str:
    """A worker's /metrics text ('' when it has no port or does not answer)."""
    if not port:
        return ""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            return r.read().decode()
    except OSError:
        return ""


def wait_all_ready(stack: Stack, timeout_s: float = 120) -> None:
    """Until every worker's /readyz answers 200 (a worker without a metrics port is taken as ready)."""
    deadline = time.monotonic() + timeout_s
    waiting = dict(stack.metrics_ports)
    while waiting:
        for name, port in list(waiting.items()):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        del waiting[name]
            except OSError:  # 503 (HTTPError) or not answering yet
                pass
        if waiting and time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout_s:g} s: {', '.join(sorted(waiting))}")
        time.sleep(0.2)


class EventFlow:
    """Events for the bench's users at a steady rate, on a thread of its own: synthetic ones (same users and
    tastes as the filled histories), each with a fresh id (none is a duplicate) and stamped when sent (so
    freshness counts from then)."""

    def __init__(self, settings: Settings, rate: float) -> None:
        self.settings = settings.model_copy(update={"producer_linger_ms": FLOW_LINGER_MS})
        self.rate = rate
        self.sent = 0
        self.recent: deque[str] = deque(maxlen=RECENT_USERS)  # users of the newest events (requests go to them)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._pool = generate_events(replace(FILL, n_events=FLOW_POOL)) if rate > 0 else []
        self._thread = threading.Thread(target=self._run, name="event-flow", daemon=True)

    def _run(self) -> None:
        pacer = Pacer(rate=self.rate)
        try:
            with EventProducer(self.settings) as producer:
                i = 0
                while not self._stop.is_set():
                    pacer.wait(None)
                    event = self._pool[i % len(self._pool)]
                    producer.send({**event, "event_id": uuid.uuid4().hex, "ts": int(time.time() * 1000)})
                    self.recent.append(event["user_id"])
                    self.sent += 1
                    i += 1
        except Exception as exc:  # noqa: BLE001 - reported by the bench at the end, not lost in a thread
            self.error = exc

    def request_user(self, users: list[str], i: int) -> str:
        """Whom the i-th request asks for: a user with one of the newest events (a shop asks for the
        recommendations of a user who is active now), or round-robin when no events flow."""
        recent = list(self.recent)[-RECENT_USERS:] if self.recent else None
        return random.choice(recent) if recent else users[i % len(users)]

    def __enter__(self) -> EventFlow:
        if self.rate > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)


# ---- one rate, one sweep -------------------------------------------------------------------------------------
def measure_rate(
    stack: Stack, client: RecClient, users: list[str], rate: float, seconds: float, flow: EventFlow
) -> dict[str, Any]:
    """Send `rate` req/s for `seconds`, wait for the answers; the rate's row of figures."""
    rec_port = next((p for n, p in stack.metrics_ports.items() if n.startswith("recommend")), None)
    state_port = next((p for n, p in stack.metrics_ports.items() if n.startswith("state")), None)
    fresh0, state0 = parse_histogram(scrape(rec_port), FRESHNESS), parse_histogram(scrape(state_port), EVENT_TO_STATE)
    meter = CpuMeter({**stack_processes(stack), "bench": psutil.Process()})
    events0 = flow.sent
    sent: dict[str, float] = {}
    pacer = Pacer(rate=rate)
    meter.start()
    for i in tqdm(range(int(rate * seconds)), desc=f"requests at {rate:g}/s", unit="req", leave=False):
        pacer.wait(None)
        started = time.perf_counter()
        sent[client.send(flow.request_user(users, i), k=10)] = started
    cpu = meter.percent()
    events = flow.sent - events0
    client.producer.flush()
    wait_for_answers_to(client, sent, max(DRAIN_MIN_S, 3 * seconds))
    fresh = bucket_delta(fresh0, parse_histogram(scrape(rec_port), FRESHNESS))
    to_state = bucket_delta(state0, parse_histogram(scrape(state_port), EVENT_TO_STATE))
    return _row(client, sent, rate, events / seconds, cpu, fresh, to_state)


def wait_for_answers_to(client: RecClient, sent: dict[str, float], timeout_s: float) -> None:
    """Until every request in `sent` is answered or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while any(r not in client.responses for r in sent) and time.monotonic() < deadline:
        time.sleep(0.1)


def _row(
    client: RecClient,
    sent: dict[str, float],
    rate: float,
    event_rate: float,
    cpu: dict[str, float],
    fresh: dict[float, float],
    to_state: dict[float, float],
) -> dict[str, Any]:
    got = [r for r in sent if r in client.responses]
    client_ms = [(client.arrivals[r] - sent[r]) * 1000 for r in got]
    worker_ms = [
        float(client.responses[r]["latency_ms"]) for r in got if client.responses[r].get("latency_ms") is not None
    ]
    p50, p99, p999 = latency_percentiles(client_ms, len(sent) - len(got), (50, 99, 99.9))
    w50, w99 = np.percentile(worker_ms, [50, 99]) if worker_ms else (math.nan, math.nan)
    return {
        "rate": rate,
        "sent": len(sent),
        "answered": len(got),
        "errors": sum(1 for r in got if client.responses[r].get("error")),
        "client_p50_ms": p50,
        "client_p99_ms": p99,
        "client_p999_ms": p999,
        "worker_p50_ms": float(w50),
        "worker_p99_ms": float(w99),
        "freshness_p50_s": histogram_quantile(0.5, fresh),
        "freshness_p99_s": histogram_quantile(0.99, fresh),
        "freshness_n": fresh.get(math.inf, 0.0),
        "event_to_state_p50_s": histogram_quantile(0.5, to_state),
        "event_to_state_p99_s": histogram_quantile(0.99, to_state),
        "events_per_s": event_rate,
        "cpu": cpu,
        "versions": dict(Counter(client.responses[r].get("model_version") or "?" for r in got)),
    }


def run_sweep(
    stack: Stack, client: RecClient, users: list[str], rates: list[float], seconds: float, flow: EventFlow, tag: str
) -> list[dict[str, Any]]:
    """Each rate in turn until the first whose client p99 passes LIMIT_MS; one printed line per rate."""
    rows = []
    for rate in rates:
        row = measure_rate(stack, client, users, rate, seconds, flow)
        rows.append(row)
        tqdm.write(
            f"{tag}{rate:g} req/s: answered {row['answered']}/{row['sent']}, client p50 {_ms(row['client_p50_ms'])}"
            f" p99 {_ms(row['client_p99_ms'])} ms; events {row['events_per_s']:.0f}/s"
        )
        if not row["client_p99_ms"] < LIMIT_MS:
            break
    return rows


# ---- the benches ------------------------------------------------------------------------------------------------
def run_serving_bench(
    settings: Settings,
    rates: list[float],
    seconds: float,
    event_rate: float,
    runs: int,
    plot: Path | None,
    console: Console,
    serve_model: bool = True,
) -> dict[str, Any]:
    """`rtrec bench generate --stack up`: the sweep `runs` times on one full stack; tables, PNG and JSON."""
    rates = sorted(rates)
    console.rule(f"rtrec bench generate --stack up: {', '.join(f'{r:g}' for r in rates)} req/s, {seconds:g} s each")
    with full_stack(settings, console, serve_model) as stack:
        s = stack.settings
        console.print(f"stack up ({stack.describe()}); filling histories of {FILL.n_users} users ...", soft_wrap=True)
        users = fill_histories(s, FILL)
        with EventFlow(s, event_rate) as flow, RecClient(s) as client, responses_read_in_background(client):
            time.sleep(WARM_FLOW_S if event_rate > 0 else 0)
            warm = [client.send(u) for u in users]  # one per user: the model warm, each user's stale history seen
            client.producer.flush()
            wait_for_answers(client, len(warm))
            all_runs = [
                run_sweep(stack, client, users, rates, seconds, flow, f"run {n + 1}/{runs}: " if runs > 1 else "")
                for n in range(runs)
            ]
            events_sent, flow_error = flow.sent, flow.error
    if flow_error is not None:
        console.print(f"[red]the event flow stopped: {type(flow_error).__name__}: {flow_error}", soft_wrap=True)
    result = _result(all_runs, rates, seconds, event_rate, events_sent, settings)
    _print_report(result, console)
    save_figures(result, plot, _plot, console)
    return result


def _result(
    all_runs: list[list[dict[str, Any]]],
    rates: list[float],
    seconds: float,
    event_rate: float,
    events_sent: int,
    settings: Settings,
) -> dict[str, Any]:
    median = median_by_rate(all_runs)
    return {
        "config": {
            "rates": rates,
            "seconds": seconds,
            "event_rate": event_rate,
            "runs": len(all_runs),
            "users": FILL.n_users,
            "recommender": settings.recommender,
            "redis_cluster": settings.redis_cluster,
            "limit_ms": LIMIT_MS,
            "events_sent": events_sent,
            "cpus": psutil.cpu_count(),
        },
        "runs": all_runs,
        "median": median,
        "sustainable_rate_per_run": [sustainable_rate(run) for run in all_runs],
        "sustainable_rate_median": sustainable_rate(median),
        "notes": {
            "client": "send -> response arrival at the client; a request unanswered after the drain wait is "
            "infinitely late (inf)",
            "freshness": "rtrec_freshness_seconds (event time of a user's newest event -> the first response "
            "reflecting it) and rtrec_event_to_state_seconds, from the bucket counts' difference over each rate, "
            "interpolated linearly within a bucket; inf: beyond the last finite bucket bound",
            "cpu": "% of one core (user + system) while the rate's requests were sent",
        },
    }


# ---- output -------------------------------------------------------------------------------------------------------
def _ms(v: float) -> str:
    return "-" if math.isnan(v) else "inf" if math.isinf(v) else f"{v:.1f}"


def _s_as_ms(v: float) -> str:
    return "-" if math.isnan(v) else "> last bucket" if math.isinf(v) else f"{v * 1000:.0f}"


def _rate_label(r: dict[str, Any]) -> str:
    return f"{r['rate']:g}" + (f" (n={r['runs']})" if r.get("runs", 1) > 1 else "")


def _table(title: str, columns: Sequence[str]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    return table


def _client_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Requests: sent, answered, client p50/p99/p99.9 and the worker's own share (latency_ms), in ms."""
    table = _table(title, ("req/s", "sent", "answered", "errors", "p50", "p99", "p99.9", "worker p50", "worker p99"))
    for r in rows:
        table.add_row(
            _rate_label(r),
            f"{r['sent']:,.0f}",
            f"{r['answered']:,.0f}",
            f"{r['errors']:,.0f}",
            *(
                _ms(r[k])
                for k in ("client_p50_ms", "client_p99_ms", "client_p999_ms", "worker_p50_ms", "worker_p99_ms")
            ),
        )
    return table


def _freshness_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Freshness and event -> Redis from the workers' histograms (ms), and the events that flowed."""
    columns = ("req/s", "fresh p50", "fresh p99", "observed", "ev->redis p50", "ev->redis p99", "events/s")
    table = _table(title, columns)
    for r in rows:
        table.add_row(
            _rate_label(r),
            *(_s_as_ms(r[k]) for k in ("freshness_p50_s", "freshness_p99_s")),
            f"{r['freshness_n']:,.0f}",
            *(_s_as_ms(r[k]) for k in ("event_to_state_p50_s", "event_to_state_p99_s")),
            f"{r['events_per_s']:,.0f}",
        )
    return table


def _cpu_table(rows: list[dict[str, Any]], title: str) -> Table:
    """A process per row, a rate per column; the stack's total (this process left out) at the bottom."""
    names = list(dict.fromkeys(n for r in rows for n in r["cpu"]))
    table = Table(title=title)
    for col in ("process", *(f"{r['rate']:g} req/s" for r in rows)):
        table.add_column(col, justify="right")
    for name in names:
        table.add_row(name, *(_pct(r["cpu"].get(name, math.nan)) for r in rows))
    totals = [sum(v for n, v in r["cpu"].items() if not n.startswith("bench") and not math.isnan(v)) for r in rows]
    table.add_row("[bold]stack total", *(f"[bold]{t:.0f}" for t in totals))
    return table


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.0f}"


def _print_report(result: dict[str, Any], console: Console) -> None:
    runs, median = result["runs"], result["median"]
    for n, run in enumerate(runs):
        if len(runs) > 1:
            console.print(_client_table(run, f"run {n + 1}: request -> response, ms"))
            console.print(_freshness_table(run, f"run {n + 1}: freshness, ms"))
    many = len(runs) > 1
    console.print(
        _client_table(median, "median of the runs: request -> response, ms" if many else "request -> response, ms")
    )
    console.print(_freshness_table(median, "median of the runs: freshness, ms" if many else "freshness, ms"))
    console.print(_cpu_table(median, "CPU, % of one core (median)" if len(runs) > 1 else "CPU, % of one core"))
    versions: Counter[str] = Counter()
    for run in runs:
        for r in run:
            versions.update(r["versions"])
    console.print(f"answered by: {', '.join(f'{v} {n:,}' for v, n in versions.most_common())}", soft_wrap=True)
    console.print(
        "client: send -> arrival at the client; 'inf' = beyond the unanswered share (each counts as infinitely "
        "late).\nfreshness (recommend worker): a user's newest event -> the first response reflecting it; requests "
        f"ask for users among the newest {RECENT_USERS} events', so it includes the wait for that user's next "
        "request. ev->redis (state worker): event produced -> visible in Redis, the event flow's "
        f"{FLOW_LINGER_MS} ms producer linger included. Both from the difference of the Prometheus bucket "
        "counts over each rate, interpolated linearly within a bucket (bounds in workers/metrics.py).",
        soft_wrap=True,
    )
    per_run = ", ".join("none" if r is None else f"{r:g}" for r in result["sustainable_rate_per_run"])
    best = result["sustainable_rate_median"]
    console.print(
        f"[bold]sustainable rate (last with client p99 < {LIMIT_MS:.0f} ms): "
        f"{'none' if best is None else f'{best:g} req/s'}[/]"
        + (f" (median; per run: {per_run})" if len(runs) > 1 else "")
    )


def _plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    median = result["median"]
    x = [r["rate"] for r in median]
    for key, label, style in (
        ("client_p50_ms", "p50", "o-"),
        ("client_p99_ms", "p99", "s-"),
        ("client_p999_ms", "p99.9", "^-"),
    ):
        y = [r[key] if math.isfinite(r[key]) else math.nan for r in median]
        ax.plot(x, y, style, label=label + (" (median of runs)" if len(result["runs"]) > 1 else ""))
    if len(result["runs"]) > 1:  # each run's p99, faint, behind the medians
        points = [
            (r["rate"], r["client_p99_ms"]) for run in result["runs"] for r in run if math.isfinite(r["client_p99_ms"])
        ]
        ax.scatter(
            [p[0] for p in points], [p[1] for p in points], color="grey", alpha=0.4, s=12, label="p99 of each run"
        )
    ax.axhline(LIMIT_MS, color="red", linestyle="--", linewidth=1, label=f"{LIMIT_MS:.0f} ms")
    ax.axhline(GOOD_MS, color="green", linestyle=":", linewidth=1, label=f"{GOOD_MS:.0f} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    cfg = result["config"]
    ax.set(
        xlabel="requests/s (log scale)",
        ylabel="request -> response at the client (ms, log scale)",
        title=f"rtrec up: latency vs request rate ({cfg['event_rate']:g} events/s flowing"
        + (", Redis Cluster)" if cfg["redis_cluster"] else ")"),
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save_figures(
    result: dict[str, Any], plot: Path | None, draw: Callable[[dict[str, Any], Path], Any], console: Console
) -> None:
    """What a bench run leaves behind: `draw`'s PNG at `plot` and the figures beside it (same name, .json)."""
    if plot is None:
        return
    draw(result, plot)
    json_path = plot.with_suffix(".json")
    json_path.write_text(json.dumps(_jsonable(result), indent=2))
    console.print(f"plot: {plot}  figures: {json_path}", soft_wrap=True)


def _jsonable(value: Any) -> Any:
    """Strict JSON: nan -> null, inf -> "inf"."""
    if isinstance(value, float):
        return None if math.isnan(value) else "inf" if math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def run_idle(settings: Settings, seconds: float, console: Console) -> dict[str, float]:
    """`rtrec bench idle`: the full stack with no traffic; CPU of each process over `seconds`, % of one core."""
    with full_stack(settings, console) as stack:
        wait_all_ready(stack)
        time.sleep(SETTLE_S)
        processes = stack_processes(stack)
        pids = {name: p.pid for name, p in processes.items()}
        meter = CpuMeter(processes)
        meter.start()
        for _ in tqdm(range(math.ceil(seconds)), desc="idle", unit="s", leave=False):
            time.sleep(seconds / math.ceil(seconds))
        cpu = meter.percent()
    table = Table(title=f"rtrec bench idle: {seconds:g} s, no traffic")
    for col in ("process", "pid", "CPU % of one core"):
        table.add_column(col, justify="right")
    for name, pct in sorted(cpu.items(), key=lambda kv: -kv[1]):
        table.add_row(name, str(pids[name]), f"{pct:.2f}")
    total = sum(v for v in cpu.values() if not math.isnan(v))
    table.add_row("[bold]total", "", f"[bold]{total:.2f}")
    console.print(table)
    verdict = "[green]under" if total < IDLE_TARGET_PCT else "[red]over"
    console.print(f"idle stack total {total:.1f} % of one core: {verdict} the {IDLE_TARGET_PCT:.0f} % target")
    return {**cpu, "total": total}
