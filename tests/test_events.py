"""Event validation: every accepted payload is a clean Event, every rejected one a named reason."""

from __future__ import annotations

import json
import random
import time

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from rtrec.stream.events import (
    OPTIONAL,
    REQUIRED,
    Event,
    InvalidEvent,
    decode_json,
    event_from_dict,
    parse_event,
)
from rtrec.stream.settings import Settings

CFG = Settings(
    kafka_bootstrap=None,
    redis_url=None,
    max_event_bytes=16_384,
    max_future_skew_ms=300_000,
    min_event_ts_ms=0,
    max_context_keys=16,
)
NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z, passed explicitly so tests never depend on the clock

VALID = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "browse", "ts": NOW - 1000}
FULL = {
    **VALID,
    "type": "purchase",
    "session_id": "s-1",
    "price": 19.99,
    "quantity": 2,
    "context": {"device": "mobile", "pos": 3, "nested": {"a": [1, 2.5, None, True]}},
}

FUZZ = hyp_settings(
    max_examples=400,
    derandomize=True,  # reproducible in CI
    database=None,  # no .hypothesis/ directory in the repo
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def encode(payload) -> bytes:
    return json.dumps(payload).encode()


def parse(payload, cfg: Settings = CFG) -> Event:
    raw = payload if isinstance(payload, bytes) else encode(payload)
    return parse_event(raw, cfg, now_ms=NOW)


def reason_of(payload, cfg: Settings = CFG) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse(payload, cfg)
    return info.value.reason


def with_(**changes) -> dict:
    return {**VALID, **changes}


def without(name: str) -> dict:
    return {k: v for k, v in VALID.items() if k != name}


def parses_or_rejects_cleanly(raw: bytes) -> None:
    """The contract of the hot path: an Event or an InvalidEvent, never anything else."""
    try:
        ev = parse_event(raw, CFG, now_ms=NOW)
    except InvalidEvent as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return
    assert isinstance(ev, Event)


# ---- valid events ---------------------------------------------------------------------------


def test_minimal_event() -> None:
    ev = parse(VALID)
    assert ev == Event("e1", "u1", "i1", "browse", NOW - 1000)
    assert (ev.session_id, ev.price, ev.quantity, ev.context) == (None, None, None, None)


def test_all_optional_fields() -> None:
    ev = parse(FULL)
    assert ev.type == "purchase"
    assert ev.session_id == "s-1"
    assert ev.price == 19.99
    assert ev.quantity == 2
    assert ev.context == FULL["context"]
    assert ev.to_dict() == FULL


@pytest.mark.parametrize("etype", ["browse", "click", "purchase"])
def test_every_event_type_is_accepted(etype: str) -> None:
    assert parse(with_(type=etype)).type == etype


def test_integer_ids_are_canonicalised_to_strings() -> None:
    ev = parse(with_(event_id=7, user_id=123, item_id=0, session_id=42))
    assert (ev.event_id, ev.user_id, ev.item_id, ev.session_id) == ("7", "123", "0", "42")


def test_integer_price_becomes_float() -> None:
    ev = parse(with_(price=5))
    assert ev.price == 5.0 and isinstance(ev.price, float)


def test_explicit_null_optional_fields_are_absent() -> None:
    ev = parse(with_(session_id=None, price=None, quantity=None, context=None))
    assert ev.to_dict() == VALID


def test_unknown_extra_fields_are_ignored() -> None:
    assert parse(with_(extra="whatever")).to_dict() == VALID


@pytest.mark.parametrize("value", ["a", "A-z_0.9", "x" * 64, "..", "a..b", "-", "_"])
def test_ids_matching_the_pattern_are_accepted(value: str) -> None:
    assert parse(with_(user_id=value)).user_id == value


def test_ts_boundaries_are_inclusive() -> None:
    assert parse(with_(ts=CFG.min_event_ts_ms)).ts == CFG.min_event_ts_ms
    assert parse(with_(ts=NOW + CFG.max_future_skew_ms)).ts == NOW + CFG.max_future_skew_ms


def test_context_at_the_key_limit_is_accepted() -> None:
    context = {f"k{i}": i for i in range(CFG.max_context_keys)}
    assert parse(with_(context=context)).context == context


def test_payload_of_exactly_max_bytes_is_accepted() -> None:
    payload = with_(context={"pad": ""})
    pad = CFG.max_event_bytes - len(encode(payload))
    payload["context"]["pad"] = "x" * pad
    raw = encode(payload)
    assert len(raw) == CFG.max_event_bytes
    assert parse(raw).context == {"pad": "x" * pad}
    assert reason_of(encode({**payload, "context": {"pad": "x" * (pad + 1)}})) == "oversized"


def test_utf8_text_in_context_is_accepted() -> None:
    raw = json.dumps(with_(context={"note": "ünïcode ✓ 日本"}), ensure_ascii=False).encode()
    assert b"\xe2\x9c\x93" in raw  # really sent as multi-byte UTF-8, not as \u escapes
    assert parse(raw).context == {"note": "ünïcode ✓ 日本"}


def test_now_defaults_to_the_wall_clock() -> None:
    now = int(time.time() * 1000)
    assert parse_event(encode(with_(ts=now)), CFG).ts == now
    with pytest.raises(InvalidEvent) as info:
        parse_event(encode(with_(ts=now + CFG.max_future_skew_ms + 60_000)), CFG)
    assert info.value.reason == "ts_in_future"


# ---- round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [VALID, FULL], ids=["minimal", "full"])
def test_to_json_round_trips(payload: dict) -> None:
    ev = parse(payload)
    assert parse(ev.to_json()) == ev
    assert json.loads(ev.to_json()) == ev.to_dict()


def test_to_json_is_compact_and_omits_absent_fields() -> None:
    raw = Event("e", "u", "i", "click", 5).to_json()
    assert raw == b'{"event_id":"e","user_id":"u","item_id":"i","type":"click","ts":5}'


# ---- rejections -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"event_id": "e1", "user_id": "u1"',  # truncated
        encode(VALID)[:-1],  # truncated by one byte
        b"{'event_id': 'e1'}",  # single quotes
        b'{"a": 1,}',  # trailing comma
        encode(VALID) + b"{}",  # trailing data
        b'{"event_id":"e1","user_id":"u1","item_id":"i1","type":"browse","ts":NaN}',
        b'{"event_id":"e1","user_id":"u1","item_id":"i1","type":"browse","ts":1,"price":Infinity}',
        b'{"event_id":"e1","user_id":"u1","item_id":"i1","type":"browse","ts":1,"price":-Infinity}',
        b'{"context": {"x": NaN}}',
        b"NaN",
        b"\xef\xbb\xbf" + encode(VALID),  # a UTF-8 byte-order mark is not JSON
    ],
)
def test_malformed_json(raw: bytes) -> None:
    assert reason_of(raw) == "malformed_json"


