"""Print pip requirement lines from pyproject.toml without installing the project (for the images' layer cache).

    python deploy/requirements.py [--extra NAME] [--exclude DIST ...] [--deps-of DIST --drop DIST ...]

--deps-of adds the requirements of an installed distribution (Dockerfile.gpu installs faust-streaming with
--no-deps and its requirements without the click cap, as .ci/vllm-env.sh does).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path


def name_of(req: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pyproject", default=str(Path(__file__).resolve().parent.parent / "pyproject.toml"))
    ap.add_argument("--extra", action="append", default=[])
    ap.add_argument("--exclude", action="append", default=[])
    ap.add_argument("--deps-of", action="append", default=[])
    ap.add_argument("--drop", action="append", default=[])
    args = ap.parse_args()
    project = tomllib.loads(Path(args.pyproject).read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in args.extra:
        reqs += project["optional-dependencies"][extra]
    skip = {n.lower() for n in args.exclude}
    out = [r for r in reqs if name_of(r) not in skip and name_of(r) != project["name"]]
    drop = {n.lower() for n in args.drop}
    for dist in args.deps_of:
        for line in md.requires(dist) or []:
            req, _, marker = line.partition(";")
            if "extra" in marker or name_of(req) in drop:
                continue
            out.append(line)
    sys.stdout.write("".join(f"{r}\n" for r in out))


if __name__ == "__main__":
    main()
