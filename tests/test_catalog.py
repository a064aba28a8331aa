"""The item catalog: upsert records (validation), storage with the cap, item_rules, catalog files, and the
state worker applying the catalog topic (bad records dead-lettered, the rest applied)."""

from __future__ import annotations

import asyncio
import json
import math
import uuid

import pytest
from kafka import KafkaConsumer, TopicPartition

from rtrec.stream.catalog import (
    CATALOG_FULL,
    CatalogEntry,
    item_rules,
    parse_catalog_record,
    read_catalog,
    store_catalog,
    store_catalog_async,
)
from rtrec.stream.connections import async_redis_client, redis_client
from rtrec.stream.embedded import start_redis, start_redis_cluster
from rtrec.stream.eventfile import EventFileError
from rtrec.stream.events import InvalidEvent
from rtrec.stream.keys import ITEM_CATEGORY, ITEM_INFO, ITEM_UNAVAILABLE
from rtrec.stream.producer import EventProducer
from rtrec.stream.settings import Settings
from rtrec.stream.topics import ensure_topics
from rtrec.workers.stack import Stack
from tests.helpers import run_cli, stack_env, wait_for

CFG = Settings(kafka_bootstrap=None, redis_url=None)
CATALOG_KEYS = (ITEM_CATEGORY, ITEM_UNAVAILABLE, ITEM_INFO)


def raw(value: object) -> bytes:
    return json.dumps(value).encode()


