"""The `rtrec` command line."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from rtrec.stream.settings import Settings, get_settings
from rtrec.workers.cli_errors import BoundaryTyper, UserError

app = BoundaryTyper(add_completion=False, no_args_is_help=True,
                    help="rtrec: streaming real-time recommender. Mistakes are one line on stderr (exit 2); "
                    "--debug (anywhere) or RTREC_DEBUG=1 shows tracebacks.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures (not tests).")
app.add_typer(bench_app, name="bench")


class Family(str, Enum):
    llama = "llama"
    qwen2 = "qwen2"
    t5 = "t5"


model_app = typer.Typer(no_args_is_help=True, help="The checkpoint store: list, promote, roll back.")
app.add_typer(model_app, name="model")
console = Console()


def connected_settings() -> Settings:
    """Settings with server addresses from the environment or a running `rtrec up`."""
    from rtrec.stream.connections import NotConfigured
    from rtrec.workers.stack import adopt_running_stack

    env = get_settings()
    settings = adopt_running_stack(env)
    if (settings.kafka_bootstrap, settings.redis_url) != (env.kafka_bootstrap, env.redis_url):
        from rtrec.workers import cli_errors  # a connection error then hints at a stale stack.json

        cli_errors.context["stack_file"] = f"{settings.run_dir}/stack.json"
    if not settings.kafka_bootstrap or not settings.redis_url:
        raise UserError(str(NotConfigured("no running stack found: start it with `rtrec up` or set "
                                          "RTREC_KAFKA_BOOTSTRAP and RTREC_REDIS_URL")))
    return settings


@app.command()
def up(
    state_workers: int = typer.Option(1, help="state worker processes (they share partitions)"),
    recommend_workers: int = typer.Option(1, help="recommendation worker processes"),
    trainer: bool = typer.Option(True, help="run the incremental trainer (fine-tunes and promotes models)"),
) -> None:
    """Start broker, Redis and workers (embedded unless RTREC_KAFKA_BOOTSTRAP/RTREC_REDIS_URL are set), restart
    any that crash; Ctrl-C or `rtrec down` stops all."""
    from rtrec.workers.stack import AlreadyRunning, CrashLoop, Stack, locate, lock_run_dir, redis_data_dir

    settings = locate(get_settings())
    try:
        lock = lock_run_dir(settings.run_dir)  # held until this process ends, however it ends
    except AlreadyRunning as exc:
        raise UserError(str(exc), code=1) from None
    stack = Stack(settings, data_dir=redis_data_dir(settings), supervised=True,
                  log=lambda line: console.print(f"[yellow]{time.strftime('%H:%M:%S')} {line}", soft_wrap=True))
    stopping = False
    failed = False

    def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _stop)
    try:
        stack.start(state_workers, recommend_workers, trainer=trainer, ops=True)
        console.print(f"[green]rtrec is up[/]  {stack.describe()}  run dir={stack.run_dir}", soft_wrap=True)
        if stack.data_dir and any(p.name == "redis" for p in stack.servers):
            console.print(f"  redis data (append-only file) in {stack.data_dir}", soft_wrap=True)
        for proc in stack.servers + stack.workers:
            port = stack.metrics_ports.get(proc.name)
            metrics = f"  metrics http://127.0.0.1:{port}/metrics" if port else ""
            console.print(f"  {proc.name:<12} pid {proc.proc.pid:<8} log {proc.log_path}{metrics}", soft_wrap=True)
        console.print("Ctrl-C to stop (or `rtrec down` from another terminal).")
        while not stopping:
            try:
                stack.supervise()
            except CrashLoop as exc:
                console.print(f"[red]{exc}", soft_wrap=True)
                failed = True
                break
            time.sleep(0.2)
    finally:
        try:
            console.print("stopping ...")  # may fail when the terminal is gone (a closed pipe) ...
        finally:
            stack.stop()  # ... which must not leave the workers and servers running
            os.close(lock)
        console.print("stopped.")
    if failed:
        raise typer.Exit(1)


def _stack_or_none():
    from rtrec.workers.stack import locate, running_stack

    settings = locate(get_settings())
    return settings, running_stack(settings.run_dir)


@app.command()
def down(timeout: float = typer.Option(60.0, help="seconds to wait before killing it")) -> None:
    """Stop the `rtrec up` that runs here (found through .rtrec/run/stack.json); one line if none runs."""
    from rtrec.workers.stack import pid_alive

    settings, info = _stack_or_none()
    if info is None:
        console.print(f"no rtrec stack runs here ({settings.run_dir})", soft_wrap=True)
        return
    pid = int(info["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):  # its children die with it (parent-death signal)
        os.kill(pid, signal.SIGKILL)
        console.print(f"rtrec up (pid {pid}) did not stop within {timeout:.0f} s: killed it")
        raise typer.Exit(1)
    console.print(f"stopped rtrec up (pid {pid})")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """What the running `rtrec up` runs: processes, pids, ports, health, restarts, and a lag summary.
    Exit 0: all healthy; 1: no stack runs here or a process is down."""
    import urllib.request

    from rich.markup import escape

    from rtrec.stream.embedded import mask_url, port_open
    from rtrec.workers.stack import adopt_running_stack, pid_alive

    settings, info = _stack_or_none()
    if info is None:
        console.print(f"no rtrec stack runs here ({settings.run_dir})", soft_wrap=True)
        raise typer.Exit(1)
    rows = []
    for name, p in info.get("processes", {}).items():
        alive = pid_alive(int(p["pid"]))
        port = p.get("port")
        if not alive:
            health = "down"
        elif p.get("kind") == "server":
            health = "ok" if port and port_open(port) else "no port"
        elif port:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    health = "ok" if r.status == 200 else f"http {r.status}"
            except OSError:
                health = "not answering"
        else:
            health = "running"
        rows.append({"name": name, "pid": p["pid"], "port": port, "health": health,
                     "restarts": p.get("restarts", 0), "log": p.get("log")})
    lag: dict | str
    try:
        from rtrec.workers.lag import LagMonitor, summarize

        with LagMonitor(adopt_running_stack(get_settings())) as monitor:
            lag = summarize(monitor.measure())
    except Exception as exc:  # noqa: BLE001 - status reports what it can
        lag = f"unavailable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    healthy = all(r["health"] in ("ok", "running") for r in rows)
    if as_json:
        print(json.dumps({"pid": info["pid"], "kafka_bootstrap": info.get("kafka_bootstrap"),
                          "redis_url": mask_url(info.get("redis_url")), "processes": rows, "lag": lag,
                          "healthy": healthy}))
    else:
        console.print(f"rtrec up pid {info['pid']}  kafka={info.get('kafka_bootstrap')}  "
                      f"redis={mask_url(info.get('redis_url'))}  run dir={settings.run_dir}", soft_wrap=True)
        table = Table()
        for col in ("process", "pid", "port", "health", "restarts"):
            table.add_column(col)
        for r in rows:
            colour = "green" if r["health"] in ("ok", "running") else "red"
            table.add_row(escape(r["name"]), str(r["pid"]), str(r["port"] or "-"), f"[{colour}]{r['health']}",
                          str(r["restarts"]))
        console.print(table)
        if isinstance(lag, str):
            console.print(f"lag: {escape(lag)}", soft_wrap=True)
        else:
            console.print("lag: " + (", ".join(f"{escape(g)} {int(v['lag'])} msgs / {v['max_lag_seconds']:.1f} s"
                                               for g, v in lag.items()) or "no committed offsets yet"),
                          soft_wrap=True)
    if not healthy:
        raise typer.Exit(1)


@app.command()
def demo(users: int = typer.Option(3, help="users to show before/after")) -> None:
    """Start the embedded stack, replay the bundled sample, show recommendations change with new events."""
    from rtrec.workers.demo import run_demo

    run_demo(get_settings(), users, console)


@app.command()
def generate(
    out: Path = typer.Argument(..., help="output file (.jsonl/.csv, optionally .gz)"),
    events: int = typer.Option(20_000, help="number of events"),
    users: int = typer.Option(300),
    items: int = typer.Option(1000),
    clusters: int = typer.Option(20),
    days: float = typer.Option(14.0, help="event-time span"),
    seed: int = typer.Option(7),
    sample: bool = typer.Option(False, help="write the bundled demo sample instead"),
) -> None:
    """Write deterministic synthetic events (tastes, Zipf popularity, funnels, drifting trends)."""
    from rtrec.stream.eventfile import write_events
    from rtrec.stream.sample import SAMPLE_CONFIG
    from rtrec.stream.synthetic import SyntheticConfig, generate_events

    cfg = SAMPLE_CONFIG if sample else SyntheticConfig(
        n_users=users, n_items=items, n_clusters=clusters, n_events=events,
        duration_ms=int(days * 86_400_000), seed=seed,
    )
    n = write_events(out, generate_events(cfg))
    console.print(f"wrote {n} events to {out}")


@app.command()
def produce(
    user: Optional[str] = typer.Option(None, help="user_id (one event from options)"),
    item: Optional[str] = typer.Option(None, help="item_id"),
    type: str = typer.Option("click", "--type", help="browse | click | purchase"),
    ts: Optional[int] = typer.Option(None, help="event time, ms since epoch (default now)"),
    event_id: Optional[str] = typer.Option(None, help="default: a new uuid"),
    file: Optional[Path] = typer.Option(None, help="JSON lines / CSV file; '-' or no options: stdin"),
) -> None:
    """Send one event from options, or JSON lines from stdin/a file. Invalid events are reported, not sent."""
    import uuid

    from rtrec.stream.eventfile import read_numbered_events
    from rtrec.stream.events import InvalidEvent
    from rtrec.stream.producer import EventProducer
    from rtrec.stream.replay import ReplayReport, replay_events

    settings = connected_settings()
    with EventProducer(settings) as producer:
        if user is not None or item is not None:
            event = {"event_id": event_id or uuid.uuid4().hex, "user_id": user, "item_id": item,
                     "type": type, "ts": ts if ts is not None else int(time.time() * 1000)}
            try:
                producer.send(event)
            except InvalidEvent as exc:
                console.print(f"[red]invalid event: {exc}")
                _err(f"invalid event: {exc}")
                raise typer.Exit(1)
            console.print(f"sent {json.dumps(event)}")
            return
        report = ReplayReport()
        if file is not None and str(file) != "-":
            lines = read_numbered_events(file, on_error=lambda n, msg: report.reject("unparseable", n))
        else:
            lines = _stdin_events(report)
        replay_events(producer, lines, progress=False, numbered=True, report=report)
    _finish_replay(report)


def _err(line: str) -> None:
    """One line on stderr (what went wrong), beside the normal output on stdout."""
    print(f"rtrec: error: {' '.join(line.split())}", file=sys.stderr, flush=True)


def _stdin_events(report):
    """(line number, object) for each JSON line on stdin; unparseable lines are rejected, not fatal."""
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            report.reject("malformed_json", n)


def _finish_replay(report) -> None:
    """'sent N, rejected M' on stdout; exit 1 when M > 0 (with one line on stderr), 130 after Ctrl-C."""
    console.print(report.summary() + (f" in {report.seconds:.1f}s ({report.rate:,.0f}/s)" if report.seconds else ""),
                  soft_wrap=True, markup=False)
    if report.interrupted:
        _err(f"interrupted: {report.summary()} before Ctrl-C")
        raise typer.Exit(130)
    if report.rejected:
        _err(f"{report.rejected} invalid event(s) not sent: {report.summary()}")
        raise typer.Exit(1)


@app.command()
def replay(
    file: Path = typer.Argument(..., help="JSON lines or CSV event file (optionally .gz)"),
    rate: float = typer.Option(0.0, help="events per second (0 = as fast as possible)"),
    speedup: float = typer.Option(0.0, help="replay event-time gaps divided by this (0 = ignore event time)"),
    shift_to_now: bool = typer.Option(False, help="shift timestamps so the last event is 'now'"),
) -> None:
    """Replay an event file onto the events topic with a progress bar. Lines that are not valid events are
    reported (count, first line numbers) and not sent; the others are. Exit 1 if any was rejected."""
    import itertools

    from rtrec.stream.eventfile import count_records, read_numbered_events
    from rtrec.stream.producer import EventProducer
    from rtrec.stream.replay import ReplayReport, replay_events

    report = ReplayReport()
    lines = read_numbered_events(file, on_error=lambda n, msg: report.reject("unparseable", n))
    first = list(itertools.islice(lines, 1))  # the file's format, header and compression are checked here
    settings = connected_settings()
    show = sys.stderr.isatty()
    # the bar's total (for its ETA): the file's non-blank lines, counted without parsing (~0.1 s per 50 MB)
    total = count_records(file) if show else None
    shift = 0
    if shift_to_now:
        stamps = [e["ts"] for _, e in read_numbered_events(file, on_error=lambda n, msg: None)
                  if isinstance(e.get("ts"), int)]
        shift = int(time.time() * 1000) - 60_000 - max(stamps) if stamps else 0
    with EventProducer(settings) as producer:
        replay_events(producer, itertools.chain(first, lines), rate=rate, speedup=speedup, total=total,
                      ts_shift_ms=shift, numbered=True, report=report, progress=show)
    _finish_replay(report)


@app.command()
def recommend(
    user: str = typer.Argument(..., help="user_id"),
    k: int = typer.Option(10, "-k", min=1, help="how many items (1 to RTREC_MAX_K)"),
    include_seen: bool = typer.Option(False, help="allow items the user already interacted with"),
    as_json: bool = typer.Option(False, "--json", help="print the raw response"),
    timeout: float = typer.Option(30.0, min=0.1, help="seconds to wait for the answer"),
) -> None:
    """Send a recommendation request and print its response. Exit 1 on an error response."""
    from rtrec.stream.rec_client import RecClient

    if k > get_settings().max_k:
        raise UserError(f"-k {k}: more than RTREC_MAX_K ({get_settings().max_k}); ask for fewer items")
    settings = connected_settings()
    with RecClient(settings) as client:
        try:
            resp = client.recommend(user, k=k, exclude_seen=not include_seen, timeout_s=timeout)
        except TimeoutError as exc:
            raise UserError(f"{exc}; is a recommendation worker running (`rtrec status`)?", code=1) from None
    if as_json:
        print(json.dumps(resp, indent=2))
    else:
        print_response(resp)
    if resp.get("error"):
        _err(f"the recommendation worker answered with an error: {resp['error']}")
        raise typer.Exit(1)


def print_response(resp: dict, title: str | None = None) -> None:
    table = Table(title=title or f"user {resp.get('user_id')}  model {resp.get('model_version')}  "
                  f"latency {resp.get('latency_ms') or 0:.1f} ms{'  (fallback)' if resp.get('fallback') else ''}")
    table.add_column("#", justify="right")
    table.add_column("item")
    table.add_column("score", justify="right")
    table.add_column("reason")
    for n, it in enumerate(resp.get("items") or [], 1):
        table.add_row(str(n), it["item_id"], f"{it['score']:.3f}", it.get("reason", ""))
    if resp.get("error"):
        console.print(f"[red]error: {resp['error']}")
    console.print(table)


@app.command()
def state(user: str = typer.Argument(..., help="user_id")) -> None:
    """Print a user's state as stored in Redis."""
    from rtrec.stream.connections import redis_client
    from rtrec.stream.state_store import StateStore

    settings = connected_settings()
    [st] = StateStore(settings).fetch(redis_client(settings), [user])
    console.print(f"user {user}: counts {st.counts}, first_ts {st.first_ts}, last_ts {st.last_ts}")
    console.print(f"recent: {[(e.type, e.item_id) for e in st.sequence[-10:]]}")
    top = sorted(st.affinities.items(), key=lambda kv: -kv[1])[:10]
    console.print(f"affinities: {[(i, round(a, 3)) for i, a in top]}")
    console.print(f"purchased: {sorted(st.purchased)}")


