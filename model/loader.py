"""Choosing the recommender a worker serves: the generative model when a checkpoint exists."""

from __future__ import annotations

import logging
from pathlib import Path

from rtrec.model.blending import BlendingRecommender
from rtrec.model.checkpoint import latest_checkpoint
from rtrec.model.recommender import GenerativeRecommender, Recommender
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import SeqEntry, UserState

log = logging.getLogger(__name__)


def load_recommender(settings: Settings) -> Recommender:
    """Generative model on the configured backend, or the blending baseline (logged why)."""
    if settings.recommender == "blend":
        return BlendingRecommender(settings)
    path = latest_checkpoint(settings.checkpoint_dir)
    if path is None:
        log.info("no checkpoint under %s: serving the blending baseline", settings.checkpoint_dir)
        return BlendingRecommender(settings)
    generator = load_generator(settings, path)
    log.info("serving %s on %s (%s)", generator.version, generator.device, settings.backend)
    return generator


def load_generator(settings: Settings, path: Path) -> GenerativeRecommender:
    """A verified checkpoint on the configured backend (raises CheckpointError if it must be refused)."""
    if settings.backend == "vllm":
        from rtrec.model.vllm_backend import VllmGenerator

        vllm_generator = VllmGenerator.from_path(path, device=settings.device)
        vllm_generator.max_events = min(vllm_generator.max_events, settings.serve_max_events)
        return vllm_generator
    from rtrec.model.generator import TorchGenerator

    generator = TorchGenerator.from_path(path, device=settings.device, max_events=settings.serve_max_events)
    if generator.device.type == "cpu" and settings.serve_torch_threads:
        import torch

        torch.set_num_threads(settings.serve_torch_threads)
    return generator


def warm_up(recommender: GenerativeRecommender) -> None:
    """One small batch through the model, so the first real batch after a swap is not the slow one."""
    items = recommender.vocab.items[:3]
    state = UserState("warm-up", sequence=[SeqEntry(item, "click", 0, f"w{n}") for n, item in enumerate(items)])
    recommender.recommend_batch([state], 10)