# ---- records ---------------------------------------------------------------------------------------
def test_a_full_upsert_is_parsed_and_unknown_keys_are_ignored() -> None:
    entry = parse_catalog_record(
        raw({"item_id": 42, "category": "  shoes ", "available": False, "title": "Boot", "price": 9, "x": [1]}), CFG
    )
    assert entry == CatalogEntry("42", "shoes", False, "Boot", 9.0)
    assert parse_catalog_record(raw({"item_id": "i1"}), CFG) == CatalogEntry("i1", None, True, None, None)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"not json", "malformed_json"),
        (raw([1, 2]), "not_an_object"),
        (raw({"category": "c"}), "missing_field"),
        (raw({"item_id": "a b"}), "bad_id"),
        (raw({"item_id": True}), "wrong_type"),
        (raw({"item_id": "i", "available": "yes"}), "wrong_type"),
        (raw({"item_id": "i", "available": 1}), "wrong_type"),
        (raw({"item_id": "i", "category": 5}), "wrong_type"),
        (raw({"item_id": "i", "category": "   "}), "bad_value"),
        (raw({"item_id": "i", "category": "c" * 65}), "bad_value"),
        (raw({"item_id": "i", "title": 3}), "wrong_type"),
        (raw({"item_id": "i", "title": "t" * 201}), "bad_value"),
        (raw({"item_id": "i", "price": -1}), "bad_value"),
        (raw({"item_id": "i", "price": "1"}), "wrong_type"),
        (raw({"item_id": "i", "price": True}), "wrong_type"),
        (b'{"item_id": "i", "price": 1e400}', "bad_value"),
        (b'{"item_id": "i", "price": NaN}', "malformed_json"),
        (raw({"item_id": "i", "title": "x" * 2_000_000}), "oversized"),
    ],
)
def test_bad_upserts_name_their_reason(value: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as exc:
        parse_catalog_record(value, CFG)
    assert exc.value.reason == reason


# ---- files -----------------------------------------------------------------------------------------
def test_a_csv_catalog_reads_availability_title_and_price(tmp_path) -> None:
    path = tmp_path / "items.csv"
    path.write_text(
        "item_id,category,available,title,price\ni1,shoes,true,Boot,19.5\ni2,hats,NO,,\ni3,,1,Cap,0\ni4,socks,,,\n"
    )
    assert read_catalog(path) == [
        CatalogEntry("i1", "shoes", True, "Boot", 19.5),
        CatalogEntry("i2", "hats", False, None, None),
        CatalogEntry("i3", None, True, "Cap", 0.0),
        CatalogEntry("i4", "socks", True, None, None),
    ]


def test_a_jsonl_catalog_reads_upsert_records_and_cluster_numbers(tmp_path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text(
        '{"item_id": "i1", "category": "shoes", "available": false, "title": "Boot", "price": 3.5}\n'
        "\n"
        '{"item_id": 7, "cluster": 3}\n'
    )
    assert read_catalog(path) == [CatalogEntry("i1", "shoes", False, "Boot", 3.5), CatalogEntry("7", "3", True)]


@pytest.mark.parametrize(
    ("name", "text", "words"),
    [
        ("bad.csv", "item_id,category,available\ni1,c,true\ni2,c,maybe\n", [":3:", "available", "maybe"]),
        ("price.csv", "item_id,price\ni1,cheap\n", [":2:", "price"]),
        ("neg.csv", "item_id,price\ni1,-2\n", [":2:", "bad_value"]),
        (
            "bad.jsonl",
            '{"item_id": "i1", "category": "c"}\n{"item_id": "i2", "available": "no"}\n',
            [":2:", "available"],
        ),
        ("header.csv", "item,cat\ni1,c1\n", [":1:", "item_id", "category"]),
    ],
)
def test_a_bad_catalog_row_names_file_and_line(tmp_path, name: str, text: str, words: list[str]) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(EventFileError) as exc:
        read_catalog(path)
    message = str(exc.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


# ---- storage and item_rules on a real Redis (one server, and a cluster) ------------------------------
@pytest.fixture
def catalog_redis(redis_only):
    redis_only.delete(*CATALOG_KEYS)
    yield redis_only
    redis_only.delete(*CATALOG_KEYS)


def test_store_catalog_upserts_merges_info_and_keeps_the_cap(catalog_redis) -> None:
    r = catalog_redis
    s = CFG.model_copy(update={"catalog_max_items": 3})
    assert store_catalog(
        r,
        [
            CatalogEntry("a", "c1", False, "A", 1.5),
            CatalogEntry("b", None, False),  # only in the unavailable set: an item of the catalog all the same
            CatalogEntry("c", "c3", True, None, 2.0),
            CatalogEntry("x", None, False),  # the third unavailable item: one key at the cap, the catalog is full
            CatalogEntry("d", "c4"),  # a new item: refused
            CatalogEntry("b", "c2", None),  # known (by the set): applied, its availability left as it is
            CatalogEntry("a", None, True, None, 3.0),  # known: applied
        ],
        s,
    ) == [None, None, None, None, CATALOG_FULL, None, None]
    assert r.hgetall(ITEM_CATEGORY) == {"a": "c1", "b": "c2", "c": "c3"}
    assert r.smembers(ITEM_UNAVAILABLE) == {"b", "x"}
    assert json.loads(r.hget(ITEM_INFO, "a")) == {"title": "A", "price": 3.0}  # the title kept, the price updated
    assert json.loads(r.hget(ITEM_INFO, "c")) == {"price": 2.0}
    assert store_catalog(r, [CatalogEntry("e", "x")], s) == [CATALOG_FULL]
    assert store_catalog(r, [], s) == []

    async def rules():
        client = async_redis_client(s.model_copy(update={"redis_url": url_of(r)}))
        try:
            return await item_rules(client, ["a", "b", "zz"]), await item_rules(client, [])
        finally:
            await client.aclose()

    (categories, unavailable), empty = asyncio.run(rules())
    assert categories == {"a": "c1", "b": "c2", "zz": None}
    assert unavailable == {"b"}
    assert empty == ({}, set())


def test_a_large_load_is_stored_in_chunks_and_capped(catalog_redis) -> None:
    s = CFG.model_copy(update={"catalog_max_items": 2500})
    entries = [CatalogEntry(f"i{n}", f"c{n % 7}", n % 3 != 0) for n in range(3000)]
    refusals = store_catalog(catalog_redis, entries, s)
    assert refusals == [None] * 2500 + [CATALOG_FULL] * 500
    assert catalog_redis.hlen(ITEM_CATEGORY) == 2500
    assert catalog_redis.scard(ITEM_UNAVAILABLE) == len([n for n in range(2500) if n % 3 == 0])


def url_of(client) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes, url = start_redis_cluster(Settings(redis_url=None), tmp_path_factory.mktemp("catalog-cluster"))
    settings = Settings(kafka_bootstrap=None, redis_url=url, redis_cluster=True, catalog_max_items=3)
    yield settings
    for node in nodes:
        node.stop()


def test_a_cluster_stores_the_catalog_and_answers_item_rules(cluster) -> None:
    s = cluster
    client = redis_client(s)
    try:
        assert store_catalog(client, [CatalogEntry("a", "c1", False, "A"), CatalogEntry("b", "c2")], s) == [None, None]

        async def run():
            aclient = async_redis_client(s)
            try:
                refused = await store_catalog_async(
                    aclient,
                    [CatalogEntry("c", "c3", False), CatalogEntry("d", "c4"), CatalogEntry("a", None, True, None, 5)],
                    s,
                )
                return refused, await item_rules(aclient, ["a", "b", "c", "d"])
            finally:
                await aclient.aclose()

        refused, (categories, unavailable) = asyncio.run(run())
        assert refused == [None, CATALOG_FULL, None]
        assert categories == {"a": "c1", "b": "c2", "c": "c3", "d": None}
        assert unavailable == {"c"}
        assert json.loads(client.hget(ITEM_INFO, "a")) == {"title": "A", "price": 5.0}
    finally:
        client.close()


# ---- the state worker on the catalog topic -----------------------------------------------------------
CAP = 6


@pytest.fixture(scope="module")
def catalog_worker(settings, tmp_path_factory):
    """A state worker of its own: own topics, groups and Redis server (the cap counts the whole catalog)."""
    run_dir = tmp_path_factory.mktemp("catalog-worker")
    proc, url = start_redis(CFG, run_dir / "redis")
    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(
        update={
            "redis_url": url,
            "topic_events": f"events-{tag}",
            "topic_catalog": f"catalog-{tag}",
            "topic_dead_letters": f"dlq-{tag}",
            "state_group": f"state-{tag}",
            "catalog_max_items": CAP,
        }
    )
    ensure_topics(s)
    stack = Stack(s, run_dir=run_dir / "run")
    stack.start_worker("state")
    client = redis_client(s)
    producer = EventProducer(s)
    try:
        stack.wait_ready("state")
        yield s, client, producer
    finally:
        producer.close()
        client.close()
        stack.stop()
        proc.stop()


def send(producer: EventProducer, s: Settings, value: bytes, item: str | None = None) -> None:
    """An upsert keyed by its item (one item's upserts stay in order on one partition)."""
    producer.send_raw(value, key=item.encode() if item else None, topic=s.topic_catalog)


class Letters:
    """Reads the worker's own dead-letter topic from the start; reasons by the record's value."""

    def __init__(self, s: Settings) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None, enable_auto_commit=False)
        parts = [
            TopicPartition(s.topic_dead_letters, p)
            for p in sorted(self.consumer.partitions_for_topic(s.topic_dead_letters) or [])
        ]
        self.consumer.assign(parts)
        self.consumer.seek_to_beginning(*parts)
        self.by_value: dict[bytes, dict[str, str]] = {}

    def read(self) -> dict[bytes, dict[str, str]]:
        for recs in self.consumer.poll(timeout_ms=100).values():
            for rec in recs:
                self.by_value[rec.value] = {k: v.decode() for k, v in rec.headers}
        return self.by_value

    def close(self) -> None:
        self.consumer.close()


@pytest.mark.integration
def test_upserts_on_the_catalog_topic_reach_redis(catalog_worker) -> None:
    s, r, producer = catalog_worker
    send(
        producer, s, raw({"item_id": "w1", "category": "shoes", "available": False, "title": "Boot", "price": 20}), "w1"
    )
    producer.flush()
    wait_for(lambda: r.sismember(ITEM_UNAVAILABLE, "w1"), what="w1 marked unavailable")
    assert r.hget(ITEM_CATEGORY, "w1") == "shoes"
    assert json.loads(r.hget(ITEM_INFO, "w1")) == {"title": "Boot", "price": 20.0}
    send(producer, s, raw({"item_id": "w1", "available": True, "price": 18.5}), "w1")
    producer.flush()
    wait_for(lambda: not r.sismember(ITEM_UNAVAILABLE, "w1"), what="w1 available again")
    wait_for(lambda: json.loads(r.hget(ITEM_INFO, "w1")) == {"title": "Boot", "price": 18.5}, what="w1's new price")
    assert r.hget(ITEM_CATEGORY, "w1") == "shoes"


@pytest.mark.integration
def test_bad_upserts_are_dead_lettered_and_the_next_one_applied(catalog_worker) -> None:
    s, r, producer = catalog_worker
    bad = {
        b"not json {": "malformed_json",
        raw({"category": "c", "n": 1}): "missing_field",
        raw({"item_id": "w2", "available": "no"}): "wrong_type",
        raw({"item_id": "w2", "price": -3}): "bad_value",
        raw({"item_id": "w2", "category": "c" * 65}): "bad_value",
    }
    for value in bad:
        send(producer, s, value, "w2")
    send(producer, s, raw({"item_id": "w2", "category": "hats"}), "w2")
    producer.flush()
    wait_for(lambda: r.hget(ITEM_CATEGORY, "w2") == "hats", what="the good upsert after the bad ones")
    assert not r.sismember(ITEM_UNAVAILABLE, "w2") and r.hget(ITEM_INFO, "w2") is None  # nothing of the bad ones
    letters = Letters(s)
    try:
        found = wait_for(lambda: bad.keys() <= letters.read().keys() and letters.by_value, what="every dead letter")
    finally:
        letters.close()
    for value, reason in bad.items():
        assert found[value]["rtrec.reason"] == reason, value
        assert found[value]["rtrec.source.topic"] == s.topic_catalog


@pytest.mark.integration
def test_a_new_item_in_a_full_catalog_is_refused_and_known_ones_still_update(catalog_worker) -> None:
    s, r, producer = catalog_worker
    fill = [f"fill{n}" for n in range(CAP)]
    try:
        # fill the catalog up to the cap beside the worker (the cap counts every item, however stored)
        have = max(r.hlen(ITEM_CATEGORY), r.scard(ITEM_UNAVAILABLE), r.hlen(ITEM_INFO))
        store_catalog(r, [CatalogEntry(item, "filler") for item in fill[: CAP - have]], s)
        assert max(r.hlen(ITEM_CATEGORY), r.scard(ITEM_UNAVAILABLE), r.hlen(ITEM_INFO)) == CAP
        known = r.hkeys(ITEM_CATEGORY)[0]
        extra = raw({"item_id": "w-extra", "category": "new"})
        send(producer, s, extra, "w-extra")
        send(producer, s, raw({"item_id": known, "category": "updated", "available": False}), known)
        producer.flush()
        wait_for(lambda: r.hget(ITEM_CATEGORY, known) == "updated", what="the known item updated")
        assert r.sismember(ITEM_UNAVAILABLE, known)
        letters = Letters(s)
        try:
            found = wait_for(lambda: letters.read().get(extra), what="the refused upsert's dead letter")
        finally:
            letters.close()
        assert found["rtrec.reason"] == "catalog_full"
        assert "RTREC_CATALOG_MAX_ITEMS" in found["rtrec.detail"]
        assert r.hget(ITEM_CATEGORY, "w-extra") is None
        assert max(r.hlen(ITEM_CATEGORY), r.scard(ITEM_UNAVAILABLE), r.hlen(ITEM_INFO)) == CAP
    finally:
        r.hdel(ITEM_CATEGORY, *fill)
        r.srem(ITEM_UNAVAILABLE, *fill)


def test_prices_stay_finite_numbers() -> None:
    entry = parse_catalog_record(raw({"item_id": "i", "price": 10**30}), CFG)
    assert entry.price is not None and math.isfinite(entry.price)


@pytest.mark.integration
def test_the_catalog_command_stores_a_file_and_reports_refusals(catalog_worker, tmp_path) -> None:
    s, r, _ = catalog_worker
    path = tmp_path / "items.csv"
    path.write_text("item_id,category,available,title,price\ncli1,a,yes,One,1\ncli2,b,no,,\ncli3,,false,,2.5\n")
    items = ["cli1", "cli2", "cli3"]
    env = {**stack_env(s), "RTREC_CATALOG_MAX_ITEMS": "1000"}
    try:
        done = run_cli(["catalog", str(path)], env=env)
        assert done.returncode == 0, done.stderr
        assert "loaded 3 items (2 unavailable)" in done.stdout
        assert r.hmget(ITEM_CATEGORY, items) == ["a", "b", None]
        assert r.smismember(ITEM_UNAVAILABLE, items) == [0, 1, 1]
        assert json.loads(r.hget(ITEM_INFO, "cli3")) == {"price": 2.5}
        path.write_text("item_id,category\ncli1,c\ncli-new,d\n")
        full = run_cli(["catalog", str(path)], env={**env, "RTREC_CATALOG_MAX_ITEMS": "1"})
        assert full.returncode == 1
        assert "loaded 1 items (0 unavailable)" in full.stdout
        assert "1 new items refused" in full.stderr and "RTREC_CATALOG_MAX_ITEMS=1" in full.stderr
        assert r.hget(ITEM_CATEGORY, "cli1") == "c" and r.hget(ITEM_CATEGORY, "cli-new") is None
    finally:
        r.hdel(ITEM_CATEGORY, *items)
        r.srem(ITEM_UNAVAILABLE, *items)
        r.hdel(ITEM_INFO, *items)


@pytest.mark.parametrize("field", ["category", "title"])
def test_a_lone_surrogate_is_refused_at_validation_not_by_redis(field):
    """Valid JSON (an escape) that UTF-8 cannot carry: dead-lettered with its reason, never a store error."""
    raw = ('{"item_id": "i1", "' + field + '": "x\\ud800"}').encode()
    with pytest.raises(InvalidEvent) as refused:
        parse_catalog_record(raw, Settings())
    assert refused.value.reason == "bad_value" and field in str(refused.value)
