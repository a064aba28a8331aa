"""Recommendation requests are validated like events; responses have a fixed wire shape."""

from __future__ import annotations

import json
import time

import pytest

from rtrec.stream.events import InvalidEvent
from rtrec.stream.rec_messages import (
    MAX_REQUEST_BYTES,
    RecItem,
    RecRequest,
    RecResponse,
    best_effort_ids,
    parse_request,
)
from rtrec.stream.settings import Settings
from rtrec.stream.topics import internal_topics, is_legal_topic_name, topic_names

CFG = Settings(kafka_bootstrap=None, redis_url=None, max_k=100)
BASE = {"request_id": "r1", "user_id": "u1"}


def encode(payload) -> bytes:
    return json.dumps(payload).encode()


def request(**changes) -> RecRequest:
    return parse_request(encode({**BASE, **changes}), CFG)


def reason_of(raw: bytes) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse_request(raw, CFG)
    return info.value.reason


def reason_with(**changes) -> str:
    return reason_of(encode({**BASE, **changes}))


# ---- parse_request -----------------------------------------------------------------------------


def test_defaults() -> None:
    assert request() == RecRequest("r1", "u1", k=10, exclude_seen=True, reply_topic=None)


def test_all_fields() -> None:
    req = request(k=25, exclude_seen=False, reply_topic="rec-responses.my-1_a")
    assert req == RecRequest("r1", "u1", k=25, exclude_seen=False, reply_topic="rec-responses.my-1_a")


def test_integer_ids_are_canonicalised() -> None:
    req = parse_request(encode({"request_id": 9, "user_id": 123}), CFG)
    assert (req.request_id, req.user_id) == ("9", "123")


@pytest.mark.parametrize("k", [1, CFG.max_k])
def test_k_bounds_are_inclusive(k: int) -> None:
    assert request(k=k).k == k


def test_max_k_follows_settings() -> None:
    small = CFG.model_copy(update={"max_k": 5})
    assert parse_request(encode({**BASE, "k": 5}), small).k == 5
    with pytest.raises(InvalidEvent) as info:
        parse_request(encode({**BASE, "k": 6}), small)
    assert info.value.reason == "bad_value"


@pytest.mark.parametrize("k", [0, -1, CFG.max_k + 1, 10**9])
def test_k_out_of_range(k: int) -> None:
    assert reason_with(k=k) == "bad_value"


@pytest.mark.parametrize("k", [True, False, "10", 10.0, 2.5, [10], None])
def test_k_wrong_type(k) -> None:
    assert reason_with(k=k) == "wrong_type"


@pytest.mark.parametrize("value", [1, 0, "true", "yes", None, [True]])
def test_exclude_seen_must_be_a_boolean(value) -> None:
    assert reason_with(exclude_seen=value) == "wrong_type"


@pytest.mark.parametrize(
    "topic", ["rec-responses", "rec-responses.shop-1", "rec-responses.x", "rec-responses." + "a" * 235]
)
def test_valid_reply_topics(topic: str) -> None:
    assert request(reply_topic=topic).reply_topic == topic


@pytest.mark.parametrize(
    "topic",
    [
        "..",
        ".",  # Kafka refuses these names
        "events",
        "rec-requests",
        "dead-letters",
        "model-updates",  # rtrec's internal topics
        "x" * 300,
        "rec-responses." + "a" * 236,  # longer than 249
        "rec-responses.",  # the prefix alone
        "foo",
        "t",
        "rec.responses_v2-x",
        "rec-responsesX",  # neither the default nor prefixed
        "a/b",
        "a b",
        "a:b",
        "rec-responses.a/b",
        "rec-responses.tópic",
        "",
        7,
        True,
        2.5,
        ["rec-responses"],
        {"t": 1},
    ],
    ids=lambda t: repr(t)[:40],
)
def test_bad_reply_topic(topic) -> None:
    assert reason_with(reply_topic=topic) == "bad_reply_topic"


def test_reply_topic_with_trailing_newline_is_rejected() -> None:
    assert reason_with(reply_topic="rec-responses.x\n") == "bad_reply_topic"


def test_null_or_absent_reply_topic_means_default() -> None:
    assert request(reply_topic=None).reply_topic is None
    assert request().reply_topic is None


