"""Next-item training: full softmax over the vocabulary, AdamW, early stopping on a held-out item.

Deterministic for a seed on CPU. On a GPU the forward/backward runs under
bf16 autocast (mixed precision). Progress is a tqdm bar per epoch, a summary line every
`summary_every` epochs (about 8 per run) and one at the end; the loss and
validation curves are returned (and plotted by the CLI).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

from rtrec.model.sequence_model import is_encoder_decoder, next_item_logits, top_items
from rtrec.model.tokens import History, encode, item_labels, right_padded
from rtrec.model.vocab import ItemVocab
from rtrec.stream.settings import Settings


@dataclass
class ValidationCase:
    history: History
    target: str
    exclude: frozenset[str]


@dataclass
class TrainReport:
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    best_epoch: int = 0
    best: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    examples: int = 0
    refit_seconds: float = 0.0  # the refit on all training events, when there was one

    def seconds_to_best_epoch(self) -> float:
        """Training time until the end of the best epoch (with its validation): what early stopping's patience
        adds after it is not counted. The whole run's time without a best epoch."""
        if 1 <= self.best_epoch <= len(self.history):
            return self.history[self.best_epoch - 1]["seconds"]
        return self.seconds


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def vocab_for(histories: Iterable[History], settings: Settings) -> ItemVocab:
    """A vocabulary holding every item seen, with at least 25 % spare rows for the stream."""
    items: dict[str, None] = {}
    for hist in histories:
        for item, _ in hist:
            items.setdefault(item, None)
    capacity = max(settings.model_item_capacity, math.ceil(len(items) * 1.25))
    vocab = ItemVocab(capacity=capacity, hash_buckets=settings.model_hash_buckets)
    for item in items:
        vocab.add(item)
    return vocab


def decoder_examples(histories: Iterable[History], vocab: ItemVocab, layout: str, max_events: int) -> list[list[int]]:
    """Each history cut into windows of `max_events` (newest first); every item is a target."""
    out = []
    for hist in histories:
        for end in range(len(hist), 1, -max_events):
            out.append(encode(hist[max(0, end - max_events) : end], vocab, layout, max_events, grow=True))
    return out


def t5_examples(
    histories: Sequence[History], vocab: ItemVocab, layout: str, max_events: int, per_sequence: int, rng: random.Random
) -> list[tuple[list[int], int]]:
    """(history prefix, next item) pairs: `per_sequence` random cut points per history."""
    out = []
    for hist in histories:
        if len(hist) < 2:
            continue
        cuts = rng.sample(range(1, len(hist)), min(per_sequence, len(hist) - 1))
        for j in cuts:
            target = vocab.add(hist[j][0])
            if target in vocab.item_token_range():
                out.append((encode(hist[max(0, j - max_events) : j], vocab, layout, max_events, grow=True), target))
    return out


def evaluate_cases(
    model: PreTrainedModel,
    vocab: ItemVocab,
    cases: Sequence[ValidationCase],
    layout: str,
    max_events: int,
    device: torch.device,
    k: int = 10,
    batch_size: int = 256,
) -> dict[str, float]:
    """HR@k and NDCG@k of the next item, full ranking over all items."""
    model.eval()
    hits = ndcg = 0.0
    with torch.inference_mode():
        for start in range(0, len(cases), batch_size):
            chunk = cases[start : start + batch_size]
            seqs = [encode(c.history, vocab, layout, max_events) for c in chunk]
            ranked = top_items(next_item_logits(model, seqs, device), vocab, [c.exclude for c in chunk], k)
            for case, items in zip(chunk, ranked):
                ids = [i for i, _ in items]
                if case.target in ids:
                    hits += 1
                    ndcg += 1 / math.log2(ids.index(case.target) + 2)
    n = max(1, len(cases))
    return {f"HR@{k}": hits / n, f"NDCG@{k}": ndcg / n}


POOL_BATCHES = 50
"""Length bucketing sorts pools of this many batches' worth of examples."""


def _length(example: list[int] | tuple[list[int], int]) -> int:
    return len(example[0]) if isinstance(example, tuple) else len(example)


