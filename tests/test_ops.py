"""Operations: consumer lag in messages and seconds, against the real broker and a real state worker."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid

import pytest

from rtrec.stream.producer import EventProducer
from rtrec.stream.topics import ensure_topics
from rtrec.workers.lag import LagMonitor, breaches
from rtrec.workers.stack import Stack
from tests.helpers import run_cli, scrape, stack_env, tiny_checkpoint, wait_for

pytestmark = pytest.mark.integration


def test_lag_grows_while_the_state_worker_is_down_and_returns_to_zero(settings, tmp_path):
    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(update={"topic_events": f"events-{tag}", "state_group": f"state-{tag}"})
    ensure_topics(s)
    groups = {s.state_group: s.topic_events}
    env = {
        **stack_env(s),
        "RTREC_TOPIC_EVENTS": s.topic_events,
        "RTREC_STATE_GROUP": s.state_group,
        "RTREC_RECOMMEND_GROUP": f"none-{tag}",
        "RTREC_TRAINER_GROUP": f"none-{tag}",
        "RTREC_QUALITY_GROUP": f"none-{tag}",
    }
    now = int(time.time() * 1000)
    events = [
        {"event_id": f"{tag}-{n}", "user_id": f"lag-{n % 7}", "item_id": f"i{n % 11}", "type": "click", "ts": now + n}
        for n in range(60)
    ]
    stack = Stack(
        s.model_copy(
            update={
                "lag_interval_s": 0.3,
                "recommend_group": f"none-{tag}",
                "trainer_group": f"none-{tag}",
                "quality_group": f"quality-{tag}",
            }
        ),
        run_dir=tmp_path / "run",
    )
    worker = stack.start_worker("state")
    ops = stack.start_worker("ops")
    with stack, LagMonitor(s, groups) as monitor, EventProducer(s) as producer:  # stops the workers on failure
        stack.wait_ready("state")
        stack.wait_ready("ops")
        producer.send_many(events[:10])
        producer.flush()
        wait_for(lambda: sum(r.lag for r in monitor.measure()) == 0 and monitor.measure(), what="caught up")
        state_metrics = scrape(stack.metrics_ports[worker.name])
        assert state_metrics["rtrec_events_processed_total"] == 10
        assert state_metrics["rtrec_event_to_state_seconds_count"] == 10
        assert 0 < state_metrics["rtrec_event_to_state_seconds_sum"] < 10 * 5  # seconds, plausibly small
        ready = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports[worker.name]}/readyz", timeout=5)
        assert json.loads(ready.read()) == {
            "broker": True,
            "redis": True,
            "consuming": True,
            "task:topics": True,
            "catalog_consuming": True,  # the catalog topic's loop
            "catalog_task:topics": True,
        }
        stack.stop_worker(worker)

        producer.send_many(events[10:])
        producer.flush()
        first = monitor.measure()
        assert sum(r.lag for r in first) == 50
        oldest = max(r.lag_seconds for r in first)
        later = wait_for(
            lambda: (rows := monitor.measure()) and max(r.lag_seconds for r in rows) >= oldest + 0.9 and rows,
            timeout_s=20,
            what="lag in seconds growing while nothing consumes",
        )
        assert breaches(later, max_lag=10, max_lag_seconds=None)
        seconds_line = f'kafka_consumergroup_group_max_lag_seconds{{group="{s.state_group}"}}'

        def exported_backlog() -> dict[str, float] | None:
            # one exporter pass probes partitions one after another, so a pass that began while the
            # events were being written shows part of them: wait for a pass that began after
            exported = scrape(stack.metrics_ports[ops.name])
            lag = sum(
                v for k, v in exported.items() if k.startswith("kafka_consumergroup_group_lag{") and s.state_group in k
            )
            return exported if lag == 50 and exported.get(seconds_line, 0) > 0 else None

        wait_for(exported_backlog, what="exported lag of the 50 waiting events")
        quality_line = f'kafka_consumergroup_group_max_lag{{group="quality-{tag}"}}'  # the ops worker's own join
        wait_for(lambda: quality_line in scrape(stack.metrics_ports[ops.name]), what="exported quality-group lag")

        res = run_cli(["lag", "--json", "--max-lag", "10"], env=env)
        assert res.returncode == 1, res.stdout + res.stderr
        report = json.loads(res.stdout)
        assert report["groups"][s.state_group]["lag"] == 50 and report["breaches"]

        stack.start_worker("state")  # a new process resumes from the group's committed offsets
        wait_for(lambda: sum(r.lag for r in monitor.measure()) == 0, timeout_s=60, what="lag back to 0")
        assert all(r.lag_seconds == 0 for r in monitor.measure())
        res = run_cli(["lag", "--max-lag", "10", "--max-lag-seconds", "30"], env=env)
        assert res.returncode == 0, res.stdout + res.stderr


def isolated(settings, tag: str):
    """Settings whose topics and groups are this test's own, so other tests' offsets do not show."""
    return settings.model_copy(
        update={
            "topic_events": f"events-{tag}",
            "topic_requests": f"requests-{tag}",
            "topic_responses": f"responses-{tag}",
            "state_group": f"none-{tag}",
            "recommend_group": f"none-{tag}",
            "trainer_group": f"none-{tag}",
            "quality_group": f"quality-{tag}",
        }
    )


def lag_env(s) -> dict[str, str]:
    """The `rtrec lag` environment matching `isolated(settings, tag)`."""
    return {
        **stack_env(s),
        "RTREC_TOPIC_EVENTS": s.topic_events,
        "RTREC_TOPIC_REQUESTS": s.topic_requests,
        "RTREC_TOPIC_RESPONSES": s.topic_responses,
        "RTREC_STATE_GROUP": s.state_group,
        "RTREC_RECOMMEND_GROUP": s.recommend_group,
        "RTREC_TRAINER_GROUP": s.trainer_group,
        "RTREC_QUALITY_GROUP": s.quality_group,
        "COLUMNS": "200",
    }


def fill_and_commit(s, group: str, sizes: dict[str, int], committed: dict[str, int]) -> None:
    """Write sizes[topic] records to partition 0 of each topic; commit committed[topic] there as `group`."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    from rtrec.stream.connections import kafka_bootstrap

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap(s))
    for topic, n in sizes.items():
        for i in range(n):
            producer.send(topic, f"{i}".encode(), partition=0)
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap(s), group_id=group, enable_auto_commit=False)
    consumer.assign([TopicPartition(t, 0) for t in committed])
    consumer.commit({TopicPartition(t, 0): OffsetAndMetadata(o, "", -1) for t, o in committed.items()})
    consumer.close()


