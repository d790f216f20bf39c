# syntax=docker/dockerfile:1
#
# Reframe Cluster image: one image, several commands (see docs/deploy.md).
#   reframe worker    (default)  Celery worker, metrics/health on :17300
#   reframe exporter             cluster-wide gauges on :17300 (one replica)
#   reframe serve                HTTP API (FastAPI on uvicorn) on :8080 (REFRAME_API_PORT): /v1,
#                                POST /v1/fal/webhook, /healthz, /readyz, /metrics on the same port
#   reframe emulator             fal emulator for staging (the `emulator` extra is installed)
#
# Base image: both stages use exactly the same image, pinned to a Python patch release and a
# Debian suite (tests/deploy asserts the two FROM lines match). The digest is not pinned here:
# this repository is built and checked without access to a registry, so the digest cannot be
# resolved or verified in CI. At release, resolve it once and append it to both lines
# (`python:3.11.14-slim-bookworm@sha256:...`) or pin it in the registry mirror's policy.
# ---------------------------------------------------------------------------------------
# builder: build the wheel from the sources and install it (+ extra `emulator`) into a venv
# ---------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Only what the wheel is built from (.dockerignore keeps tests, k8s/ and caches out anyway).
COPY pyproject.toml README.md ./
COPY config/ config/
COPY producer/ producer/
COPY worker/ worker/
COPY falemu/ falemu/
COPY reframe/ reframe/

# Build the wheel (build backend: hatchling, fetched into pip's isolated build env), then
# install it with its runtime dependencies into /opt/venv: the only thing the runtime copies.
RUN python -m venv /opt/venv \
 && pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-cache-dir "$(ls /wheels/reframe_cluster-*.whl)[emulator]" \
 && /opt/venv/bin/pip check

# ---------------------------------------------------------------------------------------
# runtime: the same base, the venv, a non-root user; no sources, tests or build tools
# ---------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="reframe-cluster" \
      org.opencontainers.image.description="Reframe Cluster: Celery workers, exporter, HTTP API and fal emulator" \
      org.opencontainers.image.licenses="Apache-2.0"

# UID/GID 10001 match runAsUser/runAsGroup in k8s/ (a test asserts both).
RUN groupadd --system --gid 10001 reframe \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin reframe

COPY --from=builder /opt/venv /opt/venv

# HOME=/tmp: the only writable path (an emptyDir in Kubernetes; the root fs is read-only).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    PATH=/opt/venv/bin:$PATH

USER 10001:10001

# Smoke test: every package imports (the API's app and server too), the console script runs and
# the emulator's ffmpeg is there.
RUN python -c "import config, producer, worker, falemu, reframe.cli, reframe.api.server, imageio_ffmpeg; imageio_ffmpeg.get_ffmpeg_exe()" \
 && reframe --help > /dev/null \
 && reframe serve --help > /dev/null

# worker/exporter metrics and health
EXPOSE 17300
# reframe serve (REFRAME_API_PORT)
EXPOSE 8080

# Exec form: `reframe` is PID 1 and receives SIGTERM itself (Celery's main process only,
# never the pool threads); Kubernetes sets REMAP_SIGTERM=SIGQUIT for the soft shutdown.
# No HEALTHCHECK: Kubernetes ignores it (k8s/ defines startup/liveness/readiness probes), and
# one image runs commands on different ports (see k8s/.checkov.yaml, CKV_DOCKER_2).
# `reframe serve` stops on SIGTERM too (uvicorn: open streams get 5 s, reframe/api/server.py).
ENTRYPOINT ["reframe"]
CMD ["worker"]
