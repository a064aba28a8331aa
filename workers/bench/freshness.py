"""`rtrec bench freshness`: how old is what the served model has learned, under steady traffic?

Why: the trainer fine-tunes on windows of recent events and the recommendation worker hot-swaps each
promoted version; what a user gets is only as fresh as the newest event the *served* model learned from.
Model freshness at a moment = now - the training-window end (`training_window.last_ts`, the newest
event's time, in the checkpoint's manifest) of the version serving then. It grows between promotions
and drops at each swap; it sums the window's wait, the fine-tune, the gate, the save and the swap.

What runs: the stack as `rtrec up` runs it (state, recommendation, trainer and ops workers, supervised,
Redis with its append-only file) in a temporary folder, its checkpoint folder empty as on a first
`rtrec up`: the blend serves until the trainer's first model (the warm-up). Events for 500 synthetic
users flow at `rate`/s, stamped with the wall clock as they are sent (so their time is the age's
origin), and requests at `request_rate`/s ask for users of the newest events. Once a second the bench
takes a sample: the version that answered the newest answered request, and its window end.

Printed: freshness p50/p99/max over the samples after the warm-up (the first trained version
answering); the trainer's cycles during the load (its decision log: promoted, kept, failed, each
cycle's seconds and training seconds, events trained / read); requests sent / answered / failed (an
error response) / unanswered (target: none failed, every one answered, through every swap). A PNG
(freshness over time; red: a swap to a new version, orange: back to an earlier one, as an online-quality
rollback does) and the figures as JSON beside it.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from rtrec.model.checkpoint import MANIFEST, CheckpointError
from rtrec.model.store import CheckpointStore
from rtrec.stream.rec_client import RecClient
from rtrec.stream.replay import Pacer
from rtrec.stream.settings import Settings
from rtrec.workers.bench.serving import BenchInputError, EventFlow, full_stack, save_figures, wait_for_answers_to
from rtrec.workers.bench.stack_load import responses_read_in_background

TARGET_S = 60.0  # acceptance: p99 freshness under this at 1k events/s
SAMPLE_S = 1.0  # one freshness sample a second
WARM_FLOW_S = 3.0  # events flow this long before the first request (a user with no event has nothing to rank)
DRAIN_S = 60.0  # after the load, answers are awaited this long
NEWEST_SENT = 200  # a sample looks for the newest answer among this many newest requests


def check_inputs(rate: float, seconds: float, request_rate: float) -> None:
    problems = [
        rule
        for rule, ok in {
            "--rate > 0": rate > 0 and math.isfinite(rate),
            "--seconds > 0": seconds > 0 and math.isfinite(seconds),
            "--request-rate > 0": request_rate > 0 and math.isfinite(request_rate),
        }.items()
        if not ok
    ]
    if problems:
        raise BenchInputError(f"bench freshness: need {', '.join(problems)}")


# ---- pure figures ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """What served at one moment of the load."""

    t: float  # seconds since the load started
    now_ms: int  # wall clock of the sample (ms)
    version: str | None  # the version that answered the newest answered request (None: no answer yet)
    last_ts: int | None  # its training window's newest event (ms); None: not a trained checkpoint (the blend)

    @property
    def age_s(self) -> float | None:
        """Model freshness: now - the newest event the serving version learned from (None: unknown)."""
        return None if self.last_ts is None else (self.now_ms - self.last_ts) / 1000


def freshness_series(samples: Sequence[Sample]) -> list[tuple[float, float]]:
    """(seconds since the start, freshness s) per sample; nan where the serving version has no window."""
    return [(s.t, math.nan if s.age_s is None else s.age_s) for s in samples]


def after_warm_up(samples: Sequence[Sample], versions: int = 1) -> list[Sample]:
    """The samples from the first one the `versions`-th trained version answered on (before the first: the
    blend or nothing; before the second: also the model trained from scratch, the slowest cycle)."""
    seen: set[str] = set()
    for n, s in enumerate(samples):
        if s.last_ts is not None and s.version is not None:
            seen.add(s.version)
            if len(seen) >= versions:
                return list(samples[n:])
    return []


def freshness_figures(samples: Sequence[Sample], versions: int = 1) -> dict[str, float]:
    """p50/p99/max freshness (s, numpy's linear percentiles) after the warm-up (`after_warm_up`), how many
    samples they are of, when the warm-up ended (s) and how many later samples had no known window."""
    kept = after_warm_up(samples, versions)
    ages = [s.age_s for s in kept if s.age_s is not None]
    p50, p99 = (float(v) for v in np.percentile(ages, [50, 99])) if ages else (math.nan, math.nan)
    return {
        "p50_s": p50,
        "p99_s": p99,
        "max_s": max(ages) if ages else math.nan,
        "samples": len(ages),
        "unknown": len(kept) - len(ages),
        "warm_up_s": kept[0].t if kept else math.nan,
    }


def swaps(samples: Sequence[Sample]) -> list[tuple[float, str]]:
    """(seconds since the start, version) at each sample whose version differs from the last one seen."""
    out, last = [], None
    for s in samples:
        if s.version is None:
            continue
        if last is not None and s.version != last:
            out.append((s.t, s.version))
        last = s.version
    return out


def cycle_figures(decisions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The trainer's window decisions: how many, promoted / kept / failed / skipped (nothing to train on),
    the p50/max of a cycle's seconds and training seconds; and the online-quality rollbacks beside them."""
    cycles = [d for d in decisions if "rolled_back" not in d]
    failed = [d for d in cycles if d.get("failed")]
    skipped = [d for d in cycles if not d.get("failed") and "candidate_metrics" not in d]
    promoted = [d for d in cycles if d.get("promoted")]
    seconds = [float(d["seconds"]) for d in cycles if d.get("seconds") is not None]
    train = [float(d["train_seconds"]) for d in cycles if d.get("train_seconds") is not None]

    def p50_max(values: list[float]) -> tuple[float, float]:
        return (float(np.median(values)), max(values)) if values else (math.nan, math.nan)

    return {
        "cycles": len(cycles),
        "rollbacks": len(decisions) - len(cycles),
        "promoted": len(promoted),
        "kept": len(cycles) - len(promoted) - len(failed) - len(skipped),
        "failed": len(failed),
        "skipped": len(skipped),
        "seconds_p50": p50_max(seconds)[0],
        "seconds_max": p50_max(seconds)[1],
        "train_seconds_p50": p50_max(train)[0],
        "train_seconds_max": p50_max(train)[1],
    }


def request_figures(
    sent: Mapping[str, float], responses: Mapping[str, Mapping[str, Any]], arrivals: Mapping[str, float]
) -> dict[str, float]:
    """Requests sent / answered / failed (an error response) / unanswered, and send -> arrival p50/p99/max (ms)
    of the answered ones (`sent` and `arrivals`: perf_counter seconds by request id)."""
    answered = [r for r in sent if r in responses]
    ms = [(arrivals[r] - sent[r]) * 1000 for r in answered if r in arrivals]
    p50, p99 = (float(v) for v in np.percentile(ms, [50, 99])) if ms else (math.nan, math.nan)
    return {
        "sent": len(sent),
        "answered": len(answered),
        "failed": sum(1 for r in answered if responses[r].get("error")),
        "unanswered": len(sent) - len(answered),
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": max(ms) if ms else math.nan,
    }


# ---- reading the stack -------------------------------------------------------------------------------------------
class WindowEnds:
    """A version's training-window end (`training_window.last_ts` in its manifest), read once per version."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._known: dict[str, int | None] = {}

    def last_ts(self, version: str | None) -> int | None:
        if version is None:
            return None
        if version not in self._known:
            try:
                manifest = json.loads((self.store.path_of(version) / MANIFEST).read_text())
            except (CheckpointError, OSError, ValueError):  # not a checkpoint (the blend) or pruned meanwhile
                return None  # not cached: a version seen before its files are read is tried again
            last = (manifest.get("training_window") or {}).get("last_ts")
            self._known[version] = int(last) if last is not None else None
        return self._known[version]


def newest_answer(client: RecClient, recent: Sequence[str]) -> str | None:
    """The version that made the answer that arrived last, among the requests in `recent` (the newest sent):
    what serves now, even while older requests wait in a queue."""
    newest, version = -math.inf, None
    for rid in recent:
        resp, at = client.responses.get(rid), client.arrivals.get(rid)
        if resp is not None and at is not None and at > newest and not resp.get("error"):
            newest, version = at, resp.get("model_version")
    return version


def _run_load(
    client: RecClient, flow: EventFlow, ends: WindowEnds, seconds: float, request_rate: float
) -> tuple[dict[str, float], list[Sample]]:
    """Requests at `request_rate` for `seconds`, one freshness sample a second; (send time by request id,
    samples)."""
    sent: dict[str, float] = {}
    recent: deque[str] = deque(maxlen=NEWEST_SENT)
    samples: list[Sample] = []
    pacer = Pacer(rate=request_rate)
    start = time.monotonic()
    next_sample = 0.0
    fallback = list(flow.recent)
    with tqdm(total=int(seconds), desc=f"freshness at {flow.rate:g} events/s", unit="s") as bar:
        while (elapsed := time.monotonic() - start) < seconds:
            if elapsed >= next_sample:
                version = newest_answer(client, recent)
                samples.append(Sample(round(elapsed, 3), int(time.time() * 1000), version, ends.last_ts(version)))
                next_sample += SAMPLE_S
                age = samples[-1].age_s
                bar.set_postfix(fresh="-" if age is None else f"{age:.0f}s")
            pacer.wait(None)
            started = time.perf_counter()
            rid = client.send(flow.request_user(fallback, len(sent)), k=10)
            sent[rid] = started
            recent.append(rid)
            bar.update(int(elapsed) - bar.n)
    return sent, samples


def run_freshness_bench(
    settings: Settings, rate: float, seconds: float, request_rate: float, plot: Path | None, console: Console
) -> dict[str, Any]:
    """`rtrec bench freshness`: the load on a full stack, then the table, PNG and JSON; the figures."""
    console.rule(f"rtrec bench freshness: {rate:g} events/s, {request_rate:g} req/s, {seconds:g} s")
    with full_stack(settings, console, serve_model=False) as stack:
        s = stack.settings
        store = CheckpointStore(s.checkpoint_dir)
        console.print(f"stack up ({stack.describe()}); events flowing ...", soft_wrap=True)
        with EventFlow(s, rate) as flow, RecClient(s) as client, responses_read_in_background(client):
            warm, deadline = time.monotonic() + WARM_FLOW_S, time.monotonic() + WARM_FLOW_S + 30
            while time.monotonic() < warm or (not flow.recent and time.monotonic() < deadline):
                time.sleep(0.1)
            sent, samples = _run_load(client, flow, WindowEnds(store), seconds, request_rate)
            client.producer.flush()
            wait_for_answers_to(client, sent, DRAIN_S)
            responses, arrivals = dict(client.responses), dict(client.arrivals)
            events_sent, flow_error = flow.sent, flow.error
        decisions = store.decisions()
    if flow_error is not None:
        console.print(f"[red]the event flow stopped: {type(flow_error).__name__}: {flow_error}", soft_wrap=True)
    start_ms = samples[0].now_ms - int(samples[0].t * 1000) if samples else 0
    requests = request_figures(sent, responses, arrivals)
    result = _result(settings, rate, seconds, request_rate, events_sent, samples, decisions, requests, start_ms)
    _print_report(result, console)
    save_figures(result, plot, _plot, console)
    return result


def _decision_rows(decisions: Sequence[Mapping[str, Any]], start_ms: int) -> list[dict[str, Any]]:
    """Each decision: when it was decided (s since the load started; a rollback has no such stamp), its
    outcome and costs."""
    rows = []
    for d in decisions:
        window = d.get("window") or {}
        rows.append(
            {
                "t": (d["decided_ms"] - start_ms) / 1000 if d.get("decided_ms") else None,
                "promoted": bool(d.get("promoted")),
                "rolled_back": d.get("rolled_back"),
                "version": d.get("version"),
                "seconds": d.get("seconds"),
                "train_seconds": d.get("train_seconds"),
                "events": window.get("events"),
                "read": window.get("read"),
                "users": window.get("users"),
                "trigger": d.get("trigger"),
                "reason": d.get("reason"),
            }
        )
    return rows


def _result(
    settings: Settings,
    rate: float,
    seconds: float,
    request_rate: float,
    events_sent: int,
    samples: list[Sample],
    decisions: list[dict[str, Any]],
    requests: dict[str, float],
    start_ms: int,
) -> dict[str, Any]:
    knobs = (
        "trainer_every_events",
        "trainer_every_s",
        "trainer_min_events",
        "trainer_max_window_events",
        "trainer_torch_threads",
        "trainer_nice",
        "finetune_epochs",
        "finetune_first_epochs",
        "finetune_history_events",
        "finetune_replay_users",
        "promote_tolerance",
    )
    return {
        "config": {
            "rate": rate,
            "seconds": seconds,
            "request_rate": request_rate,
            "events_sent": events_sent,
            "cpus": psutil.cpu_count(),
            "target_p99_s": TARGET_S,
            **{k: getattr(settings, k, None) for k in knobs},
        },
        "freshness": freshness_figures(samples),
        "freshness_steady": freshness_figures(samples, versions=2),
        "cycles": cycle_figures(decisions),
        "requests": requests,
        "swaps": swaps(samples),
        "series": freshness_series(samples),
        "samples": [asdict(s) for s in samples],
        "decisions": _decision_rows(decisions, start_ms),
        "notes": {
            "freshness": "sample time - training_window.last_ts of the version whose answer arrived last; "
            "percentiles over the samples after the first trained version answered (the warm-up); "
            "freshness_steady: after the second (the first fine-tune of the model trained from scratch)",
            "cycles": "the trainer's window decisions during the run (seconds: window closed -> decision recorded)",
        },
    }


# ---- output --------------------------------------------------------------------------------------------------------
def _s(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.1f}"


def _print_report(result: dict[str, Any], console: Console) -> None:
    f, c, r, cfg = result["freshness"], result["cycles"], result["requests"], result["config"]
    table = Table(title=f"model freshness at {cfg['rate']:g} events/s (s)")
    for col in ("from", "p50", "p99", "max", "samples", "from t (s)"):
        table.add_column(col, justify="right")
    for label, fig in (("1st trained version", f), ("2nd (steady)", result["freshness_steady"])):
        table.add_row(
            label, _s(fig["p50_s"]), _s(fig["p99_s"]), _s(fig["max_s"]), str(fig["samples"]), _s(fig["warm_up_s"])
        )
    console.print(table)
    cycles = Table(title="trainer cycles during the load")
    columns = ("cycles", "promoted", "kept", "failed", "skipped", "rollbacks")
    for col in (*columns, "cycle s p50", "cycle s max", "train s p50"):
        cycles.add_column(col, justify="right")
    cycles.add_row(
        *(str(c[k]) for k in columns),
        *(_s(c[k]) for k in ("seconds_p50", "seconds_max", "train_seconds_p50")),
    )
    console.print(cycles)
    trained = [d["events"] for d in result["decisions"] if d.get("events") and not d.get("rolled_back")]
    read = [d["read"] for d in result["decisions"] if d.get("read")]
    if trained:
        console.print(
            f"events trained per cycle: median {np.median(trained):,.0f} (read: median "
            f"{np.median(read) if read else math.nan:,.0f}); swaps seen by requests: {len(result['swaps'])}",
            soft_wrap=True,
        )
    console.print(
        f"requests: sent {r['sent']:,}  answered {r['answered']:,}  failed {r['failed']}  "
        f"unanswered {r['unanswered']}; send -> answer p50 {_s(r['p50_ms'])} p99 {_s(r['p99_ms'])} "
        f"max {_s(r['max_ms'])} ms; events sent {cfg['events_sent']:,}",
        soft_wrap=True,
    )
    p99 = f["p99_s"]
    if math.isnan(p99):
        console.print("[bold red]no trained model answered during the load: no freshness figure")
        return
    verdict = "[green]under" if p99 < TARGET_S else "[red]over"
    console.print(f"[bold]freshness p99 {_s(p99)} s: {verdict} the {TARGET_S:.0f} s target")


def _plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    t = [p[0] for p in result["series"]]
    age = [p[1] for p in result["series"]]
    ax.plot(t, age, "-", linewidth=1.2, label="model freshness")
    served = {next((s["version"] for s in result["samples"] if s["version"]), None)}  # the first one to answer
    labels = {"red": "swap to a new version", "orange": "swap back to an earlier version (rollback)"}
    for when, version in result["swaps"]:
        color = "orange" if version in served else "red"
        served.add(version)
        ax.axvline(when, color=color, linestyle="--", linewidth=0.8, label=labels.pop(color, None))
    ax.axhline(TARGET_S, color="grey", linestyle=":", linewidth=1, label=f"{TARGET_S:.0f} s target (p99)")
    warm = result["freshness"]["warm_up_s"]
    if warm == warm:
        ax.axvspan(0, warm, color="grey", alpha=0.15, label="warm-up (no trained model yet)")
    cfg = result["config"]
    ax.set(
        xlabel="time since the load started (s)",
        ylabel="now - newest event the served model learned from (s)",
        title=f"Model freshness: {cfg['rate']:g} events/s, {cfg['request_rate']:g} req/s, {cfg['cpus']} CPUs",
    )
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
