"""Incremental fine-tuning of the production checkpoint on a recent window, and the promotion gate.

The trainer hands in the window's events, each window user's older history
(from Redis, events before the window) and a replay sample of other users'
histories (so the model does not forget what the window does not show). The
newest event of each window user is held out: the candidate never trains on
it, and candidate and current model are both scored on it before promotion.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rtrec.model.checkpoint import Checkpoint, load_checkpoint
from rtrec.model.histories import newest, user_histories
from rtrec.model.sequence_model import build_model, resize_for
from rtrec.model.tokens import History
from rtrec.model.train import TrainReport, ValidationCase, evaluate_cases, seed_everything, train_model, vocab_for
from rtrec.stream.settings import Settings


@dataclass
class FineTuneData:
    train: list[History]
    holdout: list[ValidationCase]
    window_users: int
    window_events: int
    items: set[str] = field(default_factory=set)


def build_data(
    window: Sequence[dict[str, Any]],
    context: Mapping[str, History],
    replay: Sequence[History],
    settings: Settings,
    max_history: int | None = None,
) -> FineTuneData:
    """Training histories and held-out cases from a window (time-ordered events).

    A window user with at least two events (window + context) gives one
    held-out case: their newest event, predicted from everything before it.
    With `max_history` (the trainer passes `finetune_history_events`) each
    history is cut to its newest that many events, a window user's and a
    replayed one's alike: serving reads a short recent history, and a
    fine-tune's cost grows with the tokens it trains on.
    """
    per_user = user_histories(window)
    train: list[History] = []
    holdout: list[ValidationCase] = []
    items: set[str] = set()
    for user, recent in per_user.items():
        full = _newest(list(context.get(user, ())) + recent, max_history)
        items.update(i for i, _ in full)
        if len(full) >= settings.finetune_min_history:
            holdout.append(ValidationCase(full[:-1], full[-1][0], frozenset()))
            full = full[:-1]
        if len(full) >= 2:
            train.append(full)
    for hist in replay:
        if len(hist) >= 2:
            kept = _newest(list(hist), max_history)
            train.append(kept)
            items.update(i for i, _ in kept)
    return FineTuneData(train, holdout, len(per_user), len(window), items)


def _newest(history: History, keep: int | None) -> History:
    return newest(history, keep) if keep else history


def _tuning_settings(settings: Settings, layout: str, max_events: int) -> Settings:
    return settings.model_copy(
        update={
            "model_layout": layout,
            "model_max_events": max_events,
            "train_lr": settings.finetune_lr,
            "train_epochs": settings.finetune_epochs,
            "train_warmup_steps": 0,
        }
    )


def fine_tune(
    current: Path | Checkpoint | None,
    data: FineTuneData,
    settings: Settings,
    device: torch.device,
    progress: bool = False,
) -> tuple[Checkpoint, TrainReport]:
    """Continue training a fresh copy of `current` (or a new model when there is none) on `data`.

    New items take free vocabulary rows; when they would overflow the reserved
    capacity, the vocabulary grows and the embeddings are resized once here.
    """
    seed_everything(settings.train_seed)
    if current is None:
        vocab = vocab_for(data.train, settings)
        model = build_model(settings, vocab)
        s = settings.model_copy(update={"train_epochs": settings.finetune_first_epochs})
        meta = {
            "family": settings.model_family,
            "layout": settings.model_layout,
            "max_events": settings.model_max_events,
        }
        parent = None
    else:
        if isinstance(current, Checkpoint):  # in memory (stream eval): train a copy, keep the original
            ck = Checkpoint(copy.deepcopy(current.model), copy.deepcopy(current.vocab), current.manifest, current.path)
        else:
            ck = load_checkpoint(current, device="cpu")
        model, vocab, meta, parent = ck.model, ck.vocab, dict(ck.manifest["meta"]), ck.version
        new_items = {i for i in data.items if i not in vocab}
        if vocab.grow(len(new_items)):
            resize_for(model, vocab)
        s = _tuning_settings(settings, ck.layout, ck.max_events)
    for hist in data.train:  # assign rows before training, so every new item is a target
        for item, _ in hist:
            vocab.add(item)
    report = train_model(model, vocab, data.train, s, device, progress=progress)
    model.to("cpu").eval()
    manifest = {"version": "candidate", "meta": meta, "parent": parent}
    return Checkpoint(model, vocab, manifest, Path(".")), report


def score(ck: Checkpoint, cases: Sequence[ValidationCase], device: torch.device) -> dict[str, float]:
    """HR@10 / NDCG@10 of a checkpoint on held-out cases (full ranking over its items)."""
    if not cases:
        return {"HR@10": 0.0, "NDCG@10": 0.0}
    ck.model.to(device)
    try:
        return evaluate_cases(ck.model, ck.vocab, cases, ck.layout, ck.max_events, device)
    finally:
        ck.model.to("cpu")


@dataclass
class GateResult:
    promote: bool
    reason: str
    candidate: dict[str, float]
    current: dict[str, float] | None


def gate(
    candidate: Checkpoint,
    current: Checkpoint | None,
    cases: Sequence[ValidationCase],
    tolerance: float,
    device: torch.device,
    min_cases: int = 1,
) -> GateResult:
    """Promote only if the candidate is not worse than the current model beyond `tolerance` (NDCG@10)."""
    cand = score(candidate, cases, device)
    if current is None:
        return GateResult(True, "first model", cand, None)
    if len(cases) < min_cases:
        return GateResult(False, f"only {len(cases)} held-out cases (< {min_cases}): nothing to judge by", cand, None)
    cur = score(current, cases, device)
    delta = cand["NDCG@10"] - cur["NDCG@10"]
    if delta < -tolerance:
        return GateResult(
            False,
            f"candidate NDCG@10 {cand['NDCG@10']:.4f} < current {cur['NDCG@10']:.4f} - tolerance {tolerance}",
            cand,
            cur,
        )
    return GateResult(
        True,
        f"candidate NDCG@10 {cand['NDCG@10']:.4f} vs current {cur['NDCG@10']:.4f} "
        f"(delta {delta:+.4f}, tolerance {tolerance})",
        cand,
        cur,
    )
