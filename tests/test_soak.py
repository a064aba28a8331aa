"""The soak bench end to end (slow: run with -m slow); its figures are printed, only counts are asserted."""

from __future__ import annotations

import pytest
from rich.console import Console

from rtrec.stream.settings import Settings
from rtrec.workers.bench.soak import run_soak

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_a_short_soak_loses_duplicates_and_fails_nothing(tmp_path):
    result = run_soak(
        Settings(kafka_bootstrap=None, redis_url=None),
        minutes=0.75,
        event_rate=300,
        request_rate=30,
        promote_every_s=15,
        users=300,
        sample_s=2,
        plot=tmp_path / "soak.png",
        console=Console(),
    )
    assert result["events"] > 10_000 and result["requests"] > 1_000
    assert (result["lost"], result["twice"], result["unanswered"], result["answered_twice"], result["failed"]) == (
        0,
        0,
        0,
        0,
        0,
    )
    assert result["promotions"] >= 2 and result["drained"]
    assert (tmp_path / "soak.png").exists()