def _batches(examples: list, batch_size: int, rng: random.Random, by_length: bool = False) -> list[list]:
    """Shuffled batches of `batch_size` examples; `by_length` instead cuts length-sorted pools into batches of
    about the tokens a random batch holds (more short histories per batch, fewer long ones), so little compute
    goes to padding (full ML-1M: 1.74 padded tokens per real one at random, 1.03 bucketed) while every
    optimizer step still covers about as many next-item targets: with equal-count batches of like lengths,
    Adam gives a batch of a few short histories the step a batch of long ones gets (measured on ML-100K,
    HR@10 for seeds 0/1/2: equal-count buckets 0.196 / 0.204 / 0.185, random 0.212 / 0.230 / 0.205,
    token-sized buckets 0.217 / 0.208 / 0.227)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    if not by_length:
        return [[examples[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    budget = batch_size * sum(map(_length, examples)) / max(1, len(examples))  # a random batch's tokens
    pool, batches = batch_size * POOL_BATCHES, []
    for s in range(0, len(order), pool):
        batch: list = []
        for i in sorted(order[s : s + pool], key=lambda i: _length(examples[i])):
            if batch and (len(batch) + 1) * _length(examples[i]) > budget:  # padded to this, the longest so far
                batches.append(batch)
                batch = []
            batch.append(examples[i])
        batches.append(batch)
    rng.shuffle(batches)
    return batches


def validation_sample(cases: Sequence[ValidationCase], n: int, seed: int) -> list[ValidationCase]:
    """A fixed sample of `n` validation cases (all of them when n <= 0 or there are fewer): each epoch's early
    stopping ranks the same users, at a fraction of the cost of ranking everyone."""
    if n <= 0 or len(cases) <= n:
        return list(cases)
    return [cases[i] for i in sorted(random.Random(seed).sample(range(len(cases)), n))]


def batch_size(examples: int, settings: Settings) -> int:
    """`train_batch_size`, made smaller for small data so an epoch has `train_min_steps` optimizer steps.

    Measured on MovieLens-100K (943 sequences): batch 128 gives 8 steps per epoch and
    HR@10 0.194; batch 32 (30 steps) 0.221. MovieLens-1M-sized data keeps 128.
    """
    return max(8, min(settings.train_batch_size, examples // max(1, settings.train_min_steps)))


def train_model(
    model: PreTrainedModel,
    vocab: ItemVocab,
    histories: Sequence[History],
    settings: Settings,
    device: torch.device,
    validation: Sequence[ValidationCase] = (),
    epochs: int | None = None,
    progress: bool = True,
) -> TrainReport:
    """Train in place; with validation cases, keep the best epoch's weights (early stopping).

    Early stopping ranks a fixed sample of `train_valid_users` validation cases each epoch; batches are
    cut by length (`train_length_buckets`), so little compute goes to padding.
    """
    s = settings
    seed_everything(s.train_seed)
    rng = random.Random(s.train_seed)
    layout, max_events = s.model_layout, s.model_max_events
    seq2seq = is_encoder_decoder(model)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.train_lr, weight_decay=s.train_weight_decay)
    report, best = TrainReport(), _BestEpoch()
    started = time.monotonic()
    fixed = None if seq2seq else decoder_examples(histories, vocab, layout, max_events)
    validation = validation_sample(validation, s.train_valid_users, s.train_seed)
    hooks = _dropout_hooks(model, s.train_embedding_dropout, s.train_hidden_dropout)
    average = _Ema(model, s.train_ema_decay) if validation and s.train_ema_decay else None
    step = 0
    total_epochs = epochs or s.train_epochs
    every = summary_every(total_epochs)
    for epoch in range(1, total_epochs + 1):
        examples = fixed or t5_examples(histories, vocab, layout, max_events, s.t5_targets_per_sequence, rng)
        report.examples = len(examples)
        batches = _batches(examples, batch_size(len(examples), s), rng, by_length=s.train_length_buckets)
        total_steps = total_epochs * len(batches)
        loss, step = _train_epoch(
            model, optimizer, batches, vocab, seq2seq, s, device, step, total_steps, f"epoch {epoch}", progress, average
        )
        row = {"epoch": epoch, "loss": loss, "seconds": time.monotonic() - started}
        if validation:
            with average.swapped_in(model) if average else contextlib.nullcontext():
                row.update(evaluate_cases(model, vocab, validation, layout, max_events, device))
                row["seconds"] = time.monotonic() - started  # an epoch's time includes its validation
                best.update(model, epoch, row, report)
        report.history.append(row)
        stopping = bool(validation) and best.stale >= s.train_patience and epoch >= s.train_min_epochs
        if progress and (epoch == 1 or epoch % every == 0 or epoch == total_epochs or stopping):
            tqdm.write(epoch_summary(row, total_epochs, report.best_epoch, report.best))
        if stopping:
            break
    for hook in hooks:
        hook.remove()
    _finish(model, report, best, bool(validation), total_epochs, started, progress)
    return report


@dataclass
class _BestEpoch:
    """Early stopping: the best validation score so far, that epoch's weights, epochs since."""

    score: float = -1.0
    state: dict[str, torch.Tensor] | None = None
    stale: int = 0

    def update(self, model: PreTrainedModel, epoch: int, row: dict[str, float], report: TrainReport) -> None:
        if row["NDCG@10"] > self.score:
            self.score, self.stale = row["NDCG@10"], 0
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            report.best_epoch, report.best = epoch, dict(row)
        else:
            self.stale += 1


