"""The request forms of issue 17 on the wire: similar items (item_id), re-ranking (candidates), filters.

Pure parsing (no servers), plus the argument checks of `rtrec recommend` / `rtrec similar` that fail before
any connection.
"""

from __future__ import annotations

import json

import pytest

from rtrec.stream.events import InvalidEvent
from rtrec.stream.rec_client import as_item_filter
from rtrec.stream.rec_messages import (
    MAX_REQUEST_BYTES,
    NO_FILTER,
    ItemFilter,
    RecItem,
    RecRequest,
    RecResponse,
    best_effort_ids,
    max_request_bytes,
    parse_filter,
    parse_request,
)
from rtrec.stream.settings import Settings

CFG = Settings(kafka_bootstrap=None, redis_url=None)
BASE = {"request_id": "r1", "user_id": "u1"}


def encode(payload) -> bytes:
    return json.dumps(payload).encode()


def request(**changes) -> RecRequest:
    return parse_request(encode({**BASE, **changes}), CFG)


def rejection(payload, settings: Settings = CFG) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        parse_request(encode(payload), settings)
    detail = info.value.detail
    assert detail and "\n" not in detail
    return info.value


def reason_with(**changes) -> str:
    return rejection({**BASE, **changes}).reason


def ids(n: int, width: int = 64) -> list[str]:
    return [f"{i:0{width}d}" for i in range(n)]


# ---- valid forms ---------------------------------------------------------------------------------------


def test_the_plain_form_is_unchanged() -> None:
    req = request()
    assert req == RecRequest("r1", "u1")
    assert (req.item_id, req.candidates, req.filter) == (None, None, NO_FILTER)


def test_similar_items_with_a_user() -> None:
    assert request(item_id="i9", k=5) == RecRequest("r1", "u1", k=5, item_id="i9")


def test_similar_items_without_a_user() -> None:
    req = parse_request(encode({"request_id": "r1", "item_id": "i9"}), CFG)
    assert req == RecRequest("r1", "", item_id="i9")
    assert parse_request(encode({"request_id": "r1", "user_id": None, "item_id": 42}), CFG).item_id == "42"


def test_a_re_ranking_keeps_first_occurrences_in_order() -> None:
    req = request(candidates=["b", "a", 7, "b", "c", "a", "7"])
    assert req.candidates == ("b", "a", "7", "c")
    assert req.item_id is None and req.user_id == "u1"


def test_a_single_candidate_and_the_cap_are_accepted() -> None:
    assert request(candidates=["x"]).candidates == ("x",)
    assert request(candidates=ids(CFG.max_candidates)).candidates == tuple(ids(CFG.max_candidates))


def test_a_filter_on_each_form() -> None:
    wire = {"categories": [" shoes ", "hats", "shoes"], "exclude_categories": ["sale"], "exclude_items": ["i1", 2]}
    expected = ItemFilter(frozenset({"shoes", "hats"}), frozenset({"sale"}), frozenset({"i1", "2"}))
    assert request(filter=wire).filter == expected
    assert request(filter=wire, item_id="i9").filter == expected
    assert request(filter=wire, candidates=["a", "b"]).filter == expected


def test_empty_or_null_filter_parts_mean_no_rule() -> None:
    assert request(filter={}).filter == NO_FILTER
    assert request(filter=None).filter == NO_FILTER
    req = request(filter={"categories": [], "exclude_categories": None, "exclude_items": ["i1"]})
    assert req.filter == ItemFilter(exclude_items=frozenset({"i1"}))
    assert not req.filter.by_category


def test_null_new_fields_mean_absent() -> None:
    assert request(item_id=None, candidates=None, filter=None) == RecRequest("r1", "u1")


def test_a_category_of_64_characters_is_accepted() -> None:
    assert request(filter={"categories": ["c" * 64]}).filter.categories == {"c" * 64}


def test_unknown_top_level_keys_are_still_tolerated() -> None:
    assert request(extra={"a": 1}, item_id="i1").item_id == "i1"


# ---- round trip --------------------------------------------------------------------------------------


