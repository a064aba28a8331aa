"""A worker's start-up waits for a broker and a Redis that come up late (docker compose starts them together).

Real servers: the embedded Tansu broker and Valkey, started a few seconds after the worker began to wait,
on ports chosen beforehand.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
from kafka.admin import KafkaAdminClient

from rtrec.stream.connections import async_redis_client
from rtrec.stream.embedded import free_port, start_redis, start_tansu
from rtrec.stream.settings import Settings
from rtrec.stream.topics import ensure_topics, topic_names
from rtrec.workers.startup import StartupTimeout, wait_for_services

pytestmark = pytest.mark.integration

LATE_S = 3.0


def _start_late(start, delay_s: float, started: list) -> threading.Thread:
    def run():
        time.sleep(delay_s)
        started.append(start())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_startup_timeout_setting_has_a_generous_default(monkeypatch):
    monkeypatch.delenv("RTREC_STARTUP_TIMEOUT_S", raising=False)
    assert Settings().startup_timeout_s == 120
    monkeypatch.setenv("RTREC_STARTUP_TIMEOUT_S", "7.5")
    assert Settings().startup_timeout_s == 7.5


def test_ensure_topics_waits_for_a_broker_that_starts_late(tmp_path):
    port = free_port()
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{port}", redis_url=None, partitions=2, connect_timeout_s=1)
    started: list = []
    thread = _start_late(lambda: start_tansu(tmp_path, port=port), LATE_S, started)
    t0 = time.monotonic()
    try:
        ensure_topics(settings, timeout_s=60)
        waited = time.monotonic() - t0
        thread.join(30)
        assert waited >= LATE_S - 0.5, "ensure_topics returned before the broker existed"
        admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        try:
            assert set(topic_names(settings)) <= set(admin.list_topics())
        finally:
            admin.close()
    finally:
        thread.join(30)
        for proc, _ in started:
            proc.stop()


def test_wait_for_services_waits_for_late_broker_and_redis(tmp_path):
    kport, rport = free_port(), free_port()
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{kport}",
        redis_url=f"redis://127.0.0.1:{rport}/0",
        partitions=1,
        connect_timeout_s=1,
        startup_timeout_s=60,
    )
    (tmp_path / "k").mkdir()
    (tmp_path / "r").mkdir()
    started: list = []
    threads = [
        _start_late(lambda: start_tansu(tmp_path / "k", port=kport), LATE_S, started),
        _start_late(lambda: start_redis(settings, tmp_path / "r", port=rport), LATE_S + 1, started),
    ]

    async def start_worker():
        client = async_redis_client(settings)
        try:
            await wait_for_services(settings, client)
            return await client.ping()
        finally:
            await client.aclose()

    try:
        t0 = time.monotonic()
        assert asyncio.run(start_worker()) is True
        assert time.monotonic() - t0 >= LATE_S
    finally:
        for t in threads:
            t.join(30)
        for proc, _ in started:
            proc.stop()


def test_wait_for_services_gives_up_at_the_deadline_with_one_line():
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        connect_timeout_s=0.5,
        startup_timeout_s=2,
    )

    async def start_worker():
        client = async_redis_client(settings)
        try:
            await wait_for_services(settings, client, topics=False)
        finally:
            await client.aclose()

    t0 = time.monotonic()
    with pytest.raises(StartupTimeout, match=r"Redis at redis://127\.0\.0\.1:.* did not answer within RTREC_STARTUP"):
        asyncio.run(start_worker())
    assert time.monotonic() - t0 < 10
    t0 = time.monotonic()
    topics_failed = r"could not create rtrec.s topics on the broker at 127\.0\.0\.1:.* RTREC_STARTUP_TIMEOUT_S"
    with pytest.raises(StartupTimeout, match=topics_failed):
        asyncio.run(wait_for_services(settings))
    assert time.monotonic() - t0 < 15


def test_a_worker_announcing_itself_waits_out_a_stalled_redis(tmp_path):
    """Under load a start-up write can time out: the worker retries it instead of crashing (seen in CI)."""
    import signal

    from rtrec.stream.connections import redis_client
    from rtrec.stream.keys import workers_ready
    from rtrec.workers.lifecycle import announce_ready

    server, url = start_redis(Settings(), tmp_path)
    s = Settings(redis_url=url, redis_timeout_s=0.3)
    try:
        server.proc.send_signal(signal.SIGSTOP)  # Redis accepts connections but does not answer
        threading.Timer(1.5, server.proc.send_signal, args=(signal.SIGCONT,)).start()

        async def announce() -> None:
            client = async_redis_client(s)
            await announce_ready(client, "state", timeout_s=30)
            await client.aclose()

        asyncio.run(announce())
        assert redis_client(s).sismember(workers_ready("state"), str(os.getpid()))
    finally:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()