def test_bad_reply_topic_detail_is_one_line_and_ids_stay_usable() -> None:
    raw = encode({**BASE, "reply_topic": "dead-letters"})
    with pytest.raises(InvalidEvent) as info:
        parse_request(raw, CFG)
    detail = info.value.detail
    assert "internal" in detail and "rec-responses" in detail and "\n" not in detail
    assert best_effort_ids(raw) == ("r1", "u1")


@pytest.mark.parametrize("prefix", ["", "dead", "events", "model-updates"])
def test_an_operator_prefix_never_opens_internal_topics(prefix: str) -> None:
    cfg = CFG.model_copy(update={"reply_topic_prefix": prefix})
    for topic in ("events", "rec-requests", "dead-letters", "model-updates", "__consumer_offsets"):
        with pytest.raises(InvalidEvent) as info:
            parse_request(encode({**BASE, "reply_topic": topic}), cfg)
        assert info.value.reason == "bad_reply_topic", (prefix, topic)
    assert parse_request(encode({**BASE, "reply_topic": "rec-responses"}), cfg).reply_topic == "rec-responses"


def test_an_empty_prefix_allows_any_other_legal_name() -> None:
    cfg = CFG.model_copy(update={"reply_topic_prefix": ""})
    assert parse_request(encode({**BASE, "reply_topic": "foo"}), cfg).reply_topic == "foo"
    for topic in ("", ".", "..", "a/b"):
        with pytest.raises(InvalidEvent):
            parse_request(encode({**BASE, "reply_topic": topic}), cfg)


def test_renamed_internal_topics_are_refused_and_the_renamed_default_allowed() -> None:
    cfg = CFG.model_copy(
        update={"topic_events": "shop.events", "topic_responses": "shop.replies", "reply_topic_prefix": "shop."}
    )
    with pytest.raises(InvalidEvent) as info:
        parse_request(encode({**BASE, "reply_topic": "shop.events"}), cfg)
    assert info.value.reason == "bad_reply_topic"
    for topic in ("shop.replies", "shop.replies-2"):
        assert parse_request(encode({**BASE, "reply_topic": topic}), cfg).reply_topic == topic


@pytest.mark.parametrize("name", ["request_id", "user_id"])
def test_missing_or_null_id(name: str) -> None:
    assert reason_of(encode({k: v for k, v in BASE.items() if k != name})) == "missing_field"
    assert reason_with(**{name: None}) == "missing_field"


@pytest.mark.parametrize("value", ["", "a:b", "x" * 65, "u 1"])
@pytest.mark.parametrize("name", ["request_id", "user_id"])
def test_bad_ids(name: str, value: str) -> None:
    assert reason_with(**{name: value}) == "bad_id"


@pytest.mark.parametrize("value", [True, 1.5, ["u"]], ids=repr)
def test_ids_of_wrong_type(value) -> None:
    assert reason_with(user_id=value) == "wrong_type"


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"{", "malformed_json"),
        (b'{"request_id":"r","user_id":"u","k":NaN}', "malformed_json"),
        (b"[]", "not_an_object"),
        (b'"r1"', "not_an_object"),
        (b"\xff\xfe", "bad_encoding"),
        (b"[" * 3000 + b"]" * 1000, "malformed_json"),
    ],
)
def test_payload_level_rejections(raw: bytes, reason: str) -> None:
    assert reason_of(raw) == reason


def test_request_size_limit() -> None:
    payload = {**BASE, "pad": ""}
    payload["pad"] = "x" * (MAX_REQUEST_BYTES - len(encode(payload)))
    assert len(encode(payload)) == MAX_REQUEST_BYTES
    assert parse_request(encode(payload), CFG).user_id == "u1"
    payload["pad"] += "x"
    assert reason_of(encode(payload)) == "oversized"


def test_request_to_json_round_trips() -> None:
    for req in (RecRequest("r", "u"), RecRequest("r", "u", k=3, exclude_seen=False, reply_topic="rec-responses.t")):
        assert parse_request(req.to_json(), CFG) == req
    assert "reply_topic" not in json.loads(RecRequest("r", "u").to_json())


# ---- best_effort_ids ------------------------------------------------------------------------------


