# The worker, beat and emulator image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY emulator ./emulator
COPY config ./config
RUN pip install --no-cache-dir . && useradd --create-home snowpipe \
    && mkdir -p /data /keys && chown snowpipe /data /keys
USER snowpipe
