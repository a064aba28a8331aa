"""10,000 generated bad events (and bad requests) through the running workers.

Property: every payload the validator rejects lands in the dead-letter topic and
is counted once, the worker never stops, and the valid events sent between them
are all applied. Hypothesis generates the payloads (derandomized, so CI sees the
same 10k every run); `tests/test_events.py` checks the reasons one by one.
"""

from __future__ import annotations

import json
import math
import time
import uuid

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from rtrec.stream.events import REQUIRED, InvalidEvent, parse_event
from rtrec.stream.rec_messages import parse_request
from rtrec.workers.dead_letters import dlq_counts
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

PER_EXAMPLE = 100
EXAMPLES = 100  # x PER_EXAMPLE = 10,000 bad events
VALID_EVERY = 10  # one valid event after every 10 bad ones

NOW = int(time.time() * 1000)
BASE = {"event_id": "e", "user_id": "u", "item_id": "i", "type": "browse", "ts": NOW - 60_000}

BAD_VALUES = st.one_of(
    st.integers(65, 50_000).map(lambda n: "x" * n),  # huge strings
    st.sampled_from([math.nan, math.inf, -math.inf]),  # NaN / infinities
    st.integers(-(2**63), -1),  # negative numbers (and timestamps)
    st.integers(10**15, 2**70),  # far-future / overflowing numbers
    st.integers(0, 10**12).map(str),  # numbers as strings
    st.sampled_from(["", " ", "a b", "../../etc/passwd", "u}:h", "{u}", "a\nb", "\u202e", "\x00"]),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x) if math.isfinite(x) else True),
)


def _with(field: str, value) -> bytes:
    return json.dumps({**BASE, field: value}).encode()


BAD_EVENTS = st.one_of(
    st.binary(max_size=40),  # arbitrary bytes, invalid UTF-8 included
    st.integers(1, 100_000).map(lambda d: b"[" * d + b"]" * d),  # deep nesting
    st.integers(10, 5_000).map(lambda d: (b'{"a":' * d) + b"1" + (b"}" * d)),
    st.tuples(st.sampled_from(sorted(REQUIRED)), BAD_VALUES).map(lambda fv: _with(*fv)),  # wrong values
    st.sampled_from(sorted(REQUIRED)).map(lambda f: json.dumps({k: v for k, v in BASE.items() if k != f}).encode()),
    st.text(max_size=8).map(lambda t: _with("type", f"like{t}")),  # unknown types
    st.integers(17_000, 400_000).map(lambda n: json.dumps({**BASE, "extra": "y" * n}).encode()),  # oversized
    st.sampled_from([b"null", b"[]", b"42", b'"event"', b"{}", b'{"ts": NaN}', b"\xff\xfe\x00", b""]),
)


def rejected(raw: bytes, settings) -> bool:
    try:
        parse_event(raw, settings)
    except InvalidEvent:
        return True
    return False


def total(redis) -> int:
    return sum(dlq_counts(redis).values())


FUZZ = hyp_settings(
    max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)


def test_10k_generated_bad_events_are_dead_lettered_and_valid_ones_around_them_applied(settings, redis, tmp_path):
    """On a state worker of its own (own events and dead-letter topics: ~10k letters, some of 1 MB,
    would otherwise slow every other test that reads the shared dead-letter topic)."""
    from rtrec.stream.producer import EventProducer
    from rtrec.stream.topics import ensure_topics
    from rtrec.workers.stack import Stack

    tag = uuid.uuid4().hex[:8]
    settings = settings.model_copy(
        update={"topic_events": f"events-{tag}", "topic_dead_letters": f"dlq-{tag}", "state_group": f"state-{tag}"}
    )
    ensure_topics(settings)
    user = f"fuzz-{tag}"
    sent = {"bad": 0, "valid": 0}
    stack = Stack(settings, run_dir=tmp_path / "run")
    worker = stack.start_worker("state")
    stack.wait_ready("state")
    producer = EventProducer(settings)

    @FUZZ
    @given(st.lists(BAD_EVENTS.filter(lambda raw: rejected(raw, settings)), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def run(payloads: list[bytes]) -> None:
        before = total(redis)
        for n, raw in enumerate(payloads, 1):
            producer.send_raw(raw, key=user.encode())
            if n % VALID_EVERY == 0:
                sent["valid"] += 1
                producer.send(
                    {
                        **BASE,
                        "event_id": f"{user}-{sent['valid']}",
                        "user_id": user,
                        "item_id": f"it{sent['valid'] % 7}",
                        "ts": int(time.time() * 1000),
                    }
                )
        producer.flush()
        sent["bad"] += len(payloads)
        wait_for(
            lambda: int(redis.hget(f"rt:u:{user}:h", "n") or 0) == sent["valid"],
            timeout_s=60,
            what="the valid events between the bad ones",
        )
        wait_for(lambda: total(redis) - before == len(payloads), timeout_s=60, what="every bad event counted")

    try:
        # one 1 MB payload too (the producer's own limit is 1 MiB)
        before = total(redis)
        producer.send_raw(json.dumps({**BASE, "blob": "z" * 1_000_000}).encode(), key=user.encode())
        producer.flush()
        wait_for(lambda: total(redis) - before == 1, what="the 1 MB event dead-lettered")
        run()
        assert sent["bad"] >= PER_EXAMPLE * EXAMPLES
        assert worker.alive()
    finally:
        producer.close()
        stack.stop()


BAD_REQUESTS = st.one_of(
    st.integers(-10, 0).map(lambda k: {"k": k}),
    st.integers(10_001, 10**12).map(lambda k: {"k": k}),
    st.sampled_from(["10", 2.5, None, [], {}]).map(lambda k: {"k": k}),
    st.sampled_from([1, "yes", None]).map(lambda e: {"exclude_seen": e}),
    st.sampled_from(["bad topic", "../x", "x" * 300, 5]).map(lambda t: {"reply_topic": t}),
    st.sampled_from(["", "a b", "x" * 65, True]).map(lambda u: {"user_id": u}),
)


def test_generated_bad_requests_are_answered_with_errors(settings, stack, producer, rec_client):
    requests: list[str] = []

    @hyp_settings(
        max_examples=200, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
    )
    @given(BAD_REQUESTS)
    def build(change: dict) -> None:
        request = {"request_id": f"bad-{uuid.uuid4().hex[:12]}", "user_id": "u1", "k": 5, **change}
        raw = json.dumps(request).encode()
        with pytest.raises(InvalidEvent):
            parse_request(raw, settings)
        producer.send_raw(raw, key=b"u1", topic=settings.topic_requests)
        requests.append(request["request_id"])

    build()
    producer.flush()
    got = rec_client.collect(requests, timeout_s=60)
    assert set(got) == set(requests)
    assert all(r["error"].startswith("invalid request") and r["items"] == [] for r in got.values())
    assert all(w.alive() for w in stack.workers)


def test_a_request_id_with_a_lone_surrogate_is_answered_and_does_not_hold_the_next_request(producer, rec_client):
    tag = uuid.uuid4().hex[:8]
    hostile_id = f"\ud800{tag}"  # valid JSON (an escape), not encodable as UTF-8: orjson refuses it
    raw = ('{"request_id": "\\ud800' + tag + '", "user_id": "u1", "k": 0}').encode()
    producer.send_raw(raw, key=b"u1", topic=rec_client.settings.topic_requests)
    producer.flush()
    after = rec_client.send("u1", k=3)
    got = rec_client.collect([hostile_id, after], timeout_s=30)
    assert "k must be between" in got[hostile_id]["error"]
    assert got[after]["request_id"] == after  # answered after it: the worker went on