def test_rtrec_groups_names_every_group_the_stack_runs():
    from rtrec.stream.settings import Settings
    from rtrec.workers.lag import normalise_groups, rtrec_groups

    s = Settings()
    assert rtrec_groups(s) == {
        s.state_group: [s.topic_events],
        f"{s.state_group}-catalog": [s.topic_catalog],
        s.recommend_group: [s.topic_requests],
        s.trainer_group: [s.topic_events],
        s.quality_group: [s.topic_events, s.topic_responses],
    }
    shared = s.model_copy(update={"trainer_group": s.recommend_group})  # one name for two roles: both topics
    assert rtrec_groups(shared)[s.recommend_group] == [s.topic_requests, s.topic_events]
    assert normalise_groups({"g": "t", "h": ["a", "b"]}) == {"g": ["t"], "h": ["a", "b"]}  # the older shape


def test_a_committed_offsets_failure_is_a_lag_error_not_never_committed():
    from kafka.errors import GroupIdNotFoundError, NodeNotReadyError

    from rtrec.workers.lag import LagError

    class Admin:
        def __init__(self, exc):
            self.exc = exc

        def list_group_offsets(self, groups):
            raise self.exc

    monitor = LagMonitor.__new__(LagMonitor)  # no broker: only the admin answer matters
    monitor.bootstrap, monitor.groups = "127.0.0.1:9", {"g": ["t"]}
    monitor.admin = Admin(GroupIdNotFoundError())
    assert monitor.measure() == []  # a group the broker does not know: it never committed
    monitor.admin = Admin(NodeNotReadyError("coordinator away"))
    with pytest.raises(LagError, match="committed offsets of group 'g'"):
        monitor.measure()


def test_a_failed_lag_measurement_clears_the_lag_figures_and_is_counted():
    from prometheus_client import REGISTRY

    from rtrec.workers.lag import PartitionLag
    from rtrec.workers.metrics import record_lag, record_lag_unknown

    group = f"unknown-{uuid.uuid4().hex[:8]}"
    record_lag([PartitionLag(group, "t", 0, 5, 9, 4, 1.5)])
    labels = {"group": group, "topic": "t", "partition": "0"}
    assert REGISTRY.get_sample_value("kafka_consumergroup_group_lag", labels) == 4
    failures = REGISTRY.get_sample_value("rtrec_lag_measure_failures_total") or 0
    record_lag_unknown()
    assert REGISTRY.get_sample_value("kafka_consumergroup_group_lag", labels) is None  # unknown, not 4, not 0
    assert REGISTRY.get_sample_value("kafka_consumergroup_group_max_lag", {"group": group}) is None
    assert REGISTRY.get_sample_value("rtrec_lag_measure_failures_total") == failures + 1


