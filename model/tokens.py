"""A user's history as a token sequence, and batches of them for the model.

Layout ``item`` (default): ``BOS item1 ... itemN`` (types dropped; measured better,
at half the tokens). Layout ``item_type``: ``BOS item1 type1 item2 type2 ... itemN typeN``;
the next item is predicted at each type token, so the model knows what the user did
with an item before guessing the next one (kept for the measured comparison).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rtrec.model.vocab import BOS, PAD, TYPE_TOKENS, ItemVocab

History = Sequence[tuple[str, str]]  # (item_id, event type), oldest first


def encode(history: History, vocab: ItemVocab, layout: str, max_events: int, grow: bool = False) -> list[int]:
    """Token ids for the last `max_events` events; `grow` assigns rows to new items (training)."""
    lookup = vocab.add if grow else vocab.token
    ids = [BOS]
    for item, etype in list(history)[-max_events:] if max_events else []:
        ids.append(lookup(item))
        if layout == "item_type":
            ids.append(TYPE_TOKENS[etype])
    return ids


def item_labels(ids: list[int], vocab: ItemVocab) -> list[int]:
    """Causal-LM labels: only assigned item tokens are targets (-100 elsewhere)."""
    items = vocab.item_token_range()
    return [t if t in items else -100 for t in ids]


def left_padded(seqs: list[list[int]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left padding, attention mask and position ids that start at 0 for every row.

    Explicit position ids keep a padded row's positions identical to the
    unpadded sequence, so results do not depend on who else is in the batch.
    """
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def right_padded(
    seqs: list[list[int]], labels: list[list[int]] | None = None, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Right padding for training (positions then need no adjustment)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    out_labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
        if labels is not None:
            out_labels[row, : len(s)] = torch.tensor(labels[row], dtype=torch.long)
    batch = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    if labels is not None:
        batch["labels"] = out_labels.to(device)
    return batch
