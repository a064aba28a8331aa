"""Settings in sections: one flat object, the same RTREC_* names, and a reference page that cannot drift."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from rtrec.stream import settings as settings_module
from rtrec.stream.settings import (
    TABLE_BEGIN,
    TABLE_END,
    KafkaSettings,
    Settings,
    env_name,
    get_settings,
    settings_markdown,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
ENV_IN_TABLE_ROW = re.compile(r"^\| `(RTREC_[A-Z0-9_]+)` \|", re.MULTILINE)
MEASUREMENT = re.compile(r"measured|ML-\d|HR@|\b0\.\d{3}\b", re.IGNORECASE)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RTREC_"):
            monkeypatch.delenv(name)


def test_docs_hold_the_generated_tables() -> None:
    text = DOC.read_text(encoding="utf-8")
    start, end = text.index(TABLE_BEGIN), text.index(TABLE_END) + len(TABLE_END)
    assert text[start:end] == settings_markdown(), (
        "docs/configuration.md is stale: python -m rtrec.stream.settings --write docs/configuration.md"
    )


def test_docs_list_every_variable_once() -> None:
    listed = ENV_IN_TABLE_ROW.findall(DOC.read_text(encoding="utf-8"))
    assert sorted(listed) == sorted(env_name(name) for name in Settings.model_fields)


def test_sections_partition_the_fields() -> None:
    sections = Settings.sections()
    every = [name for names in sections.values() for name in names]
    assert all(sections.values()), "an empty section"
    assert len(every) == len(set(every)), "a field in two sections"
    assert set(every) == set(Settings.model_fields)
    assert "kafka_bootstrap" in sections["kafka"] and "redis_url" in sections["redis"]
    assert "redis_password" in sections["security"] and "train_seed" in sections["train"]


def test_descriptions_are_one_line_without_measurements() -> None:
    for name, info in Settings.model_fields.items():
        assert info.description, f"{name} has no description"
        assert "\n" not in info.description and len(info.description) <= 120, name
        assert not MEASUREMENT.search(info.description), f"{name}: measurements belong in docs/configuration.md"


def test_environment_names_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTREC_KAFKA_BOOTSTRAP", "kafka:9092")
    monkeypatch.setenv("RTREC_REDIS_URL", "rediss://cache:6380/1")
    monkeypatch.setenv("RTREC_REDIS_PASSWORD", "s3cret")
    monkeypatch.setenv("RTREC_PARTITIONS", "8")
    monkeypatch.setenv("RTREC_SERVE_BLEND_WEIGHT", "0")
    monkeypatch.setenv("RTREC_MODEL_FAMILY", "qwen2")
    monkeypatch.setenv("RTREC_DRIFT_ENABLED", "false")
    monkeypatch.setenv("RTREC_USER_TTL_DAYS", "30")
    s = Settings()
    assert (s.kafka_bootstrap, s.redis_url, s.partitions, s.serve_blend_weight) == (
        "kafka:9092",
        "rediss://cache:6380/1",
        8,
        0.0,
    )
    assert s.redis_password is not None and s.redis_password.get_secret_value() == "s3cret"
    assert (s.model_family, s.drift_enabled, s.user_ttl_days) == ("qwen2", False, 30.0)
    assert s.model_fields_set >= {"kafka_bootstrap", "partitions", "drift_enabled"}
    assert KafkaSettings().partitions == 8  # a section alone reads the same names


def test_defaults_and_flat_attributes() -> None:
    s = Settings()
    assert (s.kafka_bootstrap, s.redis_url, s.partitions, s.state_batch_max, s.dedupe_window) == (
        None,
        None,
        4,
        2000,
        256,
    )
    assert s.run_dir == Path(".rtrec/run") and s.checkpoint_dir == Path(".rtrec/checkpoints")
    assert s.type_weights() == {"browse": 1.0, "click": 2.0, "purchase": 4.0}
    copy = s.model_copy(update={"partitions": 9, "redis_url": "redis://h:1"})
    assert (copy.partitions, copy.redis_url, s.partitions) == (9, "redis://h:1", 4)
    get_settings.cache_clear()
    try:
        assert isinstance(get_settings(), Settings) and get_settings() is get_settings()
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    ("env", "value", "error_type"),
    [
        ("RTREC_REDIS_URL", "http://cache:6379", "value_error"),
        ("RTREC_PARTITIONS", "0", "greater_than_equal"),
        ("RTREC_PARTITIONS", "abc", "int_parsing"),
        ("RTREC_CONNECT_TIMEOUT_S", "-1", "greater_than"),
        ("RTREC_DEDUPE_WINDOW", "100001", "less_than_equal"),
        ("RTREC_TRAIN_EMBEDDING_DROPOUT", "1", "less_than"),
        ("RTREC_KAFKA_SECURITY_PROTOCOL", "TLS", "literal_error"),
        ("RTREC_DRIFT_ENABLED", "maybe", "bool_parsing"),
    ],
)
def test_bad_values_are_refused_by_name(monkeypatch: pytest.MonkeyPatch, env: str, value: str, error_type: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    [error] = caught.value.errors()
    assert env_name(str(error["loc"][0])) == env and error["type"] == error_type


def test_bad_redis_url_says_what_a_redis_url_is() -> None:
    with pytest.raises(ValidationError, match="not a Redis URL"):
        Settings(redis_url="localhost:6379")


def test_command_line_prints_sections_and_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert settings_module.main(["--sections"]) == 0
    assert capsys.readouterr().out.startswith("kafka: kafka_bootstrap, ")
    assert settings_module.main(["--markdown"]) == 0
    assert capsys.readouterr().out.strip() == settings_markdown()