def test_readiness_counts_an_outage_as_not_ready_and_lets_a_bug_through(caplog):
    import asyncio

    from aiokafka.errors import KafkaConnectionError
    from prometheus_client import REGISTRY
    from redis.exceptions import ConnectionError as RedisConnectionError

    from rtrec.workers.metrics import readiness

    class Runtime:
        def __init__(self, broker):
            self.consumer = self
            self.broker = broker

        async def topics(self):
            return self.broker()

        def checks(self):
            return {"consuming": True}

    class Redis:
        def __init__(self, up=False):
            self.up = up

        async def ping(self):
            if not self.up:
                raise RedisConnectionError("refused")
            return True

    def unreachable():
        raise KafkaConnectionError("no broker")

    def bug():
        raise TypeError("a bug in a check")

    def sample(check: str, reason: str) -> float:
        return REGISTRY.get_sample_value("rtrec_readiness_failures_total", {"check": check, "reason": reason}) or 0

    assert asyncio.run(readiness(Runtime(lambda: {"t"}), Redis(up=True))) == {
        "broker": True,
        "redis": True,
        "consuming": True,
    }
    before = sample("broker", "KafkaConnectionError"), sample("redis", "ConnectionError")
    checks = asyncio.run(readiness(Runtime(unreachable), Redis(), model=True))
    assert checks == {"broker": False, "redis": False, "consuming": True, "model": True}
    assert (sample("broker", "KafkaConnectionError"), sample("redis", "ConnectionError")) == (
        before[0] + 1,
        before[1] + 1,
    )
    assert "broker does not answer (KafkaConnectionError" in caplog.text
    with pytest.raises(TypeError, match="a bug in a check"):  # not hidden as "broker not ready"
        asyncio.run(readiness(Runtime(bug), Redis()))


def test_readyz_answers_503_and_logs_the_traceback_when_a_check_has_a_bug(caplog):
    import asyncio

    from rtrec.stream.embedded import free_port
    from rtrec.workers.metrics import serve

    async def buggy() -> dict[str, bool]:
        raise KeyError("consuming")

    async def probe() -> tuple[int, dict]:
        port = free_port()
        runner = await serve(port, buggy)
        try:

            def get() -> tuple[int, dict]:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
                except urllib.error.HTTPError as err:
                    return err.code, json.loads(err.read())
                raise AssertionError("/readyz answered 200")

            return await asyncio.to_thread(get)
        finally:
            await runner.cleanup()

    assert asyncio.run(probe()) == (503, {"error": False})
    [record] = [r for r in caplog.records if "readiness check raised" in r.getMessage()]
    assert record.exc_info and record.exc_info[0] is KeyError


def test_lag_against_an_unreachable_broker_exits_2_fast_with_one_line():
    from rtrec.stream.embedded import free_port

    env = {
        "RTREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "RTREC_REDIS_URL": "redis://127.0.0.1:1",
        "COLUMNS": "80",
    }
    started = time.monotonic()
    res = run_cli(["lag", "--json"], env=env, timeout=60)
    elapsed = time.monotonic() - started
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert elapsed <= 10, elapsed
    assert "Traceback" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "RTREC_KAFKA_BOOTSTRAP" in lines[0], out


def test_lag_monitor_fails_fast_with_lag_error_when_the_broker_goes_away(tmp_path):
    from rtrec.stream.embedded import start_tansu
    from rtrec.stream.settings import Settings
    from rtrec.workers.lag import LagError

    tansu, bootstrap = start_tansu(tmp_path)
    try:
        s = isolated(Settings(kafka_bootstrap=bootstrap, redis_url=None), uuid.uuid4().hex[:8])
        ensure_topics(s)
        fill_and_commit(s, s.quality_group, {s.topic_events: 3}, {s.topic_events: 1})
        with LagMonitor(s) as monitor:
            assert sum(r.lag for r in monitor.measure()) == 2
            tansu.stop()
            started = time.monotonic()
            with pytest.raises(LagError, match=bootstrap):
                monitor.measure()
            assert time.monotonic() - started <= 10
        started = time.monotonic()
        with pytest.raises(LagError, match="RTREC_KAFKA_BOOTSTRAP"):
            LagMonitor(s)  # nothing listens on the port any more
        assert time.monotonic() - started <= 10
    finally:
        tansu.stop()


