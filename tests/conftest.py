"""Session fixtures: one real stack (Tansu broker, Redis server, state + recommendation workers)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from rtrec.stream.connections import redis_client
from rtrec.stream.embedded import start_redis
from rtrec.stream.producer import EventProducer
from rtrec.stream.rec_client import RecClient
from rtrec.stream.settings import Settings
from rtrec.workers.stack import Stack


def _settings(**kw) -> Settings:
    # explicit None: the tests start their own servers even if RTREC_* points elsewhere
    return Settings(kafka_bootstrap=None, redis_url=None, **kw)


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    # an empty checkpoint directory: these workers serve the blending baseline
    run_dir = tmp_path_factory.mktemp("stack")
    st = Stack(_settings(checkpoint_dir=run_dir / "no-checkpoints"), run_dir=run_dir)
    try:
        st.start(state_workers=1, recommend_workers=1)
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="session")
def settings(stack: Stack) -> Settings:
    return stack.settings


@pytest.fixture(scope="session")
def redis(settings: Settings):
    client = redis_client(settings)
    yield client
    client.close()


@pytest.fixture(scope="session")
def producer(settings: Settings):
    with EventProducer(settings) as p:
        yield p


@pytest.fixture(scope="session")
def rec_client(settings: Settings):
    with RecClient(settings) as c:
        yield c


@pytest.fixture(scope="session")
def redis_only(tmp_path_factory):
    """A Redis server of its own, for store-level tests that need no broker."""
    s = _settings()
    proc, url = start_redis(s, tmp_path_factory.mktemp("redis"))
    client = redis_client(s.model_copy(update={"redis_url": url}))
    yield client
    client.close()
    proc.stop()


@pytest.fixture
def uid() -> Callable[[str], str]:
    """Unique ids per test, so tests sharing the stack never see each other's users."""
    tag = uuid.uuid4().hex[:8]
    return lambda name: f"{name}-{tag}"
