"""Secrets stay out of logs and reprs; a control message cannot make a worker load a file outside its store."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from stream.settings import Settings
from workers.model_watch import ModelWatcher


def test_secrets_are_not_in_the_settings_repr_or_its_json():
    s = Settings(redis_password="redis-s3cret", kafka_sasl_password="kafka-s3cret", kafka_sasl_username="svc")
    for text in (repr(s), str(s), s.model_dump_json()):
        assert "redis-s3cret" not in text and "kafka-s3cret" not in text
    assert s.redis_password.get_secret_value() == "redis-s3cret"  # still usable where it is needed


class FakeWorker:  # only the attribute the watcher swaps; the loading path is real
    class recommender:
        version = "blend-v1"


@pytest.mark.integration
@pytest.mark.parametrize("version", ["../../etc", "/etc/passwd", ".tmp-x", "no-such-version"])
def test_a_model_update_naming_a_path_outside_the_store_is_refused(settings, tmp_path, caplog, version):
    from stream.connections import async_redis_client

    s = settings.model_copy(update={"checkpoint_dir": tmp_path / "store"})
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "CURRENT").write_text(version)  # even a CURRENT pointing out is not followed blindly

    async def go():
        redis = async_redis_client(s)
        try:
            watcher = ModelWatcher(s, FakeWorker(), redis, "rt:stats:security-test")
            ok = await watcher.swap_to(version)
            return ok, watcher.refused
        finally:
            await redis.aclose()

    with caplog.at_level(logging.ERROR):
        ok, refused = asyncio.run(go())
    assert ok is False and refused == [version]
    assert FakeWorker.recommender.version == "blend-v1"  # still serving what it served
    assert "refused model" in caplog.text


def test_a_malformed_model_update_message_is_refused_not_fatal(settings, tmp_path):
    from stream.connections import async_redis_client

    s = settings.model_copy(update={"checkpoint_dir": tmp_path})

    async def go():
        redis = async_redis_client(s)
        try:
            watcher = ModelWatcher(s, FakeWorker(), redis, "rt:stats:security-test")
            for raw in (b"not json", json.dumps({"version": 1}).encode(), b"\xff\xfe"):
                await watcher.on_message(raw)
            return watcher.refused
        finally:
            await redis.aclose()

    assert asyncio.run(go()) == ["?", "?", "?"]
