# The fill-mask service: `microbert-serve` on port 8000, as a non-root user.
#
# GPU (default): a CUDA runtime base and PyPI's torch (a CUDA 13 build, matching the base).
#   docker build -f docker/serve.Dockerfile -t microbert-serve .
# CPU, from the same file: any Debian/Ubuntu base with Python >= 3.11 and the CPU build of torch, by exact
# version, from a local wheel in docker/wheels/ or from an index:
#   docker build -f docker/serve.Dockerfile -t microbert-serve:cpu \
#     --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#     --build-arg TORCH_SPEC=torch==2.13.0+cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# A build machine that trusts its own CA: pass it as a secret, never a layer: --secret id=pip_ca,src=FILE.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# --- python: Python, a venv, torch and the project's core dependencies. The same instructions open
# docker/train.Dockerfile and docker/serve.Dockerfile, so one image's build reuses the other's layers
# and both share them on disk. Dependencies come before any source: a code change reuses them.
FROM ${BASE_IMAGE} AS python
# The CUDA images have no Python; Debian's python images have it and its venv module.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
# WHEELS_ONLY=1: torch and all it needs come from docker/wheels/ (a wheelhouse: docker/gpu-images.sh
# downloads the CUDA build's ~2.7 GB once), none from an index.
ARG WHEELS_ONLY=
# torch alone first, by exact version (TORCH_SPEC): a CPU image that asked for +cpu fails here if the
# wheel is missing, instead of quietly downloading the multi-GB CUDA build. Later installs keep it.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_ca \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi; \
    if [ -n "$WHEELS_ONLY" ]; then export PIP_NO_INDEX=1; fi; \
    pip install --find-links /wheels "$TORCH_SPEC" \
    && python3 -c 'from importlib.metadata import version; print("torch==" + version("torch"))' \
       > /opt/venv/constraints.txt
WORKDIR /opt/venv/requirements
COPY pyproject.toml docker/requirements.py ./
RUN --mount=type=secret,id=pip_ca \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python3 requirements.py pyproject.toml build > build.txt \
    && python3 requirements.py pyproject.toml core > core.txt \
    && pip install --constraint /opt/venv/constraints.txt -r build.txt -r core.txt

# --- wheel: the project itself, built beside the image ---------------------------------------------
FROM python AS wheel
COPY README.md /src/
COPY pyproject.toml /src/
COPY microbert /src/microbert
COPY serve /src/serve
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /dist /src

# --- the image ----------------------------------------------------------------------------------------
FROM python
# jemalloc, which microbert-serve preloads into its processes: with glibc's malloc the processes that
# run the model grew under sustained load (serve/allocator.py).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=secret,id=pip_ca \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python3 requirements.py pyproject.toml serve > serve.txt \
    && pip install --constraint /opt/venv/constraints.txt -r serve.txt
ARG APP_UID=1000
# CUDA's Ubuntu images ship a user with uid 1000: make room for ours, whose uid matches most hosts' first
# user, so files in a mounted run folder belong to them.
RUN if getent passwd "$APP_UID" >/dev/null; then userdel --remove "$(id -nu "$APP_UID")"; fi \
    && useradd --create-home --uid "$APP_UID" --user-group --shell /usr/sbin/nologin microbert
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install --no-deps --no-cache-dir /dist/*.whl
ENV MICROBERT_HOST=0.0.0.0 MICROBERT_PORT=8000 MICROBERT_MODEL_DIR=/model
USER ${APP_UID}
WORKDIR /home/microbert
EXPOSE 8000
# /ready answers 200 once the model is loaded, 503 before; urllib raises on anything but 2xx.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('MICROBERT_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["microbert-serve"]
