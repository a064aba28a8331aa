"""`rtrec up`, `down`, `status` and `demo`: start, stop and look at the stack of servers and workers."""

from __future__ import annotations

import json
import os
import signal
import time

import typer
from rich.table import Table

from rtrec.stream.settings import get_settings
from rtrec.workers.cli.errors import UserError
from rtrec.workers.cli.running_stack import stack_or_none
from rtrec.workers.cli.terminal import console

HEALTHY = ("ok", "running")


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
    stack = Stack(
        settings,
        data_dir=redis_data_dir(settings),
        supervised=True,
        log=lambda line: console.print(f"[yellow]{time.strftime('%H:%M:%S')} {line}", soft_wrap=True),
    )
    stopping = False
    failed = False

    def _stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _stop)
    try:
        stack.start(state_workers, recommend_workers, trainer=trainer, ops=True)
        _print_started(stack)
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


def _print_started(stack) -> None:
    """What `rtrec up` started: each process with its pid, log and metrics address."""
    console.print(f"[green]rtrec is up[/]  {stack.describe()}  run dir={stack.run_dir}", soft_wrap=True)
    if stack.data_dir and any(p.name == "redis" for p in stack.servers):
        console.print(f"  redis data (append-only file) in {stack.data_dir}", soft_wrap=True)
    for proc in stack.servers + stack.workers:
        port = stack.metrics_ports.get(proc.name)
        metrics = f"  metrics http://127.0.0.1:{port}/metrics" if port else ""
        console.print(f"  {proc.name:<12} pid {proc.proc.pid:<8} log {proc.log_path}{metrics}", soft_wrap=True)
    console.print("Ctrl-C to stop (or `rtrec down` from another terminal).")


def down(timeout: float = typer.Option(60.0, help="seconds to wait before killing it")) -> None:
    """Stop the `rtrec up` that runs here (found through .rtrec/run/stack.json); one line if none runs."""
    from rtrec.workers.stack import pid_alive

    settings, info = stack_or_none()
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


def status(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """What the running `rtrec up` runs: processes, pids, ports, health, restarts, and a lag summary.
    Exit 0: all healthy; 1: no stack runs here or a process is down."""
    from rtrec.stream.embedded import mask_url

    settings, info = stack_or_none()
    if info is None:
        console.print(f"no rtrec stack runs here ({settings.run_dir})", soft_wrap=True)
        raise typer.Exit(1)
    rows = [_process_health(name, p) for name, p in info.get("processes", {}).items()]
    lag = _lag_summary()
    healthy = all(r["health"] in HEALTHY for r in rows)
    if as_json:
        print(
            json.dumps(
                {
                    "pid": info["pid"],
                    "kafka_bootstrap": info.get("kafka_bootstrap"),
                    "redis_url": mask_url(info.get("redis_url")),
                    "processes": rows,
                    "lag": lag,
                    "healthy": healthy,
                }
            )
        )
    else:
        console.print(
            f"rtrec up pid {info['pid']}  kafka={info.get('kafka_bootstrap')}  "
            f"redis={mask_url(info.get('redis_url'))}  run dir={settings.run_dir}",
            soft_wrap=True,
        )
        _print_status(rows, lag)
    if not healthy:
        raise typer.Exit(1)


def _process_health(name: str, process: dict) -> dict:
    """One row of `rtrec status`: a server is healthy when its port is open, a worker when /healthz says 200."""
    import urllib.request

    from rtrec.stream.embedded import port_open
    from rtrec.workers.stack import pid_alive

    port = process.get("port")
    if not pid_alive(int(process["pid"])):
        health = "down"
    elif process.get("kind") == "server":
        health = "ok" if port and port_open(port) else "no port"
    elif port:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                health = "ok" if r.status == 200 else f"http {r.status}"
        except OSError:
            health = "not answering"
    else:
        health = "running"
    return {
        "name": name,
        "pid": process["pid"],
        "port": port,
        "health": health,
        "restarts": process.get("restarts", 0),
        "log": process.get("log"),
    }


def _lag_summary() -> dict | str:
    """Each group's lag, or one line saying why it could not be measured (status reports what it can)."""
    from rtrec.workers.stack import adopt_running_stack

    try:
        from rtrec.workers.lag import LagMonitor, summarize

        with LagMonitor(adopt_running_stack(get_settings())) as monitor:
            return summarize(monitor.measure())
    except Exception as exc:  # noqa: BLE001 - status reports what it can
        return f"unavailable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def _print_status(rows: list[dict], lag: dict | str) -> None:
    from rich.markup import escape

    table = Table()
    for col in ("process", "pid", "port", "health", "restarts"):
        table.add_column(col)
    for r in rows:
        colour = "green" if r["health"] in HEALTHY else "red"
        table.add_row(
            escape(r["name"]), str(r["pid"]), str(r["port"] or "-"), f"[{colour}]{r['health']}", str(r["restarts"])
        )
    console.print(table)
    if isinstance(lag, str):
        console.print(f"lag: {escape(lag)}", soft_wrap=True)
    else:
        console.print(
            "lag: "
            + (
                ", ".join(f"{escape(g)} {int(v['lag'])} msgs / {v['max_lag_seconds']:.1f} s" for g, v in lag.items())
                or "no committed offsets yet"
            ),
            soft_wrap=True,
        )


def demo(users: int = typer.Option(3, help="users to show before/after")) -> None:
    """Start the embedded stack, replay the bundled sample, show recommendations change with new events."""
    from rtrec.workers.cli.demo import run_demo

    run_demo(get_settings(), users, console)