def test_lag_monitor_measures_the_quality_group_on_both_its_topics(settings):
    s = isolated(settings, uuid.uuid4().hex[:8])
    ensure_topics(s)
    fill_and_commit(
        s, s.quality_group, {s.topic_events: 5, s.topic_responses: 4}, {s.topic_events: 2, s.topic_responses: 1}
    )
    with LagMonitor(s) as monitor:
        rows = wait_for(lambda: [r for r in monitor.measure() if r.group == s.quality_group], what="quality rows")
        assert {r.group for r in monitor.measure()} == {s.quality_group}  # the other groups never committed
    first = {r.topic: r for r in rows if r.partition == 0}
    assert (first[s.topic_events].committed, first[s.topic_events].lag) == (2, 3)
    assert (first[s.topic_responses].committed, first[s.topic_responses].lag) == (1, 3)
    assert sum(r.lag for r in rows) == 6 and len(rows) == 2 * s.partitions
    with LagMonitor(s, {s.quality_group: s.topic_responses}) as monitor:  # the older {group: topic} shape
        assert {r.topic for r in monitor.measure()} == {s.topic_responses}


def test_lag_group_option_measures_a_user_group_on_the_topics_it_committed(settings):
    tag = uuid.uuid4().hex[:8]
    s = isolated(settings, tag)
    orders, billing = f"orders-{tag}", f"billing-{tag}"
    ensure_topics(s, extra=[orders])
    fill_and_commit(s, billing, {orders: 4}, {orders: 1})
    env = lag_env(s)
    res = run_cli(["lag", "--json", "--group", billing, "--max-lag", "3"], env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    mine = [p for p in report["partitions"] if p["group"] == billing]
    assert {p["topic"] for p in mine} == {orders} and report["groups"][billing]["lag"] == 3
    assert [(p["committed"], p["lag"]) for p in mine if p["partition"] == 0] == [(1, 3)]
    res = run_cli(["lag", "--group", billing, "--group", f"ghost-{tag}", "--max-lag", "2"], env=env)
    assert res.returncode == 1, res.stdout + res.stderr  # a breach: 1, not the 2 of a broker failure
    assert billing in res.stdout and f"no committed offsets: ghost-{tag}" in res.stdout


def test_compose_services_run_modules_that_exist_and_metric_names_are_exported():
    import importlib
    from pathlib import Path

    import yaml

    compose = yaml.safe_load((Path(__file__).parent.parent / "docker-compose.yml").read_text())
    rtrec = {name: svc for name, svc in compose["services"].items() if svc.get("build")}
    assert {"state", "recommend", "trainer", "ops"} <= set(rtrec)
    for name, svc in rtrec.items():
        python, flag, module = svc["command"]
        assert (python, flag) == ("python", "-m")
        assert callable(importlib.import_module(module).main), name
    from prometheus_client import REGISTRY

    import rtrec.workers.metrics

    names = {m.name for m in REGISTRY.collect()}
    for required in (
        "kafka_consumergroup_group_lag",
        "kafka_consumergroup_group_lag_seconds",
        "kafka_consumergroup_group_max_lag_seconds",
        "kafka_partition_latest_offset",
        "rtrec_events_processed",
        "rtrec_dead_letters",
        "rtrec_event_to_state_seconds",
        "rtrec_request_latency_seconds",
        "rtrec_batch_size",
        "rtrec_model_info",
        "rtrec_model_swaps",
        "rtrec_model_swaps_refused",
        "rtrec_freshness_seconds",
    ):
        assert required in names, required


class Rec:
    """The two fields of a consumer record the join reads."""

    def __init__(self, topic: str, value: dict) -> None:
        self.topic, self.value = topic, json.dumps(value).encode()


def test_online_quality_joins_responses_with_later_events():
    from rtrec.stream.settings import Settings
    from rtrec.workers.quality import QualityJoin, hit_rates

    s = Settings(quality_window_s=60)
    join = QualityJoin(s)
    t = 1_700_000_000_000

    def response(user, version, items, at, **kw):
        return Rec(
            s.topic_responses,
            {
                "user_id": user,
                "model_version": version,
                "generated_at": at,
                "items": [{"item_id": i} for i in items],
                **kw,
            },
        )

    def event(user, item, ts):
        return Rec(s.topic_events, {"user_id": user, "item_id": item, "ts": ts, "type": "click"})

    counts = join.handle(
        [
            response("a", "v1", ["x", "y"], t),
            event("a", "y", t + 1000),
            event("a", "x", t + 2000),  # one hit only
            response("b", "v1", ["x"], t),
            event("b", "x", t + 61_000),  # too late
            response("c", "v2", ["z"], t),
            event("c", "q", t + 10),
            event("c", "z", t - 5),  # miss; before
            response("d", "trending", ["x"], t, fallback=True),
            event("d", "x", t + 1),  # not counted
            Rec(s.topic_events, {"broken": True}),
            Rec(s.topic_responses, {"error": "boom"}),
        ]
    )
    assert counts == {"v1|served": 2, "v1|hits": 1, "v2|served": 1}
    rates = hit_rates({k: str(v) for k, v in counts.items()})
    assert rates["v1"]["hit_rate"] == 0.5 and rates["v2"]["hit_rate"] == 0.0


def test_trainer_rolls_back_a_promotion_whose_online_hit_rate_dropped(settings, redis, tmp_path):
    from rtrec.model.store import CheckpointStore
    from rtrec.stream.keys import QUALITY
    from rtrec.stream.synthetic import SyntheticConfig, generate_events
    from rtrec.workers.trainer import Trainer

    events = generate_events(SyntheticConfig(n_users=10, n_items=20, n_events=200, seed=3))
    root = tmp_path / "ck"
    old, new = tiny_checkpoint(root, events).name, tiny_checkpoint(root, events, seed=1).name
    store = CheckpointStore(root)
    store.promote(old)
    store.promote(new)
    trainer = Trainer(settings.model_copy(update={"checkpoint_dir": root, "quality_min_served": 100}))
    redis.hset(QUALITY, mapping={f"{old}|served": 300, f"{old}|hits": 90, f"{new}|served": 50, f"{new}|hits": 1})
    assert trainer.judge_online() is None  # too few responses from the new version to judge
    redis.hset(QUALITY, mapping={f"{new}|served": 300, f"{new}|hits": 30})
    decision = trainer.judge_online()
    assert decision and decision["rolled_back"] == new and decision["version"] == old
    assert store.current_version() == old
    assert store.decisions()[-1]["trigger"] == "online quality"
    assert trainer.judge_online() is None  # judged once; the old version is not re-judged against itself


def _exported_names() -> set[str]:
    from prometheus_client import REGISTRY

    import rtrec.workers.metrics  # noqa: F401 - registers the metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {m.name + sfx for m in REGISTRY.collect() for sfx in suffixes.get(m.type, ("",))}


def test_grafana_dashboard_queries_only_exported_metrics():
    import re
    from pathlib import Path

    deploy = Path(__file__).parent.parent / "deploy"
    dashboard = json.loads((deploy / "grafana" / "dashboards" / "rtrec.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b((?:rtrec|kafka)_[a-z0-9_]+)", e)}
    assert used and used <= _exported_names(), used - _exported_names()
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("lag (seconds)", "events processed", "p99", "freshness", "model version"):
        assert topic in titles


def test_prometheus_config_passes_promtool():
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (`apt-get install prometheus`; .ci/run does it)")
    config = Path(__file__).parent.parent / "deploy" / "prometheus.yml"
    res = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_two_state_workers_share_the_partitions_and_apply_every_event_once(settings, redis, tmp_path):
    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(update={"topic_events": f"events-{tag}", "state_group": f"state-{tag}"})
    ensure_topics(s)
    stack = Stack(s, run_dir=tmp_path / "run")
    workers = [stack.start_worker("state"), stack.start_worker("state")]
    try:
        stack.wait_ready("state", 2)
        now = int(time.time() * 1000)
        events = [
            {
                "event_id": f"{tag}-{n}",
                "user_id": f"share-{tag}-{n % 40}",
                "item_id": f"i{n % 97}",
                "type": ("browse", "click", "purchase")[n % 3],
                "ts": now + n,
            }
            for n in range(4000)
        ]
        with EventProducer(s) as producer:
            producer.send_many(events)
            producer.flush()

        def processed() -> list[float]:
            return [scrape(stack.metrics_ports[w.name]).get("rtrec_events_processed_total", 0) for w in workers]

        wait_for(lambda: sum(processed()) >= len(events), timeout_s=60, what="all events applied")
        per_worker = processed()
        assert sum(per_worker) == len(events) and all(n > 0 for n in per_worker)  # both own partitions
        for u in range(40):
            user = f"share-{tag}-{u}"
            mine = [e for e in events if e["user_id"] == user]
            h = redis.hgetall(f"rt:u:{user}:h")
            assert int(h["n"]) == len(mine)
            for etype in ("browse", "click", "purchase"):
                assert int(h.get(etype, 0)) == sum(e["type"] == etype for e in mine)
    finally:
        stack.stop()
