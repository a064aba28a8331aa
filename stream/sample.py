"""The bundled sample: synthetic events the demo replays, shipped as a file in the package.

It is exactly ``generate_events(SAMPLE_CONFIG)`` (a test checks), so anyone can
regenerate it with ``rtrec generate --sample``.
"""

from __future__ import annotations

from pathlib import Path

from rtrec.stream.synthetic import SyntheticConfig

SAMPLE_CONFIG = SyntheticConfig(n_users=200, n_items=600, n_clusters=12, n_events=12_000, seed=2026)
SAMPLE_PATH = Path(__file__).parent / "data" / "sample_events.jsonl.gz"
