"""What the benches share to put load on a running stack and see it handled.

A default-size model (untrained: speed does not depend on training), synthetic user histories
produced through the stack, a thread that reads recommendation responses as they arrive (so each
is stamped on arrival, not when the sender has time), and waits with a deadline for answers and
for events applied by the state worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rtrec.stream.connections import redis_client
from rtrec.stream.producer import EventProducer
from rtrec.stream.rec_client import RecClient
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import StateStore
from rtrec.stream.synthetic import SyntheticConfig, generate_events
from rtrec.workers.stack import Stack

if TYPE_CHECKING:
    from rtrec.model.generator import TorchGenerator

N_ITEMS = 3000


def default_generator(settings: Settings) -> TorchGenerator:
    """The configured model family at its default size, over items i0..i2999, weights from a fixed seed."""
    import torch  # only the benches that serve a model load torch (ingest and memory do not)

    from rtrec.model.checkpoint import Checkpoint
    from rtrec.model.generator import TorchGenerator, resolve_device
    from rtrec.model.pipeline import model_meta
    from rtrec.model.sequence_model import build_model
    from rtrec.model.vocab import ItemVocab

    vocab = ItemVocab(capacity=settings.model_item_capacity, hash_buckets=settings.model_hash_buckets)
    for n in range(N_ITEMS):
        vocab.add(f"i{n}")
    torch.manual_seed(0)
    model = build_model(settings, vocab).eval()
    device = resolve_device(settings.device)
    manifest = {"version": "bench-untrained", "meta": model_meta(settings)}
    return TorchGenerator(
        Checkpoint(model.to(device), vocab, manifest, Path(".")), device, max_events=settings.serve_max_events
    )


def fill_histories(settings: Settings, config: SyntheticConfig) -> list[str]:
    """Produce synthetic events through the running stack, wait until Redis holds them; the user ids."""
    events = generate_events(config)
    with EventProducer(settings) as producer:
        producer.send_many(events)
    redis = redis_client(settings)
    while StateStore(settings).stats(redis).get("applied", 0) < len(events):
        time.sleep(0.05)
    redis.close()
    return sorted({e["user_id"] for e in events})


def read_responses_until(client: RecClient, stop: threading.Event) -> None:
    """Poll responses on a thread of its own, so each is stamped as it arrives."""
    while not stop.is_set():
        client.poll(timeout_ms=20)


@contextmanager
def responses_read_in_background(client: RecClient) -> Iterator[None]:
    """While inside, a thread of its own polls `client`'s responses (`read_responses_until`)."""
    stop = threading.Event()
    reader = threading.Thread(target=read_responses_until, args=(client, stop), daemon=True)
    reader.start()
    try:
        yield
    finally:
        stop.set()
        reader.join()


def wait_for_answers(client: RecClient, expected: int, timeout_s: float = 60) -> None:
    """Until `client` holds `expected` responses or `timeout_s` passed (the caller counts what is missing)."""
    deadline = time.monotonic() + timeout_s
    while len(client.responses) < expected and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_applied(store: StateStore, client, target: int, stack: Stack | None = None, timeout_s: float = 300) -> float:
    """Until the state worker applied `target` events (``applied`` in the stats); the time it did (monotonic).

    A worker of `stack` that exited fails the wait at once, with the tail of its log.
    """
    deadline = time.monotonic() + timeout_s
    while (applied := store.stats(client).get("applied", 0)) < target:
        dead = [w for w in stack.workers if not w.alive()] if stack is not None else []
        if dead:
            raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {applied} of {target} events applied after {timeout_s:g}s")
        time.sleep(0.01)
    return time.monotonic()
