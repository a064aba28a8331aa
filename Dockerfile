# One image for every rtrec worker; docker-compose picks the module to run.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY workers ./workers
COPY model ./model
RUN pip install --no-cache-dir .
ENV RTREC_RUN_DIR=/tmp/rtrec
CMD ["python", "-m", "workers.state"]