@app.command()
def dlq() -> None:
    """Dead-lettered messages counted so far, by reason."""
    from rtrec.stream.connections import redis_client
    from rtrec.workers.dead_letters import dlq_counts

    counts = dlq_counts(redis_client(connected_settings()))
    console.print(counts or "no dead letters")


@app.command()
def train(
    events: Optional[Path] = typer.Option(None, exists=True, dir_okay=True, readable=True,
                                          help="event file (JSON lines/CSV, or a MovieLens file)"),
    from_topic: bool = typer.Option(False, help="train on the events topic instead of a file"),
    since_hours: float = typer.Option(0.0, min=0.0, help="with --from-topic: only events this recent (0 = all)"),
    out: Optional[Path] = typer.Option(None, help="checkpoint root (default RTREC_CHECKPOINT_DIR)"),
    family: Optional[Family] = typer.Option(None, help="model family (default RTREC_MODEL_FAMILY)"),
    epochs: Optional[int] = typer.Option(None, min=1, help="max epochs (early stopping on each user's last event)"),
    promote: bool = typer.Option(True, help="make the new checkpoint CURRENT if it passes the trainer's gate"),
    force: bool = typer.Option(False, "--force", help="make it CURRENT even if the gate says it is worse"),
) -> None:
    """Train the generative model and write a versioned checkpoint (safetensors + vocab + manifest).

    Refuses input with fewer than RTREC_TRAIN_MIN_EVENTS events or RTREC_TRAIN_MIN_USERS users with 3+ events
    (exit 2). The new checkpoint becomes CURRENT only through the incremental trainer's gate (its NDCG@10 on
    each user's last event may be at most RTREC_PROMOTE_TOLERANCE below CURRENT's), or with --force."""
    from rtrec.model.datasets import TrainingInputError, leave_one_out, load_events, prepare_training_events

    settings = get_settings()
    update = {k: v for k, v in {"model_family": family.value if family else None,
                                "train_epochs": epochs}.items() if v is not None}
    settings = settings.model_copy(update=update)
    if from_topic:
        from rtrec.stream.topic_window import read_topic_events

        data, source = read_topic_events(connected_settings(), since_ms=int(since_hours * 3_600_000) or None), \
            f"topic {settings.topic_events}"
    elif events is not None:
        data, source = load_events(events), events
    else:
        raise UserError("give --events FILE or --from-topic")
    try:
        data = prepare_training_events(data, settings, source)  # before the long part
    except TrainingInputError as exc:
        raise UserError(f"{exc}; CURRENT is unchanged") from None
    from rtrec.model.checkpoint import load_checkpoint  # torch: imported once the input is known to be usable
    from rtrec.model.finetune import gate
    from rtrec.model.generator import resolve_device
    from rtrec.model.pipeline import _cases, plot_training, train_checkpoint
    from rtrec.model.store import CheckpointStore

    root = out or settings.checkpoint_dir
    store = CheckpointStore(root)
    current_path = store.current_path()  # what serves now (before the new checkpoint is written)
    path, report = train_checkpoint(settings, data, root)
    metrics = {k: round(v, 4) for k, v in report.best.items() if "@" in k}
    curves = plot_training({settings.model_family: report}, path.parent / f"{path.name}-training.png")
    console.print(f"checkpoint {path}  best epoch {report.best_epoch}  validation "
                  f"{', '.join(f'{k} {v:.4f}' for k, v in metrics.items())}  {report.seconds:.0f}s  curves {curves}",
                  soft_wrap=True, markup=False)
    if not promote:
        return
    if force or current_path is None:
        store.promote(path.name, reason="rtrec train --force" if force else "rtrec train: first model")
        console.print(f"CURRENT -> {path.name}" + (" (--force)" if force else " (first model)"))
        return
    split = leave_one_out(data)
    device = resolve_device(settings.device)
    result = gate(load_checkpoint(path), load_checkpoint(current_path), _cases(split, split.test_users, valid=False),
                  settings.promote_tolerance, device, settings.promote_min_cases)
    if result.promote:
        store.promote(path.name, reason=f"rtrec train: {result.reason}")
        console.print(f"CURRENT -> {path.name}: {result.reason}", soft_wrap=True, markup=False)
    else:
        console.print(f"kept CURRENT {current_path.name}: {result.reason} (use --force, or "
                      f"`rtrec model promote {path.name}`)", soft_wrap=True, markup=False)