def test_nan_constant_is_rejected_even_where_the_field_would_be_optional() -> None:
    raw = encode(VALID)[:-1] + b',"context":{"score":NaN}}'
    assert reason_of(raw) == "malformed_json"


@pytest.mark.parametrize(
    "raw",
    [b"[]", encode([VALID]), b'"an event"', b"42", b"null", b"true"],
    ids=["empty-list", "list", "string", "number", "null", "bool"],
)
def test_not_an_object(raw: bytes) -> None:
    assert reason_of(raw) == "not_an_object"


def test_event_from_dict_rejects_non_dicts() -> None:
    with pytest.raises(InvalidEvent) as info:
        event_from_dict([VALID], CFG, now_ms=NOW)
    assert info.value.reason == "not_an_object"


@pytest.mark.parametrize("name", REQUIRED)
def test_missing_field(name: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse(without(name))
    assert info.value.reason == "missing_field"
    assert info.value.detail == name


@pytest.mark.parametrize("name", REQUIRED)
def test_null_required_field_counts_as_missing(name: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse(with_(**{name: None}))
    assert info.value.reason == "missing_field"
    assert info.value.detail == name


def test_missing_fields_are_all_named() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse({"type": "browse"})
    assert info.value.reason == "missing_field"
    assert info.value.detail == "event_id, user_id, item_id, ts"


@pytest.mark.parametrize("etype", ["view", "Browse", "", "purchase ", "x" * 1000])
def test_unknown_type(etype: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse(with_(type=etype))
    assert info.value.reason == "unknown_type"
    assert len(str(info.value)) < 200  # a long type is not copied whole into the message


@pytest.mark.parametrize(
    "changes",
    [
        {"ts": str(NOW)},
        {"ts": float(NOW)},
        {"ts": 1.5},
        {"ts": True},
        {"ts": [NOW]},
        {"type": 1},
        {"type": ["browse"]},
        {"user_id": ["u1"]},
        {"user_id": True},
        {"user_id": False},
        {"user_id": 1.0},
        {"item_id": {"id": "i1"}},
        {"event_id": 2.5},
        {"session_id": ["s"]},
        {"price": "9.99"},
        {"price": True},
        {"price": [1]},
        {"quantity": 0},
        {"quantity": -1},
        {"quantity": 1.5},
        {"quantity": 2.0},
        {"quantity": "2"},
        {"quantity": True},
        {"context": "device=mobile"},
        {"context": [["device", "mobile"]]},
        {"context": 1},
    ],
    ids=repr,
)
def test_wrong_type(changes: dict) -> None:
    assert reason_of(with_(**changes)) == "wrong_type"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * 65,
        "a:b",
        "a{b",
        "a}b",
        "a/b",
        "a b",
        " a",
        "a|b",
        "a*",
        "ü",
        "a\tb",
        "\n",
        10**70,  # an integer id too long once written in decimal
    ],
    ids=repr,
)
@pytest.mark.parametrize("field", ["event_id", "user_id", "item_id", "session_id"])
def test_bad_id(field: str, value) -> None:
    assert reason_of(with_(**{field: value})) == "bad_id"


@pytest.mark.parametrize("field", ["event_id", "user_id", "item_id"])
def test_id_with_trailing_newline_is_rejected(field: str) -> None:
    assert reason_of(with_(**{field: "u1\n"})) == "bad_id"


@pytest.mark.parametrize("ts", [-1, -NOW, CFG.min_event_ts_ms - 1])
def test_ts_out_of_range(ts: int) -> None:
    assert reason_of(with_(ts=ts)) == "ts_out_of_range"


def test_min_event_ts_is_configurable() -> None:
    cfg = CFG.model_copy(update={"min_event_ts_ms": NOW - 10})
    assert reason_of(with_(ts=NOW - 11), cfg) == "ts_out_of_range"
    assert parse(with_(ts=NOW - 10), cfg).ts == NOW - 10


@pytest.mark.parametrize("ts", [NOW + CFG.max_future_skew_ms + 1, NOW + 86_400_000, 10**30])
def test_ts_in_future(ts: int) -> None:
    assert reason_of(with_(ts=ts)) == "ts_in_future"


@pytest.mark.parametrize("price", [-0.01, -1])
def test_negative_price(price: float) -> None:
    assert reason_of(with_(price=price)) == "bad_value"


def test_price_overflowing_to_infinity_is_rejected() -> None:
    raw = encode(VALID)[:-1] + b',"price":1e999}'  # parses to float('inf')
    assert reason_of(raw) == "bad_value"


def test_huge_integer_price_is_a_clean_rejection() -> None:
    raw = encode(VALID)[:-1] + b',"price":1' + b"0" * 400 + b"}"
    assert reason_of(raw) == "bad_value"


def test_context_with_too_many_keys() -> None:
    context = {f"k{i}": i for i in range(CFG.max_context_keys + 1)}
    assert reason_of(with_(context=context)) == "bad_value"


def test_oversized() -> None:
    raw = encode(with_(context={"pad": "x" * CFG.max_event_bytes}))
    assert reason_of(raw) == "oversized"


def test_oversized_is_checked_before_decoding() -> None:
    assert reason_of(b"\xff" * (CFG.max_event_bytes + 1)) == "oversized"


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff",
        b'{"event_id": "e\xff1"}',
        encode(VALID)[:-1] + b',"context":{"x":"\xc3"}}',  # truncated two-byte sequence
        b'{"a": "\xed\xa0\x80"}',  # UTF-8-encoded surrogate
        "{}".encode("utf-16"),
    ],
)
def test_bad_encoding(raw: bytes) -> None:
    assert reason_of(raw) == "bad_encoding"