ROUND_TRIPS = [
    RecRequest("r", "u"),
    RecRequest("r", "u", k=3, exclude_seen=False, reply_topic="rec-responses.t"),
    RecRequest("r", "", item_id="i1"),
    RecRequest("r", "u", item_id="i1", k=7),
    RecRequest("r", "u", candidates=("c", "a", "b")),
    RecRequest("r", "u", filter=ItemFilter(categories=frozenset({"b", "a"}))),
    RecRequest(
        "r",
        "",
        item_id="i1",
        filter=ItemFilter(frozenset({"x"}), frozenset({"y", "z"}), frozenset({"i2", "i3"})),
    ),
]


@pytest.mark.parametrize("req", ROUND_TRIPS, ids=[str(n) for n in range(len(ROUND_TRIPS))])
def test_round_trip(req: RecRequest) -> None:
    assert parse_request(req.to_json(), CFG) == req


def test_to_json_writes_only_what_is_set_and_sorts_the_filter() -> None:
    plain = json.loads(RecRequest("r", "u").to_json())
    assert set(plain) == {"request_id", "user_id", "k", "exclude_seen"}
    similar = json.loads(RecRequest("r", "", item_id="i1").to_json())
    assert "user_id" not in similar and similar["item_id"] == "i1"
    wire = json.loads(
        RecRequest("r", "u", candidates=("b", "a"), filter=ItemFilter(exclude_items=frozenset({"z", "y"}))).to_json()
    )
    assert wire["candidates"] == ["b", "a"]
    assert wire["filter"] == {"exclude_items": ["y", "z"]}
    same = RecRequest("r", "u", filter=ItemFilter(exclude_items=frozenset({"y", "z"}))).to_json()
    assert same == RecRequest("r", "u", filter=ItemFilter(exclude_items=frozenset({"z", "y"}))).to_json()


# ---- bad forms -----------------------------------------------------------------------------------------


def test_too_many_candidates() -> None:
    err = rejection({**BASE, "candidates": ids(CFG.max_candidates + 1, 4)})
    assert err.reason == "too_many_candidates"
    assert str(CFG.max_candidates) in err.detail and "RTREC_MAX_CANDIDATES" in err.detail


def test_the_candidate_cap_follows_settings() -> None:
    small = CFG.model_copy(update={"max_candidates": 3})
    assert parse_request(encode({**BASE, "candidates": ["a", "b", "c"]}), small).candidates == ("a", "b", "c")
    assert rejection({**BASE, "candidates": ["a", "b", "c", "d"]}, small).reason == "too_many_candidates"


def test_empty_candidates() -> None:
    assert reason_with(candidates=[]) == "bad_value"


@pytest.mark.parametrize("value", ["a,b", "a", 5, {"a": 1}, True], ids=repr)
def test_candidates_not_a_list(value) -> None:
    assert reason_with(candidates=value) == "wrong_type"


@pytest.mark.parametrize("bad", [True, 1.5, None, ["a"], {"a": 1}], ids=repr)
def test_candidate_ids_of_wrong_type(bad) -> None:
    err = rejection({**BASE, "candidates": ["a", "b", bad]})
    assert err.reason == "wrong_type" and "candidates[2]" in err.detail


@pytest.mark.parametrize("bad", ["", "a b", "a:b", "x" * 65])
def test_bad_candidate_ids(bad: str) -> None:
    err = rejection({**BASE, "candidates": [bad]})
    assert err.reason == "bad_id" and "candidates[0]" in err.detail


def test_candidates_with_item_id() -> None:
    err = rejection({**BASE, "item_id": "i1", "candidates": ["a"]})
    assert err.reason == "bad_value" and "not both" in err.detail


@pytest.mark.parametrize("value,reason", [("", "bad_id"), ("a:b", "bad_id"), (True, "wrong_type"), ([1], "wrong_type")])
def test_bad_item_id(value, reason: str) -> None:
    assert reason_with(item_id=value) == reason


def test_unknown_filter_key() -> None:
    err = rejection({**BASE, "filter": {"categories": ["a"], "brand": ["x"]}})
    assert err.reason == "unknown_field"
    assert "'brand'" in err.detail
    assert all(key in err.detail for key in ("categories", "exclude_categories", "exclude_items"))


def test_unknown_filter_key_detail_stays_one_line() -> None:
    err = rejection({**BASE, "filter": {f"k{n}\n" + "x" * 100: [] for n in range(10)}})
    assert err.reason == "unknown_field" and len(err.detail) < 300


@pytest.mark.parametrize("value", [["a"], "shoes", 3, True], ids=repr)
def test_filter_not_an_object(value) -> None:
    assert reason_with(filter=value) == "wrong_type"