eval_app = typer.Typer(help="Offline evaluation: leave-one-out table, or a prequential stream replay.")
app.add_typer(eval_app, name="eval")


@eval_app.callback(invoke_without_command=True)
def evaluate_cmd(
    ctx: typer.Context,
    events: Optional[str] = typer.Option(None, help="event file, MovieLens file/folder, or ml-100k / ml-1m-partial"),
    families: str = typer.Option("llama,t5", help="generative families to train and compare"),
    out: Path = typer.Option(Path("eval-out"), help="CSV, bar chart and training curves go here"),
    epochs: Optional[int] = typer.Option(None, help="max epochs per family"),
) -> None:
    """Leave-one-out HR@10/NDCG@10/Recall@20/coverage/novelty: generative vs blending, popularity, BiasedMF."""
    if ctx.invoked_subcommand is not None:
        return
    if events is None:
        raise UserError("give --events FILE (or use `rtrec eval stream`)")
    from rtrec.model.datasets import load_events, prepare_training_events, resolve_source

    names = [f.strip() for f in families.split(",") if f.strip()]
    unknown = [f for f in names if f not in Family.__members__]
    if unknown or not names:
        raise UserError(f"--families: unknown {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(Family.__members__)}")
    settings = get_settings()
    if epochs is not None:
        settings = settings.model_copy(update={"train_epochs": epochs})
    path = resolve_source(events)
    data = prepare_training_events(load_events(path), settings, path)  # ids derived, checked: before training
    from rtrec.model.pipeline import run_eval

    run_eval(settings, str(path), names, out, console, events=data)