def test_none_payload_is_empty_payload() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(None, CFG, now_ms=NOW)  # a Kafka tombstone has no value
    assert info.value.reason == "empty_payload"


@pytest.mark.parametrize("opener,leaf,closer", [(b"[", b"", b"]"), (b'{"a":', b"1", b"}")], ids=["lists", "objects"])
def test_deep_nesting_within_size_limit_is_malformed_not_recursion_error(opener, leaf, closer) -> None:
    depth = (CFG.max_event_bytes - len(leaf)) // (len(opener) + len(closer))
    raw = opener * depth + leaf + closer * depth
    assert len(raw) <= CFG.max_event_bytes
    assert reason_of(raw) == "malformed_json"


def test_100k_nested_lists_are_a_clean_invalid_event() -> None:
    raw = b"[" * 100_000 + b"]" * 100_000
    roomy = CFG.model_copy(update={"max_event_bytes": len(raw)})
    assert reason_of(raw, roomy) == "malformed_json"
    assert reason_of(raw) == "oversized"  # with the default limit it never gets parsed


def test_deep_nesting_inside_context() -> None:
    raw = encode(VALID)[:-1] + b',"context":{"x":' + b"[" * 5000 + b"]" * 5000 + b"}}"
    assert reason_of(raw) == "malformed_json"


