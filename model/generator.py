"""The generative recommender on transformers (CPU or CUDA): one forward pass per request batch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from rtrec.model.checkpoint import Checkpoint, load_checkpoint
from rtrec.model.recommender import GenerativeRecommender, Scored
from rtrec.model.sequence_model import next_item_logits, top_items
from rtrec.model.tokens import encode
from rtrec.stream.state_store import UserState


def resolve_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {preference!r} requested but CUDA is not available")
    return device


class TorchGenerator(GenerativeRecommender):
    """Recommender over a checkpoint: bf16 on GPU, fp32 on CPU, inference mode."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, max_events: int | None = None) -> None:
        self.checkpoint = checkpoint
        self.device = device
        self.version = checkpoint.version
        self.vocab = checkpoint.vocab
        # serving may read fewer events than training did: the cost per request is linear in it
        self.max_events = min(checkpoint.max_events, max_events or checkpoint.max_events)

    @classmethod
    def from_path(cls, path: Path, device: str = "auto", max_events: int | None = None) -> TorchGenerator:
        dev = resolve_device(device)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        return cls(load_checkpoint(path, device=dev, dtype=dtype), dev, max_events)

    def token_ids(self, state: UserState) -> list[int]:
        """The prompt for one user: their recent (item, type) events as tokens."""
        ck = self.checkpoint
        return encode([(e.item_id, e.type) for e in state.sequence], ck.vocab, ck.layout, self.max_events)

    def recommend_batch(self, states: Sequence[UserState], k: int) -> list[Scored]:
        if not states:
            return []
        with torch.inference_mode():
            logits = next_item_logits(self.checkpoint.model, [self.token_ids(s) for s in states], self.device)
            allow = [s.allow for s in states] if any(s.allow is not None for s in states) else None
            return top_items(logits, self.checkpoint.vocab, [s.exclude for s in states], k, allow)
