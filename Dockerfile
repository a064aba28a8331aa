# One image for every rtrec worker; docker-compose picks the module to run.
# EXTRAS=gpu adds vLLM (build on/for a CUDA machine): docker compose --profile gpu build
FROM python:3.11-slim
ARG EXTRAS=""
WORKDIR /app
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY workers ./workers
COPY model ./model
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"
ENV RTREC_RUN_DIR=/tmp/rtrec
CMD ["python", "-m", "workers.state"]
