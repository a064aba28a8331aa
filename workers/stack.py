"""The whole rtrec stack as real processes: broker, Redis, state and recommendation workers.

Used by `rtrec up` and `rtrec demo`, by the integration tests and by the
benches, so all of them exercise the same start-up path. Servers named in the
settings (RTREC_KAFKA_BOOTSTRAP / RTREC_REDIS_URL) are used as they are;
missing ones are started here and stopped again by `stop()`.

`rtrec up` runs a supervised stack (`Stack(..., supervised=True)`): its
children die with it (Linux parent-death signal), `supervise()` restarts a
crashed child with backoff, and the embedded Redis keeps an append-only file in
a stable data folder, so user state survives restarts.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rtrec.stream.connections import redis_client
from rtrec.stream.embedded import (
    ManagedProcess,
    free_port,
    mask_url,
    python_env,
    start_redis,
    start_redis_cluster,
    start_tansu,
    strip_password,
)
from rtrec.stream.keys import workers_ready
from rtrec.stream.settings import Settings
from rtrec.stream.topics import ensure_topics

WORKER_MODULES = {
    "state": "rtrec.workers.state",
    "recommend": "rtrec.workers.recommend",
    "trainer": "rtrec.workers.trainer",
    "ops": "rtrec.workers.ops",
}
EMBEDDED_SESSION_TIMEOUT_MS = 3000  # Tansu accepts it; group joins take ~2 s instead of ~8 s
# Tansu holds an empty fetch for its whole wait even when data arrives (Kafka answers at once): an idle
# worker's waits stop growing here, so the first record after a quiet spell waits at most this (fetch_pacing.py)
EMBEDDED_IDLE_FETCH_WAIT_MS = 200


HOME_DIR = ".rtrec"
RESTART_BACKOFF_MAX_S = 10.0  # the wait before a restart doubles after each crash, up to this
STABLE_AFTER_S = 30.0  # a child that ran this long has its crash count reset


def stack_file(run_dir: Path) -> Path:
    return run_dir / "stack.json"


def find_home(start: Path | None = None) -> Path:
    """The rtrec folder: RTREC_HOME, else the nearest `.rtrec/` at or above the working directory, else ./.rtrec."""
    if os.environ.get("RTREC_HOME"):
        return Path(os.environ["RTREC_HOME"]).expanduser().resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / HOME_DIR).is_dir():
            return folder / HOME_DIR
    return here / HOME_DIR


def locate(settings: Settings) -> Settings:
    """Absolute run and checkpoint directories: as configured (RTREC_RUN_DIR, RTREC_CHECKPOINT_DIR), else in
    the rtrec folder found by `find_home`, so commands find the stack from any subfolder."""
    explicit = settings.model_fields_set
    if "run_dir" in explicit:
        return settings.model_copy(update={"run_dir": Path(settings.run_dir).resolve()})
    home = find_home()
    update: dict[str, object] = {"run_dir": home / "run"}
    if "checkpoint_dir" not in explicit:
        update["checkpoint_dir"] = home / "checkpoints"
    return settings.model_copy(update=update)


def redis_data_dir(settings: Settings) -> Path:
    """Where `rtrec up`'s embedded Redis keeps its append-only file: `data/redis` next to the run directory."""
    return Path(settings.run_dir).resolve().parent / "data" / "redis"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def running_stack(run_dir: Path) -> dict | None:
    """The stack.json of a running `rtrec up` in `run_dir`; None when there is none, or it is stale
    (its process is gone, e.g. after kill -9) or unreadable."""
    try:
        info = json.loads(stack_file(run_dir).read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if pid_alive(pid) else None


def adopt_running_stack(settings: Settings) -> Settings:
    """Locate the rtrec folder; fill unset server addresses from a running `rtrec up` (its stack.json)."""
    settings = locate(settings)
    if settings.kafka_bootstrap and settings.redis_url:
        return settings
    info = running_stack(settings.run_dir)
    if info is None:
        return settings
    update = {
        "kafka_bootstrap": settings.kafka_bootstrap or info.get("kafka_bootstrap"),
        "redis_url": settings.redis_url or info.get("redis_url"),
    }
    if "redis_cluster" not in settings.model_fields_set and not settings.redis_url and info.get("redis_cluster"):
        update["redis_cluster"] = True
    return settings.model_copy(update=update)


class AlreadyRunning(RuntimeError):
    def __init__(self, pid: int | None, run_dir: Path) -> None:
        self.pid, self.run_dir = pid, run_dir
        super().__init__(
            f"rtrec up already runs here (pid {pid if pid else '?'}, {run_dir}); "
            "stop it with `rtrec down` or use another RTREC_HOME"
        )


def lock_run_dir(run_dir: Path) -> int:
    """Hold `run_dir/up.lock` for the life of this process (the kernel drops it when the process dies,
    even by kill -9); raises AlreadyRunning with the holder's pid."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "up.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            pid = int(path.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        raise AlreadyRunning(pid or None, run_dir) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    os.set_inheritable(fd, False)
    return fd


def write_private(path: Path, text: str) -> None:
    """Write atomically, readable by the owner only (0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CrashLoop(RuntimeError):
    """A child kept crashing: `rtrec up` stops the stack."""


class Stack:
    """Start what is missing, run workers as subprocesses, stop everything in reverse order."""

    def __init__(
        self,
        settings: Settings,
        run_dir: Path | None = None,
        data_dir: Path | None = None,
        supervised: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        # absolute: servers change their working directory, and children must agree on one folder
        self.run_dir = Path(run_dir or settings.run_dir).resolve()
        self.settings = settings.model_copy(update={"run_dir": self.run_dir})
        self.data_dir = Path(data_dir).resolve() if data_dir else None  # None: throw-away Redis data
        self.supervised = supervised  # children die with this process; supervise() restarts them
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.servers: list[ManagedProcess] = []
        self.workers: list[ManagedProcess] = []
        self.embedded_broker = False
        self.metrics_ports: dict[str, int] = {}  # worker name -> its /metrics, /healthz, /readyz port
        self.restarts: dict[str, int] = {}  # name -> restarts so far
        self._crashes: dict[str, int] = {}  # name -> crashes in a row
        self._restart_due: dict[str, float] = {}  # name -> when the pending restart is due

    # ---- servers -------------------------------------------------------------------
    def start_servers(self) -> Settings:
        """Start the embedded broker/Redis where none is configured; create topics."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        update: dict[str, object] = {}
        if not self.settings.kafka_bootstrap:
            proc, bootstrap = start_tansu(self.run_dir, self.settings.kafka_port, die_with_parent=self.supervised)
            self.servers.append(proc)
            self.embedded_broker = True
            update["kafka_bootstrap"] = bootstrap
            if "RTREC_SESSION_TIMEOUT_MS" not in os.environ:
                update["session_timeout_ms"] = EMBEDDED_SESSION_TIMEOUT_MS
            if "RTREC_IDLE_FETCH_WAIT_MS" not in os.environ:
                update["idle_fetch_wait_ms"] = EMBEDDED_IDLE_FETCH_WAIT_MS
        if not self.settings.redis_url and self.settings.redis_cluster:
            nodes, url = start_redis_cluster(self.settings, self.run_dir, die_with_parent=self.supervised)
            self.servers += nodes
            update["redis_url"] = url
        elif not self.settings.redis_url:
            proc, url = start_redis(
                self.settings,
                self.run_dir,
                self.settings.redis_port,
                data_dir=self.data_dir,
                die_with_parent=self.supervised,
            )
            self.servers.append(proc)
            update["redis_url"] = url
        self.settings = self.settings.model_copy(update=update)
        # a broker we just started may take a while to listen; one that is configured answers or is unreachable
        ensure_topics(self.settings, timeout_s=30 if self.embedded_broker else self.settings.connect_timeout_s)
        self._write_stack_file()
        return self.settings

    def _write_stack_file(self) -> None:
        """stack.json (0600, no secrets: a password in the URL is left out; clients take RTREC_REDIS_PASSWORD)."""
        processes = {}
        for p in self.servers + self.workers:
            port = p.port or self.metrics_ports.get(p.name, 0)
            processes[p.name] = {
                "pid": p.proc.pid,
                "kind": "server" if p in self.servers else "worker",
                "port": port or None,
                "log": str(p.log_path),
                "restarts": self.restarts.get(p.name, 0),
            }
        info = {
            "kafka_bootstrap": self.settings.kafka_bootstrap,
            "redis_url": strip_password(self.settings.redis_url),
            "redis_cluster": self.settings.redis_cluster,
            "redis_data_dir": str(self.data_dir) if self.data_dir else None,
            "pid": os.getpid(),
            "servers": {p.name: p.proc.pid for p in self.servers},
            "workers": {p.name: p.proc.pid for p in self.workers},
            "metrics": {name: f"http://127.0.0.1:{port}/metrics" for name, port in self.metrics_ports.items()},
            "processes": processes,
        }
        write_private(stack_file(self.run_dir), json.dumps(info, indent=2))

    # ---- workers -------------------------------------------------------------------
    def start_worker(self, kind: str, **env: str) -> ManagedProcess:
        """Spawn one worker process (`state`, `recommend` or `trainer`) reading this stack's settings."""
        n = sum(1 for w in self.workers if w.name.startswith(kind)) + 1
        port = free_port() if self.settings.metrics else 0
        environment = python_env(
            self.settings,
            RTREC_RUN_DIR=str(self.run_dir),
            RTREC_SESSION_TIMEOUT_MS=str(self.settings.session_timeout_ms),
            RTREC_METRICS_PORT=str(port),
            **env,
        )
        proc = ManagedProcess.spawn(
            f"{kind}-{n}",
            [sys.executable, "-m", WORKER_MODULES[kind]],
            self.run_dir,
            env=environment,
            die_with_parent=self.supervised,
        )
        self.workers.append(proc)
        if port:
            self.metrics_ports[proc.name] = port
            if stack_file(self.run_dir).exists():
                self._write_stack_file()
        return proc

    def wait_ready(self, kind: str, count: int = 1, timeout_s: float = 60) -> None:
        """Block until `count` workers of `kind` hold a partition assignment."""
        client = redis_client(self.settings)
        deadline = time.monotonic() + timeout_s
        while len(self._ready_pids(client, kind)) < count:
            dead = [w for w in self.workers if w.name.startswith(kind) and not w.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} workers not ready after {timeout_s}s")
            time.sleep(0.05)
        client.close()

    def _ready_pids(self, client, kind: str) -> set[str]:
        alive = {str(w.proc.pid) for w in self.workers if w.name.startswith(kind) and w.alive()}
        return alive & client.smembers(workers_ready(kind))

    def start(
        self, state_workers: int = 1, recommend_workers: int = 1, trainer: bool = False, ops: bool = False
    ) -> Settings:
        """Servers, then workers; `rtrec up` adds the trainer (one: it owns the checkpoint store) and ops."""
        self.start_servers()
        for _ in range(state_workers):
            self.start_worker("state")
        for _ in range(recommend_workers):
            self.start_worker("recommend")
        if trainer:
            self.start_worker("trainer")
        if ops:
            self.start_worker("ops")
        self.wait_ready("state", state_workers)
        self.wait_ready("recommend", recommend_workers)
        if trainer:
            self.wait_ready("trainer", 1)
        if ops:
            self.wait_ready("ops", 1)
        return self.settings

    # ---- supervision -----------------------------------------------------------------
    def supervise(self, now: float | None = None) -> None:
        """One round: schedule a restart (with backoff) for each child that exited, run the restarts that are
        due. Raises CrashLoop when a child crashed RTREC_MAX_RESTARTS + 1 times in a row."""
        now = time.monotonic() if now is None else now
        for proc in list(self.servers + self.workers):
            name = proc.name
            if proc.alive():
                if self._crashes.get(name) and now - proc.started_at > STABLE_AFTER_S:
                    self._crashes[name] = 0
                continue
            if name not in self._restart_due:
                crashes = self._crashes.get(name, 0) + 1
                self._crashes[name] = crashes
                code = proc.proc.poll()
                limit = self.settings.max_restarts
                if crashes > limit:
                    raise CrashLoop(
                        f"{name} crashed {crashes} times in a row (exit code {code}); giving up and "
                        f"stopping the stack; its log: {proc.log_path}"
                    )
                delay = min(self.settings.restart_backoff_s * 2 ** (crashes - 1), RESTART_BACKOFF_MAX_S)
                self._restart_due[name] = now + delay
                self.log(f"{name} exited (code {code}); restarting in {delay:.1f} s (try {crashes}/{limit})")
            elif now >= self._restart_due[name]:
                del self._restart_due[name]
                self._restart(proc)
                now = time.monotonic()

    def _restart(self, proc: ManagedProcess) -> None:
        proc.restart()
        self.restarts[proc.name] = self.restarts.get(proc.name, 0) + 1
        try:
            if proc in self.servers and proc.port:
                proc.wait_port(proc.port)
                if proc.name == "tansu":  # memory storage: the restarted broker has no topics
                    ensure_topics(self.settings)
        except Exception as exc:  # noqa: BLE001 - a server that died again: the next round sees it
            self.log(f"{proc.name} did not come back: {str(exc).splitlines()[0] if str(exc) else exc!r}")
            return
        finally:
            self._write_stack_file()
        note = " (the embedded broker keeps events in memory: its log starts empty)" if proc.name == "tansu" else ""
        self.log(f"{proc.name} restarted, pid {proc.proc.pid}{note}")

    def describe(self) -> str:
        """The addresses, fit to print (passwords masked)."""
        return f"kafka={self.settings.kafka_bootstrap}  redis={mask_url(self.settings.redis_url)}"

    def stop_worker(self, proc: ManagedProcess, kill: bool = False) -> None:
        proc.kill() if kill else proc.stop()
        self.workers.remove(proc)

    def stop(self) -> None:
        """Workers first (all signalled at once, then awaited), then the servers."""
        for group in (self.workers, self.servers):
            for proc in reversed(group):
                if proc.alive():
                    try:
                        proc.proc.terminate()
                    except ProcessLookupError:
                        pass
            for proc in reversed(group):
                proc.stop()
            group.clear()
        self._restart_due.clear()
        stack_file(self.run_dir).unlink(missing_ok=True)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