@eval_app.command("stream")
def evaluate_stream(
    events: str = typer.Option(..., help="event file, MovieLens file/folder, or ml-100k / ml-1m-partial"),
    every: str = typer.Option("7,28", help="fine-tune intervals to compare, in days of stream time"),
    period_days: float = typer.Option(7.0, help="scoring period (the shortest interval)"),
    initial_frac: float = typer.Option(0.3, help="share of the stream's time span used for the first model"),
    sample: float = typer.Option(0.2, help="share of events predicted (all are learned)"),
    out: Path = typer.Option(Path("eval-stream-out"), help="CSV and PNG go here"),
) -> None:
    """Prequential replay in time order: frozen model vs fine-tuning every T vs blending (HR@10 over time)."""
    from rtrec.model.datasets import load_events, prepare_training_events, resolve_source

    try:
        intervals = [float(x) for x in every.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--every {every!r}: give days as numbers, e.g. 7,28") from None
    if not intervals or min(intervals) <= 0:
        raise UserError(f"--every {every!r}: give one or more positive numbers of days, e.g. 7,28")
    path = resolve_source(events)
    data = prepare_training_events(load_events(path), get_settings(), path)  # an empty file fails here
    from rtrec.model.stream_eval import run_stream_eval
    run_stream_eval(get_settings(), data, intervals, period_days, initial_frac, sample, out, console)


def _lag_table(rows, problems, silent: list[str] | None = None) -> Table:
    from rich.markup import escape

    from rtrec.workers.lag import summarize

    table = Table(title=f"consumer lag at {time.strftime('%H:%M:%S')}")
    for col in ("group", "topic", "partition", "committed", "end", "lag", "lag s"):
        table.add_column(col, justify="right" if col not in ("group", "topic") else "left")
    for r in rows:
        table.add_row(escape(r.group), escape(r.topic), str(r.partition),
                      "-" if r.committed is None else str(r.committed), str(r.end), str(r.lag), f"{r.lag_seconds:.1f}")
    for group, g in summarize(rows).items():
        table.add_row(f"[b]{escape(group)}", "all", "", "", "", f"[b]{int(g['lag'])}", f"[b]{g['max_lag_seconds']:.1f}")
    notes = [f"[red]{escape('; '.join(problems))}"] if problems else []
    quiet = [g for g in silent or [] if g not in {r.group for r in rows}]
    if quiet:  # a --group that committed nothing (or a typo) would otherwise just be missing
        notes.append(f"[yellow]no committed offsets: {escape(', '.join(quiet))}")
    table.caption = "\n".join(notes) or None
    return table


def _lag_report(monitor, watch: float, as_json: bool, max_lag: Optional[int], max_lag_seconds: Optional[float],
                silent: list[str]) -> list[str]:
    """Measure, print (once, as JSON, or refreshed every `watch` s); returns the last breaches."""
    from rich.live import Live

    from rtrec.workers.lag import breaches, summarize

    rows = monitor.measure()
    problems = breaches(rows, max_lag, max_lag_seconds)
    if watch > 0:
        with Live(_lag_table(rows, problems, silent), console=console, refresh_per_second=4) as live:
            try:
                while True:
                    time.sleep(watch)
                    rows = monitor.measure()
                    problems = breaches(rows, max_lag, max_lag_seconds)
                    live.update(_lag_table(rows, problems, silent))
            except KeyboardInterrupt:
                pass
    elif as_json:
        print(json.dumps({"partitions": [r.to_dict() for r in rows], "groups": summarize(rows),
                          "breaches": problems}))
    else:
        console.print(_lag_table(rows, problems, silent))
    return problems


@app.command()
def lag(
    watch: float = typer.Option(0.0, help="refresh every this many seconds (0: print once)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    max_lag: Optional[int] = typer.Option(None, help="exit 1 when a group is more messages behind"),
    max_lag_seconds: Optional[float] = typer.Option(None, help="exit 1 when a group is more seconds behind"),
    group: Optional[list[str]] = typer.Option(
        None, "--group", help="also measure this consumer group, on the topics it committed on (repeatable)"),
) -> None:
    """Consumer lag of every rtrec group (state, recommend, trainer, quality) and any --group, per partition,
    in messages and seconds. Exit 0: within bounds; 1: a group above a threshold; 2: the broker could not be asked."""
    from rtrec.workers.lag import LagError, LagMonitor

    extra = group or []
    try:
        with LagMonitor(connected_settings(), extra_groups=extra) as monitor:
            problems = _lag_report(monitor, watch, as_json, max_lag, max_lag_seconds, extra)
    except LagError as exc:  # unreachable broker, refused credentials: one line, not a traceback
        raise UserError(str(exc)) from None
    if problems:
        raise typer.Exit(1)


@app.command("rebuild-state")
def rebuild_state(
    since_hours: float = typer.Option(
        0.0, min=0.0, help="build the state from the events the broker received in the last H hours only; "
        "state from older events is dropped (0: the whole topic)"),
) -> None:
    """Rebuild Redis state from the events topic (after Redis lost data) into a fresh namespace, then switch to it
    atomically; gives the same state whether or not Redis still holds any. Other keys (logs, metrics, models) stay."""
    from rich.markup import escape
    from tqdm import tqdm

    from rtrec.stream.rebuild import RebuildError, rebuild

    settings = connected_settings()
    try:
        with tqdm(unit="rec", desc="rebuild") as bar:
            report = rebuild(settings, since_ms=int(since_hours * 3_600_000) or None, progress=bar.update)
    except RebuildError as exc:  # unreachable broker or Redis, a rebuild already running: one line, not a traceback
        console.print(f"[red]{escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2)
    console.print(escape(report.summary()), soft_wrap=True)


@app.command()
def quality() -> None:
    """Online hit rate per model version: responses whose items the user then browsed/clicked/bought."""
    from rtrec.model.store import CheckpointStore
    from rtrec.stream.connections import redis_client
    from rtrec.stream.keys import QUALITY
    from rtrec.workers.quality import hit_rates

    settings = connected_settings()
    rates = hit_rates(redis_client(settings).hgetall(QUALITY))
    current = CheckpointStore(settings.checkpoint_dir).current_version()
    table = Table(title=f"online hit rate (window {settings.quality_window_s:g} s)")
    for col in ("", "model version", "served", "hits", "hit rate"):
        table.add_column(col, justify="right" if col in ("served", "hits", "hit rate") else "left")
    for version, r in sorted(rates.items()):
        table.add_row("*" if version == current else "", version, str(int(r["served"])), str(int(r["hits"])),
                      f"{r['hit_rate']:.4f}")
    console.print(table)


@app.command()
def trainer() -> None:
    """Run the incremental trainer in the foreground (fine-tune on new events, gate, promote, announce)."""
    from rtrec.workers.trainer import build_app
    from rtrec.workers.faust_app import run_worker

    settings = connected_settings()
    run_worker(build_app(settings), settings)


@model_app.command("list")
def model_list() -> None:
    """Versions in the checkpoint store, oldest first; CURRENT marked."""
    from rtrec.model.store import CheckpointStore

    store = CheckpointStore(get_settings().checkpoint_dir)
    versions = store.versions()
    table = Table(title=f"checkpoints in {store.root}", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    table.add_column("", no_wrap=True)
    # the version in full, on one line: `rtrec model promote VERSION` needs it copied exactly
    table.add_column("version", no_wrap=True, min_width=max((len(v.version) for v in versions), default=7))
    wide = console.width >= 96  # narrower: no "created" column (version names carry their UTC time)
    if wide:
        table.add_column("created (UTC)", no_wrap=True)
    for col in ("HR@10", "NDCG@10", "events"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("trigger", overflow="fold")
    for v in versions:
        m, w = v.metrics, v.training_window
        created = [v.created_at[:16].replace("T", " ")] if wide else []
        table.add_row("*" if v.current else "", v.version, *created,
                      f"{m['HR@10']:.4f}" if "HR@10" in m else "", f"{m['NDCG@10']:.4f}" if "NDCG@10" in m else "",
                      str(w.get("events", "")), str(w.get("trigger", "")))
    console.print(table)
    decisions = store.decisions()
    if decisions:
        last = decisions[-1]
        console.print(f"last trainer decision ({last['at']}): "
                      f"{'promoted ' + last['version'] if last.get('promoted') else 'kept current'} - {last['reason']}",
                      soft_wrap=True, markup=False)


def _announce(version: str, reason: str) -> None:
    from rtrec.workers.stack import adopt_running_stack
    from rtrec.workers.trainer import announce_sync

    settings = adopt_running_stack(get_settings())
    if settings.kafka_bootstrap:
        try:
            announce_sync(settings, version, reason)
            console.print(f"announced on {settings.topic_model_updates}")
            return
        except Exception as exc:  # noqa: BLE001 - workers still follow CURRENT
            console.print(f"[yellow]could not announce ({exc})")
    console.print(f"workers switch within RTREC_MODEL_CHECK_S ({settings.model_check_s:g} s)")


@model_app.command("promote")
def model_promote(version: str = typer.Argument(..., help="a version from `rtrec model list`")) -> None:
    """Verify VERSION and make it CURRENT; serving workers hot-swap to it."""
    from rtrec.model.checkpoint import CheckpointError
    from rtrec.model.store import CheckpointStore

    try:
        path = CheckpointStore(get_settings().checkpoint_dir).promote(version, reason="rtrec model promote")
    except CheckpointError as exc:
        console.print(f"[red]refused: {exc}")
        raise typer.Exit(1)
    console.print(f"CURRENT -> {path.name}")
    _announce(path.name, "promote")


@model_app.command("rollback")
def model_rollback() -> None:
    """Make the previously served version CURRENT again; serving workers hot-swap back."""
    from rtrec.model.checkpoint import CheckpointError
    from rtrec.model.store import CheckpointStore

    try:
        path = CheckpointStore(get_settings().checkpoint_dir).rollback()
    except CheckpointError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(1)
    console.print(f"CURRENT -> {path.name} (rolled back)")
    _announce(path.name, "rollback")


@app.command()
def catalog(file: Path = typer.Argument(..., help="JSON lines/CSV with item_id and category")) -> None:
    """Load item categories into Redis (used by diversity re-ranking)."""
    from rtrec.stream.catalog import read_catalog, store_categories

    pairs = read_catalog(file)  # the file is checked before connecting
    n = store_categories(connected_settings(), pairs)
    console.print(f"loaded {n} item categories")


@bench_app.command("ingest")
def bench_ingest(
    events: int = typer.Option(50_000, help="synthetic events to replay"),
    baseline_events: int = typer.Option(10_000, help="events for the naive baseline"),
    plot: Optional[Path] = typer.Option(Path("bench-ingest.png"), help="latency histogram PNG"),
) -> None:
    """Events/s and event->Redis-visible latency through broker + state worker, vs a naive consumer."""
    from rtrec.workers.bench_ingest import run_bench

    run_bench(get_settings(), events, baseline_events, plot, console)


@bench_app.command("generate")
def bench_generate(
    batches: str = typer.Option("1,8,32,128", help="batch sizes to time"),
    rate: float = typer.Option(200.0, help="requests/s for the over-Kafka latency run"),
    seconds: float = typer.Option(10.0, help="duration of the over-Kafka run"),
    plot: Optional[Path] = typer.Option(Path("bench-generate.png"), help="latency histogram PNG"),
) -> None:
    """recs/s and per-batch latency of the default model on this machine, and request->response over Kafka."""
    from rtrec.workers.bench_generate import run_bench as run_generate_bench

    run_generate_bench(get_settings(), [int(b) for b in batches.split(",")], rate, seconds, plot, console)


@bench_app.command("hotswap")
def bench_hotswap(
    rate: float = typer.Option(100.0, help="steady requests/s"),
    seconds: float = typer.Option(20.0, help="duration of the load"),
    swaps: int = typer.Option(3, help="promotions during the load"),
    plot: Optional[Path] = typer.Option(Path("bench-hotswap.png"), help="latency-over-time PNG"),
) -> None:
    """Requests sent/answered/failed and latency before/during/after several promotions."""
    from rtrec.workers.bench_hotswap import run_bench as run_hotswap_bench

    result = run_hotswap_bench(get_settings(), rate, seconds, swaps, plot, console)
    if result["failed"] or result["unanswered"]:
        raise typer.Exit(1)


@bench_app.command("soak")
def bench_soak(
    minutes: float = typer.Option(10.0, help="duration of the load"),
    event_rate: float = typer.Option(500.0, help="events/s"),
    request_rate: float = typer.Option(50.0, help="requests/s"),
    promote_every_s: float = typer.Option(120.0, help="seconds between promotions"),
    users: int = typer.Option(2000, help="distinct users in the load"),
    sample_s: float = typer.Option(5.0, help="seconds between memory samples"),
    plot: Optional[Path] = typer.Option(Path("bench-soak.png"), help="memory-over-time PNG"),
) -> None:
    """Steady events + requests with promotions: lost/duplicated/failed counts and worker memory growth."""
    from rtrec.workers.bench_soak import run_soak

    result = run_soak(get_settings(), minutes, event_rate, request_rate, promote_every_s, users, sample_s, plot,
                      console)
    if result["lost"] or result["twice"] or result["failed"] or result["unanswered"]:
        raise typer.Exit(1)


@bench_app.command("memory")
def bench_memory(
    users: int = typer.Option(2000, help="distinct users in the generated stream"),
    items: int = typer.Option(5000, help="items in the generated catalog"),
    events: int = typer.Option(200_000, help="events to replay"),
    days: float = typer.Option(7.0, help="event-time span of the stream, ending now (replayed time-compressed)"),
    rate: float = typer.Option(1000.0, help="events/s for the 7-day projection (dedupe bytes are amortized over "
                               "rate x 7 days of events)"),
    project_users: Optional[int] = typer.Option(None, help="users for the projection, each at the replay's "
                                                "bytes per active user (default: --users)"),
    plot: Optional[Path] = typer.Option(Path("bench-memory.png"),
                                        help="memory-over-events PNG (used_memory, key families stacked, the "
                                        "second half's ±10% band); the figures go to the same name .json"),
    samples: int = typer.Option(20, help="memory samples over the replay"),
) -> None:
    """Redis bytes per event, per user (dedupe state included) and per item, memory over the replay and whether it
    stays flat, and a 7-day projection for a rate."""
    from rich.markup import escape

    from rtrec.workers.bench_memory import BenchInputError, check_inputs, run_memory_bench

    settings = get_settings()
    try:
        check_inputs(settings, users, items, events, days, rate, project_users, samples)
    except BenchInputError as exc:  # one line before anything starts, not a traceback
        console.print(f"[red]{escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2)
    run_memory_bench(settings, users, items, events, days, rate, project_users, samples, plot, console)


if __name__ == "__main__":
    app()
