# One CPU image for every rtrec worker; docker-compose picks the module to run. GPU (vLLM): Dockerfile.gpu.
# Layers: torch (CPU wheel) -> the other dependencies (from pyproject.toml alone) -> the code, so an edit to the
# code reinstalls nothing. The embedded dev servers (the `embedded` extra) are not installed: the image talks to
# the Kafka and Redis named by RTREC_KAFKA_BOOTSTRAP / RTREC_REDIS_URL.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app

# torch from PyTorch's CPU wheel index: PyPI's Linux torch is the CUDA build (gigabytes of nvidia-* wheels).
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

# The dependencies, from pyproject.toml only (torch==2.13.0 is satisfied by 2.13.0+cpu and stays).
COPY pyproject.toml deploy/requirements.py ./
RUN python requirements.py > /tmp/requirements.txt \
 && echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt -r /tmp/requirements.txt \
 && python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"

# The code (no dependency resolution: everything is above).
COPY README.md ./
COPY stream ./stream
COPY workers ./workers
COPY model ./model
RUN pip install --no-deps .

# An unprivileged user; /checkpoints exists and is its own so a fresh named volume mounted there is writable.
RUN useradd --system --uid 10001 --create-home --home-dir /home/rtrec rtrec \
 && mkdir -p /checkpoints /tmp/rtrec && chown rtrec:rtrec /checkpoints /tmp/rtrec
USER rtrec
ENV RTREC_RUN_DIR=/tmp/rtrec HOME=/home/rtrec
CMD ["python", "-m", "rtrec.workers.state"]
