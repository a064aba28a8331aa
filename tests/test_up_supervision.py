"""`rtrec up` as a service: supervision, durable embedded Redis, status/down, one stack per folder.

Real processes, started from a relative working directory (a project folder without
RTREC_RUN_DIR), as a user runs them.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rtrec.stream.connections import redis_client
from rtrec.stream.embedded import ManagedProcess, mask_url, strip_password
from rtrec.stream.producer import EventProducer
from rtrec.stream.rec_client import RecClient
from rtrec.stream.settings import Settings
from rtrec.workers import stack as stack_mod
from rtrec.workers.stack import CrashLoop, Stack
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[1]
RTREC = [sys.executable, "-m", "rtrec.workers.cli"]
PASSWORD = "s3cret-pw"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTREC_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def cli(args: list[str], cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(RTREC + args, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


class Up:
    """`rtrec up` in the background, its output in a file (so it can be read while it runs)."""

    def __init__(self, cwd: Path, args: list[str] = (), **env: str) -> None:
        self.cwd = cwd
        self.out = cwd / f"up-{time.monotonic_ns()}.out"
        self.proc = subprocess.Popen(
            RTREC + ["up", *args], cwd=cwd, env=_env(**env), stdout=open(self.out, "w"), stderr=subprocess.STDOUT
        )
        try:
            wait_for(
                lambda: "Ctrl-C to stop" in self.output() or self.proc.poll() is not None,
                timeout_s=120,
                what="rtrec up",
            )
        except AssertionError:
            self.kill()
            raise AssertionError("rtrec up did not come up:\n" + self.output()) from None
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def info(self) -> dict:
        return json.loads((self.cwd / ".rtrec" / "run" / "stack.json").read_text())

    def pids(self) -> list[int]:
        return [p["pid"] for p in self.info()["processes"].values()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _alive(pid: int) -> bool:
    return stack_mod.pid_alive(pid)


def _settings(info: dict, **kw) -> Settings:
    return Settings(
        kafka_bootstrap=info["kafka_bootstrap"],
        redis_url=info["redis_url"],
        redis_cluster=info.get("redis_cluster", False),
        **kw,
    )


def _answers(settings: Settings, user: str = "nobody") -> bool:
    """One recommendation request through the broker answered without an error (a fresh client each time)."""
    try:
        with RecClient(settings) as client:
            rid = client.send(user, k=3)
            resp = client.collect([rid], timeout_s=10).get(rid)
    except Exception:  # noqa: BLE001 - the broker may still be coming back
        return False
    return bool(resp) and (resp.get("items") or "nothing to recommend" in (resp.get("error") or ""))


def _hget(settings: Settings, key: str, field: str):
    try:
        with redis_client(settings) as client:
            return client.hget(key, field)
    except Exception:  # noqa: BLE001 - Redis may still be coming back
        return None


def _event(user: str, n: int) -> dict:
    return {
        "event_id": f"{user}-e{n}",
        "user_id": user,
        "item_id": f"i{n}",
        "type": "browse",
        "ts": 1_767_225_600_000 + n,
    }


@pytest.mark.integration
def test_up_restarts_each_crashed_child_and_dies_with_nothing_left(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    up = Up(project)
    try:
        settings = _settings(up.info())
        assert _answers(settings)
        for n, name in enumerate(["redis", "tansu", "state-1", "recommend-1", "trainer-1", "ops-1"]):
            old = up.info()["processes"][name]["pid"]
            os.kill(old, signal.SIGKILL)
            wait_for(
                lambda: (p := up.info()["processes"][name])["pid"] != old and p["restarts"] >= 1 and _alive(p["pid"]),
                timeout_s=60,
                what=f"{name} restarted",
            )
            wait_for(lambda: f"{name} restarted, pid" in up.output(), what=f"{name} restart logged")
            assert f"{name} exited (code -9); restarting in" in up.output()
            wait_for(lambda: _answers(settings), timeout_s=90, what=f"an answer after {name} was restarted")
            if name in ("redis", "tansu"):  # events sent after the restart are applied
                user = f"sup-{n}"
                with EventProducer(settings) as producer:
                    for k in range(3):
                        producer.send(_event(user, k))
                    producer.flush()
                wait_for(
                    lambda: _hget(settings, f"rt:u:{user}:h", "n") == "3",
                    timeout_s=60,
                    what=f"events applied after {name} restarted",
                )
        assert up.proc.poll() is None

        pids = up.pids()
        up.kill()  # kill -9 of `rtrec up` itself: its children die with it
        wait_for(lambda: not any(_alive(pid) for pid in pids), timeout_s=5, what="no child of rtrec up left")
        # a stale stack.json is not taken for a running stack
        res = cli(["status"], cwd=project)
        assert res.returncode == 1 and "no rtrec stack runs here" in res.stdout
    finally:
        up.kill()


@pytest.mark.integration
def test_up_keeps_redis_state_across_restarts_and_one_stack_per_folder(tmp_path):
    project = tmp_path / "project"
    sub = project / "src" / "deep"
    sub.mkdir(parents=True)
    up = Up(project, RTREC_REDIS_PASSWORD=PASSWORD)
    try:
        # stack.json: owner-only, no secret; nothing printed holds the password
        path = project / ".rtrec" / "run" / "stack.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert PASSWORD not in path.read_text() and PASSWORD not in up.output()
        info = up.info()

        # a second `up` in the same folder (here: from a subfolder) is refused with the running one's pid
        second = cli(["up"], cwd=sub, RTREC_REDIS_PASSWORD=PASSWORD)
        assert second.returncode == 1 and f"pid {up.proc.pid}" in second.stdout + second.stderr
        assert up.info()["pid"] == up.proc.pid  # stack.json untouched

        # commands run in a subfolder find the stack: produce, status
        user = "durable-user"
        res = cli(
            ["produce", "--user", user, "--item", "i1", "--type", "purchase"], cwd=sub, RTREC_REDIS_PASSWORD=PASSWORD
        )
        assert res.returncode == 0, res.stdout + res.stderr
        redis = redis_client(_settings(info, redis_password=PASSWORD))
        wait_for(lambda: redis.hget(f"rt:u:{user}:h", "n") == "1", timeout_s=30, what="produced event applied")
        redis.execute_command("WAITAOF", 1, 0, 5000)  # on disk (appendfsync everysec would get there within 1 s)
        redis.close()
        status = cli(["status", "--json"], cwd=sub, RTREC_REDIS_PASSWORD=PASSWORD)
        assert status.returncode == 0, status.stdout + status.stderr
        report = json.loads(status.stdout)
        assert report["pid"] == up.proc.pid and report["healthy"]
        assert {p["name"] for p in report["processes"]} == {
            "tansu",
            "redis",
            "state-1",
            "recommend-1",
            "trainer-1",
            "ops-1",
        }
        assert all(p["health"] == "ok" and p["port"] for p in report["processes"])
        assert PASSWORD not in status.stdout

        # RTREC_HOME names the folder from anywhere
        res = cli(["status"], cwd=tmp_path, RTREC_HOME=str(project / ".rtrec"))
        assert res.returncode == 0 and str(up.proc.pid) in res.stdout, res.stdout + res.stderr

        pids = up.pids()
        down = cli(["down"], cwd=sub)
        assert down.returncode == 0 and f"stopped rtrec up (pid {up.proc.pid})" in down.stdout, down.stdout
        assert up.proc.wait(10) == 0
        assert not any(_alive(pid) for pid in pids) and not path.exists()
        again = cli(["down"], cwd=sub)
        assert again.returncode == 0 and again.stdout.strip().startswith("no rtrec stack runs here")

        # up again in the same folder: the user's state is back (the AOF in .rtrec/data/redis)
        assert list((project / ".rtrec" / "data" / "redis").iterdir())
        up = Up(project, ["--no-trainer"], RTREC_REDIS_PASSWORD=PASSWORD)
        redis = redis_client(_settings(up.info(), redis_password=PASSWORD))
        assert redis.hget(f"rt:u:{user}:h", "n") == "1"
        redis.close()
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0
    finally:
        up.kill()


@pytest.mark.integration
def test_up_with_an_embedded_redis_cluster_from_a_relative_folder(tmp_path):
    project = tmp_path / "cluster"
    project.mkdir()
    up = Up(project, ["--no-trainer"], RTREC_REDIS_CLUSTER="true")
    try:
        info = up.info()
        assert info["redis_cluster"] and sum(name.startswith("redis-cluster-") for name in info["servers"]) == 3
        assert all(str(project / ".rtrec" / "run") in p["log"] for p in info["processes"].values())
        wait_for(lambda: _answers(_settings(info)), timeout_s=60, what="an answer from the cluster stack")
        # other commands learn the cluster mode from stack.json
        res = cli(["state", "nobody"], cwd=project)
        assert "MOVED" not in res.stdout + res.stderr and "Traceback" not in res.stderr, res.stdout + res.stderr
        down = cli(["down"], cwd=project)
        assert down.returncode == 0, down.stdout
        assert up.proc.wait(30) == 0
    finally:
        up.kill()


@pytest.mark.integration
@pytest.mark.slow  # the external-server mode is also covered (absolute run dir) by test_cli.py
def test_up_with_external_servers_and_more_workers_from_a_relative_folder(tmp_path, monkeypatch):
    from rtrec.stream.embedded import start_redis, start_tansu

    monkeypatch.chdir(tmp_path)
    servers = Path("servers")  # relative on purpose: the servers get absolute folders
    tansu, bootstrap = start_tansu(servers)
    redis_proc, url = start_redis(Settings(), servers)
    project = tmp_path / "project"
    project.mkdir()
    try:
        up = Up(project, ["--no-trainer", "--state-workers", "2"], RTREC_KAFKA_BOOTSTRAP=bootstrap, RTREC_REDIS_URL=url)
        try:
            info = up.info()
            assert info["servers"] == {} and set(info["workers"]) == {"state-1", "state-2", "recommend-1", "ops-1"}
            wait_for(lambda: _answers(_settings(info)), timeout_s=60, what="an answer")
            assert cli(["down"], cwd=project).returncode == 0
            assert up.proc.wait(30) == 0
        finally:
            up.kill()
        assert tansu.alive() and redis_proc.alive()  # not ours to stop
    finally:
        tansu.stop()
        redis_proc.stop()


@pytest.mark.integration
@pytest.mark.slow  # the give-up logic itself is tested fast below
def test_up_gives_up_on_a_crash_loop_and_stops_the_stack(tmp_path):
    from rtrec.stream.embedded import redis_server_binary

    project = tmp_path / "project"
    project.mkdir()
    wrapper = tmp_path / "flaky-redis"  # runs once; every restart fails at once
    wrapper.write_text(
        f"#!/bin/sh\nif [ -e {tmp_path}/started ]; then echo broken; exit 7; fi\n"
        f'touch {tmp_path}/started\nexec {redis_server_binary(Settings())} "$@"\n'
    )
    wrapper.chmod(0o755)
    up = Up(
        project,
        ["--no-trainer"],
        RTREC_REDIS_SERVER_BIN=str(wrapper),
        RTREC_RESTART_BACKOFF_S="0.05",
        RTREC_MAX_RESTARTS="3",
    )
    try:
        pids = up.pids()
        os.kill(up.info()["processes"]["redis"]["pid"], signal.SIGKILL)
        assert up.proc.wait(60) == 1
        out = up.output()
        assert out.count("giving up") == 1 and "redis crashed 4 times in a row (exit code 7)" in out, out
        wait_for(lambda: not any(_alive(pid) for pid in pids), timeout_s=5, what="the stack stopped")
        assert not (project / ".rtrec" / "run" / "stack.json").exists()
    finally:
        up.kill()


def test_a_crash_loop_gives_up_with_one_line(tmp_path):
    lines: list[str] = []
    st = Stack(
        Settings(
            kafka_bootstrap="127.0.0.1:1", redis_url="redis://127.0.0.1:1/0", restart_backoff_s=0.01, max_restarts=3
        ),
        run_dir=tmp_path,
        supervised=True,
        log=lines.append,
    )
    st.workers.append(
        ManagedProcess.spawn(
            "crashy-1", [sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path, die_with_parent=True
        )
    )
    deadline = time.monotonic() + 30
    with pytest.raises(CrashLoop) as err:
        while time.monotonic() < deadline:
            st.supervise()
            time.sleep(0.01)
    assert "crashy-1 crashed 4 times in a row (exit code 3); giving up" in str(err.value)
    assert st.restarts["crashy-1"] == 3 and sum("restarted" in line for line in lines) == 3
    assert stat.S_IMODE((tmp_path / "stack.json").stat().st_mode) == 0o600
    st.stop()


def test_stack_json_never_holds_a_password(tmp_path):
    url = f"redis://user:{PASSWORD}@127.0.0.1:6379/0"
    assert mask_url(url) == "redis://user:***@127.0.0.1:6379/0"
    assert mask_url(f"redis://:{PASSWORD}@h:1/0") == "redis://:***@h:1/0"
    assert strip_password(url) == "redis://user@127.0.0.1:6379/0"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    st = Stack(Settings(kafka_bootstrap="127.0.0.1:1", redis_url=url), run_dir=tmp_path / "run")
    (tmp_path / "run").mkdir()
    st._write_stack_file()
    text = (tmp_path / "run" / "stack.json").read_text()
    assert PASSWORD not in text and json.loads(text)["redis_url"] == "redis://user@127.0.0.1:6379/0"
    assert PASSWORD not in st.describe()


def test_commands_find_the_rtrec_folder_from_a_subfolder(tmp_path, monkeypatch):
    (tmp_path / ".rtrec").mkdir()
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    monkeypatch.delenv("RTREC_HOME", raising=False)
    monkeypatch.delenv("RTREC_RUN_DIR", raising=False)
    monkeypatch.delenv("RTREC_CHECKPOINT_DIR", raising=False)
    located = stack_mod.locate(Settings())
    assert located.run_dir == tmp_path.resolve() / ".rtrec" / "run"
    assert located.checkpoint_dir == tmp_path.resolve() / ".rtrec" / "checkpoints"
    monkeypatch.setenv("RTREC_HOME", str(tmp_path / "elsewhere"))
    assert stack_mod.locate(Settings()).run_dir == (tmp_path / "elsewhere" / "run").resolve()