@pytest.mark.parametrize("key", ["categories", "exclude_categories", "exclude_items"])
@pytest.mark.parametrize("value", ["shoes", {"a": 1}, 3])
def test_filter_lists_must_be_lists(key: str, value) -> None:
    assert reason_with(filter={key: value}) == "wrong_type"


@pytest.mark.parametrize("key", ["categories", "exclude_categories", "exclude_items"])
def test_filter_list_too_long(key: str) -> None:
    limit = CFG.max_filter_values
    assert len(request(filter={key: ids(limit, 8)}).filter.to_dict()[key]) == limit
    err = rejection({**BASE, "filter": {key: ids(limit + 1, 8)}})
    assert err.reason == "bad_value" and str(limit) in err.detail and "RTREC_MAX_FILTER_VALUES" in err.detail


@pytest.mark.parametrize("category", ["c" * 65, "", "   ", "\t\n"], ids=repr)
def test_category_too_long_or_empty(category: str) -> None:
    assert reason_with(filter={"categories": [category]}) == "bad_value"
    assert reason_with(filter={"exclude_categories": ["ok", category]}) == "bad_value"


@pytest.mark.parametrize("category", [5, None, True, ["a"]], ids=repr)
def test_category_must_be_a_string(category) -> None:
    assert reason_with(filter={"categories": [category]}) == "wrong_type"


@pytest.mark.parametrize("bad,reason", [("a:b", "bad_id"), (1.5, "wrong_type")])
def test_bad_excluded_item(bad, reason: str) -> None:
    err = rejection({**BASE, "filter": {"exclude_items": ["ok", bad]}})
    assert err.reason == reason and "exclude_items[1]" in err.detail


def test_user_id_missing_without_item_id() -> None:
    err = rejection({"request_id": "r1", "k": 3})
    assert err.reason == "missing_field" and "user_id" in err.detail and "item_id" in err.detail
    assert rejection({"request_id": "r1", "candidates": ["a"]}).reason == "missing_field"
    assert rejection({"request_id": "r1", "item_id": None}).reason == "missing_field"


def test_request_id_still_required_with_item_id() -> None:
    err = rejection({"item_id": "i1"})
    assert err.reason == "missing_field" and err.detail.startswith("request_id")


# ---- the byte limit ------------------------------------------------------------------------------------


def test_max_request_bytes_follows_the_limits() -> None:
    assert max_request_bytes(CFG) == MAX_REQUEST_BYTES  # the defaults
    bigger = CFG.model_copy(update={"max_candidates": 1000})
    assert max_request_bytes(bigger) == MAX_REQUEST_BYTES + 500 * 72


def test_a_full_request_fits() -> None:
    """Every list at its limit, every value 64 characters: within the byte limit."""
    n = CFG.max_filter_values
    payload = {
        **BASE,
        "k": CFG.max_k,
        "exclude_seen": False,
        "reply_topic": "rec-responses." + "t" * 235,
        "candidates": ids(CFG.max_candidates),
        "filter": {
            "categories": [f"c{i:063d}" for i in range(n)],
            "exclude_categories": [f"x{i:063d}" for i in range(n)],
            "exclude_items": [f"e{i:063d}" for i in range(n)],
        },
    }
    raw = encode(payload)  # json.dumps' default ", " separators: the roomiest common form
    assert len(raw) <= max_request_bytes(CFG)
    req = parse_request(raw, CFG)
    assert len(req.candidates or ()) == CFG.max_candidates and len(req.filter.exclude_items) == n


def test_500_candidates_of_64_characters_are_accepted() -> None:
    req = request(candidates=ids(500))
    assert req.candidates == tuple(ids(500))


def test_over_the_byte_limit_is_oversized() -> None:
    payload = {**BASE, "candidates": ["a"], "pad": ""}
    payload["pad"] = "x" * (max_request_bytes(CFG) - len(encode(payload)))
    assert len(encode(payload)) == max_request_bytes(CFG)
    assert parse_request(encode(payload), CFG).candidates == ("a",)
    payload["pad"] += "x"
    assert rejection(payload).reason == "oversized"


def test_best_effort_ids_reads_a_large_request() -> None:
    raw = encode({"request_id": "r9", "user_id": "u9", "candidates": ids(500), "k": 0})
    assert len(raw) > 4096
    assert best_effort_ids(raw) == ("r9", "u9")
    assert best_effort_ids(raw, CFG) == ("r9", "u9")