def test_integer_literal_over_4300_digits_is_a_clean_invalid_event() -> None:
    raw = encode(VALID)[:-1] + b',"quantity":' + b"9" * 5000 + b"}"
    assert len(raw) <= CFG.max_event_bytes
    assert reason_of(raw) == "malformed_json"


def test_invalid_event_is_a_value_error_with_reason_and_detail() -> None:
    with pytest.raises(ValueError) as info:
        decode_json(b"{", 100)
    exc = info.value
    assert isinstance(exc, InvalidEvent)
    assert exc.reason == "malformed_json"
    assert str(exc).startswith("malformed_json: ")
    assert InvalidEvent("x").args == ("x",)


# ---- fuzzing: arbitrary input never escapes as anything but InvalidEvent --------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)  # huge ints: see the huge-integer tests above
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=70)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=20),
    max_leaves=30,
)
field_values = (
    json_values
    | st.sampled_from(["browse", "click", "purchase", "u1", "", "a:b", "x" * 65])
    | st.integers(min_value=-5, max_value=NOW + 10**9)
)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    parses_or_rejects_cleanly(raw)


@FUZZ
@given(st.dictionaries(st.sampled_from(REQUIRED + OPTIONAL + ("other",)), field_values, max_size=10))
def test_fuzz_event_shaped_objects(data: dict) -> None:
    parses_or_rejects_cleanly(json.dumps(data).encode())


@FUZZ
@given(
    st.dictionaries(st.sampled_from(REQUIRED + OPTIONAL), field_values, max_size=10),
)
def test_fuzz_overrides_of_a_valid_event(changes: dict) -> None:
    raw = json.dumps({**FULL, **changes}).encode()
    parses_or_rejects_cleanly(raw)
    try:
        ev = parse(raw)
    except InvalidEvent:
        return
    assert parse(ev.to_json()) == ev  # whatever is accepted round-trips


def test_fuzz_byte_mutations_of_valid_payloads() -> None:
    rng = random.Random(1234)
    seeds = [encode(VALID), encode(FULL)]
    alphabet = b'{}[]":,0123456789-.eE\\ntrufalsN\xff\xc3\x80 '
    accepted = rejected = 0
    for _ in range(3000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(raw) + (op == 1))
            if op == 0 and raw:
                raw[pos] = rng.choice(alphabet)
            elif op == 1:
                raw.insert(pos, rng.choice(alphabet))
            elif raw:
                del raw[pos]
        try:
            parse_event(bytes(raw), CFG, now_ms=NOW)
            accepted += 1
        except InvalidEvent:
            rejected += 1
    assert accepted + rejected == 3000
    assert accepted > 0 and rejected > 0  # the mutations explore both sides
