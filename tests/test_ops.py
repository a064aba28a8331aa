"""Operations: consumer lag in messages and seconds, against the real broker and a real state worker."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from stream.producer import EventProducer
from stream.topics import ensure_topics
from tests.conftest import wait_for
from tests.test_cli import run_cli, stack_env
from workers.lag import LagMonitor, breaches
from workers.stack import Stack

pytestmark = pytest.mark.integration


def test_lag_grows_while_the_state_worker_is_down_and_returns_to_zero(settings, tmp_path):
    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(update={"topic_events": f"events-{tag}", "state_group": f"state-{tag}"})
    ensure_topics(s)
    groups = {s.state_group: s.topic_events}
    env = {**stack_env(s), "RTREC_TOPIC_EVENTS": s.topic_events, "RTREC_STATE_GROUP": s.state_group,
           "RTREC_RECOMMEND_GROUP": f"none-{tag}", "RTREC_TRAINER_GROUP": f"none-{tag}"}
    now = int(time.time() * 1000)
    events = [{"event_id": f"{tag}-{n}", "user_id": f"lag-{n % 7}", "item_id": f"i{n % 11}", "type": "click",
               "ts": now + n} for n in range(60)]
    stack = Stack(s, run_dir=tmp_path / "run")
    worker = stack.start_worker("state")
    with LagMonitor(s, groups) as monitor, EventProducer(s) as producer:
        stack.wait_ready("state")
        producer.send_many(events[:10])
        producer.flush()
        wait_for(lambda: sum(r.lag for r in monitor.measure()) == 0 and monitor.measure(), what="caught up")
        stack.stop_worker(worker)

        producer.send_many(events[10:])
        producer.flush()
        first = monitor.measure()
        assert sum(r.lag for r in first) == 50
        time.sleep(1.0)
        later = monitor.measure()
        assert max(r.lag_seconds for r in later) >= max(r.lag_seconds for r in first) + 0.9  # growing
        assert breaches(later, max_lag=10, max_lag_seconds=None)

        res = run_cli(["lag", "--json", "--max-lag", "10"], env=env)
        assert res.returncode == 1, res.stdout + res.stderr
        report = json.loads(res.stdout)
        assert report["groups"][s.state_group]["lag"] == 50 and report["breaches"]

        stack.start_worker("state")  # a new process resumes from the group's committed offsets
        wait_for(lambda: sum(r.lag for r in monitor.measure()) == 0, timeout_s=60, what="lag back to 0")
        assert all(r.lag_seconds == 0 for r in monitor.measure())
    res = run_cli(["lag", "--max-lag", "10", "--max-lag-seconds", "30"], env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    stack.stop()