def test_best_effort_ids_follows_settings() -> None:
    raw = encode({"request_id": "r9", "user_id": "u9"})
    small = CFG.model_copy(update={"max_candidates": 1, "max_filter_values": 1})
    limit = max_request_bytes(small)
    assert best_effort_ids(raw + b" " * limit, small) == ("r9", "u9")
    assert best_effort_ids(b" " * limit + raw, small) == ("", "")


# ---- responses and the client's filter -----------------------------------------------------------------


def test_response_item_id_only_when_set() -> None:
    plain = RecResponse("r", "u", [RecItem("i", 1.0)], "v", generated_at=1)
    assert "item_id" not in plain.to_dict()
    similar = RecResponse("r", "", [RecItem("i", 1.0)], "v", generated_at=1, item_id="anchor")
    assert similar.to_dict()["item_id"] == "anchor"
    assert json.loads(similar.to_json()) == similar.to_dict()


def test_client_filter_from_its_wire_form() -> None:
    assert as_item_filter(None, CFG) is NO_FILTER
    f = ItemFilter(categories=frozenset({"a"}))
    assert as_item_filter(f, CFG) is f
    assert as_item_filter({"categories": ["a"]}, CFG) == f
    assert parse_filter({"exclude_items": [3]}, CFG) == ItemFilter(exclude_items=frozenset({"3"}))
    with pytest.raises(InvalidEvent) as info:
        as_item_filter({"brand": ["x"]}, CFG)
    assert info.value.reason == "unknown_field"


# ---- the command line: mistakes found before any connection ---------------------------------------------


@pytest.fixture
def cli(monkeypatch, tmp_path, capsys):
    """Run `rtrec ARGS` in this process, with no stack anywhere; returns (exit code, stderr)."""
    from rtrec.workers.cli import app

    for name in ("RTREC_DEBUG", "RTREC_KAFKA_BOOTSTRAP", "RTREC_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RTREC_RUN_DIR", str(tmp_path / "no-stack"))

    def run(args: list[str]) -> tuple[int, str]:
        with pytest.raises(SystemExit) as info:
            app(args=args)
        code = info.value.code
        return code if isinstance(code, int) else 1, capsys.readouterr().err

    return run


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(
    "args,words",
    [
        (["similar", "i1", "-k", "0"], ["-k"]),
        (["similar", "i1", "-k", "100000"], ["-k", "RTREC_MAX_K"]),
        (["similar", "a:b"], ["bad_id", "item_id"]),
        (["similar", "i1", "--user", "u 1"], ["bad_id", "user_id"]),
        (["similar", "i1", "--category", "c" * 65], ["bad_value", "categories"]),
        (["similar", "i1", "--exclude-item", "x y"], ["bad_id", "exclude_items"]),
        (["recommend", "u1", "--candidates", ",,"], ["--candidates"]),
        (["recommend", "u1", "--candidates", "a,b:c"], ["bad_id", "candidates[1]"]),
        (["recommend", "u1", "--candidates", ",".join(ids(501, 4))], ["too_many_candidates", "RTREC_MAX_CANDIDATES"]),
        (["recommend", "u1", "--exclude-category", " "], ["bad_value", "exclude_categories"]),
    ],
    ids=lambda v: " ".join(v)[:40] if isinstance(v, list) else None,
)
def test_cli_mistakes_are_one_line(cli, args: list[str], words: list[str]) -> None:
    code, stderr = cli(args)
    line = one_line(stderr)
    assert code != 0, line
    assert line.startswith("rtrec: error:") and all(w in line for w in words), line


def test_cli_a_valid_similar_request_goes_on_to_look_for_the_stack(cli) -> None:
    code, stderr = cli(["similar", "i1", "--user", "u1", "-k", "3", "--category", "shoes"])
    assert code == 2 and "rtrec up" in one_line(stderr)


def test_a_filter_category_with_a_lone_surrogate_is_refused():
    raw = b'{"request_id": "r", "user_id": "u", "filter": {"categories": ["x\\ud800"]}}'
    with pytest.raises(InvalidEvent) as refused:
        parse_request(raw, Settings())
    assert refused.value.reason == "bad_value" and "filter.categories[0]" in str(refused.value)
