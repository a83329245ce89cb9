# The worker, beat and emulator image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY worker ./worker
COPY emulator ./emulator
# The image runs the emulator too (docker-compose.yml): the [emulator] extra. A production-only
# image needs just `pip install -c constraints.txt .`. constraints.txt pins every dependency at
# the version the tests ran with (make constraints).
RUN pip install --no-cache-dir -c constraints.txt '.[emulator]' && useradd --create-home snowpipe \
    && mkdir -p /data /keys && chown snowpipe /data /keys
USER snowpipe
