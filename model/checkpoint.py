"""Versioned checkpoints: safetensors weights + vocabulary + manifest with a sha256 of every file.

Written to a temporary directory and renamed into place, so a reader never
sees half a checkpoint. Loading verifies every hash first and refuses a
checkpoint that does not match, has unlisted files, or has no safetensors
weights; weights are only ever read with safetensors (never torch.load).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, T5ForConditionalGeneration

from rtrec.model.vocab import ItemVocab

MANIFEST = "manifest.json"
VOCAB = "vocab.json"
META = "rtrec.json"


class CheckpointError(RuntimeError):
    """A checkpoint that must not be served: missing, tampered with, or unreadable."""


@dataclass
class Checkpoint:
    model: PreTrainedModel
    vocab: ItemVocab
    manifest: dict[str, Any]
    path: Path

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def layout(self) -> str:
        return self.manifest["meta"]["layout"]

    @property
    def max_events(self) -> int:
        return int(self.manifest["meta"]["max_events"])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def new_version(prefix: str = "gen") -> str:
    return f"{prefix}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.urandom(2).hex()}"


def save_checkpoint(
    model: PreTrainedModel,
    vocab: ItemVocab,
    root: Path,
    meta: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    training_window: dict[str, Any] | None = None,
    version: str | None = None,
) -> Path:
    """Write `root/<version>/` atomically and return its path."""
    version = version or new_version()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{version}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    vocab.save(tmp / VOCAB)
    (tmp / META).write_text(json.dumps(meta, indent=2))
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {
        "version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "family": model.config.model_type,
        "meta": meta,
        "metrics": metrics or {},
        "training_window": training_window or {},
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    final = root / version
    os.replace(tmp, final)
    return final


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest, after checking every file's sha256; raises CheckpointError otherwise."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, str] = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    present = {p.name for p in path.iterdir() if p.is_file()} - {MANIFEST}
    if present != set(files):
        raise CheckpointError(f"{path}: files differ from the manifest: {sorted(present ^ set(files))}")
    if not any(name.endswith(".safetensors") for name in files):
        raise CheckpointError(f"{path}: no safetensors weights")
    for name, expected in files.items():
        actual = sha256_file(path / name)
        if actual != expected:
            raise CheckpointError(f"{path}: sha256 mismatch for {name}")
    return manifest


def load_checkpoint(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Checkpoint:
    """Verify, then load weights (safetensors only) and the vocabulary."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    try:
        config = AutoConfig.from_pretrained(path)
        cls = T5ForConditionalGeneration if config.is_encoder_decoder else AutoModelForCausalLM
        model = cls.from_pretrained(path, use_safetensors=True, dtype=dtype or torch.float32)
        vocab = ItemVocab.load(path / VOCAB)
    except Exception as exc:  # shape mismatch, bad config, ...: refuse, never half-load
        raise CheckpointError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from exc
    if model.get_input_embeddings().num_embeddings < vocab.size:
        raise CheckpointError(f"{path}: embedding has fewer rows than the vocabulary needs")
    model.to(device).eval()
    return Checkpoint(model, vocab, manifest, path)


def latest_checkpoint(root: Path) -> Path | None:
    """CURRENT if present (the promoted version), else the newest version directory."""
    root = Path(root)
    current = root / "CURRENT"
    if current.is_file():
        candidate = root / current.read_text().strip()
        if candidate.is_dir():
            return candidate
    versions = (
        sorted(
            (p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime
        )
        if root.is_dir()
        else []
    )
    return versions[-1] if versions else None


def set_current(root: Path, version: str) -> None:
    """Point CURRENT at `version` atomically (write temp file, rename)."""
    tmp = Path(root) / ".CURRENT.tmp"
    tmp.write_text(version)
    os.replace(tmp, Path(root) / "CURRENT")
