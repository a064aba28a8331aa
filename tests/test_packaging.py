"""The installed distribution: `rtrec` is its only top-level import name (issue 15), and it carries its data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (path,) = out.glob("rtrec-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_only_rtrec_as_a_top_level_name(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"rtrec"}
    packages = {name.rsplit("/", 1)[0] for name in wheel.namelist() if name.endswith("/__init__.py")}
    assert {"rtrec/stream", "rtrec/workers", "rtrec/model"} <= packages


def test_every_source_module_and_the_sample_data_are_in_the_wheel(wheel):
    names = set(wheel.namelist())
    for folder in ("stream", "workers", "model"):
        for module in (ROOT / folder).rglob("*.py"):
            assert f"rtrec/{module.relative_to(ROOT).as_posix()}" in names, f"{module} is not packaged"
    assert "rtrec/stream/data/sample_events.jsonl.gz" in names


def test_the_console_script_points_into_the_namespace(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "rtrec = rtrec.workers.cli:app" in wheel.read(entry_points).decode()
