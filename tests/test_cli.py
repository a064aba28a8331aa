"""The command line as a user runs it: real subprocesses against real servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rtrec.stream.embedded import start_redis, start_tansu
from rtrec.stream.eventfile import read_events, write_events
from rtrec.stream.sample import SAMPLE_CONFIG, SAMPLE_PATH
from rtrec.stream.settings import Settings
from rtrec.stream.synthetic import generate_events
from tests.helpers import RTREC, run_cli, stack_env, tiny_checkpoint, wait_for


def test_bundled_sample_is_the_documented_generator_output():
    assert list(read_events(SAMPLE_PATH)) == generate_events(SAMPLE_CONFIG)


def test_generate_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    for out in (a, b):
        res = run_cli(
            [
                "generate",
                str(out),
                "--events",
                "500",
                "--users",
                "20",
                "--items",
                "100",
                "--clusters",
                "5",
                "--seed",
                "3",
            ]
        )
        assert res.returncode == 0, res.stderr
    assert list(read_events(a)) == [dict(e) for e in read_events(b)]
    assert len(list(read_events(a))) == 500


@pytest.mark.integration
def test_replay_and_produce_reach_redis(settings, redis, uid, tmp_path):
    user = uid("cli")
    events = [{"user_id": user, "item_id": f"i{n}", "type": "browse", "ts": 1_767_225_600_000 + n} for n in range(20)]
    events.append({"user_id": user, "item_id": "i1", "type": "dance", "ts": 1_767_225_600_000})
    path = tmp_path / "events.csv"
    write_events(path, events)
    res = run_cli(["replay", str(path), "--rate", "1000"], env=stack_env(settings))
    assert res.returncode == 1, res.stderr  # a rejected event: exit 1, as `produce`
    assert "sent 20, rejected 1" in res.stdout and "line 22" not in res.stdout and "lines 22" in res.stdout
    wait_for(lambda: redis.hget(f"rt:u:{user}:h", "n") == "20", what="replayed events")

    again = run_cli(["replay", str(path)], env=stack_env(settings))  # derived ids: no double count
    assert again.returncode == 1 and "sent 20, rejected 1" in again.stdout
    line = json.dumps(
        {"event_id": uid("p"), "user_id": user, "item_id": "i99", "type": "purchase", "ts": 1_767_225_700_000}
    )
    res = run_cli(["produce"], env=stack_env(settings), stdin=line + "\n")
    assert res.returncode == 0, res.stderr
    wait_for(lambda: redis.hget(f"rt:u:{user}:h", "n") == "21", what="produced event")
    assert redis.hget(f"rt:u:{user}:h", "browse") == "20"

    bad = run_cli(["produce", "--user", user, "--item", "i1", "--type", "like"], env=stack_env(settings))
    assert bad.returncode == 1 and "unknown_type" in bad.stdout


def _start_up(run_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        RTREC + ["up"],
        env={**os.environ, "RTREC_RUN_DIR": str(run_dir), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 90
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C to stop" in line:
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError("rtrec up did not come up:\n" + "".join(lines))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.integration
def test_up_serves_requests_and_ctrl_c_stops_everything(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_up(run_dir, {})
    try:
        info = json.loads((run_dir / "stack.json").read_text())
        pids = list(info["servers"].values()) + [int(p.read_text()) for p in run_dir.glob("*-1.pid")]
        assert set(info["servers"]) == {"tansu", "redis"} and len(pids) == 6  # + state, recommend, trainer, ops
        assert set(info["metrics"]) == {"state-1", "recommend-1", "trainer-1", "ops-1"}
        assert (run_dir / "trainer-1.pid").exists()

        # another command finds the running stack through the run directory
        res = run_cli(["recommend", "nobody", "-k", "3", "--json"], env={"RTREC_RUN_DIR": str(run_dir)})
        answer = json.loads(res.stdout)
        assert answer["fallback"] is True and answer["error"], res.stdout + res.stderr  # an empty store: nothing yet
        assert res.returncode == 1  # an error response exits 1
    finally:
        proc.send_signal(signal.SIGINT)  # a failed assertion must not leave the stack running
    assert proc.wait(60) == 0
    assert not any(_alive(pid) for pid in pids)
    assert not (run_dir / "stack.json").exists()


@pytest.mark.integration
def test_up_uses_external_servers_and_leaves_them_running(tmp_path):
    servers = tmp_path / "servers"
    tansu, bootstrap = start_tansu(servers)
    redis_proc, url = start_redis(Settings(), servers)
    try:
        proc = _start_up(tmp_path / "run", {"RTREC_KAFKA_BOOTSTRAP": bootstrap, "RTREC_REDIS_URL": url})
        info = json.loads((tmp_path / "run" / "stack.json").read_text())
        assert info["servers"] == {} and info["kafka_bootstrap"] == bootstrap and info["redis_url"] == url
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert tansu.alive() and redis_proc.alive()
    finally:
        tansu.stop()
        redis_proc.stop()


@pytest.mark.integration
def test_demo_shows_recommendations_following_new_events(tmp_path):
    res = run_cli(["demo"], env={"RTREC_RUN_DIR": str(tmp_path / "run")}, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summaries = [line for line in res.stdout.splitlines() if line.startswith("items from category")]
    assert len(summaries) == 3
    # the users' new interest shows up after their events (the demo's whole point)
    gained = 0
    for line in summaries:
        before = int(line.split("before ")[1].split("/")[0])
        after = int(line.split("after ")[1].split("/")[0])
        gained += after - before
    assert gained > 0
    assert "trained gen-" in res.stdout and "gen-" in res.stdout.split("5. recommendations after")[1]


TINY_MODEL_ENV = {
    "RTREC_MODEL_HIDDEN": "64",
    "RTREC_MODEL_HEADS": "1",
    "RTREC_MODEL_LAYERS": "1",
    "RTREC_MODEL_INTERMEDIATE": "128",
    "RTREC_MODEL_MAX_EVENTS": "20",
    "RTREC_MODEL_ITEM_CAPACITY": "200",
    "RTREC_TRAIN_EPOCHS": "2",
}


def test_train_writes_a_promoted_checkpoint_and_eval_writes_the_table(tmp_path):
    events = tmp_path / "events.jsonl"
    assert (
        run_cli(
            ["generate", str(events), "--events", "2000", "--users", "40", "--items", "120", "--clusters", "4"]
        ).returncode
        == 0
    )
    root = tmp_path / "ck"
    res = run_cli(["train", "--events", str(events), "--out", str(root)], env=TINY_MODEL_ENV, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    version = (root / "CURRENT").read_text()
    manifest = json.loads((root / version / "manifest.json").read_text())
    assert manifest["training_window"]["events"] == 2000 and "HR@10" in manifest["metrics"]
    assert (root / f"{version}-training.png").exists()

    out = tmp_path / "eval"
    res = run_cli(
        ["eval", "--events", str(events), "--families", "llama,t5", "--out", str(out)], env=TINY_MODEL_ENV, timeout=600
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    [csv_path] = list(out.glob("*.csv"))
    names = [line.split(",")[0] for line in csv_path.read_text().splitlines()[1:]]
    assert names == [
        "generative-llama",
        "generative-t5",
        "blending",
        "popularity",
        "river-BiasedMF",
        "EASE",
        "generative-llama+blending",
        "generative-t5+blending",
        "unmasked: generative-llama",
        "unmasked: generative-t5",
        "unmasked: blending",
        "unmasked: EASE",
        "similar: model (llama)",
        "similar: model (t5)",
        "similar: co-visitation",
        "similar: fused (llama)",
        "similar: fused (t5)",
        "rerank100: model (llama)",
        "rerank100: model (t5)",
        "rerank100: fused (llama)",
        "rerank100: fused (t5)",
        "rerank100: popularity",
        "rerank100: EASE",
    ]
    assert list(out.glob("*.png")) and (out / "training-curves.png").exists()


@pytest.mark.integration
def test_train_from_the_events_topic(settings, producer, redis, tmp_path, uid):
    for n in range(30):
        producer.send(
            {
                "event_id": uid(f"t{n}"),
                "user_id": uid(f"tu{n % 5}"),
                "item_id": f"topic-i{n % 7}",
                "type": "browse",
                "ts": 1_767_225_600_000 + n,
            }
        )
    producer.flush()
    root = tmp_path / "ck"
    res = run_cli(
        ["train", "--from-topic", "--out", str(root)], env={**stack_env(settings), **TINY_MODEL_ENV}, timeout=300
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (root / "CURRENT").exists(), res.stdout[-2000:] + res.stderr[-2000:]
    manifest = json.loads((root / (root / "CURRENT").read_text() / "manifest.json").read_text())
    assert manifest["training_window"]["events"] >= 30


def test_model_list_promote_and_rollback(tmp_path):
    from rtrec.stream.synthetic import SyntheticConfig, generate_events

    events = generate_events(SyntheticConfig(n_users=10, n_items=20, n_events=200, seed=3))
    root = tmp_path / "ck"
    first, second = tiny_checkpoint(root, events).name, tiny_checkpoint(root, events, seed=1).name
    env = {"RTREC_CHECKPOINT_DIR": str(root), "RTREC_RUN_DIR": str(tmp_path / "no-stack"), "COLUMNS": "200"}
    for version in (first, second):
        res = run_cli(["model", "promote", version], env=env)
        assert res.returncode == 0 and f"CURRENT -> {version}" in res.stdout, res.stdout + res.stderr
    assert (root / "CURRENT").read_text() == second
    listing = run_cli(["model", "list"], env=env).stdout
    assert first in listing and second in listing
    res = run_cli(["model", "rollback"], env=env)
    assert res.returncode == 0 and (root / "CURRENT").read_text() == first, res.stdout
    res = run_cli(["model", "promote", "no-such-version"], env=env)
    assert res.returncode == 1 and "refused" in res.stdout


def test_model_list_shows_every_version_id_in_full_at_80_columns(tmp_path):
    root = tmp_path / "ck"
    versions = ["gen-20260101T120000-ab12", "trainer-20260101T130000-cd34"]
    for n, version in enumerate(versions):
        (root / version).mkdir(parents=True)
        (root / version / "manifest.json").write_text(
            json.dumps(
                {
                    "created_at": f"2026-01-01T1{n}:00:00Z",
                    "metrics": {"HR@10": 0.51234, "NDCG@10": 0.3},
                    "training_window": {"events": 123456, "trigger": "events:5000"},
                }
            )
        )
    (root / "CURRENT").write_text(versions[0])
    res = run_cli(["model", "list"], env={"RTREC_CHECKPOINT_DIR": str(root), "COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in res.stdout and "0.5123" in res.stdout, res.stdout
    for version in versions:
        assert any(version in line.split() for line in lines), res.stdout
    assert any(line.split()[:2] == ["*", versions[0]] for line in lines if line.strip()), res.stdout
