"""Redis key names: spelled once, in stream/keys.py, and never renamed (Redis already holds data under them)."""

from __future__ import annotations

import re
from pathlib import Path

from rtrec.stream import keys

ROOT = Path(__file__).resolve().parents[1]
KEY_LITERAL = re.compile(r"""["']\{?rt:""")  # "rt:...", f"rt:...", "{rt:...}": docstrings' ``rt:...`` are fine


def test_no_module_but_the_keys_module_spells_a_key() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for package in ("stream", "workers", "model")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "stream" / "keys.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if KEY_LITERAL.search(line)
    ]
    assert found == []


def test_key_names_stay_as_stored() -> None:
    assert (
        keys.PREFIX,
        keys.LOGS,
        keys.INGEST_LATENCY,
        keys.ITEM_CATEGORY,
        keys.QUALITY,
        keys.MODEL_SERVING,
        keys.RECOMMEND_STATS,
        keys.TRAINER_STATS,
    ) == (
        "rt",
        "rt:logs",
        "rt:lat:ingest",
        "rt:item:category",
        "rt:quality",
        "rt:model:serving",
        "rt:stats:recommend",
        "rt:stats:trainer",
    )
    assert keys.user_key("rt", "u1", "h") == "rt:u:u1:h"
    assert keys.user_key(keys.bucket_prefix("rt", 7), "u1", "seq") == "rt:{b7}:u:u1:seq"
    assert keys.trending("rt") == "rt:pop"
    assert keys.staging_prefix("rt") == "rt:rebuild" and keys.rebuild_lock("rt") == "rt:rebuild:lock"
    assert keys.workers_ready("state") == "rt:workers:state"
    assert keys.dead_letter_counts() == "rt:dlq"
    assert keys.dead_letter_marker("rt:dlq", "events", 2, 41) == "{rt:dlq}:seen:events:2:41"


def test_a_bucket_tag_is_what_bucket_prefix_appends() -> None:
    assert keys.BUCKET_TAG.fullmatch(keys.bucket_prefix("rt", 12)[len("rt") :])
    assert not keys.BUCKET_TAG.fullmatch(":rebuild")