class _Ema:
    """An exponential moving average of a model's parameters (Polyak averaging).

    The average over the last ~1/(1 - decay) steps varies less between seeds than the weights of the
    last step, which still move with the last batches (measured: docs/configuration.md).
    """

    def __init__(self, model: PreTrainedModel, decay: float) -> None:
        self.decay = decay
        self.params = [p.detach().clone() for p in model.parameters()]

    def update(self, model: PreTrainedModel) -> None:
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, model: PreTrainedModel):
        """The model holds the averaged weights inside the block, its own again after it."""
        own = [p.detach().clone() for p in model.parameters()]
        torch._foreach_copy_([p.data for p in model.parameters()], self.params)
        try:
            yield
        finally:
            torch._foreach_copy_([p.data for p in model.parameters()], own)


def _train_epoch(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batches: list[list],
    vocab: ItemVocab,
    seq2seq: bool,
    settings: Settings,
    device: torch.device,
    step: int,
    total_steps: int,
    tqdm_label: str,
    progress: bool,
    average: _Ema | None = None,
) -> tuple[float, int]:
    """One pass over `batches` (linear warm-up, bf16 autocast on a GPU); (mean loss, optimizer steps so far)."""
    s = settings
    model.train()
    total, count = 0.0, 0
    # every target weighs the same, whichever batch it is in: a batch's summed loss is divided by the epoch's
    # mean targets per batch, not by its own count (length-bucketed batches of short histories would
    # otherwise count each of their few targets many times over)
    per_batch = max(1.0, sum(_targets(batch, vocab, seq2seq) for batch in batches) / max(1, len(batches)))
    bar = tqdm(batches, desc=tqdm_label, unit="batch", disable=not progress, leave=False)
    for batch in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, s)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            summed, targets = _loss(model, batch, vocab, seq2seq, device)
        optimizer.zero_grad(set_to_none=True)
        (summed / per_batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if average:
            average.update(model)
        step += 1
        total += summed.item()
        count += targets
        bar.set_postfix(loss=f"{total / max(1, count):.3f}")
    return total / max(1, count), step


def learning_rate(step: int, total_steps: int, settings: Settings) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up to `train_lr`, then constant, or with
    `train_lr_decay` down a cosine to 0 at `total_steps`: a fixed epoch budget ends at its best weights instead
    of still oscillating at the peak rate."""
    s = settings
    rate = s.train_lr * (min(1.0, (step + 1) / s.train_warmup_steps) if s.train_warmup_steps else 1.0)
    if s.train_lr_decay and total_steps > s.train_warmup_steps:
        done = max(0.0, (step - s.train_warmup_steps) / (total_steps - s.train_warmup_steps))
        rate *= 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return rate


def _targets(batch: list, vocab: ItemVocab, seq2seq: bool) -> int:
    """Next-item targets in a batch: one per example for T5, one per item token after the first for a decoder."""
    if seq2seq:
        return len(batch)
    items = vocab.item_token_range()
    return sum(1 for ids in batch for t in ids[1:] if t in items)


def _finish(
    model: PreTrainedModel,
    report: TrainReport,
    best: _BestEpoch,
    validated: bool,
    total_epochs: int,
    started: float,
    progress: bool,
) -> None:
    """Restore the best epoch's weights, fill in the report's best row and time, print the final line."""
    if best.state is not None:
        model.load_state_dict(best.state)
    if not validated:
        report.best_epoch, report.best = len(report.history), dict(report.history[-1]) if report.history else {}
    report.seconds = time.monotonic() - started
    if progress and report.history:
        ran = len(report.history)
        why = "early stopping" if ran < total_epochs else "max epochs"
        tqdm.write(
            f"done: {ran}/{total_epochs} epochs ({why}) in {report.seconds:.0f} s; best epoch "
            f"{report.best_epoch}: {_metrics_text(report.best)}"
        )
    model.eval()


def summary_every(total_epochs: int, lines: int = 8) -> int:
    """Print a progress summary every this many epochs: about `lines` lines for the whole run."""
    return max(1, math.ceil(total_epochs / lines))


def _metrics_text(row: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds"))


def epoch_summary(row: dict[str, float], total_epochs: int, best_epoch: int, best: dict[str, float]) -> str:
    """`epoch 16/60 (34 s): loss 3.1234, NDCG@10 0.4100, ...; best NDCG@10 0.4200 at epoch 12`."""
    line = f"epoch {int(row['epoch'])}/{total_epochs} ({row['seconds']:.0f} s): {_metrics_text(row)}"
    if best_epoch and "NDCG@10" in best:
        line += f"; best NDCG@10 {best['NDCG@10']:.4f} at epoch {best_epoch}"
    return line


def _dropout_hooks(model: PreTrainedModel, embedding_p: float, hidden_p: float) -> list:
    """Dropout on the input embeddings and on each decoder layer's output, while training only.

    Hooks, so checkpoints stay plain HF models. Llama/Qwen2 configs have
    attention dropout only; on small data SASRec-style dropout on the
    embeddings and the residual stream is the regulariser that matters.
    """

    def drop(p: float):
        def hook(module, args, out):
            if isinstance(out, tuple):
                return (F.dropout(out[0], p, module.training), *out[1:])
            return F.dropout(out, p, module.training)

        return hook

    hooks = []
    if embedding_p > 0:
        hooks.append(model.get_input_embeddings().register_forward_hook(drop(embedding_p)))
    layers = getattr(model.base_model, "layers", None)
    if hidden_p > 0 and layers is not None:
        hooks += [layer.register_forward_hook(drop(hidden_p)) for layer in layers]
    return hooks


def _loss(
    model: PreTrainedModel, batch: list, vocab: ItemVocab, seq2seq: bool, device: torch.device
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the next item (a full softmax over the assigned item tokens only), and the
    number of targets it sums over.

    Only positions followed by an item are projected (half of them in the
    item_type layout), and only onto item rows: cheaper than the full-vocabulary
    head and exactly the distribution that serving ranks.
    """
    items = vocab.item_token_range()
    head = model.get_output_embeddings().weight[items.start : items.stop]
    if seq2seq:
        inputs = right_padded([ids for ids, _ in batch], device=device)
        start = torch.full((len(batch), 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)
        out = model(**inputs, decoder_input_ids=start, output_hidden_states=True)
        hidden = out.decoder_hidden_states[-1][:, 0]
        if model.config.tie_word_embeddings:  # T5 rescales before its tied head
            hidden = hidden * (model.config.d_model**-0.5)
        targets = torch.tensor([t for _, t in batch], dtype=torch.long, device=device)
        return F.cross_entropy((hidden @ head.T).float(), targets - items.start, reduction="sum"), len(batch)
    inputs = right_padded(batch, [item_labels(ids, vocab) for ids in batch], device=device)
    labels = inputs.pop("labels")[:, 1:]
    hidden = model.base_model(**inputs).last_hidden_state[:, :-1]
    keep = labels != -100
    return _chunked_cross_entropy(hidden[keep], head, labels[keep] - items.start), int(keep.sum())


CE_ROWS = 512
"""Targets per slice of the training loss: a slice's logits are 512 x 3,706 floats (7.6 MB) on MovieLens-1M."""


def _chunked_cross_entropy(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of `hidden @ head.T`, computed `CE_ROWS` targets at a time: the same loss and
    gradient, but no logits matrix of every target by every item (7,000 x 3,706 on a MovieLens-1M batch).
    Measured on the 2 cores: the head and loss of such a batch 0.27-0.35 s forward and backward at once, 0.16 s
    sliced."""
    return sum(
        (
            F.cross_entropy((hidden[s : s + CE_ROWS] @ head.T).float(), targets[s : s + CE_ROWS], reduction="sum")
            for s in range(0, len(targets), CE_ROWS)
        ),
        hidden[:0].sum(),  # zero, in the graph, for a batch without targets
    )
