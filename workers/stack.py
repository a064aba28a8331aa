"""The whole rtrec stack as real processes: broker, Redis, state and recommendation workers.

Used by `rtrec up` and `rtrec demo`, by the integration tests and by the
benches, so all of them exercise the same start-up path. Servers named in the
settings (RTREC_KAFKA_BOOTSTRAP / RTREC_REDIS_URL) are used as they are;
missing ones are started here and stopped again by `stop()`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from stream.connections import redis_client
from stream.embedded import ManagedProcess, free_port, python_env, start_redis, start_redis_cluster, start_tansu
from stream.settings import Settings
from stream.topics import ensure_topics

READY_KEY = "rt:workers:{kind}"
WORKER_MODULES = {"state": "workers.state", "recommend": "workers.recommend", "trainer": "workers.trainer",
                  "ops": "workers.ops"}
EMBEDDED_SESSION_TIMEOUT_MS = 3000  # Tansu accepts it; group joins take ~2 s instead of ~8 s


def stack_file(run_dir: Path) -> Path:
    return run_dir / "stack.json"


def adopt_running_stack(settings: Settings) -> Settings:
    """Fill unset server addresses from a running `rtrec up` (its stack.json), if there is one."""
    if settings.kafka_bootstrap and settings.redis_url:
        return settings
    path = stack_file(settings.run_dir)
    if not path.exists():
        return settings
    info = json.loads(path.read_text())
    return settings.model_copy(
        update={
            "kafka_bootstrap": settings.kafka_bootstrap or info.get("kafka_bootstrap"),
            "redis_url": settings.redis_url or info.get("redis_url"),
        }
    )


class Stack:
    """Start what is missing, run workers as subprocesses, stop everything in reverse order."""

    def __init__(self, settings: Settings, run_dir: Path | None = None) -> None:
        self.run_dir = Path(run_dir or settings.run_dir)
        self.settings = settings.model_copy(update={"run_dir": self.run_dir})
        self.servers: list[ManagedProcess] = []
        self.workers: list[ManagedProcess] = []
        self.embedded_broker = False
        self.metrics_ports: dict[str, int] = {}  # worker name -> its /metrics, /healthz, /readyz port

    # ---- servers -------------------------------------------------------------------
    def start_servers(self) -> Settings:
        """Start the embedded broker/Redis where none is configured; create topics."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        update: dict[str, object] = {}
        if not self.settings.kafka_bootstrap:
            proc, bootstrap = start_tansu(self.run_dir, self.settings.kafka_port)
            self.servers.append(proc)
            self.embedded_broker = True
            update["kafka_bootstrap"] = bootstrap
            if "RTREC_SESSION_TIMEOUT_MS" not in os.environ:
                update["session_timeout_ms"] = EMBEDDED_SESSION_TIMEOUT_MS
        if not self.settings.redis_url and self.settings.redis_cluster:
            nodes, url = start_redis_cluster(self.settings, self.run_dir)
            self.servers += nodes
            update["redis_url"] = url
        elif not self.settings.redis_url:
            proc, url = start_redis(self.settings, self.run_dir, self.settings.redis_port)
            self.servers.append(proc)
            update["redis_url"] = url
        self.settings = self.settings.model_copy(update=update)
        ensure_topics(self.settings)
        self._write_stack_file()
        return self.settings

    def _write_stack_file(self) -> None:
        info = {
            "kafka_bootstrap": self.settings.kafka_bootstrap,
            "redis_url": self.settings.redis_url,
            "pid": os.getpid(),
            "servers": {p.name: p.proc.pid for p in self.servers},
            "metrics": {name: f"http://127.0.0.1:{port}/metrics" for name, port in self.metrics_ports.items()},
        }
        stack_file(self.run_dir).write_text(json.dumps(info, indent=2))

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
            f"{kind}-{n}", [sys.executable, "-m", WORKER_MODULES[kind]], self.run_dir, env=environment
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
        return alive & client.smembers(READY_KEY.format(kind=kind))

    def start(self, state_workers: int = 1, recommend_workers: int = 1, trainer: bool = False,
              ops: bool = False) -> Settings:
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

    def stop_worker(self, proc: ManagedProcess, kill: bool = False) -> None:
        proc.kill() if kill else proc.stop()
        self.workers.remove(proc)

    def stop(self) -> None:
        for proc in reversed(self.workers):
            proc.stop()
        self.workers.clear()
        for proc in reversed(self.servers):
            proc.stop()
        self.servers.clear()
        stack_file(self.run_dir).unlink(missing_ok=True)

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def announce_ready(redis_client, kind: str) -> None:
    """A worker says it holds its assignment (wait_ready counts live pids in this set)."""
    await redis_client.sadd(READY_KEY.format(kind=kind), str(os.getpid()))


async def announce_gone(redis_client, kind: str) -> None:
    await redis_client.srem(READY_KEY.format(kind=kind), str(os.getpid()))
