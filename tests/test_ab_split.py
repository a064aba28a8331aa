"""A/B split between model versions: sticky arms, a worker serving both, per-arm quality and its verdict."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from aiokafka import ConsumerRecord

from rtrec.model.generator import TorchGenerator
from rtrec.stream.connections import async_redis_client
from rtrec.stream.keys import QUALITY
from rtrec.stream.rec_messages import RecRequest
from rtrec.stream.settings import Settings
from rtrec.stream.synthetic import SyntheticConfig, generate_events
from rtrec.workers.ab_split import AB_CANDIDATE_LOADED, CANDIDATE, CONTROL, arm_of, candidate_or_none
from rtrec.workers.ops import QualityCounts
from rtrec.workers.quality import QualityJoin, arm_hit_rates, arm_winner, hit_rates, wilson
from tests.helpers import run_cli, run_worker_batch, stack_env, trained_checkpoint, wait_for


class Fixed:
    """A deliberately bad candidate: the same unrelated items for everyone."""

    def __init__(self, version: str, items: list[str]) -> None:
        self.version, self.items = version, items

    def recommend_batch(self, states, k):
        return [[(item, 1.0 - n / 100) for n, item in enumerate(self.items[:k])] for _ in states]


def test_arms_are_sticky_and_the_share_is_close_to_the_setting():
    users = [f"user-{n}" for n in range(10_000)]
    arms = [arm_of(u, 0.1) for u in users]
    assert arms == [arm_of(u, 0.1) for u in users]  # sticky: a pure function of the user id
    assert abs(arms.count(CANDIDATE) / len(users) - 0.1) <= 0.015
    assert abs([arm_of(u, 0.5) for u in users].count(CANDIDATE) / len(users) - 0.5) <= 0.015
    # a larger share only adds users: nobody served by the candidate at 10 % leaves it at 50 %
    assert all(arm_of(u, 0.5) == CANDIDATE for u, arm in zip(users, arms) if arm == CANDIDATE)
    assert arm_of("", 0.99) == CONTROL  # similar items without a user: always control


def test_an_unloadable_candidate_is_refused_and_everyone_is_served_by_control(tmp_path, caplog):
    s = Settings(ab_candidate="gen-no-such-version", checkpoint_dir=tmp_path)
    assert candidate_or_none(s) is None
    assert AB_CANDIDATE_LOADED.labels(version="gen-no-such-version")._value.get() == 0
    refusals = [r.getMessage() for r in caplog.records if "A/B candidate" in r.getMessage()]
    assert len(refusals) == 1 and "\n" not in refusals[0] and "serving every user from CURRENT" in refusals[0]
    assert candidate_or_none(Settings()) is None  # no split configured


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    events = generate_events(SyntheticConfig(n_users=30, n_items=80, n_clusters=4, n_events=1500, seed=4))
    return TorchGenerator.from_path(trained_checkpoint(tmp_path_factory.mktemp("ck"), events))


@pytest.mark.integration
def test_the_worker_serves_each_arm_from_its_own_model(settings, producer, redis, generator):
    tag = uuid.uuid4().hex[:8]
    users = {CONTROL: [], CANDIDATE: []}
    n = 0
    while min(len(v) for v in users.values()) < 4:  # four known users in each arm
        user = f"ab-{tag}-{n}"
        users[arm_of(user, 0.5)].append(user)
        n += 1
    chosen = users[CONTROL][:4] + users[CANDIDATE][:4]
    items = generator.checkpoint.vocab.items
    now = int(time.time() * 1000)
    for m, user in enumerate(chosen):
        for j in range(3):
            item = items[(m + j) % len(items)]
            producer.send({"event_id": f"{user}-{j}", "user_id": user, "item_id": item, "type": "click", "ts": now})
    producer.flush()
    wait_for(lambda: all(redis.hget(f"rt:u:{u}:h", "n") == "3" for u in chosen), what="histories applied")

    bad = Fixed("bad-candidate-1", [f"unrelated-{tag}-{i}" for i in range(5)])
    s = settings.model_copy(update={"ab_candidate": bad.version, "ab_share": 0.5})
    raws = [RecRequest(uuid.uuid4().hex, user, 5).to_json() for user in chosen]
    raws.append(RecRequest(uuid.uuid4().hex, "", 5, item_id=items[0]).to_json())  # similar items, no user
    responses = run_worker_batch(s, generator, raws, candidate=bad)
    assert len(responses) == len(raws)
    by_user = {r["user_id"]: r for r in responses}
    for user in chosen:
        got = by_user[user]
        assert "error" not in got and got["fallback"] is False
        if user in users[CANDIDATE]:
            assert (got["arm"], got["model_version"]) == (CANDIDATE, bad.version)
            assert [it["item_id"] for it in got["items"]] == bad.items
        else:
            assert (got["arm"], got["model_version"]) == (CONTROL, generator.version)
            assert not set(bad.items) & {it["item_id"] for it in got["items"]}
    assert by_user[""]["arm"] == CONTROL and by_user[""]["model_version"] == generator.version

    # without a candidate loaded (none configured, or refused) everyone is control
    plain = run_worker_batch(settings, generator, raws[:8])
    assert {(r["arm"], r["model_version"]) for r in plain} == {(CONTROL, generator.version)}


def _served_and_clicked(s: Settings, tag: str) -> list[ConsumerRecord]:
    """200 responses per arm; the control arm's items are clicked by 60 % of its users, the candidate's by 20 %."""
    t = int(time.time() * 1000)
    values: list[tuple[str, dict]] = []
    for arm, version, hit_every in ((CONTROL, f"ctl-{tag}", (0, 1, 2)), (CANDIDATE, f"cand-{tag}", (0,))):
        for n in range(200):
            user = f"{arm}-{tag}-{n}"
            items = [{"item_id": f"{arm}-item-{n}"}, {"item_id": f"{arm}-other-{n}"}]
            response = {"user_id": user, "model_version": version, "arm": arm, "generated_at": t, "items": items}
            values.append((s.topic_responses, response))
            if n % 5 in hit_every:
                values.append((s.topic_events, {"user_id": user, "item_id": f"{arm}-item-{n}", "ts": t + 1000}))
            else:
                values.append((s.topic_events, {"user_id": user, "item_id": f"elsewhere-{n}", "ts": t + 1000}))
    return [
        ConsumerRecord(topic, 0, offset, t, 0, None, json.dumps(v).encode(), None, -1, 0, [])
        for offset, (topic, v) in enumerate(values)
    ]


@pytest.mark.integration
def test_quality_per_arm_names_the_winner_and_its_promote_command(settings, redis, tmp_path):
    tag = uuid.uuid4().hex[:8]
    control, candidate = f"ctl-{tag}", f"cand-{tag}"
    s = settings.model_copy(update={"quality_window_s": 60})
    join = QualityJoin(s)

    async def add() -> None:
        client = async_redis_client(s)
        try:
            await QualityCounts(join, client).add(_served_and_clicked(s, tag))  # what the ops worker writes
        finally:
            await client.aclose()

    asyncio.run(add())
    raw = {k: v for k, v in redis.hgetall(QUALITY).items() if tag in k}
    by_arm = arm_hit_rates(raw)
    ctl, cand = by_arm[(CONTROL, control)], by_arm[(CANDIDATE, candidate)]
    assert (ctl["served"], ctl["hits"], cand["served"], cand["hits"]) == (200, 120, 200, 40)
    assert cand["high"] < ctl["low"]  # the intervals separate
    assert arm_winner(by_arm) == (CONTROL, control)
    assert set(hit_rates(raw)) == {control, candidate}  # the per-version view ignores the per-arm fields

    store = tmp_path / "store"
    store.mkdir()
    (store / "CURRENT").write_text(control)  # the control arm serves CURRENT
    env = {**stack_env(s), "RTREC_AB_CANDIDATE": candidate, "RTREC_CHECKPOINT_DIR": str(store), "COLUMNS": "200"}
    res = run_cli(["quality"], env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    low, high = wilson(120, 200)
    assert any("control" in ln and control in ln and "200" in ln and f"{low:.4f} - {high:.4f}" in ln for ln in lines)
    low, high = wilson(40, 200)
    assert any("candidate" in ln and candidate in ln and f"{low:.4f} - {high:.4f}" in ln for ln in lines)
    assert f"winner: control {control}" in res.stdout
    assert f"rtrec model promote {control}\n" in res.stdout


def test_wilson_intervals_and_a_candidate_that_wins():
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    won = {"a|control|served": "1000", "a|control|hits": "100", "b|candidate|served": "1000", "b|candidate|hits": "200"}
    assert arm_winner(arm_hit_rates(won)) == (CANDIDATE, "b")
    close = {"a|control|served": "50", "a|control|hits": "5", "b|candidate|served": "50", "b|candidate|hits": "7"}
    assert arm_winner(arm_hit_rates(close)) is None  # the intervals overlap: no verdict yet
