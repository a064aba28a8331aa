"""The checkpoint store: versioned checkpoints, the CURRENT pointer, promotion history and retention.

Layout of the store directory (local by default; an object store would
implement the same methods)::

    <root>/<version>/          one checkpoint (written to a temp dir, then renamed)
    <root>/CURRENT             the version workers serve (replaced atomically)
    <root>/promotions.jsonl    every promotion and rollback, oldest first (rollback reads it)
    <root>/decisions.jsonl     every trainer decision, promoted or not, with the reason

Retention keeps the newest `keep` versions plus every version that is CURRENT
or the one a rollback would return to.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtrec.model.checkpoint import MANIFEST, CheckpointError, latest_checkpoint, set_current, verify_checkpoint

PROMOTIONS = "promotions.jsonl"
DECISIONS = "decisions.jsonl"


@dataclass(frozen=True)
class VersionInfo:
    version: str
    path: Path
    created_at: str
    metrics: dict[str, Any]
    training_window: dict[str, Any]
    current: bool


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class CheckpointStore:
    """Versioned checkpoints under one directory, with an atomically replaced CURRENT pointer."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---- reading ---------------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        """Every complete version, oldest first (by manifest created_at, then name)."""
        if not self.root.is_dir():
            return []
        current = self.current_version()
        out = []
        for path in self.root.iterdir():
            if not path.is_dir() or path.name.startswith(".") or not (path / MANIFEST).is_file():
                continue
            try:
                manifest = json.loads((path / MANIFEST).read_text())
            except ValueError:
                continue
            out.append(
                VersionInfo(
                    path.name,
                    path,
                    manifest.get("created_at", ""),
                    manifest.get("metrics", {}),
                    manifest.get("training_window", {}),
                    path.name == current,
                )
            )
        return sorted(out, key=lambda v: (v.created_at, v.path.stat().st_mtime, v.version))

    def current_version(self) -> str | None:
        pointer = self.root / "CURRENT"
        if pointer.is_file():
            return pointer.read_text().strip() or None
        return None

    def current_path(self) -> Path | None:
        """The served checkpoint: CURRENT, else (a store that never promoted) the newest version."""
        return latest_checkpoint(self.root)

    def path_of(self, version: str) -> Path:
        path = self.root / version
        if not (path / MANIFEST).is_file() or version.startswith(".") or "/" in version:
            raise CheckpointError(f"no version {version!r} in {self.root}")
        return path

    def promotions(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.root / PROMOTIONS)

    def decisions(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.root / DECISIONS)

    # ---- changing --------------------------------------------------------------------
    def promote(self, version: str, reason: str = "manual") -> Path:
        """Verify `version` (every sha256) and point CURRENT at it; logged for rollback."""
        path = self.path_of(version)
        verify_checkpoint(path)
        previous = self.current_version()
        set_current(self.root, version)
        _append_jsonl(
            self.root / PROMOTIONS, {"at": _now(), "version": version, "previous": previous, "reason": reason}
        )
        return path

    def rollback(self) -> Path:
        """Return to the version served before the current one (as the promotion log says)."""
        current = self.current_version()
        for row in reversed(self.promotions()):
            if row["version"] == current and row.get("previous") and not row.get("rollback_of"):
                target = row["previous"]
                path = self.path_of(target)
                verify_checkpoint(path)
                set_current(self.root, target)
                _append_jsonl(
                    self.root / PROMOTIONS,
                    {
                        "at": _now(),
                        "version": target,
                        "previous": current,
                        "reason": f"rollback from {current}",
                        "rollback_of": current,
                    },
                )
                return path
        raise CheckpointError(f"nothing to roll back to: no promotion log entry before {current!r}")

    def record_decision(self, decision: dict[str, Any]) -> None:
        _append_jsonl(self.root / DECISIONS, {"at": _now(), **decision})

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` versions, never CURRENT or its rollback target."""
        protected = {self.current_version()}
        for row in reversed(self.promotions()):
            if row["version"] == self.current_version():
                protected.add(row.get("previous"))
                break
        versions = self.versions()
        doomed = [v for v in versions[: max(0, len(versions) - keep)] if v.version not in protected]
        for v in doomed:
            trash = self.root / f".trash-{v.version}"
            os.replace(v.path, trash)  # readers never see a half-deleted version
            shutil.rmtree(trash, ignore_errors=True)
        return [v.version for v in doomed]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