def test_best_effort_ids_of_an_invalid_request() -> None:
    raw = encode({"request_id": "r-7", "user_id": "bad:user", "k": 0})
    with pytest.raises(InvalidEvent):
        parse_request(raw, CFG)
    assert best_effort_ids(raw) == ("r-7", "bad:user")


def test_best_effort_ids_accepts_integers_and_truncates() -> None:
    assert best_effort_ids(encode({"request_id": 12, "user_id": "x" * 100})) == ("12", "x" * 64)


def test_best_effort_ids_ignores_non_scalar_ids() -> None:
    assert best_effort_ids(encode({"request_id": ["r"], "user_id": {"u": 1}})) == ("", "")
    assert best_effort_ids(encode({"user_id": "u"})) == ("", "u")


def test_best_effort_ids_ignores_booleans() -> None:
    assert best_effort_ids(encode({"request_id": True, "user_id": False})) == ("", "")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'"just a string"',
        b"null",
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"request_id": 1' + b"0" * 5000 + b"}",
        b"\x00" * 10,
    ],
    ids=lambda raw: repr(raw[:20]),
)
def test_best_effort_ids_on_garbage_returns_empty_ids(raw: bytes) -> None:
    assert best_effort_ids(raw) == ("", "")


def test_best_effort_ids_only_reads_the_size_limit() -> None:
    raw = encode({"request_id": "r", "user_id": "u"})
    assert best_effort_ids(raw + b" " * MAX_REQUEST_BYTES) == ("r", "u")
    assert best_effort_ids(b" " * MAX_REQUEST_BYTES + raw) == ("", "")


# ---- RecResponse -----------------------------------------------------------------------------------


def make_response(**kw) -> RecResponse:
    fields = dict(
        request_id="r1",
        user_id="u1",
        items=[RecItem("i1", 0.123456789, "trending now"), RecItem("i2", 0.5)],
        model_version="blend-v1",
        generated_at=1_767_225_600_000,
        latency_ms=1.23456,
    )
    fields.update(kw)
    return RecResponse(**fields)


def test_response_to_dict_shape() -> None:
    assert make_response().to_dict() == {
        "request_id": "r1",
        "user_id": "u1",
        "items": [
            {"item_id": "i1", "score": 0.123457, "reason": "trending now"},
            {"item_id": "i2", "score": 0.5, "reason": ""},
        ],
        "model_version": "blend-v1",
        "generated_at": 1_767_225_600_000,
        "latency_ms": 1.235,
        "fallback": False,
        "arm": "control",
    }


def test_error_key_only_when_there_is_an_error() -> None:
    assert "error" not in make_response().to_dict()
    failed = make_response(items=[], error="bad_value: k must be between 1 and 100", fallback=True)
    d = failed.to_dict()
    assert d["error"] == "bad_value: k must be between 1 and 100"
    assert d["items"] == [] and d["fallback"] is True


def test_empty_error_string_is_still_reported() -> None:
    assert make_response(error="").to_dict()["error"] == ""


def test_response_to_json_matches_to_dict() -> None:
    resp = make_response(error="x")
    raw = resp.to_json()
    assert json.loads(raw) == resp.to_dict()
    assert b" " not in raw.replace(b"trending now", b"")  # compact separators


def test_generated_at_defaults_to_now() -> None:
    before = int(time.time() * 1000)
    resp = RecResponse("r", "u", [], "v")
    after = int(time.time() * 1000)
    assert before <= resp.generated_at <= after
    assert (resp.latency_ms, resp.fallback, resp.error) == (0.0, False, None)


# ---- topic helpers (stream/topics.py) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name,legal",
    [
        ("a", True),
        ("a" * 249, True),
        ("A.b_c-9", True),
        ("...", True),
        ("", False),
        (".", False),
        ("..", False),
        ("a" * 250, False),
        ("a b", False),
        ("a\n", False),
        ("é", False),
    ],
)
def test_is_legal_topic_name(name: str, legal: bool) -> None:
    assert is_legal_topic_name(name) is legal


def test_internal_topics_are_all_but_the_default_response_topic() -> None:
    assert internal_topics(CFG) == frozenset(
        {"events", "item-catalog", "rec-requests", "dead-letters", "model-updates"}
    )
    assert set(topic_names(CFG)) - internal_topics(CFG) == {CFG.topic_responses}
