"""The request forms of issue 17 on the wire: similar items, re-ranking candidates, filters, availability.

Sent by a real client to the session stack (Tansu, Redis, a state worker and a recommendation
worker serving the blending baseline); each answer read back from the response topic.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from rtrec.model.ranking import REASON_PLACED
from rtrec.stream.keys import ITEM_CATEGORY, ITEM_UNAVAILABLE
from rtrec.workers.dead_letters import dlq_counts
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

NOW = int(time.time() * 1000)


def ev(user: str, item: str, kind: str, ts: int) -> dict:
    return {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": item, "type": kind, "ts": ts}


def ids(response: dict) -> list[str]:
    return [it["item_id"] for it in response["items"]]


@pytest.fixture
def covisited(producer, redis, uid):
    """Three other shoppers who looked at a, then b (all three), c (two) and d (one): a's neighbours in
    that order."""
    a, b, c, d = (uid(n) for n in "abcd")
    for n in range(3):
        other = uid(f"other{n}")
        producer.send(ev(other, a, "browse", NOW - 60_000))
        producer.send(ev(other, b, "purchase" if n == 0 else "click", NOW - 59_000))
        if n < 2:
            producer.send(ev(other, c, "click", NOW - 58_000))
        if n == 0:
            producer.send(ev(other, d, "click", NOW - 57_000))
    producer.flush()
    wait_for(lambda: redis.zscore(f"rt:covis:{a}", d) is not None, what="co-visitation of a")
    return a, b, c, d


def test_similar_items_are_the_anchors_neighbours_without_the_anchor(rec_client, covisited):
    a, b, c, d = covisited
    got = rec_client.recommend(item_id=a, k=3)  # no user: no personal context
    assert "error" not in got and got["item_id"] == a and got["user_id"] == ""
    assert ids(got)[:3] == [b, c, d]
    assert got["items"][0]["reason"] == f"often bought together with {a}"
    assert got["fallback"] is False


def test_similar_items_for_a_user_leave_out_what_the_user_saw(rec_client, producer, redis, covisited, uid):
    a, b, c, _ = covisited
    user = uid("viewer")
    producer.send(ev(user, b, "click", NOW - 1000))
    producer.flush()
    wait_for(lambda: redis.hget(f"rt:u:{user}:h", "n") == "1", what="the viewer's event")
    got = rec_client.recommend(user, item_id=a, k=3)
    assert b not in ids(got) and ids(got)[0] == c
    assert b in ids(rec_client.recommend(user, item_id=a, k=3, exclude_seen=False))


def test_candidates_are_all_ranked_and_nothing_else(rec_client, producer, redis, covisited, uid):
    a, b, _, d = covisited
    user, stranger = uid("shopper"), uid("never-seen-item")
    producer.send(ev(user, a, "browse", NOW - 1000))
    producer.flush()
    wait_for(lambda: redis.hget(f"rt:u:{user}:h", "n") == "1", what="the shopper's event")
    candidates = [stranger, d, b]
    got = rec_client.recommend(user, candidates=candidates, k=3)
    assert "error" not in got
    assert ids(got) == [b, d, stranger]  # co-visited first (b more than d); the unknown one placed last
    assert got["items"][2]["reason"] == REASON_PLACED
    fewer = rec_client.recommend(user, candidates=candidates, k=1)
    assert ids(fewer) == [b]


def test_filters_keep_only_and_never_what_they_name(rec_client, producer, redis, covisited, uid):
    a, b, c, d = covisited
    redis.hset(ITEM_CATEGORY, mapping={b: "shoes", c: "hats", d: "hats"})
    only_hats = rec_client.recommend(item_id=a, k=2, filter={"categories": ["hats"]})
    assert ids(only_hats) == [c, d]
    no_hats = rec_client.recommend(item_id=a, k=5, filter={"exclude_categories": ["hats"]})
    assert b in ids(no_hats) and not {c, d} & set(ids(no_hats))
    no_b = rec_client.recommend(item_id=a, k=5, filter={"exclude_items": [b]})
    assert b not in ids(no_b) and ids(no_b)[:2] == [c, d]
    short = rec_client.recommend(item_id=a, k=5, filter={"categories": ["hats"]})
    assert ids(short) == [c, d]  # only two hats are known anywhere: no other category is let in


def test_an_item_made_unavailable_on_the_catalog_topic_leaves_the_answers(
    rec_client, producer, redis, settings, covisited
):
    a, b, c, d = covisited
    e, someone = f"e-{b}", f"someone-{b}"  # an item only trending, not co-visited with a: the refill
    producer.send(ev(someone, e, "click", NOW - 1000))
    producer.flush()
    wait_for(lambda: redis.hget(f"rt:u:{someone}:h", "n") == "1", what="e trending")
    assert ids(rec_client.recommend(item_id=a, k=3))[0] == b
    sent = time.monotonic()
    producer.send_raw(
        json.dumps({"item_id": b, "available": False}).encode(), key=b.encode(), topic=settings.topic_catalog
    )
    producer.flush()

    def b_gone() -> bool:
        return b not in ids(rec_client.recommend(item_id=a, k=3, timeout_s=10))

    wait_for(b_gone, what="b gone from the answers")
    print(f"unavailable -> gone from the answers in {time.monotonic() - sent:.2f} s")
    assert redis.sismember(ITEM_UNAVAILABLE, b)
    refilled = rec_client.recommend(item_id=a, k=3)
    assert ids(refilled)[:2] == [c, d] and len(refilled["items"]) == 3 and b not in ids(refilled)
    producer.send_raw(
        json.dumps({"item_id": b, "available": True}).encode(), key=b.encode(), topic=settings.topic_catalog
    )
    producer.flush()
    wait_for(lambda: b in ids(rec_client.recommend(item_id=a, k=3, timeout_s=10)), what="b back")


@pytest.mark.parametrize(
    ("change", "reason", "says"),
    [
        ({"candidates": [f"i{n}" for n in range(501)]}, "too_many_candidates", "RTREC_MAX_CANDIDATES"),
        ({"candidates": "i1,i2"}, "wrong_type", "candidates"),
        ({"filter": {"brand": ["x"]}}, "unknown_field", "brand"),
        ({"filter": {"categories": "hats"}}, "wrong_type", "categories"),
        ({"item_id": ["a"]}, "wrong_type", "item_id"),
        ({"item_id": "a", "candidates": ["b"]}, "bad_value", "not both"),
    ],
)
def test_bad_forms_are_answered_with_an_error_and_dead_lettered(
    rec_client, producer, redis, settings, uid, change, reason, says
):
    before = dlq_counts(redis).get(reason, 0)
    request_id = uid("bad")
    raw = json.dumps({"request_id": request_id, "user_id": "u1", "k": 5, **change}).encode()
    producer.send_raw(raw, key=b"u1", topic=settings.topic_requests)
    producer.flush()
    after = rec_client.send("u1", k=2)  # the next request is not held back
    got = rec_client.collect([request_id, after], timeout_s=30)
    assert got[request_id]["error"].startswith("invalid request") and says in got[request_id]["error"]
    assert got[request_id]["items"] == [] and after in got  # the request after it was answered too
    wait_for(lambda: dlq_counts(redis).get(reason, 0) > before, what=f"a dead letter for {reason}")


def test_candidates_and_a_filter_apply_both(rec_client, producer, redis, covisited, uid):
    a, b, c, d = covisited
    user = uid("both")
    producer.send(ev(user, a, "browse", NOW - 1000))
    producer.flush()
    wait_for(lambda: redis.hget(f"rt:u:{user}:h", "n") == "1", what="the user's event")
    redis.hset(ITEM_CATEGORY, mapping={b: "shoes", c: "hats", d: "hats"})
    got = rec_client.recommend(user, candidates=[d, c, b], filter={"exclude_categories": ["shoes"]})
    assert ids(got) == [c, d]  # b is a candidate but filtered out; nothing outside the candidates comes in
    got = rec_client.recommend(user, candidates=[d, c, b], filter={"exclude_items": [c]})
    assert ids(got) == [b, d]


def test_a_filtered_re_ranking_places_the_candidates_that_pass_however_low_they_rank(rec_client, redis, uid):
    """Only the last five of 50 candidates pass the filter, and no ranker knows any of them: the answer is
    still k of those five (the client's own list refills a filtered re-ranking, not only trending)."""
    candidates = [uid(f"c{n}") for n in range(50)]
    redis.hset(ITEM_CATEGORY, mapping={c: "books" if n >= 45 else "toys" for n, c in enumerate(candidates)})
    got = rec_client.recommend(uid("reader"), candidates=candidates, k=3, filter={"categories": ["books"]})
    assert ids(got) == candidates[45:48]
    assert all(it["reason"] == REASON_PLACED for it in got["items"])
