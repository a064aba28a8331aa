"""Building the transformer from a config, and scoring the next item with it.

Two families, both plain Hugging Face classes built from a config (no
pretrained weights): a decoder-only ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``
and an encoder-decoder ``T5ForConditionalGeneration`` in the text-to-text form
(input: the typed history, output: the next item token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from rtrec.model.tokens import left_padded, right_padded
from rtrec.model.vocab import BOS, EOS, PAD, ItemVocab
from rtrec.stream.settings import Settings

DECODER_FAMILIES = ("llama", "qwen2")


def build_model(settings: Settings, vocab: ItemVocab) -> PreTrainedModel:
    """A freshly initialised model sized by the settings and the vocabulary."""
    s = settings
    positions = 2 * s.model_max_events + 8
    if s.model_family == "t5":
        config = T5Config(
            vocab_size=vocab.size,
            d_model=s.model_hidden,
            d_kv=s.model_hidden // s.model_heads,
            d_ff=s.model_intermediate,
            num_layers=s.model_layers,
            num_decoder_layers=1,
            num_heads=s.model_heads,
            dropout_rate=s.model_dropout,
            feed_forward_proj="relu",
            pad_token_id=PAD,
            eos_token_id=EOS,
            decoder_start_token_id=PAD,
            tie_word_embeddings=True,
        )
        return T5ForConditionalGeneration(config)
    common = dict(
        vocab_size=vocab.size,
        hidden_size=s.model_hidden,
        intermediate_size=s.model_intermediate,
        num_hidden_layers=s.model_layers,
        num_attention_heads=s.model_heads,
        num_key_value_heads=s.model_heads,
        max_position_embeddings=positions,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=True,
        attention_dropout=s.model_dropout,
        head_dim=s.model_hidden // s.model_heads,
    )
    if s.model_family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    return LlamaForCausalLM(LlamaConfig(**common))


def resize_for(model: PreTrainedModel, vocab: ItemVocab) -> bool:
    """Give the model one embedding row per vocabulary row after `vocab.grow()`.

    Rows keep their ids (the layout only ever appends), so every existing item
    keeps its learned embedding; new rows start from the mean embedding.
    """
    current = model.get_input_embeddings().num_embeddings
    if current >= vocab.size:
        return False
    model.resize_token_embeddings(vocab.size, mean_resizing=True)
    return True


def is_encoder_decoder(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def next_item_logits(model: PreTrainedModel, seqs: list[list[int]], device: torch.device | str) -> torch.Tensor:
    """Logits of the next token after each sequence: one forward pass for the batch."""
    if is_encoder_decoder(model):
        batch = right_padded(seqs, device=device)
        start = torch.full((len(seqs), 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=start)
        return out.logits[:, 0, :].float()
    batch = left_padded(seqs, device=device)
    out = model(**batch, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1, :].float()


def top_items(
    logits: torch.Tensor,
    vocab: ItemVocab,
    exclude: Sequence[set[str] | frozenset[str]],
    k: int,
    allow: Sequence[frozenset[str] | None] | None = None,
) -> list[list[tuple[str, float]]]:
    """Softmax over recommendable item tokens only; excluded items removed; top-k per row.

    A row with an `allow` set ranks only those items (a re-ranking's candidates): the softmax is
    then over them alone, as vLLM's ``allowed_token_ids`` makes it.
    """
    items = vocab.item_token_range()
    scores = logits[:, items.start : items.stop]
    if scores.shape[1] == 0:
        return [[] for _ in range(logits.shape[0])]
    scores = scores.clone()
    for row, allowed in enumerate(allow or ()):
        if allowed is not None:
            keep = [vocab.token(i) - items.start for i in allowed if i in vocab]
            masked = torch.full_like(scores[row], float("-inf"))
            if keep:
                masked[keep] = scores[row, keep]
            scores[row] = masked
    for row, excluded in enumerate(exclude):
        cols = [vocab.token(i) - items.start for i in excluded if i in vocab]
        if cols:
            scores[row, cols] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    kk = min(k, scores.shape[1])
    values, idx = torch.topk(probs, kk, dim=-1)
    out = []
    for row in range(logits.shape[0]):
        ranked = []
        for p, col in zip(values[row].tolist(), idx[row].tolist()):
            if p > 0:  # -inf (excluded) rows come out as 0 probability
                ranked.append((vocab.items[col], p))
        out.append(ranked)
    return out
